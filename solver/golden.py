"""Golden solutions: the known answers of the instances in ``problems/``, for regression.

Naming: a problem file ``<dir>/<stem>.yaml`` (or ``.yml`` / ``.json``) has its golden in
``<dir>/<stem>.golden.json`` beside it (see ``problems/README.md``). A golden records what
must not change — the status, and the optimal objective or the infeasibility explanation —
plus, for information only, one optimal assignment (ties may make another backend pick a
different, equally good one) and which backends produced and cross-checked it.

``bitsack regress`` solves every instance with a golden by every available exact backend and
fails on any difference in status, or in objective beyond a relative ``OBJECTIVE_RTOL``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitsack.errors import ValidationError
from bitsack.solver.solution import Solution

GOLDEN_SCHEMA = "bitsack.golden/v1"
GOLDEN_SUFFIX = ".golden.json"
#: Relative tolerance on a proven optimum's objective.
OBJECTIVE_RTOL = 1e-6
#: Gap the backends are asked for during regression (tighter than the compare tolerance).
REGRESS_REL_GAP = 1e-7

_PROBLEM_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Golden:
    """The known answer of one instance."""

    problem: str
    status: str
    objective: float | None
    infeasibility: dict[str, float] = field(default_factory=dict)  # resource -> min usage
    assignment: dict[str, str] = field(default_factory=dict)
    reference: str = ""
    cross_checked: tuple[str, ...] = ()
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"schema": GOLDEN_SCHEMA, "problem": self.problem, "status": self.status,
                "objective": self.objective, "infeasibility": self.infeasibility,
                "message": self.message, "reference": self.reference,
                "cross_checked": list(self.cross_checked), "assignment": self.assignment,
                "tolerance": {"objective_rtol": OBJECTIVE_RTOL}}


def golden_path(problem_path: str | Path) -> Path:
    """Where the golden of ``problem_path`` lives."""
    p = Path(problem_path)
    return p.with_name(p.name[: -len(p.suffix)] + GOLDEN_SUFFIX)


def find_instances(root: str | Path) -> Iterator[tuple[Path, Path]]:
    """(problem file, golden path) for every problem file under ``root``, sorted.

    Raises:
        bitsack.errors.ValidationError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValidationError("DIR", f"{str(root)!r} is not a folder of problem files")
    for path in sorted(root.rglob("*")):
        if path.suffix in _PROBLEM_SUFFIXES and not path.name.endswith(GOLDEN_SUFFIX) \
                and path.is_file():
            yield path, golden_path(path)


def load_golden(path: str | Path) -> Golden:
    """Read a golden file.

    Raises:
        bitsack.errors.ValidationError: unreadable or malformed.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValidationError("golden", f"{str(path)!r} cannot be read: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != GOLDEN_SCHEMA:
        raise ValidationError("golden.schema", f"{str(path)!r}: valid: {GOLDEN_SCHEMA!r}")
    status = data.get("status")
    if status not in ("optimal", "infeasible"):
        raise ValidationError("golden.status", f"{status!r} in {str(path)!r}; valid: optimal, "
                              "infeasible")
    objective = data.get("objective")
    if status == "optimal" and not isinstance(objective, (int, float)):
        raise ValidationError("golden.objective", f"{objective!r} in {str(path)!r}; an "
                              "optimal golden needs its objective")
    return Golden(problem=str(data.get("problem")), status=status, objective=objective,
                  infeasibility={k: float(v) for k, v in (data.get("infeasibility")
                                                          or {}).items()},
                  assignment=dict(data.get("assignment") or {}),
                  reference=str(data.get("reference", "")),
                  cross_checked=tuple(data.get("cross_checked") or ()),
                  message=str(data.get("message", "")))


def golden_from_solution(solution: Solution, cross_checked: tuple[str, ...] = ()) -> Golden:
    """The golden a proven answer establishes.

    Raises:
        bitsack.errors.SolverError: the solution is neither optimal nor proven infeasible.
    """
    from bitsack.errors import SolverError

    if solution.status not in ("optimal", "infeasible"):
        raise SolverError(f"{solution.problem}: {solution.certificate.solver} ended "
                          f"{solution.status}; a golden needs a proven answer")
    return Golden(problem=solution.problem, status=solution.status,
                  objective=solution.objective,
                  infeasibility={i.resource: i.min_achievable for i in solution.infeasibility},
                  assignment=dict(solution.assignment), reference=solution.certificate.solver,
                  cross_checked=cross_checked, message=solution.message)


def compare(golden: Golden, solution: Solution) -> str | None:
    """None when ``solution`` agrees with ``golden``, else what differs."""
    if solution.problem != golden.problem:
        return f"problem name {solution.problem!r} != golden {golden.problem!r}"
    if solution.status != golden.status:
        return f"status {solution.status} != golden {golden.status}"
    if golden.status == "optimal":
        obj, ref = solution.objective, golden.objective
        if obj is None or abs(obj - ref) > OBJECTIVE_RTOL * max(1.0, abs(ref)):
            return f"objective {obj!r} != golden {ref!r} (rtol {OBJECTIVE_RTOL:g})"
        return None
    got = {i.resource: i.min_achievable for i in solution.infeasibility}
    if set(got) != set(golden.infeasibility):
        return f"infeasible budgets {sorted(got)} != golden {sorted(golden.infeasibility)}"
    for res, value in golden.infeasibility.items():
        if abs(got[res] - value) > OBJECTIVE_RTOL * max(1.0, abs(value)):
            return f"{res} smallest feasible limit {got[res]!r} != golden {value!r}"
    return None
