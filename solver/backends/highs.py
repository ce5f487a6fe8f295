"""``highs``: the MILP of ``mathopt_model`` solved by HiGHS through OR-Tools MathOpt.

HiGHS through MathOpt takes linear objectives only (a quadratic one fails inside MathOpt with
``StatusNotOk``), so interactions are handled by outer approximation (Kelley's cutting planes,
Duran & Grossmann 1986): the convex term ½Σ_k y_k² is replaced by ½Σ_k t_k with t_k ≥ 0, the
MILP is solved, and tangent cuts of y_k² at the MILP's choice are added::

    oa_cut[j,k]:   t_k ≥ 2 p_k y_k − p_k²          (p = U x_j, the j-th point; y_k² ≥ that)

Each cut under-estimates the convex function, so every MILP is a relaxation of the problem and
its dual bound is a valid lower bound on the true optimum; every MILP solution is a feasible
plan whose true objective ``evaluate`` recomputes. The loop stops when the best plan's
objective and the best MILP bound are within the requested gap, or time runs out.

Two cut families (``params["cuts"]``). ``per_factor`` (above) keeps y = Ux as N dense rows
(N × n nonzeros: 2.3M for the 7B shape at N = 128) and cuts each factor. ``aggregated``
(default) cuts one epigraph t ≥ ½‖y‖² directly in x: ``oa_cut[j]: t ≥ (Uᵀp)·x − ½‖p‖²``, one
dense row per round and no y. The aggregated cuts are weaker per round but each MILP is far
lighter; on the generator's Fisher-shaped factors (a shared direction per layer) they won at
every size measured (16 layers, N = 128: 1e-4 proven in 30 s vs 0.35 % after 70 s; 7B shape,
N = 128: 1e-4 in 43 s while one per-factor MILP did not finish its root in 60 s). On factors
with independent random columns per-factor cuts needed fewer rounds (1 layer, N = 32: 1.3 s
vs 13 s), so both stay available.

Before the first OA round the plan that ignores interactions is solved (a plain MILP), and the
first cuts are taken at its y: the interactions are a correction to the standalone losses, so
that plan is close to optimal and its tangents are tight near the answer.

``params``: ``cuts`` (``aggregated`` default, or ``per_factor``), ``max_rounds`` (OA MILP
rounds after the seed, default 50),
``milp_rel_gap`` (the gap each MILP is solved to; default half the requested gap).

Determinism: HiGHS runs its MIP on one thread and is deterministic for a fixed
``random_seed`` unless the wall-clock limit stops it. ``threads`` cannot be set through
MathOpt for HiGHS and is recorded as 1.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from bitsack.errors import SolverError
from bitsack.solver.backends.base import (
    SolveOptions,
    Stopwatch,
    check_params,
    float_param,
    int_param,
    make_solution,
    register,
)
from bitsack.solver.backends.mathopt_model import (
    MipFormulation,
    additive_plan,
    budget_excess,
    build_mip,
    hint_params,
    mathopt_solver_works,
    ortools_version,
    read_result,
    run_mathopt,
    solve_params,
    tighten_budgets,
)
from bitsack.solver.problem import Problem
from bitsack.solver.solution import Solution, evaluate, gap, is_optimal

_PARAMS = ("cuts", "max_rounds", "milp_rel_gap")
_BUDGET_RETRIES = 2


@functools.lru_cache(maxsize=1)
def _available() -> bool:
    return mathopt_solver_works("HIGHS")


@register
class HighsBackend:
    """OR-Tools MathOpt + HiGHS: exact MILP; interactions by outer approximation."""

    name = "highs"

    @classmethod
    def is_available(cls) -> bool:
        """True when OR-Tools imports and MathOpt's HiGHS solves a trivial MIP."""
        return _available()

    def solve(self, problem: Problem, options: SolveOptions) -> Solution:
        """Solve ``problem`` to ``options.rel_gap`` within ``options.time_limit_s``.

        Raises:
            SolverError: unknown ``params`` key or value, or HiGHS failed.
        """
        watch = Stopwatch()
        check_params(self.name, options.params, _PARAMS)
        cuts = options.params.get("cuts", "aggregated")
        if cuts not in ("per_factor", "aggregated"):
            raise SolverError(f"params.cuts: {cuts!r} is not a cut family; "
                              f"valid: ['per_factor', 'aggregated']")
        max_rounds = int_param(self.name, options.params, "max_rounds", 50, 1, 100_000)
        milp_gap = float_param(self.name, options.params, "milp_rel_gap",
                               0.5 * options.rel_gap, 0.0, 1.0, hi_open=True)

        form = build_mip(problem,
                         interactions="outer" if cuts == "per_factor" else "outer_aggregated")
        build_s = watch()
        run = OuterApproximation(problem, options, form, watch, milp_gap, "HIGHS", self.name)
        if form.U is None:
            run.solve_milp()
        else:
            run.outer_approximation(cuts, max_rounds)

        used = {
            "interactions": None if form.U is None else f"outer approximation, {cuts} cuts",
            "time_limit_s": options.time_limit_s,
            "rel_gap": options.rel_gap,
            "abs_gap": options.abs_gap,
            "milp_rel_gap": milp_gap,
            "seed": options.seed,
            "threads": 1,
            "rounds": run.rounds,
            "cuts_added": run.cuts_added,
            "termination": run.terminations,
            "build_s": round(build_s, 3),
            **form.counts,
        }
        return make_solution(
            problem, assignment=run.best, dual_bound=run.lower, solver=self.name,
            solver_version=f"ortools {ortools_version()} (MathOpt HiGHS)", options=options,
            wall_time_s=watch(), params=used, infeasible=run.infeasible,
        )


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
        for _ in range(_BUDGET_RETRIES):
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
