"""The backend protocol, the registry, and the one place a backend's answer becomes a Solution.

A backend is a class with ``name``, ``is_available()`` and ``solve(problem, options)``.
Register it with ``@register``. Backends return ``Solution`` objects built by
``make_solution``, which recomputes the objective, usage and gap with ``evaluate`` so no
backend's own claims reach the certificate unchecked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bitsack.errors import SolverError, ValidationError
from bitsack.solver.bounded import short_repr
from bitsack.solver.numeric import MAX_SEED, MAX_THREADS, MAX_TIME_LIMIT_S
from bitsack.solver.problem import Problem
from bitsack.solver.solution import (
    DEFAULT_ABS_GAP,
    DEFAULT_REL_GAP,
    Certificate,
    Infeasibility,
    Solution,
    evaluate,
    gap,
    is_optimal,
)


@dataclass(frozen=True)
class SolveOptions:
    """Limits and knobs every backend honours (those that make sense for it).

    Attributes:
        time_limit_s: wall-clock limit; None = no limit.
        rel_gap: stop once the relative gap is at most this; also the tolerance for "optimal".
        abs_gap: absolute gap tolerance for "optimal".
        seed: random seed (solvers run deterministically for a given seed).
        threads: worker threads; None = backend default.
        verbose: let the backend print its log.
        params: backend-specific extra parameters (documented by each backend).
    """

    time_limit_s: float | None = None
    rel_gap: float = DEFAULT_REL_GAP
    abs_gap: float = DEFAULT_ABS_GAP
    seed: int = 0
    threads: int | None = None
    verbose: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Range-check every field (``ValidationError`` naming it, e.g. ``time_limit_s``)."""
        if self.time_limit_s is not None:
            _check_number("time_limit_s", self.time_limit_s, 0.0, MAX_TIME_LIMIT_S,
                          lo_open=True, what="seconds")
        _check_number("rel_gap", self.rel_gap, 0.0, 1.0, hi_open=True, what="a fraction")
        _check_number("abs_gap", self.abs_gap, 0.0, 1e150, what="an absolute gap")
        _check_int("seed", self.seed, 0, MAX_SEED)
        if self.threads is not None:
            _check_int("threads", self.threads, 1, MAX_THREADS)
        if not isinstance(self.params, dict) or not all(isinstance(k, str)
                                                        for k in self.params):
            raise ValidationError("params", f"{short_repr(self.params)} is not a mapping "
                                  "name -> value")


def _check_number(path: str, value: Any, lo: float, hi: float, *, lo_open: bool = False,
                  hi_open: bool = False, what: str = "a number") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(path, f"{short_repr(value)} is not a number")
    number = float(value)
    below = number <= lo if lo_open else number < lo
    above = number >= hi if hi_open else number > hi
    if not math.isfinite(number) or below or above:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValidationError(path, f"{number!r} is out of range; valid: {what} in {interval}")
    return number


def _check_int(path: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer() and lo <= value <= hi:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValidationError(path, f"{short_repr(value)} is out of range; valid: an integer "
                              f"in {lo}..{hi}")
    return value


def int_param(backend: str, params: dict[str, Any], key: str, default: int, lo: int,
              hi: int) -> int:
    """Backend parameter ``key`` as an integer in ``lo..hi`` (``default`` when absent).

    Raises:
        bitsack.errors.ValidationError: ``params.<key>`` out of range or not an integer.
    """
    value = params.get(key, default)
    try:
        return _check_int(f"params.{key}", value, lo, hi)
    except ValidationError as exc:
        raise ValidationError(exc.path, f"{str(exc).split(': ', 1)[1]} (backend {backend})") \
            from None


def float_param(backend: str, params: dict[str, Any], key: str, default: float | None,
                lo: float, hi: float, *, lo_open: bool = False,
                hi_open: bool = False) -> float | None:
    """Backend parameter ``key`` as a finite number in the given interval (``default`` when
    absent, which may be None).

    Raises:
        bitsack.errors.ValidationError: ``params.<key>`` out of range or not a number.
    """
    value = params.get(key, default)
    if value is None:
        return None
    try:
        return _check_number(f"params.{key}", value, lo, hi, lo_open=lo_open, hi_open=hi_open)
    except ValidationError as exc:
        raise ValidationError(exc.path, f"{str(exc).split(': ', 1)[1]} (backend {backend})") \
            from None


class UnsupportedProblem(SolverError):
    """A backend declines an instance it cannot solve by design (too large for ``brute``,
    interactions or two budgets for ``dp``). ``auto`` and ``bitsack regress`` skip to the
    next backend on this error; any other ``SolverError`` is a failure."""


class Backend(Protocol):
    """What every backend provides.

    Attributes:
        name: the registry name (``--solver NAME``).
        exact: class attribute; True when the backend proves optimality given time (its
            certificate then closes the gap). Backends without it count as exact; ``greedy``
            and ``auto`` set False. ``bitsack regress`` compares goldens against exact ones.
    """

    name: str

    @classmethod
    def is_available(cls) -> bool: ...

    def solve(self, problem: Problem, options: SolveOptions) -> Solution: ...


_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a backend available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type]:
    """Name -> backend class, for every registered backend (available or not)."""
    from bitsack.solver import backends  # noqa: F401  (imports every backend module)

    return dict(_REGISTRY)


def get_backend(name: str) -> Backend:
    """Instantiate backend ``name``.

    Raises:
        SolverError: unknown name, or the backend's dependency is missing.
    """
    reg = registry()
    if name not in reg:
        raise SolverError(f"solver: {name!r} is not a backend; valid: {sorted(reg)}")
    cls = reg[name]
    if not cls.is_available():
        raise SolverError(f"solver: backend {name!r} is not available here "
                          f"(its dependency is missing); available: "
                          f"{sorted(n for n, c in reg.items() if c.is_available())}")
    return cls()


def check_params(backend: str, params: dict[str, Any], valid: tuple[str, ...]) -> None:
    """Refuse backend params this backend does not understand (a typo is not silently ignored).

    Raises:
        SolverError: an unknown key, naming it and the valid ones.
    """
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise SolverError(f"params: {unknown} not understood by {backend}; valid: "
                          f"{list(valid)}")


class Stopwatch:
    """Wall time since construction, for certificates."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def make_solution(
    problem: Problem,
    *,
    assignment: dict[str, str] | None,
    dual_bound: float | None,
    solver: str,
    solver_version: str,
    options: SolveOptions,
    wall_time_s: float,
    params: dict[str, Any] | None = None,
    infeasible: bool = False,
    message: str = "",
    extra: dict[str, Any] | None = None,
    check_claims: bool = True,
) -> Solution:
    """Build the Solution for a backend's answer, recomputing everything checkable.

    The plan's objective, usage and violations come from ``evaluate``. The backend's dual bound
    and any infeasibility claim are checked against bounds bitsack computes itself
    (``bitsack.solver.certify``): a claim they contradict is dropped (bitsack's own
    Lagrangian bound stands in, the better plan is kept), the status is then at best
    ``feasible`` and the message says what was refuted. ``certificate.params["bound_check"]``
    records the comparison.

    Args:
        assignment: unit -> option, or None when the backend found nothing.
        dual_bound: a valid lower bound on the optimum (already corrected for any scaling the
            backend did), or None if it has none.
        infeasible: the backend *proved* infeasibility (status ``infeasible``, explained by
            ``explain_infeasibility``); otherwise no assignment means ``no_solution``.
        check_claims: check the claims independently (False only for ``greedy``, whose
            bound *is* the independent one).

    Raises:
        SolverError: the backend's assignment violates the problem (a backend bug, never a
            status).
    """
    from bitsack.solver.certify import check_claims as run_check
    from bitsack.solver.certify import slack

    limits = problem.limits
    params = dict(params or {})
    # the tolerances "optimal" was judged by, so `bitsack check` can judge it the same way
    params.setdefault("rel_gap", options.rel_gap)
    params.setdefault("abs_gap", options.abs_gap)
    ev = None
    if assignment is not None:
        ev = evaluate(problem, assignment)
        if not ev.feasible:
            raise SolverError(f"solver {solver} returned an infeasible assignment: "
                              f"{'; '.join(ev.violations[:3])}")
    refuted = False
    if check_claims:
        check = run_check(problem, dual_bound=dual_bound,
                          objective=None if ev is None else ev.objective,
                          infeasible=infeasible and assignment is None, abs_tol=options.abs_gap,
                          solver=solver)
        params["bound_check"] = check.to_params()
        if dual_bound is None and check.own.lower is not None:
            dual_bound = check.own.lower  # a valid bound of bitsack's own beats none
        if not check.ok:
            refuted = True
            notes = [check.contradiction, "the certificate uses bitsack's own Lagrangian bound "
                     "instead and the status is at most feasible"]
            dual_bound, infeasible = check.own.lower, False
            own = check.own
            if own.plan is not None and (ev is None or own.upper < ev.objective):
                notes.append(f"the plan is bitsack's own (objective {own.upper:.8g})"
                             + ("" if ev is None else f", better than {solver}'s "
                                f"({ev.objective:.8g})"))
                assignment, ev = own.plan, evaluate(problem, own.plan)
            message = "; ".join(m for m in [message, *notes] if m)
    elif dual_bound is not None and ev is not None \
            and dual_bound > ev.objective + slack(ev.objective, options.abs_gap):
        refuted = True
        message = "; ".join(m for m in [message, (
            f"{solver}'s dual bound {dual_bound:.8g} is above the objective "
            f"{ev.objective:.8g} of its own plan; no bound is reported")] if m)
        dual_bound = None
    if assignment is None:
        status = "infeasible" if infeasible else "no_solution"
        infeas = explain_infeasibility(problem) if infeasible else ()
        if infeasible and not message:
            message = infeasibility_message(problem, infeas)
        cert = Certificate(
            primal_bound=None, dual_bound=dual_bound, abs_gap=None, rel_gap=None, usage={},
            limits=limits, max_violation=0.0, solver=solver, solver_version=solver_version,
            params=params, wall_time_s=wall_time_s,
        )
        return Solution(problem=problem.name, status=status, assignment={}, objective=None,
                        certificate=cert, infeasibility=infeas, message=message,
                        extra=dict(extra or {}))

    primal = ev.objective
    if dual_bound is not None:
        dual_bound = min(dual_bound, primal)
    abs_gap, rel_gap = gap(primal, dual_bound)
    optimal = not refuted and is_optimal(abs_gap, rel_gap, options.rel_gap, options.abs_gap)
    cert = Certificate(
        primal_bound=primal, dual_bound=dual_bound, abs_gap=abs_gap, rel_gap=rel_gap,
        usage=ev.usage, limits=limits, max_violation=ev.max_violation, solver=solver,
        solver_version=solver_version, params=params, wall_time_s=wall_time_s,
    )
    return Solution(problem=problem.name, status="optimal" if optimal else "feasible",
                    assignment=dict(assignment), objective=primal, certificate=cert,
                    message=message, extra=dict(extra or {}))


def explain_infeasibility(problem: Problem) -> tuple[Infeasibility, ...]:
    """For each budget, the smallest limit any assignment could meet, respecting constraints.

    Per resource r this is ``min Σ_u cost_r[u, o_u]`` subject to the side constraints, solved
    exactly on its own: without constraints it is the sum of each unit's cheapest option;
    ``same_option`` / ``same_bits`` groups choose one shared option / bit-width;
    ``min_kept`` groups keep their cheapest kept units (``bitsack.solver.feasibility``).
    Components of overlapping constraints are enumerated when small; beyond that the value is
    the best single-constraint relaxation, a valid lower bound, and the message says "at least".
    """
    from bitsack.solver.feasibility import min_cost_is_exact, min_cost_per_resource

    exact = min_cost_is_exact(problem)
    out = []
    for res in problem.resources:
        if res.limit is None:
            continue
        low = min_cost_per_resource(problem, res.name)
        if low > res.limit + 1e-9 * max(1.0, abs(res.limit)):
            needs = "needs" if exact else "needs at least"
            out.append(Infeasibility(
                resource=res.name, limit=res.limit, min_achievable=low,
                message=f"{res.name} limit {res.limit:.6g} cannot be met: the cheapest "
                        f"assignment respecting the constraints {needs} {low:.6g}",
            ))
    return tuple(out)


def infeasibility_message(problem: Problem, infeas: tuple[Infeasibility, ...]) -> str:
    """One line explaining a proven infeasibility (budget by budget, or their combination)."""
    if infeas:
        return "; ".join(i.message for i in infeas)
    from bitsack.solver.feasibility import min_cost_per_resource, min_weighted

    if min_weighted(problem, problem.arrays.loss).chosen is None:
        return "the side constraints admit no assignment at all"
    limited = [r for r in problem.resources if r.limit is not None]
    if len(limited) > 1:
        parts = ", ".join(f"{r.name} needs >= {min_cost_per_resource(problem, r.name):.6g} "
                          f"(limit {r.limit:.6g})" for r in limited)
        return ("each budget can be met on its own but not all together (" + parts + "); "
                "loosen one of them")
    return "the budgets and constraints cannot all hold"


SolveFn = Callable[[Problem, SolveOptions], Solution]
