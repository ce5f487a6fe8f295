"""A plan: what every unit of a model becomes, and the packed segments that follows for each
weight matrix.

A plan maps unit ids (``bitsack.models`` ids, e.g. ``L3.attn.g1``) to a ``Choice``: prune, or
keep at ``bits`` (1..8) with ``group_size`` columns per quantization group, or keep in fp16
(16). Plans come from a solved problem (``plan_from_solution``: option ids ``prune``, ``b<k>``
at the problem's default group size, ``b<k>g<G>``), from the measured search, or are written
by hand (``{unit: bits}`` at a default group size, or ``{unit: "b3g128"}``).

``matrix_segments`` turns a plan into per-matrix segments: units own whole rows (q/k/v,
gate/up, embeddings) or whole columns (o_proj, down_proj) of a matrix, so once the units of a
layer are ordered by their choice, each matrix is a run of contiguous segments with one bits
and one group size each.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bitsack.errors import ModelError, ValidationError
from bitsack.kernels.formats import SUPER_COLS, num_groups

#: The most token-id row ranges a vocabulary matrix may be split into (``vocab_groups``;
#: ``bitsack.models.adapter.vocab_ranges``).
MAX_VOCAB_GROUPS = 16


def check_vocab_groups(value: Any, field: str = "vocab_groups") -> int:
    """``value`` if it is a valid ``vocab_groups``: an integer 1..MAX_VOCAB_GROUPS.

    Raises:
        ValidationError: otherwise, naming ``field``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or \
            not 1 <= value <= MAX_VOCAB_GROUPS:
        raise ValidationError(field, f"{value!r}; valid: an integer 1..{MAX_VOCAB_GROUPS} "
                              "(token-id row ranges of the embedding; 1: one unit)")
    return value


@dataclass(frozen=True, order=True)
class Choice:
    """One unit's fate: ``bits`` 0 (pruned), 1..8 (packed with ``group_size``) or 16 (fp16)."""

    bits: int
    group_size: int | None = None

    @property
    def pruned(self) -> bool:
        return self.bits == 0

    @property
    def option_id(self) -> str:
        """The problem-file option id (``prune``, ``b16``, ``b3g64``)."""
        if self.bits == 0:
            return "prune"
        if self.bits == 16 or self.group_size is None:
            return f"b{self.bits}"
        return f"b{self.bits}g{self.group_size}"

    def __str__(self) -> str:
        return self.option_id


def nominal_bits(choice: Choice, scale_bits: int | None = None) -> float:
    """Bits per weight of a choice on a row whose width the group size and 256 divide
    (``bits + (16 + bits)/G``: an fp16 scale and a ``bits``-bit zero point per group; with
    ``scale_bits`` S, ``bits + (S + bits)/G + 16/256``: S-bit scale codes and an fp16 step per
    256 columns)."""
    if choice.bits in (0, 16):
        return float(choice.bits)
    if scale_bits is None:
        return choice.bits + (16.0 + choice.bits) / choice.group_size
    return choice.bits + (scale_bits + choice.bits) / choice.group_size + 16.0 / SUPER_COLS


PRUNE = Choice(0)
FP16 = Choice(16)


def parse_choice(value: Any, default_group_size: int, field: str = "plan") -> Choice:
    """A ``Choice`` from an option id (``prune``, ``b4``, ``b3g128``), a bit count (0 = prune,
    at ``default_group_size``) or a ``Choice``.

    Raises:
        ValidationError: anything else (names ``field`` and what is valid).
    """
    if isinstance(value, Choice):
        bits, g = value.bits, value.group_size
    elif isinstance(value, str):
        from bitsack.solver.problem import parse_option

        try:
            spec = parse_option(value)
        except ValueError as exc:
            raise ValidationError(field, str(exc).removeprefix("option: ")) from None
        bits, g = spec.bits, spec.group_size
    elif isinstance(value, int) and not isinstance(value, bool):
        bits, g = value, None
    else:
        raise ValidationError(field, f"{value!r}; valid: an option id or a bit count")
    if bits == 0:
        return PRUNE
    if bits == 16:
        if g is not None:
            raise ValidationError(field, f"{value!r}: 16 bits (fp16) has no group size")
        return FP16
    if not 1 <= bits <= 8:
        raise ValidationError(field, f"{value!r}: {bits} bits has no packed layout; valid: "
                              "0 (prune), 1..8 or 16")
    g = default_group_size if g is None else g
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValidationError(field, f"{value!r}: group size {g!r}; valid: a positive integer")
    return Choice(bits, g)


def normalize_plan(plan: Mapping[str, Any], default_group_size: int) -> dict[str, Choice]:
    """``{unit: Choice}`` from a plan of option ids, bit counts or choices."""
    return {str(uid): parse_choice(v, default_group_size, f"plan.{uid}")
            for uid, v in plan.items()}


def plan_from_solution(problem, solution) -> dict[str, Choice]:
    """``{unit: Choice}`` from a solved problem (its default group size for plain ``b<k>``).

    Raises:
        ValidationError: the solution has no assignment (infeasible / no solution) or names
            units the problem does not have.
    """
    if not solution.assignment:
        raise ValidationError("solution.status", f"{solution.status!r} has no assignment to "
                              "apply; valid: optimal or feasible")
    unknown = sorted(set(solution.assignment) - {u.id for u in problem.units})
    if unknown:
        raise ValidationError("solution.assignment", f"units {unknown[:5]} are not in problem "
                              f"{problem.name!r}")
    return normalize_plan(solution.assignment, problem_group_size(problem))


def problem_group_size(problem) -> int:
    """The group size plain ``b<k>`` options of ``problem`` mean."""
    return int(problem.settings.group_size)


# ---- plan -> packed segments ---------------------------------------------------------------
@dataclass(frozen=True)
class SegmentPlan:
    """A contiguous range of one matrix's rows (``axis`` 0) or columns (1) in one format."""

    axis: int
    start: int
    stop: int
    bits: int
    group_size: int | None

    @property
    def width(self) -> int:
        return self.stop - self.start


def module_name(param: str) -> str:
    """``model.layers.0.mlp.up_proj`` from ``model.layers.0.mlp.up_proj.weight``."""
    if not param.endswith(".weight"):
        raise ModelError(f"slice parameter {param!r} is not a '.weight'")
    return param[: -len(".weight")]


def matrix_segments(units, plan: Mapping[str, Choice],
                    scale_bits: int | None = None) -> dict[str, list[SegmentPlan]]:
    """Module name -> its segments, for the planned units (units the plan does not name are
    kept in fp16).

    Adjacent slices of one choice merge into one segment where that leaves the packed bytes
    equal to the sum of the units' sizes: the first run's zero points (``bits`` bits each, one
    stream per segment) must fill whole 32-bit words, and for columns its width must be a
    whole number of groups and of 32-bit words, so the groups and words of the merged segment
    are those of the parts. With double-quantized scales (``scale_bits``) the scale codes
    must fill whole words too, and a column run must hold whole super-blocks of 256 columns.

    Raises:
        ModelError: a matrix owned along both axes, or slices that leave a gap.
    """
    raw: dict[str, list[tuple[int, int, int, Choice, int]]] = {}
    for unit in units:
        choice = plan.get(unit.id, FP16)
        for s in unit.slices:
            raw.setdefault(module_name(s.param), []).append(
                (s.dim, s.start, s.stop, choice, s.shape[1 - s.dim]))
    return {name: _merge(name, spec, scale_bits) for name, spec in raw.items()}


def _merge(name: str, spec: list[tuple[int, int, int, Choice, int]],
           scale_bits: int | None = None) -> list[SegmentPlan]:
    axes = {d for d, *_ in spec}
    if len(axes) != 1:
        raise ModelError(f"{name}: owned along both axes {sorted(axes)}; units must own whole "
                         "rows or whole columns of a matrix")
    axis = axes.pop()
    runs: list[list[Any]] = []
    for _, start, stop, choice, other in sorted(spec, key=lambda s: s[1]):
        if runs and runs[-1][1] != start:
            raise ModelError(f"{name}: unit slices leave a gap at {runs[-1][1]}:{start}")
        if runs and runs[-1][2] == choice and _mergeable(axis, runs[-1], choice, other, scale_bits):
            runs[-1][1] = stop
        else:
            runs.append([start, stop, choice])
    return [SegmentPlan(axis, a, b, c.bits, c.group_size) for a, b, c in runs]


def _mergeable(axis: int, run: list[Any], choice: Choice, other: int,
               scale_bits: int | None = None) -> bool:
    """Whether ``choice`` may extend ``run`` (a ``[start, stop, choice]`` along ``axis``) with
    bytes equal to the sum of the parts; ``other`` is the matrix's size along the other axis."""
    if choice.bits == 16:
        return True
    n = run[1] - run[0]
    streams = (choice.bits,) if scale_bits is None else (choice.bits, scale_bits)
    if axis == 0:  # n rows of `other` columns
        groups = n * num_groups(other, choice.group_size)
        return all(groups * b % 32 == 0 for b in streams)
    groups = other * (n // choice.group_size)
    return (n % choice.group_size == 0 and (choice.bits * n) % 32 == 0
            and all(groups * b % 32 == 0 for b in streams)
            and (scale_bits is None or n % SUPER_COLS == 0))
