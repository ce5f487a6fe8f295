"""Outer approximation of the interaction term (Kelley's cutting planes; Duran & Grossmann
1986), shared by ``highs`` and by ``scip``'s ``interactions="outer"``.

The convex term ½Σ_k y_k² of the model (``solver/__init__.py``) is replaced by ½Σ_k t_k with
t_k ≥ 0; each MILP is solved, and tangent cuts of y_k² at the MILP's choice are added::

    oa_cut[j,k]:   t_k ≥ 2 p_k y_k − p_k²          (p = U x_j, the j-th point; y_k² ≥ that)

or, with ``aggregated`` cuts, one dense row per round directly in x and no y:
``oa_cut[j]: t ≥ (Uᵀp)·x − ½‖p‖²``. Each cut under-estimates the convex function, so every
MILP is a relaxation of the problem and its dual bound is a valid lower bound on the true
optimum; every MILP solution is a feasible plan whose true objective ``evaluate`` recomputes.
The loop stops when the best plan's objective and the best MILP bound are within the
requested gap, or time runs out. Before the first round the plan that ignores interactions is
solved (a plain MILP) and the first cuts are taken at its y: the interactions are a correction
to the standalone losses, so that plan is close to optimal and its tangents are tight near the
answer.
"""

from __future__ import annotations

import math

import numpy as np

from bitsack.solver.backends.base import SolveOptions, Stopwatch
from bitsack.solver.backends.mathopt_base import (
    MathOptRun,
    additive_plan,
    budget_excess,
    hint_params,
    read_result,
    run_mathopt,
    solve_params,
    tighten_budgets,
)
from bitsack.solver.backends.mathopt_model import MipFormulation, build_mip
from bitsack.solver.problem import Problem
from bitsack.solver.solution import evaluate, gap, is_optimal

#: Re-solves allowed to push a plan that violates a budget by the solver's tolerance back inside.
BUDGET_RETRIES = 2

#: Cut families.
CUTS = ("per_factor", "aggregated")


def solve_outer(problem: Problem, options: SolveOptions, watch: Stopwatch, *, solver_type: str,
                backend: str, cuts: str, max_rounds: int, milp_gap: float) -> MathOptRun:
    """Solve by MILPs: plainly without interactions, by outer approximation with them."""
    form = build_mip(problem, interactions="outer" if cuts == "per_factor" else
                     "outer_aggregated")
    build_s = watch()
    run = OuterApproximation(problem, options, form, watch, milp_gap, solver_type, backend)
    if form.U is None:
        run.solve_milp()
    else:
        run.outer_approximation(cuts, max_rounds)
    params = {
        "interactions": None if form.U is None else f"outer approximation, {cuts} cuts",
        "milp_rel_gap": milp_gap,
        "rounds": run.rounds,
        "cuts_added": run.cuts_added,
        "termination": run.terminations,
    }
    return MathOptRun(form=form, assignment=run.best, dual_bound=run.lower,
                      infeasible=run.infeasible, build_s=build_s, params=params)


class OuterApproximation:
    """One solve by MILPs (HiGHS, or SCIP for ``scip``'s ``interactions="outer"``): best plan,
    best bound, the rounds so far. ``solve_milp`` alone is a plain MILP solve."""

    def __init__(self, problem: Problem, options: SolveOptions, form: MipFormulation,
                 watch: Stopwatch, milp_gap: float, solver_type: str, backend: str) -> None:
        self.solver_type = solver_type
        self.backend = backend
        self.problem = problem
        self.options = options
        self.form = form
        self.watch = watch
        self.milp_gap = milp_gap
        self.best: dict[str, str] | None = None
        self.best_obj = math.inf
        self.lower: float | None = None
        self.infeasible = False
        self.rounds = 0
        self.cuts_added = 0
        self.terminations: list[str] = []

    def remaining(self) -> float | None:
        if self.options.time_limit_s is None:
            return None
        return self.options.time_limit_s - self.watch()

    def closed(self) -> bool:
        if self.best is None:
            return False
        abs_gap, rel_gap = gap(self.best_obj, self.lower)
        return is_optimal(abs_gap, rel_gap, self.options.rel_gap, self.options.abs_gap)

    def _milp(self, rel_gap: float, hint: dict[str, str] | None = None):
        """One HiGHS solve of the current model; its bound counts only if the model is a
        relaxation (budget rows untightened), which ``solve_milp`` tracks."""
        from ortools.math_opt.python import mathopt

        remaining = self.remaining()
        params = solve_params(self.options, time_limit_s=remaining, rel_gap=rel_gap,
                              objective_scale=self.form.objective_scale,
                              threads=self.solver_type != "HIGHS")
        model_params = None if hint is None else hint_params(self.form, self.problem, hint)
        result = run_mathopt(self.form.model, getattr(mathopt.SolverType, self.solver_type),
                             self.backend, params,
                             model_params)
        answer = read_result(self.problem, self.form, result, self.backend)
        self.terminations.append(answer.termination)
        self.rounds += 1
        return answer

    def solve_milp(self, rel_gap: float | None = None, hint: dict[str, str] | None = None):
        """Solve the current MILP, keep its bound, offer its plan; returns the plan or None.

        A plan violating a budget by the solver's tolerance is pushed back inside by solving
        again with tightened budget rows (whose bounds then do not count), the rows restored.
        """
        answer = self._milp(self.options.rel_gap if rel_gap is None else rel_gap, hint)
        if answer.infeasible:
            # Cuts only relax the objective; the constraints are the problem's own.
            self.infeasible = True
            return None
        if answer.dual_bound is not None:
            self.lower = answer.dual_bound if self.lower is None else max(self.lower,
                                                                          answer.dual_bound)
        plan = answer.assignment
        saved = {name: self.form.model.get_linear_constraint(row).upper_bound
                 for name, (row, _) in self.form.budget_rows.items()}
        for _ in range(BUDGET_RETRIES):
            if plan is None:
                break
            excess = budget_excess(self.problem, plan)
            if not excess:
                break
            tighten_budgets(self.form, excess)
            plan = self._milp(self.options.rel_gap if rel_gap is None else rel_gap).assignment
        for name, (row, _) in self.form.budget_rows.items():
            self.form.model.get_linear_constraint(row).upper_bound = saved[name]
        if plan is not None and budget_excess(self.problem, plan):
            plan = None
        if plan is not None:
            value = evaluate(self.problem, plan).objective
            if value < self.best_obj:
                self.best, self.best_obj = plan, value
        return plan

    def outer_approximation(self, cuts: str, max_rounds: int) -> None:
        """Kelley's loop (module docstring): solve, cut at the new point, until the gap closes."""
        # Round 0: the additive plan (interactions ignored) seeds the first cuts. Its bound is
        # not a bound of the problem (the objective differs), so it is not kept.
        plan = self._additive_plan()
        if self.infeasible:
            return
        seen: set[tuple[str, ...]] = set()
        while True:
            if plan is not None:  # None only after a seed that found nothing in its time
                key = tuple(plan[u.id] for u in self.problem.units)
                if key in seen:
                    # Cutting at a point twice adds nothing: the tangent there is already
                    # exact, so the MILP's objective is the true one; only its gap is left.
                    break
                seen.add(key)
                self._add_cuts(plan, cuts)
            if self.closed() or self.rounds - 1 >= max_rounds:  # round 1 is the seed
                break
            remaining = self.remaining()
            if remaining is not None and remaining <= 0:
                break
            plan = self.solve_milp(self.milp_gap, hint=self.best)
            if plan is None:  # infeasible, or no plan within the time left
                break

    def _additive_plan(self) -> dict[str, str] | None:
        """The plan that ignores interactions (``additive_plan``), offered as a candidate."""
        from ortools.math_opt.python import mathopt

        plan, answer = additive_plan(self.problem, getattr(mathopt.SolverType, self.solver_type),
                                     self.backend,
                                     self.options, self._share(0.25))
        self.terminations.append(f"additive seed: {answer.termination}")
        self.rounds += 1
        if answer.infeasible:
            # Same constraints as the problem: its infeasibility is the problem's.
            self.infeasible = True
            return None
        if plan is not None:
            value = evaluate(self.problem, plan).objective
            if value < self.best_obj:
                self.best, self.best_obj = plan, value
        return plan

    def _share(self, fraction: float) -> float | None:
        remaining = self.remaining()
        return None if remaining is None else max(fraction * remaining, 0.0)

    def _add_cuts(self, plan: dict[str, str], cuts: str) -> None:
        """Tangent cuts of the interaction term at p = U x(plan)."""
        from bitsack.solver.solution import option_vector

        form, U = self.form, self.form.U
        chosen = option_vector(self.problem, plan)
        p = U[:, chosen].sum(axis=1)
        model = form.model
        added = 0
        tag = self.cuts_added
        if cuts == "per_factor":
            # Skip factors whose tangent would be (numerically) the existing t_k ≥ 0 bound.
            for k in np.flatnonzero(np.abs(p) > 1e-12 * max(1.0, float(np.abs(p).max()))):
                pk = float(p[k])
                model.add_linear_constraint(
                    form.t[k] - 2.0 * pk * form.y[k] >= -pk * pk, name=f"oa_cut[{tag},{k}]")
                added += 1
        else:
            from ortools.math_opt.python import mathopt

            g = U.T @ p  # gradient of ½‖Ux‖² at x is Uᵀp
            if float(p @ p) > 0.0:
                expr = mathopt.fast_sum(float(g[i]) * form.x[i] for i in np.flatnonzero(g))
                model.add_linear_constraint(form.t[0] - expr >= -0.5 * float(p @ p),
                                            name=f"oa_cut[{tag}]")
                added = 1
        self.cuts_added += added
