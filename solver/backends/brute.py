"""``brute``: exhaustive search over every assignment — the test oracle.

Enumerates the product of all units' options in lexicographic order (unit 0 most
significant), in vectorized chunks, and keeps the feasible assignment of least objective
(ties: the first in that order). Everything the problem can express is honoured: budgets,
``same_option`` / ``same_bits`` / ``min_kept`` constraints, the low-rank factor ``U`` and
explicit pairs. Being exhaustive, its dual bound is its own optimum and it proves
infeasibility when nothing qualifies.

Deliberately naive (no pruning, no decomposition) so that it shares no logic with the
backends it checks. It refuses instances above ``max_combinations`` (params, default
2,000,000) with :class:`UnsupportedProblem`.
"""

from __future__ import annotations

import math

import numpy as np

from bitsack.solver.backends.base import (
    SolveOptions,
    Stopwatch,
    UnsupportedProblem,
    check_params,
    int_param,
    make_solution,
    register,
)
from bitsack.solver.problem import Problem
from bitsack.solver.solution import FEASIBILITY_TOL, Solution

#: Default largest number of assignments brute force will enumerate.
MAX_COMBINATIONS = 2_000_000
_CHUNK = 1 << 15


@register
class BruteBackend:
    """Exhaustive enumeration (tiny instances only)."""

    name = "brute"
    exact = True

    @classmethod
    def is_available(cls) -> bool:
        return True

    def solve(self, problem: Problem, options: SolveOptions) -> Solution:
        clock = Stopwatch()
        check_params(self.name, options.params, ("max_combinations",))
        limit = int_param(self.name, options.params, "max_combinations", MAX_COMBINATIONS, 1,
                          10**12)
        sizes = [len(u.options) for u in problem.units]
        total = math.prod(sizes)
        if total > limit:
            digits = len(str(total))
            size = str(total) if digits <= 12 else f"~1e{digits - 1}"
            raise UnsupportedProblem(f"brute: {size} assignments exceed max_combinations "
                                     f"= {limit}; use dp, greedy or a MIP backend")
        best_value, best_row = _search(problem, sizes, total)
        if best_row is None:
            return make_solution(problem, assignment=None, dual_bound=None, solver=self.name,
                                 solver_version="1", options=options, wall_time_s=clock(),
                                 params={"max_combinations": limit}, infeasible=True)
        assignment = {u.id: u.options[int(best_row[i])].id for i, u in enumerate(problem.units)}
        return make_solution(problem, assignment=assignment, dual_bound=best_value,
                             solver=self.name, solver_version="1", options=options,
                             wall_time_s=clock(), params={"max_combinations": limit,
                                                          "enumerated": total})


def _search(problem: Problem, sizes: list[int], total: int) -> tuple[float, np.ndarray | None]:
    from bitsack.solver.feasibility import constraint_violations_vectorized

    arrays = problem.arrays
    start = arrays.start[:-1]
    radix = np.array(sizes, dtype=np.int64)
    # place value of each unit's digit: unit 0 most significant
    place = np.ones(len(sizes), dtype=np.int64)
    for i in range(len(sizes) - 2, -1, -1):
        place[i] = place[i + 1] * radix[i + 1]
    limited = [(arrays.cost[r.name], r.limit) for r in problem.resources if r.limit is not None]
    inter = problem.interactions
    UT = sqn = None
    if inter is not None and inter.U is not None:
        UT = np.asarray(inter.U, dtype=np.float64).T
        sqn = np.einsum("ij,ij->i", UT, UT)
    pairs = []
    if inter is not None:
        for p in inter.pairs:
            pairs.append((problem.unit_index[p.a[0]], problem.option_index(*p.a),
                          problem.unit_index[p.b[0]], problem.option_index(*p.b), p.value))
    best_value, best_row = math.inf, None
    for lo in range(0, total, _CHUNK):
        idx = np.arange(lo, min(total, lo + _CHUNK), dtype=np.int64)
        digits = (idx[:, None] // place[None, :]) % radix[None, :]
        chosen = digits + start[None, :]
        ok = constraint_violations_vectorized(problem, chosen)
        for col, lim in limited:
            ok &= col[chosen].sum(axis=1) - lim <= FEASIBILITY_TOL * max(1.0, abs(lim))
        if not ok.any():
            continue
        digits, chosen = digits[ok], chosen[ok]
        value = arrays.loss[chosen].sum(axis=1)
        if UT is not None:
            tot = UT[chosen].sum(axis=1)
            value = value + 0.5 * (np.einsum("ij,ij->i", tot, tot) - sqn[chosen].sum(axis=1))
        for ua, ia, ub, ib, v in pairs:
            value = value + v * ((chosen[:, ua] == ia) & (chosen[:, ub] == ib))
        k = int(np.argmin(value))
        if value[k] < best_value:
            best_value, best_row = float(value[k]), digits[k].copy()
    return best_value, best_row
