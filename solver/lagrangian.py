"""The multiple-choice knapsack's Lagrangian relaxation and greedy fill: bitsack's own bounds.

One engine, two users: the ``greedy`` backend (the NNCF/HAWQ-style baseline; its docstring
states the method: normalized costs, the dual function L(λ), coordinate bisection and
supergradient steps, the greedy fill) and the certificate check (``bitsack.solver.certify``),
which needs a lower bound and a feasible plan computed independently of any solver.
"""

from __future__ import annotations

import math

import numpy as np

from bitsack.solver.problem import Problem
from bitsack.solver.solution import FEASIBILITY_TOL

#: Bisection steps per coordinate of the dual search.
BISECTIONS = 60


def _scales(limits: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Per-resource normalization: the limit, or the largest cost for a zero limit."""
    out = np.array(limits, dtype=np.float64, copy=True)
    for r, lim in enumerate(out):
        if lim <= 0:
            out[r] = max(1.0, float(costs[r].max()) if costs.shape[1] else 1.0)
    return out


def lower_bound_losses(problem: Problem) -> np.ndarray:
    """Per-option losses whose additive sum is a lower bound on the full objective.

    ``ℓ − ½‖U_{:,i}‖²`` for the low-rank part, plus each negative pair's value on its ``a``
    option (see the module docstring). Equal to the losses without interactions.
    """
    lb = problem.arrays.loss.copy()
    inter = problem.interactions
    if inter is None:
        return lb
    if inter.U is not None:
        U = np.asarray(inter.U, dtype=np.float64)
        lb -= 0.5 * np.einsum("ij,ij->j", U, U)
    for p in inter.pairs:
        if p.value < 0:
            lb[problem.option_index(*p.a)] += p.value
    return lb


class LagrangianSearch:
    """The MCKP Lagrangian dual search and the greedy fill (``bitsack.solver.backends.greedy``'s
    docstring states the method). ``solve()`` returns the best plan's flat option indices;
    ``best_dual`` is the best Lagrangian bound met (a valid lower bound on the optimum)."""


    def __init__(self, problem: Problem, iterations: int, *, cycles: int = 4,
                 bisections: int = BISECTIONS):
        from bitsack.solver.feasibility import (
            max_cost_per_resource,
            min_cost_is_exact,
            min_cost_per_resource,
            structure_of,
        )

        self.problem = problem
        self.iterations = iterations
        self.cycles = cycles
        self.bisections = bisections
        arrays = problem.arrays
        self.loss = arrays.loss
        self.lb_loss = lower_bound_losses(problem)
        inter = problem.interactions
        self.has_inter = inter is not None and bool(
            inter.pairs or (inter.U is not None and np.any(inter.U != 0)))
        self.flat_ids = [o.id for u in problem.units for o in u.options]
        limited = [r for r in problem.resources if r.limit is not None]
        self.all_cost = np.stack([arrays.cost[r.name] for r in limited]) if limited \
            else np.zeros((0, problem.n_options))
        self.all_limit = np.array([r.limit for r in limited], dtype=np.float64)
        self.exact = min_cost_is_exact(problem)
        self.st = structure_of(problem)
        self.proven_infeasible = self.st.infeasible is not None
        if self.exact and not self.proven_infeasible:
            self.proven_infeasible = any(
                min_cost_per_resource(problem, r.name) > r.limit
                + FEASIBILITY_TOL * max(1.0, abs(r.limit)) for r in limited)
        binding = [r for r in limited if max_cost_per_resource(problem, r.name) > r.limit]
        self.names = [r.name for r in binding]
        raw = np.stack([arrays.cost[r.name] for r in binding]) if binding \
            else np.zeros((0, problem.n_options))
        # budgets with evaluate()'s float tolerance: the bound is then valid for every plan
        # evaluate() accepts, and prices do not diverge on a limit met only up to rounding
        limits = np.array([r.limit + FEASIBILITY_TOL * max(1.0, abs(r.limit)) for r in binding],
                          dtype=np.float64)
        scale = _scales(limits, raw)
        self.cost = raw / scale[:, None]  # normalized costs ĉ
        self.lim = limits / scale  # normalized limits (1, or 0 for a zero budget)
        self.best_dual = -np.inf
        self.best_lambda = np.zeros(len(binding))
        self.candidates: list[np.ndarray] = []
        self.evaluations = 0
        spread = self.loss.max() - self.loss.min() if len(self.loss) else 1.0
        self.lam_scale = max(float(spread) * len(problem.units), 1e-12)

    # -- the dual function -----------------------------------------------------------------

    def dual(self, lam: np.ndarray) -> tuple[float, np.ndarray]:
        """L(λ) and its supergradient; records the primal minimizer as a candidate."""
        from bitsack.solver.feasibility import min_weighted

        self.evaluations += 1
        priced = lam @ self.cost if len(lam) else 0.0
        res = min_weighted(self.problem, self.lb_loss + priced)
        if res.chosen is None:
            return -np.inf, np.zeros(len(lam))
        value = res.value - float(lam @ self.lim)
        grad = self.cost[:, res.chosen].sum(axis=1) - self.lim
        if value > self.best_dual:
            self.best_dual, self.best_lambda = value, lam.copy()
        primal = res.chosen
        if self.has_inter:
            primal = min_weighted(self.problem, self.loss + priced).chosen
        if primal is not None and self.feasible(primal):
            self.candidates.append(primal)
        return value, grad

    def _bisect(self, lam: np.ndarray, r: int) -> np.ndarray:
        """Maximize L along coordinate r (concave in λ_r) by bisection on its supergradient."""
        lam = lam.copy()
        lam[r] = 0.0
        _, g = self.dual(lam)
        if g[r] <= 0:
            return lam
        lo, hi = 0.0, self.lam_scale
        for _ in range(80):  # find a price at which this budget holds
            lam[r] = hi
            _, g = self.dual(lam)
            if g[r] <= 0:
                break
            lo, hi = hi, hi * 4
        else:
            return lam
        for _ in range(self.bisections):
            mid = 0.5 * (lo + hi)
            lam[r] = mid
            _, g = self.dual(lam)
            if g[r] > 0:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-12 * hi:
                break
        lam[r] = hi
        self.dual(lam)
        return lam

    def maximize_dual(self) -> None:
        k = len(self.names)
        lam = np.zeros(k)
        self.dual(lam)
        if k == 0:
            return
        for _ in range(1 if k == 1 else self.cycles):
            for r in range(k):
                lam = self._bisect(lam, r)
        if k == 1:
            return
        lam = self.best_lambda.copy()
        theta = 1.0
        stall = 0
        for _ in range(self.iterations):
            value, g = self.dual(lam)
            norm = float(g @ g)
            if norm == 0:
                break
            target = self.best_primal_value()
            if target is None:
                step = self.lam_scale * 0.01
            else:
                step = theta * max(target - value, 1e-12 * abs(target)) / norm
            prev_best = self.best_dual
            lam = np.maximum(0.0, lam + step * g)
            stall = 0 if self.best_dual > prev_best else stall + 1
            if stall >= 10:
                theta *= 0.5
                stall = 0
                lam = self.best_lambda.copy()

    # -- primal side -----------------------------------------------------------------------

    def feasible(self, chosen: np.ndarray) -> bool:
        from bitsack.solver.feasibility import constraint_violations_vectorized

        usage = self.all_cost[:, chosen].sum(axis=1)
        if np.any(usage - self.all_limit > FEASIBILITY_TOL * np.maximum(1.0,
                                                                        np.abs(self.all_limit))):
            return False
        return bool(constraint_violations_vectorized(self.problem, chosen[None, :])[0])

    def objective(self, chosen: np.ndarray) -> float:
        value = float(self.loss[chosen].sum())
        inter = self.problem.interactions
        if inter is not None and inter.U is not None:
            cols = np.asarray(inter.U)[:, chosen]
            tot = cols.sum(axis=1)
            value += 0.5 * (float(tot @ tot) - float(np.sum(cols * cols)))
        if inter is not None and inter.pairs:
            picked = set(chosen.tolist())
            for p in inter.pairs:
                if self.problem.option_index(*p.a) in picked and \
                        self.problem.option_index(*p.b) in picked:
                    value += p.value
        return value

    def best_primal_value(self) -> float | None:
        if not self.candidates:
            return None
        return min(self.objective(c) for c in self.candidates[-20:])

    def fill(self, chosen: np.ndarray) -> np.ndarray:
        """Steepest feasible improvements over units outside same_bits/min_kept groups.

        The classic MCKP greedy with a heap of candidate moves (unit u: current option ->
        option j that lowers the loss), keyed by loss decrease per unit of normalized extra
        cost. A popped move is applied if it still fits every budget, else dropped: with
        non-negative extra costs the slack only shrinks, so it would never fit later. Moves of
        a unit are re-generated from its new option after each change (stale ones skipped).
        """
        import heapq

        st = self.st
        free_supers = [int(s) for s in np.flatnonzero(st.free)]
        if not free_supers:
            return chosen
        chosen = chosen.copy()
        loss_s = st.super_weights(self.loss).tolist()
        cost_s = [st.super_weights(c).tolist() for c in self.all_cost]
        inv_scale = (1.0 / _scales(self.all_limit, self.all_cost)).tolist()
        R = range(len(cost_s))
        slack = (self.all_limit - self.all_cost[:, chosen].sum(axis=1)
                 + FEASIBILITY_TOL * np.maximum(1.0, np.abs(self.all_limit))).tolist()
        lead_of = {int(st.agg_idx[st.agg_ptr[k]]): k for k in range(len(loss_s))}
        cur = {s: lead_of[int(chosen[st.members[s][0]])] for s in free_supers}
        version = dict.fromkeys(free_supers, 0)

        def moves(s: int) -> list[tuple[float, int, int, int, int]]:
            """(−ratio, option, unit, unit version, from option) for every improving move."""
            k0 = cur[s]
            out = []
            for k in range(int(st.s_start[s]), int(st.s_start[s + 1])):
                dl = loss_s[k] - loss_s[k0]
                if dl >= 0:
                    continue
                eff = sum(max(cost_s[r][k] - cost_s[r][k0], 0.0) * inv_scale[r] for r in R)
                out.append((dl / eff if eff > 0 else -math.inf, k, s, version[s], k0))
            return out

        heap = [m for s in free_supers for m in moves(s)]
        heapq.heapify(heap)
        while heap:
            _, k, s, ver, k0 = heapq.heappop(heap)
            if ver != version[s]:
                continue  # the unit moved since this candidate was made
            dc = [cost_s[r][k] - cost_s[r][k0] for r in R]
            if any(dc[r] > slack[r] for r in R):
                continue
            for r in R:
                slack[r] -= dc[r]
            cur[s] = k
            version[s] += 1
            flat = st.agg_idx[st.agg_ptr[k]:st.agg_ptr[k + 1]]
            chosen[self.problem.arrays.unit_of[flat]] = flat
            for m in moves(s):
                heapq.heappush(heap, m)
        return chosen

    def solve(self, cheapest_start: bool = True) -> np.ndarray | None:
        """The best plan found (None without one); ``cheapest_start`` also fills up from the
        cheapest assignment (when no Lagrangian candidate is feasible it is the only start)."""
        from bitsack.solver.feasibility import min_weighted

        if self.st.infeasible is not None:
            return None
        self.maximize_dual()
        starts = []
        if self.candidates:
            starts.append(min(self.candidates, key=self.objective))
        if len(self.all_cost) and (cheapest_start or not starts):
            norm = self.all_cost / _scales(self.all_limit, self.all_cost)[:, None]
            cheapest = min_weighted(self.problem, norm.sum(axis=0)).chosen
            if cheapest is not None and self.feasible(cheapest):
                starts.append(cheapest)
        results = [self.fill(x) for x in starts]
        results = [x for x in results if self.feasible(x)] + [x for x in starts]
        if not results:
            return None
        return min(results, key=self.objective)
