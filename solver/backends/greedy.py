"""``greedy``: the MCKP convex-hull / Lagrangian heuristic, with its Lagrangian lower bound.

This is the baseline that HAWQ- and NNCF-style mixed-precision tools use: price every
resource, let each unit take the option that is cheapest in ``loss + price · cost``, and
raise the prices until the budgets hold; then spend what budget is left on the steepest
remaining improvements. It is fast and usually close, but it proves nothing by itself —
which is why it reports the Lagrangian bound, so its gap is visible.

Normalized costs ``ĉ_r = cost_r / limit_r`` make the multipliers comparable across resources
(loss units per whole budget). For multipliers ``λ >= 0``

    L(λ) = min_{x satisfying the side constraints} Σ_u (ℓ[u,o_u] + λ·ĉ[u,o_u])  −  Σ_r λ_r

is a lower bound on the optimum for every λ (weak duality: any feasible x has
λ·(ĉx − 1) <= 0). A zero budget is normalized by its largest cost instead, with 0 in place
of the 1; every limit includes ``evaluate``'s relative 1e-9 float tolerance, so the bound
holds for every plan ``evaluate`` accepts. The inner minimization is exact and fast
(``bitsack.solver.feasibility.min_weighted``: separable over units, closed form over
constraint groups). With one binding budget L is a
concave function of a scalar, maximized by bisection on its supergradient ``usage/limit − 1``
(the breakpoints are exactly the slopes of the units' lower convex hulls, so this *is* the
convex-hull greedy). With several budgets: cyclic coordinate bisection, then projected
supergradient steps (Polyak step towards the best primal value). Every L(λ) evaluated is a
valid bound; the best is reported.

Interactions. The heuristic chooses by the standalone losses only; the objective it reports
is always the full one (``evaluate``). For the bound, the interaction term must be bounded
below: with the low-rank factor it equals ``½‖Σ_u U_{:,o_u}‖² − ½ Σ_u ‖U_{:,o_u}‖²`` and the
first part is >= 0, so using ``ℓ' = ℓ − ½‖U_{:,(u,o)}‖²`` per option gives a valid (often
loose) additive lower bound; an explicit pair of value v < 0 adds v to the loss of its ``a``
option (``v·[a∧b] >= v·[a]``), one with v > 0 is dropped (>= 0). The dual bound is computed on
ℓ', so it stays valid with interactions.

Primal. Among the minimizers x(λ) met during the search, the feasible one with the least
objective; and separately the cheapest assignment. Each is then improved by the classic
greedy fill: over units not in a ``same_bits`` / ``min_kept`` group, repeatedly take the
option change with the largest loss decrease per unit of normalized extra cost that still
fits every budget. The better of the two is returned.

Params: ``iterations`` (supergradient steps with several budgets, default 200). The time
limit is not consulted: the work is bounded (about 60 evaluations of L per budget and cycle).
"""

from __future__ import annotations

import numpy as np

from bitsack.solver.backends.base import (
    SolveOptions,
    Stopwatch,
    check_params,
    int_param,
    make_solution,
    register,
)
from bitsack.solver.lagrangian import LagrangianSearch
from bitsack.solver.problem import Problem
from bitsack.solver.solution import Solution


@register
class GreedyBackend:
    """Lagrangian / convex-hull heuristic with a Lagrangian dual bound."""

    name = "greedy"
    exact = False

    @classmethod
    def is_available(cls) -> bool:
        return True

    def solve(self, problem: Problem, options: SolveOptions) -> Solution:
        clock = Stopwatch()
        check_params(self.name, options.params, ("iterations",))
        run = LagrangianSearch(problem, int_param(self.name, options.params, "iterations", 200, 0,
                                         100_000))
        result = run.solve()
        params = {"lambda": {r: float(v) for r, v in zip(run.names, run.best_lambda,
                                                         strict=True)},
                  "evaluations": run.evaluations}
        if result is None:
            return make_solution(problem, assignment=None, dual_bound=run.best_dual
                                 if np.isfinite(run.best_dual) else None, solver=self.name,
                                 solver_version="1", options=options, wall_time_s=clock(),
                                 params=params, infeasible=run.proven_infeasible,
                                 message="" if run.proven_infeasible else
                                 "greedy found no feasible plan; try an exact backend",
                                 check_claims=False)
        flat_ids = run.flat_ids
        assignment = {u.id: flat_ids[result[i]] for i, u in enumerate(problem.units)}
        dual = run.best_dual if np.isfinite(run.best_dual) else None
        # its Lagrangian bound is the independent one make_solution would compare with
        return make_solution(problem, assignment=assignment, dual_bound=dual,
                             solver=self.name, solver_version="1", options=options,
                             wall_time_s=clock(), params=params, check_claims=False)
