"""``dp``: exact dynamic programming for one budget and an additive objective.

Scope. One *binding* budget (budgets that even the most expensive assignment meets are
dropped first), no interactions, and side constraints whose ``same_bits`` / ``min_kept``
groups do not overlap (``same_option`` groups may overlap anything: they are merged into
super-units first, see ``bitsack.solver.feasibility``). Anything else raises
:class:`UnsupportedProblem`, which ``auto`` takes as "use another backend".

The recursion. Blocks are processed one after another over a table ``T[c]`` = least loss of
the blocks so far with discretized cost exactly ``c`` (``c = 0 .. C``):

- a free super-unit: ``T'[c] = min_o T[c − w_o] + l_o``;
- a ``same_bits`` group: for each bit-width b a copy of the table is run through the group's
  members with only ``{prune, b}`` allowed, and ``T'`` is the cell-wise minimum over b;
- a ``min_kept`` group (at least k kept): ``k + 1`` tables indexed by ``min(k, kept so far)``;
  ``T'`` is the table of index k.

The answer is ``min_c T[c]``; choices are recorded per block and cell and traced back.

Discretization — what is exact and what is bounded. First each super-unit's cheapest option
cost is subtracted from its options and from the limit (every assignment pays it), leaving
costs ``c' >= 0`` and capacity ``L'``. The limit includes the relative 1e-9 float tolerance
that ``evaluate`` allows (``FEASIBILITY_TOL``), so dp and ``evaluate`` agree on what fits.

- *Exact mode*: if every ``c'`` is an integer (memory bytes are), divide by their greatest
  common divisor g; since sums of multiples of g are multiples of g,
  ``Σ c' <= L'  ⇔  Σ c'/g <= ⌊⌊L'⌋ / g⌋ = C``. The DP over ``C + 1`` cells is then exact.
- *Grid mode* (fractional costs, or ``C + 1`` above the cell limit): ``C + 1`` cells of
  step ``s = L'/C``. Primal pass: costs rounded **up**,
  ``⌈c'/s⌉``; a plan with ``Σ⌈c'/s⌉ <= C`` has ``Σ c' <= s·C = L'``, so it is always
  feasible. Its loss is at most the true optimum at the tighter limit ``L' − n·s`` (rounding
  up adds less than s per unit, n units). Dual pass: costs rounded **down**, ``⌊c'/s⌋``;
  every truly feasible plan has ``Σ⌊c'/s⌋ <= Σ c'/s <= C``, so this DP is a relaxation and its
  optimum is a valid lower bound, reported as the dual bound. This pass runs first: if its
  optimal plan happens to meet the true budget, it is optimal outright (gap 0); otherwise
  the rounded-up pass supplies the plan and the certificate's gap is the honest distance
  between the two.

If the rounded-down relaxation has no solution, the problem is proven infeasible; if only the
rounded-up pass fails, the status is ``no_solution`` with the dual bound.

Params (``SolveOptions.params``): ``max_cells`` (default 2**20), ``max_record_mb`` (memory
for trace-back records, default 384), ``max_work`` (cell updates per pass, default 2e9). The
time limit is not consulted: the work is bounded by these up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bitsack.solver.backends.base import (
    SolveOptions,
    Stopwatch,
    UnsupportedProblem,
    check_params,
    float_param,
    int_param,
    make_solution,
    register,
)
from bitsack.solver.problem import Problem
from bitsack.solver.solution import FEASIBILITY_TOL, Solution

DEFAULT_MAX_CELLS = 1 << 20
DEFAULT_MAX_RECORD_MB = 384
DEFAULT_MAX_WORK = 2e9
_INF = float("inf")


@dataclass(frozen=True)
class DPPlan:
    """How ``dp`` would discretize an instance (see :func:`plan`).

    Attributes:
        resource: the binding budget's resource (None: no budget binds).
        exact: exact (integer) mode or grid mode.
        cells: table length ``C + 1``.
        step: cost of one cell in resource units (g in exact mode).
        shift: Σ of the super-units' cheapest costs, removed from the limit.
        capacity: ``L'`` (limit minus ``shift``), resource units.
        dropped: resources whose budget can never bind and were ignored.
    """

    resource: str | None
    exact: bool
    cells: int
    step: float
    shift: float
    capacity: float
    dropped: tuple[str, ...]


@register
class DPBackend:
    """Exact DP over one budget (see the module docstring for the discretization)."""

    name = "dp"
    exact = True

    @classmethod
    def is_available(cls) -> bool:
        return True

    def solve(self, problem: Problem, options: SolveOptions) -> Solution:
        clock = Stopwatch()
        check_params(self.name, options.params, ("max_cells", "max_record_mb", "max_work"))
        p = plan(problem, options.params)
        params = {"resource": p.resource, "mode": "exact" if p.exact else "grid",
                  "cells": p.cells, "step": p.step, "dropped_budgets": list(p.dropped)}

        def done(assignment, dual, infeasible=False, message=""):
            return make_solution(problem, assignment=assignment, dual_bound=dual,
                                 solver=self.name, solver_version="1", options=options,
                                 wall_time_s=clock(), params=params, infeasible=infeasible,
                                 message=message)

        if p.capacity < 0 or p.cells <= 0:
            return done(None, None, infeasible=True)
        model = _Model(problem, p)
        if p.exact:
            value, super_choice = model.run(rounding="exact", trace=True)
            if super_choice is None:
                return done(None, None, infeasible=True)
            return done(model.assignment(super_choice), value)
        # grid mode: the rounded-down relaxation first; if its optimum happens to fit the
        # true budget it is optimal outright, else the rounded-up pass supplies the plan
        dual, relaxed = model.run(rounding="down", trace=True)
        if relaxed is None:
            return done(None, None, infeasible=True)
        if model.fits(relaxed):
            params["relaxation_fits"] = True
            return done(model.assignment(relaxed), dual)
        del relaxed
        _, super_choice = model.run(rounding="up", trace=True)
        if super_choice is None:
            return done(None, dual, message="dp (grid mode): the rounded-up pass found no plan; "
                        "its rounded-down relaxation is feasible. Try an exact backend.")
        return done(model.assignment(super_choice), dual)


def plan(problem: Problem, params: dict | None = None) -> DPPlan:
    """Decide whether and how ``dp`` solves ``problem``.

    Raises:
        UnsupportedProblem: interactions, two or more binding budgets, or overlapping
            ``same_bits`` / ``min_kept`` groups.
    """
    from bitsack.solver.feasibility import max_cost_per_resource, structure_of

    params = params or {}
    inter = problem.interactions
    if inter is not None and (inter.pairs or (inter.U is not None and np.any(inter.U != 0))):
        raise UnsupportedProblem("dp: the objective has interactions; dp handles an additive "
                                 "objective only (use scip, highs or brute)")
    st = structure_of(problem)
    for comp in st.components:
        if comp.overlapping:
            idx = [c.index for c in comp.constraints]
            raise UnsupportedProblem(f"dp: constraints {idx} overlap (share units); dp supports "
                                     "non-overlapping same_bits/min_kept groups only")
    binding, dropped = [], []
    for res in problem.resources:
        if res.limit is None:
            continue
        if max_cost_per_resource(problem, res.name) <= res.limit:
            dropped.append(res.name)
        else:
            binding.append(res)
    if len(binding) > 1:
        raise UnsupportedProblem(f"dp: {len(binding)} budgets can bind "
                                 f"({[r.name for r in binding]}); dp handles one")
    max_cells = int_param("dp", params, "max_cells", DEFAULT_MAX_CELLS, 2, 1 << 31)
    if not binding:
        return DPPlan(None, True, 1, 1.0, 0.0, 0.0, tuple(dropped))
    res = binding[0]
    cs = st.super_weights(problem.arrays.cost[res.name])
    mins = np.minimum.reduceat(cs, st.s_start[:-1]) if len(cs) else np.zeros(0)
    shifted = cs - mins[st.s_of]
    shift = float(mins.sum())
    # the same float tolerance evaluate() allows, so dp and evaluate agree on what fits
    capacity = float(res.limit) + FEASIBILITY_TOL * max(1.0, abs(res.limit)) - shift
    maxes = np.maximum.reduceat(shifted, st.s_start[:-1]) if len(cs) else np.zeros(0)
    reach = float(maxes.sum())
    if capacity < 0:
        return DPPlan(res.name, True, 0, 1.0, shift, capacity, tuple(dropped))
    cap_cells = min(max_cells, _cell_budget(st, params))
    integral = bool(np.all(shifted == np.round(shifted))) and reach < 2**52
    if integral:
        ints = shifted.astype(np.int64)
        g = int(np.gcd.reduce(ints[ints > 0])) if np.any(ints > 0) else 1
        cells = min(int(math.floor(capacity)) // g, int(reach) // g) + 1
        if cells <= cap_cells:
            return DPPlan(res.name, True, cells, float(g), shift, capacity, tuple(dropped))
    span = min(capacity, reach)
    if span <= 0:  # zero capacity: only zero-cost options fit; any positive cost rounds up to 1
        return DPPlan(res.name, False, 1, max(reach, 1.0), shift, capacity, tuple(dropped))
    cells = cap_cells
    step = span / (cells - 1)
    return DPPlan(res.name, False, cells, step, shift, capacity, tuple(dropped))


def _cell_budget(st, params: dict) -> int:
    """Most cells the record memory and the work limit allow."""
    rec_bytes = 0
    work = 0
    for s in range(st.n_supers):
        if st.free[s]:
            rec_bytes += 1
            work += int(st.s_start[s + 1] - st.s_start[s])
    for comp in st.components:
        cc = comp.constraints[0]
        n_opts = sum(int(st.s_start[s + 1] - st.s_start[s]) for s in comp.supers)
        if cc.type == "same_bits":
            n_bits = len({int(b) for s in comp.supers for b in st.s_bits[st.options_of(s)]})
            rec_bytes += n_bits * len(comp.supers) + 1
            work += n_bits * 2 * len(comp.supers)
        else:
            rec_bytes += (cc.count + 1) * len(comp.supers) * 5
            work += (cc.count + 1) * n_opts
    max_bytes = float_param("dp", params, "max_record_mb", DEFAULT_MAX_RECORD_MB, 0.0, 1e6,
                            lo_open=True) * 2**20
    max_work = float_param("dp", params, "max_work", DEFAULT_MAX_WORK, 0.0, 1e15, lo_open=True)
    return max(2, int(min(max_bytes / max(1, rec_bytes), max_work / max(1, work))))


class _Model:
    """The block sequence of one instance, run once per rounding direction."""

    def __init__(self, problem: Problem, p: DPPlan):
        from bitsack.solver.feasibility import structure_of

        self.problem = problem
        self.p = p
        self.st = st = structure_of(problem)
        self.loss = st.super_weights(problem.arrays.loss)
        if p.resource is None:
            self.cost = np.zeros_like(self.loss)
        else:
            cs = st.super_weights(problem.arrays.cost[p.resource])
            mins = np.minimum.reduceat(cs, st.s_start[:-1])
            self.cost = cs - mins[st.s_of]
        # blocks in the order of their first super-unit
        comp_of = {comp.supers[0]: comp for comp in st.components}
        self.blocks: list = []
        for s in range(st.n_supers):
            if st.free[s]:
                self.blocks.append(s)
            elif s in comp_of:
                self.blocks.append(comp_of[s])

    def _weights(self, rounding: str) -> np.ndarray:
        if self.p.resource is None:
            return np.zeros(len(self.cost), dtype=np.int64)
        scaled = self.cost / self.p.step
        if rounding == "exact":
            w = np.round(scaled)
        elif rounding == "up":
            w = np.ceil(scaled)
        else:
            # shave a relative 1e-12 so float error never rounds a true k - ε up to k
            w = np.floor(scaled * (1 - 1e-12))
        return np.minimum(w, self.p.cells).astype(np.int64)

    def run(self, rounding: str, trace: bool) -> tuple[float, np.ndarray | None]:
        """Least loss and (when ``trace``) the chosen super-option per super-unit."""
        G = self.p.cells
        w = self._weights(rounding)
        T = np.full(G, _INF)
        T[0] = 0.0
        records = []
        for block in self.blocks:
            if isinstance(block, (int, np.integer)):
                ks = list(self.st.options_of(int(block)))
                T, rec = _step(T, ks, w, self.loss, trace)
                records.append(("free", int(block), ks, rec))
            elif block.constraints[0].type == "same_bits":
                T, rec = self._same_bits(T, block, w, trace)
                records.append(("same_bits", block, None, rec))
            else:
                T, rec = self._min_kept(T, block, w, trace)
                records.append(("min_kept", block, None, rec))
        c = int(np.argmin(T))
        value = float(T[c])
        if value == _INF:
            return _INF, None
        if not trace:
            return value, None
        choice = np.full(self.st.n_supers, -1, dtype=np.int64)
        for kind, block, ks, rec in reversed(records):
            if kind == "free":
                k = ks[int(rec[c])]
                choice[block] = k
                c -= int(w[k])
            elif kind == "same_bits":
                branch_rec, branches = rec
                b = int(branch_rec[c])
                for s, ks_s, r in reversed(branches[b]):
                    k = ks_s[int(r[c])]
                    choice[s] = k
                    c -= int(w[k])
            else:
                j = block.constraints[0].count
                for s, ks_s, opt_rec, prev_rec in reversed(rec):
                    k = ks_s[int(opt_rec[j][c])]
                    choice[s] = k
                    j = int(prev_rec[j][c])
                    c -= int(w[k])
        if c != 0:  # pragma: no cover - a broken trace-back is a bug, never a status
            raise AssertionError(f"dp trace-back ended at cell {c}, expected 0")
        return value, choice

    def _same_bits(self, T, comp, w, trace):
        st = self.st
        supers = comp.supers
        bits = sorted({int(st.s_bits[k]) for s in supers for k in st.options_of(s)} - {0}) or [0]
        best = np.full(len(T), _INF)
        branch_rec = np.zeros(len(T), dtype=np.int8) if trace else None
        branches = []
        for bi, b in enumerate(bits):
            Tb = T
            steps = []
            for s in supers:
                ks = [k for k in st.options_of(s) if int(st.s_bits[k]) in (0, b)]
                if not ks:
                    Tb = None
                    break
                Tb, rec = _step(Tb, ks, w, self.loss, trace)
                steps.append((s, ks, rec))
            branches.append(steps)
            if Tb is None:
                continue
            better = Tb < best
            np.copyto(best, Tb, where=better)
            if trace:
                branch_rec[better] = bi
        return best, (branch_rec, branches)

    def _min_kept(self, T, comp, w, trace):
        st = self.st
        cc = comp.constraints[0]
        k = cc.count
        weight = dict(zip(cc.supers, cc.weight, strict=True))
        G = len(T)
        tables: list[np.ndarray | None] = [T] + [None] * k
        recs = []
        for s in comp.supers:
            ks = list(st.options_of(s))
            new: list[np.ndarray | None] = [None] * (k + 1)
            opt_rec = [np.zeros(G, dtype=np.int8) for _ in range(k + 1)] if trace else None
            prev_rec = [np.zeros(G, dtype=np.int32) for _ in range(k + 1)] if trace else None
            for j, Tj in enumerate(tables):
                if Tj is None:
                    continue
                for i, kk in enumerate(ks):
                    wk = int(w[kk])
                    if wk >= G:
                        continue
                    jj = min(k, j + weight.get(s, 0) * (int(st.s_bits[kk]) > 0))
                    if new[jj] is None:
                        new[jj] = np.full(G, _INF)
                    cand = Tj[: G - wk] + self.loss[kk]
                    tgt = new[jj][wk:]
                    better = cand < tgt
                    np.copyto(tgt, cand, where=better)
                    if trace:
                        opt_rec[jj][wk:][better] = i
                        prev_rec[jj][wk:][better] = j
            tables = new
            recs.append((s, ks, opt_rec, prev_rec))
        final = tables[k] if tables[k] is not None else np.full(G, _INF)
        return final, recs

    def fits(self, super_choice: np.ndarray) -> bool:
        """Whether a choice meets the true (unrounded) budget."""
        if self.p.resource is None:
            return True
        return float(self.cost[super_choice].sum()) <= self.p.capacity

    def assignment(self, super_choice: np.ndarray) -> dict[str, str]:
        chosen = self.st.flat_choice(super_choice, self.problem.arrays.unit_of)
        flat_ids = [o.id for u in self.problem.units for o in u.options]
        return {u.id: flat_ids[chosen[i]] for i, u in enumerate(self.problem.units)}


def _step(T: np.ndarray, ks: list[int], w: np.ndarray, loss: np.ndarray,
          trace: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One multiple-choice step: ``T'[c] = min_{k in ks} T[c − w_k] + loss_k``."""
    G = len(T)
    new = np.full(G, _INF)
    rec = np.zeros(G, dtype=np.int8) if trace else None
    for i, k in enumerate(ks):
        wk = int(w[k])
        if wk >= G:
            continue
        cand = T[: G - wk] + loss[k]
        tgt = new[wk:]
        better = cand < tgt
        np.copyto(tgt, cand, where=better)
        if trace:
            rec[wk:][better] = i
    return new, rec
