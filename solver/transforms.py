"""Transforms of a validated problem: each returns a new, validated :class:`Problem`.

``with_limits`` (set / remove budgets), ``restrict_options`` and ``without_option`` (narrow the
choices), ``with_interaction_weight`` (shrink the interaction terms), and ``avg_bits_limit``
(the ``memory_bytes`` limit that an average bits-per-weight budget means).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from bitsack.errors import ValidationError
from bitsack.solver.problem import Interactions, Pair, Problem, Resource
from bitsack.solver.validate import check_limit, validate_problem


def with_limits(problem: Problem, limits: Mapping[str, float | None]) -> Problem:
    """A copy of ``problem`` with some resource limits replaced (None removes a budget).

    Raises:
        bitsack.errors.ValidationError: an unknown resource, a negative/NaN limit, or a budget
            on a resource no option uses.
    """
    names = [r.name for r in problem.resources]
    for name, value in limits.items():
        if name not in names:
            raise ValidationError(f"budget.{name}", f"is not a resource of problem "
                                  f"{problem.name!r}; valid: {names}")
        if value is not None:
            check_limit(value, f"budget.{name}")
    used = _used_resources(problem)
    for name, value in limits.items():
        if value is not None and name not in used:
            raise ValidationError(f"budget.{name}", f"{value!r} budgets a resource that no "
                                  f"option has a cost on; valid: one of {sorted(used)}")
    resources = tuple(
        Resource(r.name, float(limits[r.name]) if limits.get(r.name) is not None else None)
        if r.name in limits else r
        for r in problem.resources
    )
    return _replace(problem, resources=resources)


def restrict_options(problem: Problem, allowed: Mapping[str, Iterable[str]],
                     name: str | None = None) -> Problem:
    """A copy of ``problem`` where unit ``u`` keeps only the options in ``allowed[u]``.

    Units not in ``allowed`` keep all their options. The interaction factor keeps the columns
    of the surviving options (so the objective of any surviving assignment is unchanged);
    explicit pairs that name a removed option are dropped.

    Raises:
        ValidationError: a unit would be left with no option.
    """
    import dataclasses

    import numpy as np

    keep_cols: list[int] = []
    units = []
    col = 0
    for unit in problem.units:
        ok = set(allowed[unit.id]) if unit.id in allowed else None
        opts = []
        for opt in unit.options:
            if ok is None or opt.id in ok:
                opts.append(opt)
                keep_cols.append(col)
            col += 1
        if not opts:
            raise ValidationError(f"allowed[{unit.id!r}]", f"{sorted(ok or ())} leaves no "
                                  f"option; valid: a subset of {[o.id for o in unit.options]}")
        units.append(dataclasses.replace(unit, options=tuple(opts)))
    inter = problem.interactions
    if inter is not None:
        kept = {(u.id, o.id) for u in units for o in u.options}
        pairs = tuple(p for p in inter.pairs if tuple(p.a) in kept and tuple(p.b) in kept)
        U = None if inter.U is None else np.ascontiguousarray(inter.U[:, keep_cols])
        inter = Interactions(U=U, file=inter.file, pairs=pairs)
        if inter.U is None and not inter.pairs:
            inter = None
    out = dataclasses.replace(problem, name=name or problem.name, units=tuple(units),
                              interactions=inter)
    return validate_problem(out)


def without_option(problem: Problem, option_id: str, name: str | None = None) -> Problem:
    """A copy of ``problem`` where no unit offers ``option_id`` (e.g. ``"prune"``: bits only).

    Units whose only option it is keep it (nothing else could be chosen for them).
    """
    allowed = {u.id: [o.id for o in u.options if o.id != option_id] for u in problem.units
               if any(o.id == option_id for o in u.options) and len(u.options) > 1}
    return restrict_options(problem, allowed, name=name)


def with_interaction_weight(problem: Problem, weight: float) -> Problem:
    """A copy of ``problem`` whose interaction terms are multiplied by ``weight`` in [0, 1].

    ``U`` is scaled by √weight and explicit pair values by ``weight``; 0 removes the
    interactions (additive objective), 1 returns ``problem`` unchanged. When each unit's
    standalone loss is its own Fisher form (``loss_u = ½‖U_u‖²``, the ``fisher`` estimator),
    the weighted objective is ``(1 − w)·Σ loss + w·½‖Σ U‖²``: a shrinkage of the estimated
    Fisher matrix toward its block diagonal, which stays convex and keeps at least
    ``(1 − w)`` of the additive loss, so a plan cannot look free by cancelling errors in the N
    sampled directions of a rank-N factor.

    Raises:
        bitsack.errors.ValidationError: ``weight`` outside [0, 1].
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not 0.0 <= weight <= 1.0:
        raise ValidationError("interactions", f"{weight!r}; valid: a weight in [0, 1] (0 = "
                              "additive objective, 1 = the full interaction terms)")
    inter = problem.interactions
    if inter is None or weight == 1.0:
        return problem
    if weight == 0.0:
        return _replace(problem, interactions=None)
    U = None if inter.U is None else inter.U * math.sqrt(weight)
    pairs = tuple(Pair(p.a, p.b, p.value * weight) for p in inter.pairs)
    return _replace_interactions(problem, Interactions(U=U, file=inter.file, pairs=pairs))


def avg_bits_limit(problem: Problem, bits: float, resource: str = "memory_bytes") -> float:
    """The ``memory_bytes`` limit meaning ``bits`` bits per original weight, overhead included.

    ``limit = bits · Σ_u params_u / 8`` bytes (DESIGN.md): pruned weights count 0 bits, scales
    and zeros count in the packed bytes.

    Raises:
        bitsack.errors.ValidationError: ``bits`` not a finite positive number, a unit without
            ``params``, or the problem has no ``memory_bytes`` resource.
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits) \
            or bits <= 0:
        raise ValidationError("avg_bits", f"{bits!r} is not a positive finite number of bits "
                              "per weight")
    if resource not in {r.name for r in problem.resources}:
        raise ValidationError("avg_bits", f"needs a {resource!r} resource; problem "
                              f"{problem.name!r} has {[r.name for r in problem.resources]}")
    missing = [i for i, u in enumerate(problem.units) if not u.params]
    if missing:
        i = missing[0]
        raise ValidationError(f"units[{i}].params", f"{problem.units[i].params!r} on unit "
                              f"{problem.units[i].id!r} ({len(missing)} unit(s) lack params); "
                              "an avg-bits budget needs every unit's weight count (> 0)")
    return float(bits) * problem.total_params / 8.0


def _used_resources(problem: Problem) -> set[str]:
    return {name for u in problem.units for o in u.options for name, v in o.cost.items() if v}




def _replace(problem: Problem, **changes: Any) -> Problem:
    import dataclasses

    return dataclasses.replace(problem, **changes)


def _replace_interactions(problem: Problem, inter: Interactions) -> Problem:
    return _replace(problem, interactions=inter)

