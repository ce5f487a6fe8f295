"""The loss-vs-budget frontier of one resource: solve at evenly spaced limits, return the data.

The sweep runs from the least usage any assignment can have (respecting the side
constraints; below it nothing is feasible) to the most (above it the budget cannot bind),
keeping every other budget as the problem sets it. Each point is a full solve, so each
carries its own certificate: with an exact backend the frontier is proven point by point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bitsack.errors import ValidationError
from bitsack.solver.backends.base import SolveOptions
from bitsack.solver.problem import Problem

#: Most points of one sweep (each is a full solve).
MAX_POINTS = 1000


@dataclass(frozen=True)
class ParetoPoint:
    """One solve of the sweep."""

    limit: float
    status: str
    objective: float | None
    dual_bound: float | None
    rel_gap: float | None
    usage: float | None
    solver: str
    wall_time_s: float


@dataclass(frozen=True)
class ParetoResult:
    """A sweep of ``resource``'s limit from ``min_usage`` to ``max_usage``."""

    problem: str
    resource: str
    min_usage: float
    max_usage: float
    points: tuple[ParetoPoint, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["points"] = [asdict(p) for p in self.points]
        return out


def pareto_sweep(problem: Problem, resource: str, points: int, *, solver: str = "auto",
                 options: SolveOptions | None = None, progress: bool = False) -> ParetoResult:
    """Solve ``problem`` at ``points`` limits of ``resource`` spread over its usage range.

    Args:
        problem: the problem; its other budgets stay as they are.
        resource: the resource whose limit is swept.
        points: number of limits (>= 2: both ends included; 1: the midpoint).
        solver: backend name for every point.
        options: solve options for every point.
        progress: show a tqdm bar (on a terminal).

    Raises:
        bitsack.errors.ValidationError: unknown resource, a resource no option uses, or
            ``points`` < 1.
    """
    from bitsack.solver import solve
    from bitsack.solver.feasibility import max_cost_per_resource, min_cost_per_resource
    from bitsack.solver.schema import with_limits

    names = [r.name for r in problem.resources]
    if resource not in names:
        raise ValidationError("--resource", f"{resource!r} is not a resource of problem "
                              f"{problem.name!r}; valid: {names}")
    if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= MAX_POINTS:
        raise ValidationError("--points", f"{points!r} is out of range; valid: an integer in "
                              f"1..{MAX_POINTS}")
    lo = min_cost_per_resource(problem, resource)
    hi = max_cost_per_resource(problem, resource)
    if not hi > 0:
        raise ValidationError("--resource", f"no option has a cost on {resource!r}; nothing "
                              "to sweep")
    if points == 1:
        limits = [0.5 * (lo + hi)]
    else:
        limits = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(limits), unit="point", leave=False)
    out = []
    for limit in limits:
        sol = solve(with_limits(problem, {resource: limit}), solver, options)
        cert = sol.certificate
        out.append(ParetoPoint(limit=limit, status=sol.status, objective=sol.objective,
                               dual_bound=cert.dual_bound, rel_gap=cert.rel_gap,
                               usage=cert.usage.get(resource), solver=cert.solver,
                               wall_time_s=cert.wall_time_s))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return ParetoResult(problem=problem.name, resource=resource, min_usage=lo, max_usage=hi,
                        points=tuple(out))
