"""Solutions, certificates, and bitsack's own independent ``evaluate``.

A backend proposes an assignment and a dual (lower) bound; everything else in the certificate
is recomputed here from the problem alone: the objective (primal bound), resource usage, the
largest budget violation, the gap, and therefore whether the answer may be called ``optimal``.
A solver's own OPTIMAL flag is never taken on trust.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from bitsack.solver.problem import Problem

SOLUTION_SCHEMA = "bitsack.solution/v1"

#: Statuses with an assignment present / absent (cvxpy-style groups).
STATUSES_WITH_SOLUTION = ("optimal", "feasible")
STATUSES_WITHOUT_SOLUTION = ("infeasible", "no_solution")
STATUSES = STATUSES_WITH_SOLUTION + STATUSES_WITHOUT_SOLUTION

#: Default tolerances: a solution is ``optimal`` when its recomputed gap is within these.
DEFAULT_REL_GAP = 1e-4
DEFAULT_ABS_GAP = 1e-9
#: Budget violations up to this relative amount (of the limit) count as feasible (float noise).
FEASIBILITY_TOL = 1e-9


@dataclass(frozen=True)
class Evaluation:
    """What an assignment is worth, recomputed from the problem alone."""

    objective: float
    standalone: float
    interaction: float
    usage: dict[str, float]
    violations: tuple[str, ...]
    max_violation: float

    @property
    def feasible(self) -> bool:
        return not self.violations


@dataclass(frozen=True)
class Certificate:
    """How good a solution is and how we know. See DESIGN.md, "Solution JSON"."""

    primal_bound: float | None
    dual_bound: float | None
    abs_gap: float | None
    rel_gap: float | None
    usage: dict[str, float]
    limits: dict[str, float]
    max_violation: float
    solver: str
    solver_version: str
    params: dict[str, Any]
    wall_time_s: float


@dataclass(frozen=True)
class Infeasibility:
    """Why no assignment meets the budgets: per violated resource, the smallest feasible limit."""

    resource: str
    limit: float
    min_achievable: float
    message: str


@dataclass(frozen=True)
class Solution:
    """A backend's answer to a problem. ``assignment`` is empty without a solution."""

    problem: str
    status: str
    assignment: dict[str, str]
    objective: float | None
    certificate: Certificate
    infeasibility: tuple[Infeasibility, ...] = ()
    message: str = ""
    schema: str = SOLUTION_SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_solution(self) -> bool:
        return self.status in STATUSES_WITH_SOLUTION

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["infeasibility"] = [asdict(i) for i in self.infeasibility]
        return _finite_or_none(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Solution:
        cert = Certificate(**data["certificate"])
        infeas = tuple(Infeasibility(**i) for i in data.get("infeasibility", ()))
        return cls(
            problem=data["problem"],
            status=data["status"],
            assignment=dict(data.get("assignment") or {}),
            objective=data.get("objective"),
            certificate=cert,
            infeasibility=infeas,
            message=data.get("message", ""),
            schema=data.get("schema", SOLUTION_SCHEMA),
            extra=dict(data.get("extra") or {}),
        )


def _finite_or_none(obj: Any) -> Any:
    """JSON has no inf/NaN: map them to None recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def option_vector(problem: Problem, assignment: dict[str, str]):
    """Flat indices (file order) of the chosen options, one per unit, in unit order.

    Raises:
        bitsack.errors.ValidationError: a unit is missing or unknown, or an option is unknown.
    """
    import numpy as np

    from bitsack.errors import ValidationError

    unknown = sorted(set(assignment) - set(problem.unit_index))
    if unknown:
        raise ValidationError("assignment", f"unknown unit(s) {unknown[:5]}; "
                              f"valid units are the problem's {len(problem.units)} unit ids")
    chosen = np.empty(len(problem.units), dtype=np.int64)
    start = problem.arrays.start
    for ui, unit in enumerate(problem.units):
        if unit.id not in assignment:
            raise ValidationError(f"assignment.{unit.id}", "missing; every unit needs an option")
        oid = assignment[unit.id]
        for j, opt in enumerate(unit.options):
            if opt.id == oid:
                chosen[ui] = start[ui] + j
                break
        else:
            raise ValidationError(f"assignment.{unit.id}", f"{oid!r} is not an option of this "
                                  f"unit; valid: {[o.id for o in unit.options]}")
    return chosen


def evaluate(problem: Problem, assignment: dict[str, str]) -> Evaluation:
    """Recompute objective, usage and violations of ``assignment`` from the problem alone.

    The objective is ``Σ_u loss[u,o_u] + Σ_{u<u'} (U[:,o_u]·U[:,o_u'] + pairs)``. The low-rank
    sum uses ``Σ_{u<u'} a_u·a_u' = ½(‖Σ_u a_u‖² − Σ_u ‖a_u‖²)``, computed in float64.

    Raises:
        bitsack.errors.ValidationError: the assignment names unknown units or options.
    """
    import numpy as np

    chosen = option_vector(problem, assignment)
    arrays = problem.arrays
    standalone = float(np.sum(arrays.loss[chosen]))
    interaction = 0.0
    inter = problem.interactions
    if inter is not None:
        if inter.U is not None:
            cols = np.asarray(inter.U, dtype=np.float64)[:, chosen]
            total = cols.sum(axis=1)
            interaction += 0.5 * (float(total @ total) - float(np.sum(cols * cols)))
        if inter.pairs:
            picked = {(u.id, assignment[u.id]) for u in problem.units}
            for pair in inter.pairs:
                if pair.a in picked and pair.b in picked:
                    interaction += pair.value
    usage = {name: float(np.sum(col[chosen])) for name, col in arrays.cost.items()}
    violations: list[str] = []
    max_violation = 0.0
    for res in problem.resources:
        if res.limit is None:
            continue
        excess = usage[res.name] - res.limit
        if excess > FEASIBILITY_TOL * max(1.0, abs(res.limit)):
            violations.append(f"{res.name}: usage {usage[res.name]:.6g} exceeds limit "
                              f"{res.limit:.6g} by {excess:.6g}")
        max_violation = max(max_violation, excess)
    violations.extend(_constraint_violations(problem, assignment))
    return Evaluation(
        objective=standalone + interaction,
        standalone=standalone,
        interaction=interaction,
        usage=usage,
        violations=tuple(violations),
        max_violation=max(0.0, max_violation),
    )


def _constraint_violations(problem: Problem, assignment: dict[str, str]) -> list[str]:
    from bitsack.solver.problem import option_bits

    out = []
    for ci, con in enumerate(problem.constraints):
        picks = [assignment[u] for u in con.units]
        if con.type == "same_option" and len(set(picks)) > 1:
            out.append(f"constraints[{ci}] same_option: units take {sorted(set(picks))}")
        elif con.type == "same_bits":
            kept = {option_bits(p) for p in picks if p != "prune"}
            if len(kept) > 1:
                out.append(f"constraints[{ci}] same_bits: kept units use bits {sorted(kept)}")
        elif con.type == "min_kept":
            kept = sum(p != "prune" for p in picks)
            if kept < (con.count or 0):
                out.append(f"constraints[{ci}] min_kept: {kept} kept, needs {con.count}")
    return out


def gap(primal: float | None, dual: float | None) -> tuple[float | None, float | None]:
    """Absolute and relative gap; relative to ``max(|primal|, 1e-12)``. None when unknown."""
    if primal is None or dual is None or not math.isfinite(dual):
        return None, None
    abs_gap = max(0.0, primal - dual)
    return abs_gap, abs_gap / max(abs(primal), 1e-12)


def is_optimal(abs_gap: float | None, rel_gap: float | None,
               rel_tol: float = DEFAULT_REL_GAP, abs_tol: float = DEFAULT_ABS_GAP) -> bool:
    """Whether a recomputed gap allows calling a solution optimal."""
    if abs_gap is None or rel_gap is None:
        return False
    return abs_gap <= abs_tol or rel_gap <= rel_tol


def load_solution(path) -> Solution:
    """Read a solution JSON file written by ``bitsack solve --out``.

    Raises:
        bitsack.errors.ValidationError: unreadable file, invalid JSON, wrong schema or a
            missing / malformed field (named).
    """
    from pathlib import Path

    from bitsack.errors import ValidationError
    from bitsack.solver.bounded import MAX_JSON_BYTES, parse_json, read_text_bounded

    path = Path(path)
    try:
        text = read_text_bounded(path, MAX_JSON_BYTES, "json")
    except ValidationError as exc:
        raise ValidationError("solution", str(exc).split(": ", 1)[1]) from None
    try:
        data = parse_json(text, repr(str(path)))
    except ValidationError as exc:
        raise ValidationError("solution", str(exc).split(": ", 1)[1]) from None
    return solution_from_dict(data)


def solution_from_dict(data: Any) -> Solution:
    """Validate a parsed solution document and build the :class:`Solution`.

    Raises:
        bitsack.errors.ValidationError: the first malformed field, named.
    """
    from dataclasses import fields

    from bitsack.errors import ValidationError
    from bitsack.solver.bounded import short_repr

    if not isinstance(data, dict):
        raise ValidationError("solution", f"is a {type(data).__name__}; valid: a JSON object")
    if data.get("schema", SOLUTION_SCHEMA) != SOLUTION_SCHEMA:
        raise ValidationError("schema", f"{short_repr(data.get('schema'))} is not supported; "
                              f"valid: {SOLUTION_SCHEMA!r}")
    if data.get("status") not in STATUSES:
        raise ValidationError("status", f"{short_repr(data.get('status'))} is not a status; "
                              f"valid: {', '.join(STATUSES)}")
    for key in ("problem", "certificate"):
        if key not in data:
            raise ValidationError(key, "is missing")
    cert = data["certificate"]
    names = {f.name for f in fields(Certificate)}
    if not isinstance(cert, dict) or set(cert) != names:
        got = set(cert) if isinstance(cert, dict) else set()
        raise ValidationError("certificate", f"has keys {short_repr(sorted(map(str, got)))}; "
                              f"valid: exactly {sorted(names)} (missing "
                              f"{sorted(names - got)}, unknown "
                              f"{short_repr(sorted(map(str, got - names)))})")
    assignment = data.get("assignment") or {}
    if not isinstance(assignment, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in assignment.items()):
        raise ValidationError("assignment", "is not a mapping unit id -> option id")
    for key in ("primal_bound", "dual_bound", "abs_gap", "rel_gap", "max_violation",
                "wall_time_s"):
        value = cert[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValidationError(f"certificate.{key}", f"{short_repr(value)} is not a number "
                                  "or null")
    for key in ("usage", "limits"):
        value = cert[key]
        if not isinstance(value, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
            raise ValidationError(f"certificate.{key}", f"{short_repr(value)} is not a mapping "
                                  "resource -> number")
    if not isinstance(cert["params"], dict):
        raise ValidationError("certificate.params", f"{short_repr(cert['params'])} is not a "
                              "mapping")
    if data.get("objective") is not None and (isinstance(data["objective"], bool) or
                                              not isinstance(data["objective"], (int, float))):
        raise ValidationError("objective", f"{short_repr(data['objective'])} is not a number "
                              "or null")
    try:
        return Solution.from_dict(data)
    except (TypeError, KeyError) as exc:
        raise ValidationError("solution", f"malformed: {exc}") from None
