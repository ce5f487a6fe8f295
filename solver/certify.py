"""A backend's claims checked against bounds bitsack computes itself, so a certificate cannot lie.

A backend claims two things a certificate rests on: a *dual bound* (no plan is better than
this) and, sometimes, *infeasibility* (no plan meets the budgets). ``evaluate`` recomputes
everything about the plan itself, but neither claim is about that plan. Both are checked here
against an independent route — the greedy backend's Lagrangian machinery (the MCKP convex hull
/ Lagrangian relaxation, ``bitsack.solver.lagrangian``), run on the problem alone:

- ``lower``: its Lagrangian dual value, a valid lower bound on the optimum (weak duality; with
  interactions through the additive lower-bound losses ``ℓ − ½‖U_i‖²``);
- ``upper``: the objective of the best plan it finds that meets every budget *strictly*
  (usage ≤ limit, no tolerance) and every side constraint, so ``optimum ≤ upper`` whatever
  tolerance a backend used.

Contradictions, each of which makes a claim false, never a matter of tolerance:

- a dual bound above the objective of the backend's own plan, or above ``upper`` (a plan the
  backend could have found is better than what it "proved" impossible);
- "infeasible" while bitsack holds a plan that meets every budget.

What ``make_solution`` does with one: the claimed bound is dropped and bitsack's own
``lower`` stands in; the better of the two plans is returned; the status is at best
``feasible``; the message says what was refuted and by what. ``verify`` (``bitsack check``)
recomputes everything a solution file records and runs the same comparison on it.

The reproduction that motivated this: with one option's loss at 1e308, the MIP backends'
objective scaling pushed every other loss below their tolerances and HiGHS and SCIP reported
``optimal`` 0.7 (dual bound 0.7) on a problem whose optimum is 0.42. Such losses are now
refused on input (``bitsack.solver.numeric``); this check is what catches any other way a
solver's bound goes wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bitsack.solver.problem import Problem
from bitsack.solver.solution import (
    DEFAULT_ABS_GAP,
    DEFAULT_REL_GAP,
    Certificate,
    Solution,
    evaluate,
    gap,
    is_optimal,
)

#: Bisection steps and budget cycles of the independent Lagrangian (cheaper than the greedy
#: backend's own search; a looser bound still refutes a wrong claim and stays valid).
_BISECTIONS = 40
_CYCLES = 2


@dataclass(frozen=True)
class OwnBounds:
    """Bounds on the optimum that bitsack computed itself (module docstring).

    Attributes:
        lower: a valid lower bound on the optimum, or None (constraints admit nothing).
        upper: the objective of ``plan``, a valid upper bound; None without such a plan.
        plan: a plan meeting every budget strictly and every constraint, or None.
    """

    lower: float | None
    upper: float | None
    plan: dict[str, str] | None


def own_bounds(problem: Problem) -> OwnBounds:
    """bitsack's own lower and upper bounds on the optimum of ``problem`` (cached on it)."""
    return problem.derived("own_bounds", _compute)


def _compute(problem: Problem) -> OwnBounds:
    import numpy as np

    from bitsack.solver.lagrangian import LagrangianSearch

    run = LagrangianSearch(problem, iterations=0, cycles=_CYCLES, bisections=_BISECTIONS)
    chosen = run.solve(cheapest_start=False)
    lower = float(run.best_dual) if np.isfinite(run.best_dual) else None
    plan = upper = None
    if chosen is not None:
        candidate = {u.id: run.flat_ids[chosen[i]] for i, u in enumerate(problem.units)}
        ev = evaluate(problem, candidate)
        strict = all(ev.usage[r.name] <= r.limit for r in problem.resources
                     if r.limit is not None)
        if strict and not any(v.startswith("constraints") for v in ev.violations):
            plan, upper = candidate, ev.objective
    return OwnBounds(lower=lower, upper=upper, plan=plan)


def slack(value: float, abs_tol: float) -> float:
    """Float noise allowed when comparing bounds near ``value``."""
    return max(abs_tol, 1e-9 * max(1.0, abs(value)))


@dataclass(frozen=True)
class BoundCheck:
    """The outcome of checking a backend's claims (``check_claims``).

    Attributes:
        claimed_dual: the backend's dual bound (None when it gave none).
        own: bitsack's own bounds.
        contradiction: why a claim is false, or None when everything is consistent.
    """

    claimed_dual: float | None
    own: OwnBounds
    contradiction: str | None

    @property
    def ok(self) -> bool:
        return self.contradiction is None

    def to_params(self) -> dict[str, Any]:
        """What the certificate's ``params["bound_check"]`` records."""
        return {"claimed_dual_bound": _finite(self.claimed_dual),
                "independent_lower": _finite(self.own.lower),
                "independent_upper": _finite(self.own.upper),
                "contradiction": self.contradiction}


def check_claims(problem: Problem, *, dual_bound: float | None, objective: float | None,
                 infeasible: bool, abs_tol: float, solver: str) -> BoundCheck:
    """Check a backend's dual bound (and infeasibility claim) against independent bounds.

    Args:
        dual_bound: the backend's claimed lower bound, or None.
        objective: the recomputed objective of the backend's plan, or None without one.
        infeasible: the backend claims the problem infeasible.
        abs_tol: the absolute gap tolerance (part of the float slack).
        solver: the backend's name, for the message.
    """
    own = own_bounds(problem)
    why = None
    if infeasible and own.plan is not None:
        why = (f"{solver} reported the problem infeasible, but bitsack's own greedy route "
               f"found a plan meeting every budget (objective {own.upper:.8g})")
    elif dual_bound is not None:
        if objective is not None and dual_bound > objective + slack(objective, abs_tol):
            why = (f"{solver}'s dual bound {dual_bound:.8g} is above the objective "
                   f"{objective:.8g} of its own plan")
        elif own.upper is not None and dual_bound > own.upper + slack(own.upper, abs_tol):
            why = (f"{solver}'s dual bound {dual_bound:.8g} is above the objective "
                   f"{own.upper:.8g} of a plan bitsack found by its own greedy route, so the "
                   "optimum is below the bound it claimed")
    return BoundCheck(claimed_dual=dual_bound, own=own, contradiction=why)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# --------------------------------------------------------------------------------------------
# checking a solution file (``bitsack check``)


@dataclass(frozen=True)
class CheckItem:
    """One independent check of a solution against its problem."""

    name: str
    ok: bool
    detail: str


def verify(problem: Problem, solution: Solution, rel_tol: float = 1e-9) -> tuple[CheckItem, ...]:
    """Check a solution against its problem independently of whichever solver produced it.

    Recomputes feasibility, objective and usage with :func:`evaluate` and compares them (and
    the certificate's gap and status) with what the solution records; for an infeasible
    status, recomputes the smallest achievable usage of each budget it blames.

    Args:
        rel_tol: relative tolerance for recorded vs recomputed numbers.

    Raises:
        bitsack.errors.ValidationError: the assignment names units or options the problem
            does not have (the solution is for another problem).
    """
    out: list[CheckItem] = []

    def close(a: float | None, b: float | None) -> bool:
        if a is None or b is None:
            return a is b
        return abs(a - b) <= rel_tol * max(1.0, abs(a), abs(b))

    out.append(CheckItem("problem name", solution.problem == problem.name,
                         f"solution is for {solution.problem!r}, problem is {problem.name!r}"))
    cert = solution.certificate
    if solution.has_solution:
        ev = evaluate(problem, solution.assignment)
        out.append(CheckItem("feasible", ev.feasible,
                             "; ".join(ev.violations) or "every budget and constraint holds"))
        out.append(CheckItem("objective", close(solution.objective, ev.objective),
                             f"recorded {solution.objective!r}, recomputed {ev.objective!r}"))
        out.append(CheckItem("primal bound", close(cert.primal_bound, ev.objective),
                             f"recorded {cert.primal_bound!r}, recomputed {ev.objective!r}"))
        bad = [r for r in ev.usage if r in cert.usage and not close(cert.usage[r], ev.usage[r])]
        missing = sorted(set(ev.usage) - set(cert.usage))
        out.append(CheckItem("usage", not bad and not missing,
                             f"mismatch on {bad}, missing {missing}" if bad or missing else
                             ", ".join(f"{r} {v:.6g}" for r, v in ev.usage.items())))
        limits_ok = all(close(cert.limits.get(r.name), r.limit) for r in problem.resources
                        if r.limit is not None) and len(cert.limits) == len(problem.limits)
        out.append(CheckItem("limits", limits_ok, f"recorded {cert.limits}, problem "
                             f"{problem.limits}"))
        if cert.dual_bound is not None:
            slack = max(DEFAULT_ABS_GAP, rel_tol * max(1.0, abs(ev.objective)))
            out.append(CheckItem("dual <= primal", cert.dual_bound <= ev.objective + slack,
                                 f"dual {cert.dual_bound!r}, objective {ev.objective!r}"))
            out.append(_independent_check(problem, cert))
            abs_gap, rel_gap = gap(ev.objective, cert.dual_bound)
            out.append(CheckItem("gap", close(cert.abs_gap, abs_gap),
                                 f"recorded abs gap {cert.abs_gap!r}, recomputed {abs_gap!r}"))
            if solution.status == "optimal":
                tol = _param_float(cert, "rel_gap", DEFAULT_REL_GAP)
                atol = _param_float(cert, "abs_gap", DEFAULT_ABS_GAP)
                out.append(CheckItem("optimal status", is_optimal(abs_gap, rel_gap, tol, atol),
                                     f"recomputed rel gap {rel_gap!r} (tolerance {tol:g})"))
        elif solution.status == "optimal":
            out.append(CheckItem("optimal status", False, "status optimal without a dual bound"))
    else:
        out.append(CheckItem("no assignment", not solution.assignment,
                             f"status {solution.status} but {len(solution.assignment)} units "
                             "assigned"))
        if solution.status == "infeasible":
            from bitsack.solver.feasibility import min_cost_per_resource

            own = own_bounds(problem)
            out.append(CheckItem(
                "infeasible vs independent plan", own.plan is None,
                "bitsack's own greedy route finds no plan meeting every budget" if own.plan is
                None else f"bitsack's own greedy route finds a plan meeting every budget "
                f"(objective {own.upper:.8g}), so the problem is not infeasible"))

            for inf in solution.infeasibility:
                if inf.resource not in {r.name for r in problem.resources}:
                    out.append(CheckItem(f"infeasible {inf.resource}", False,
                                         "not a resource of the problem"))
                    continue
                low = min_cost_per_resource(problem, inf.resource)
                limit = problem.resource(inf.resource).limit
                ok = limit is not None and close(inf.min_achievable, low) and low > limit
                out.append(CheckItem(f"infeasible {inf.resource}", ok,
                                     f"smallest achievable {low:.6g} (recorded "
                                     f"{inf.min_achievable:.6g}), limit {limit}"))
    return tuple(out)


def _independent_check(problem: Problem, cert: Certificate) -> CheckItem:
    """The recorded dual bound against a plan bitsack finds by its own route
    (``bitsack.solver.certify``): a bound above a feasible plan's objective is false."""
    own = own_bounds(problem)
    if own.upper is None:
        return CheckItem("dual <= independent plan", True, "bitsack's own route found no plan "
                         "meeting every budget strictly; nothing to compare")
    atol = max(DEFAULT_ABS_GAP, _param_float(cert, "abs_gap", DEFAULT_ABS_GAP))
    ok = cert.dual_bound <= own.upper + slack(own.upper, atol)
    return CheckItem("dual <= independent plan", ok,
                     f"dual {cert.dual_bound!r}, objective of bitsack's own plan "
                     f"{own.upper!r}" + ("" if ok else ": the claimed bound is false (the "
                                         "optimum is at most that plan's objective)"))


def _param_float(cert: Certificate, key: str, default: float) -> float:
    """A tolerance recorded in ``cert.params`` (a file may hold anything there)."""
    value = cert.params.get(key, default) if isinstance(cert.params, dict) else default
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        return default
    return float(value)
