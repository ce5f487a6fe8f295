"""The numerically safe range of a problem's numbers, relative to the problem's own scale.

Every backend sums losses and costs, scales them (the MIP backends bring the objective to
O(10³) and the budget rows to O(1); CP-SAT rounds them to integers), and squares the
interaction factor. A value far outside the others' scale silently destroys that arithmetic:
one loss of 1e308 (meant as "never choose this") made the MIP backends' scaled losses of all
other options vanish below their tolerances, and they reported a wrong "optimum". So bitsack
refuses, with the field named:

- a loss with ``|ℓ| > LOSS_RANGE · s``, where ``s`` is the median of the problem's nonzero
  ``|ℓ|`` (its typical loss); interaction terms are held to the same scale: every
  ``½‖U_i‖²`` (the standalone size of an option's factor column) and every ``|pair value|``;
- a cost with ``c > COST_RANGE · m_r``, ``m_r`` the median nonzero cost of its resource;
- totals that could overflow what a backend forms from them: ``Σ_u max_o |ℓ|``,
  ``Σ_u max_o c_r``, ``Σ |pair values|``, ``(Σ_u max_o ‖U_{u,o}‖)²`` and every limit must stay
  at most ``MAX_MAGNITUDE`` (1e150), so sums, products with multipliers, and squares stay far
  inside float64.

``LOSS_RANGE = COST_RANGE = 1e9``: real problems span about 1e3 (the bundled SmolLM2 problem:
largest loss 1.5e3 × its median; largest memory cost 4.7 × its median). To forbid an option,
leave it out of the unit (or ``restrict_options``) rather than giving it a huge loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bitsack.errors import ValidationError

if TYPE_CHECKING:
    import numpy as np

#: Largest |loss| (and interaction size) allowed, as a multiple of the median nonzero |loss|.
LOSS_RANGE = 1e9
#: Largest cost allowed, as a multiple of the median nonzero cost of the same resource.
COST_RANGE = 1e9
#: Largest total (and limit) allowed: far from float64's 1.8e308 even when squared... twice.
MAX_MAGNITUDE = 1e150

#: Longest solver time limit accepted (about 116 days; beyond it a limit means nothing).
MAX_TIME_LIMIT_S = 1e7
#: Seeds are passed to the solvers as 32-bit integers.
MAX_SEED = 2**31 - 1
#: Most worker threads a solver may be given.
MAX_THREADS = 1024

RANGE_TEXT = (f"|loss| <= {LOSS_RANGE:g} x the median nonzero |loss|, cost <= {COST_RANGE:g} x "
              f"the median nonzero cost of its resource, totals and limits <= "
              f"{MAX_MAGNITUDE:g}")


def check_limit_value(limit: float, path: str, no_limit: str) -> float:
    """A resource limit: finite, ≥ 0 and at most ``MAX_MAGNITUDE``; ``no_limit`` is how the
    caller's input says "no limit" (``null`` in a file, ``'none'`` on the command line).

    Raises:
        ValidationError: naming ``path``.
    """
    if not math.isfinite(limit):
        raise ValidationError(path, f"{limit!r} is not finite; valid: a number >= 0, or "
                              f"{no_limit} for no limit")
    if limit < 0:
        raise ValidationError(path, f"{limit!r} is negative; valid: a number >= 0, or "
                              f"{no_limit} for no limit")
    check_limit_magnitude(limit, path)
    return limit


def check_limit_magnitude(value: float, path: str) -> None:
    """Refuse a limit above ``MAX_MAGNITUDE`` (use no limit instead).

    Raises:
        ValidationError: naming ``path``.
    """
    if abs(value) > MAX_MAGNITUDE:
        raise ValidationError(path, f"{value!r} is above {MAX_MAGNITUDE:g}; valid: a limit "
                              f"<= {MAX_MAGNITUDE:g}, or none/null for no limit")


def check_ranges(units: Sequence[Any], resources: Sequence[str], *,
                 pairs: Sequence[Any] = (), U: np.ndarray | None = None,
                 u_path: str = "interactions.U") -> None:
    """Refuse losses, costs and interaction terms outside the safe range (module docstring).

    Args:
        units: validated ``Unit`` objects (options in file order).
        resources: resource names to check costs of.
        pairs: explicit interaction pairs (``value`` attribute).
        U: the low-rank factor [N, n_options], if any.
        u_path: how to name the factor in messages.

    Raises:
        ValidationError: the first offending field, with its value and the valid range.
    """
    import numpy as np
    counts = np.fromiter((len(u.options) for u in units), dtype=np.int64, count=len(units))
    start = np.concatenate([[0], np.cumsum(counts)])
    n = int(start[-1])
    if n == 0:
        return
    loss = np.fromiter((o.loss for u in units for o in u.options), dtype=np.float64, count=n)

    def where(k: int) -> tuple[int, int]:
        ui = int(np.searchsorted(start, k, side="right") - 1)
        return ui, k - int(start[ui])

    scale = _median_nonzero(np.abs(loss))
    if U is not None and U.size:
        half_sq = 0.5 * np.einsum("ki,ki->i", U, U)
        if scale is None:
            scale = _median_nonzero(half_sq)
    if scale is not None:
        bad = np.flatnonzero(np.abs(loss) > LOSS_RANGE * scale)
        if bad.size:
            ui, j = where(int(bad[0]))
            raise ValidationError(f"units[{ui}].options[{j}].loss", _too_far(
                float(loss[bad[0]]), "loss", scale, LOSS_RANGE,
                "to forbid an option, leave it out of the unit"))
    _check_total(np.maximum.reduceat(np.abs(loss), start[:-1]), "units[*].options[*].loss",
                 "Σ over units of the largest |loss|")

    for name in resources:
        cost = np.fromiter((o.cost.get(name, 0.0) for u in units for o in u.options),
                           dtype=np.float64, count=n)
        m = _median_nonzero(cost)
        if m is None:
            continue
        bad = np.flatnonzero(cost > COST_RANGE * m)
        if bad.size:
            ui, j = where(int(bad[0]))
            raise ValidationError(f"units[{ui}].options[{j}].cost.{name}", _too_far(
                float(cost[bad[0]]), f"{name} cost", m, COST_RANGE, "check its unit"))
        _check_total(np.maximum.reduceat(cost, start[:-1]), f"units[*].options[*].cost.{name}",
                     f"Σ over units of the largest {name} cost")

    if U is not None and U.size:
        if scale is not None:
            bad = np.flatnonzero(half_sq > LOSS_RANGE * scale)
            if bad.size:
                ui, j = where(int(bad[0]))
                raise ValidationError(u_path, f"column {int(bad[0])} (units[{ui}].options"
                                      f"[{j}]): " + _too_far(float(half_sq[bad[0]]),
                                                             "½‖U_i‖²", scale, LOSS_RANGE,
                                                             "rescale the factor"))
        norms = np.sqrt(np.einsum("ki,ki->i", U, U))
        reach = float(np.sum(np.maximum.reduceat(norms, start[:-1])))
        if not reach <= math.sqrt(MAX_MAGNITUDE):
            raise ValidationError(u_path, f"the interaction term can reach {reach ** 2:.3g} "
                                  f"(Σ over units of the largest ‖U_i‖, squared); valid: at "
                                  f"most {MAX_MAGNITUDE:g}")
    if pairs:
        values = np.array([p.value for p in pairs], dtype=np.float64)
        if scale is not None:
            bad = np.flatnonzero(np.abs(values) > LOSS_RANGE * scale)
            if bad.size:
                raise ValidationError(f"interactions.pairs[{int(bad[0])}].value", _too_far(
                    float(values[bad[0]]), "pair value", scale, LOSS_RANGE,
                    "drop the pair or rescale"))
        _check_total(np.abs(values), "interactions.pairs[*].value", "Σ |pair values|")


def _median_nonzero(values: np.ndarray) -> float | None:
    import numpy as np

    nz = values[values != 0]
    return float(np.median(nz)) if nz.size else None


def _too_far(value: float, what: str, scale: float, factor: float, hint: str) -> str:
    import numpy as np

    with np.errstate(over="ignore"):
        ratio = float(np.float64(abs(value)) / np.float64(scale))
    times = f"{ratio:.3g} times" if math.isfinite(ratio) else "more than 1e308 times"
    return (f"{value:.6g} is {times} the problem's typical {what} "
            f"(median nonzero {scale:.6g}); valid: at most {factor:g} times it, i.e. "
            f"<= {factor * scale:.6g}, so that every backend computes in a safe numeric range "
            f"({hint})")


def _check_total(per_unit: np.ndarray, path: str, what: str) -> None:
    import numpy as np

    with np.errstate(over="ignore"):
        total = float(np.sum(per_unit))
    if not total <= MAX_MAGNITUDE:
        raise ValidationError(path, f"{what} is {total:.6g}; valid: at most {MAX_MAGNITUDE:g} "
                              "(sums beyond it overflow the backends' float64 arithmetic)")
