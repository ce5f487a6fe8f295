"""``scip``: the MIP / MIQP of ``mathopt_model`` solved by SCIP through OR-Tools MathOpt.

Interactions enter as the convex quadratic objective ½Σ_k y_k² over y = Ux (an MIQP; SCIP
outer-approximates it inside its own branch and bound). ``params`` (``SolveOptions.params``):

- ``interactions``: ``objective`` (default), ``epigraph`` (t_k ≥ y_k² as N quadratic
  constraints), ``direct`` (½xᵀUᵀUx, no y; small instances only) or ``outer`` (the ``highs``
  backend's outer approximation with SCIP solving each MILP).

How they compare (generated Llama-2-7B-shaped instances, 2-core EPYC shared with other jobs,
rel. gap 1e-4 asked, 60 s limit). 2 layers (1128 binaries), N = 32: ``objective`` 1.8 s,
``epigraph`` 1.8 s (SCIP presolves both to the same thing here; on a factor with independent
random columns ``epigraph`` took 18.6 s against 1.0 s), ``direct`` no proof in 60 s (gap 23:
SCIP's relaxation of the dense n×n form is weak), ``outer`` 0.7 s. At the 7B shape (18k
binaries, N = 128) the y = Ux rows hold 2.3M nonzeros and SCIP's first root LP alone took
~40 s (after 6 s of presolve), so ``objective`` ends at the root bound (gap 8 % at 60 s);
``outer`` proves 1 % in ~14 s. ``objective`` stays the default (the MIQP as such, best up to a
few thousand binaries); ``bench/results/solver.md`` has the full table.

With interactions the plan that ignores them (``additive_plan``, a quarter of the time) is
given to SCIP as a hint: SCIP's own heuristics found a plan 800× the optimum on the 7B shape.

Determinism: SCIP is deterministic for a fixed ``random_seed`` unless the wall-clock limit is
what stops it (then where it stopped depends on the machine's speed).
"""

from __future__ import annotations

from bitsack.errors import SolverError
from bitsack.solver.backends.base import SolveOptions, Stopwatch, register
from bitsack.solver.backends.mathopt_base import (
    MathOptBackend,
    MathOptRun,
    additive_plan,
    budget_excess,
    hint_params,
    read_result,
    run_mathopt,
    solve_params,
    tighten_budgets,
)
from bitsack.solver.backends.mathopt_model import build_mip
from bitsack.solver.backends.outer import BUDGET_RETRIES, solve_outer
from bitsack.solver.problem import Problem

_MODES = ("objective", "epigraph", "direct", "outer")


@register
class ScipBackend(MathOptBackend):
    """OR-Tools MathOpt + SCIP: exact MIP, MIQP with interactions."""

    name = "scip"
    solver_type = "GSCIP"
    params = ("interactions",)

    def run(self, problem: Problem, options: SolveOptions, watch: Stopwatch) -> MathOptRun:
        mode = options.params.get("interactions", "objective")
        if mode not in _MODES:
            raise SolverError(f"params.interactions: {mode!r} is not a scip formulation; "
                              f"valid: {list(_MODES)}")
        if mode == "outer":
            # outer approximation (aggregated cuts), each MILP solved by SCIP: no dense
            # y = Ux rows in SCIP's LP
            return solve_outer(problem, options, watch, solver_type=self.solver_type,
                               backend=self.name, cuts="aggregated", max_rounds=50,
                               milp_gap=0.5 * options.rel_gap)
        return self._direct(problem, options, watch, mode)

    def _direct(self, problem: Problem, options: SolveOptions, watch: Stopwatch,
                mode: str) -> MathOptRun:
        """The MIP / MIQP in one SCIP solve (re-solved with tightened budget rows when a plan
        meets a budget only up to SCIP's tolerance)."""
        from ortools.math_opt.python import mathopt

        form = build_mip(problem, interactions=mode)
        build_s = watch()

        def remaining(share: float = 1.0) -> float | None:
            if options.time_limit_s is None:
                return None
            return share * max(options.time_limit_s - watch(), 0.0)

        terminations = []
        model_params = None
        if form.U is not None:
            # SCIP's own heuristics find poor plans for the 7B-shaped MIQP (800× the
            # optimum after 60 s); the plan without interactions is a good start.
            seed, seed_answer = additive_plan(problem, mathopt.SolverType.GSCIP, self.name,
                                              options, remaining(0.25))
            terminations.append(f"additive seed: {seed_answer.termination}")
            if seed is not None:
                model_params = hint_params(form, problem, seed)

        answer = dual = None
        for attempt in range(BUDGET_RETRIES + 1):
            params = solve_params(options, time_limit_s=remaining(), rel_gap=options.rel_gap,
                                  objective_scale=form.objective_scale)
            result = run_mathopt(form.model, mathopt.SolverType.GSCIP, self.name, params,
                                 model_params)
            answer = read_result(problem, form, result, self.name)
            terminations.append(answer.termination)
            if attempt == 0:
                # Only the untightened model's bound is a bound of the problem.
                dual = answer.dual_bound
            if answer.assignment is None:
                break
            excess = budget_excess(problem, answer.assignment)
            if not excess:
                break
            tighten_budgets(form, excess)
        assignment = answer.assignment
        if assignment is not None and budget_excess(problem, assignment):
            assignment = None  # retries exhausted: report no plan rather than a violating one
        return MathOptRun(form=form, assignment=assignment, dual_bound=dual,
                          infeasible=answer.infeasible, build_s=build_s,
                          params={"interactions": mode if form.U is not None else None,
                                  "termination": terminations})
