"""What the side constraints allow: exact minimization of an additive weight over assignments.

Many questions about a problem are "minimize ``Σ_u w[u, o_u]`` over assignments that satisfy
the side constraints" for some per-option weight ``w``:

- the smallest usage of a resource (``w = cost_r``): why a budget is infeasible, where a
  Pareto sweep starts;
- the largest usage (``w = −cost_r``): where a sweep ends, how tight a generated budget is;
- the Lagrangian dual function of the greedy backend (``w = loss + λ·cost``).

Budgets are *not* part of this minimization, only the constraints. They decompose well:

1. ``same_option`` constraints are merged (they are transitive) into *super-units* whose
   options are the option ids common to all members; a super-option's weight is the sum of
   its members' weights. After this, every super-unit chooses exactly one super-option.
2. ``same_bits`` and ``min_kept`` constraints are mapped onto super-units. Super-units linked
   by such constraints form *components*; super-units in no component are *free* and simply
   take their cheapest super-option (vectorized).
3. A component with a single constraint is solved exactly in closed form:
   ``same_bits`` — for each bit-width b, every member independently takes the cheapest of
   ``prune`` and its b-bit options (any group size); the best b wins. ``min_kept`` (at least
   k kept) — every member takes its cheapest option, then the members with the smallest
   extra weight ``Δ = min_kept_option − min_option`` are forced to be kept until k are kept
   (a small covering DP when a super-unit counts several members).
4. A component where constraints *overlap* (share super-units) is enumerated exactly when the
   product of its option counts is at most ``MAX_ENUMERATION``; beyond that each constraint
   of the component is solved alone (the others dropped) and the largest of those values is
   returned. Dropping constraints relaxes the problem, so that value is still a valid *lower
   bound* on the true minimum, and :class:`MinResult` says ``exact=False`` (its assignment
   may then violate a dropped constraint).

Trivial constraints (``min_kept`` with count 0, ``same_bits`` over one super-unit) are dropped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from bitsack.solver.problem import Problem, option_bits

#: Largest number of joint assignments enumerated for a component of overlapping constraints.
MAX_ENUMERATION = 200_000

_INF = float("inf")


@dataclass(frozen=True, eq=False)
class ComponentConstraint:
    """A ``same_bits`` or ``min_kept`` constraint expressed over super-units.

    Attributes:
        type: ``same_bits`` or ``min_kept``.
        supers: indices of the super-units it involves.
        weight: for ``min_kept``, how many of the constraint's units each super-unit holds
            (keeping the super-unit keeps all of them); 1s for ``same_bits``.
        count: ``min_kept``'s k (0 for ``same_bits``).
        index: position of the original constraint in ``problem.constraints``.
    """

    type: str
    supers: tuple[int, ...]
    weight: tuple[int, ...]
    count: int
    index: int


@dataclass(frozen=True, eq=False)
class Component:
    """Super-units linked by one or more ``same_bits`` / ``min_kept`` constraints."""

    supers: tuple[int, ...]
    constraints: tuple[ComponentConstraint, ...]

    @property
    def overlapping(self) -> bool:
        return len(self.constraints) > 1


@dataclass(frozen=True, eq=False)
class Structure:
    """The constraint structure of a problem, compiled once for repeated minimizations.

    Super-option ``k`` (of super-unit ``s``, ``s_start[s] <= k < s_start[s+1]``) stands for
    the flat options ``agg_idx[agg_ptr[k]:agg_ptr[k+1]]``, one per member unit.
    """

    n_units: int
    n_options: int
    members: tuple[tuple[int, ...], ...]
    s_start: np.ndarray
    s_option_id: tuple[str, ...]
    s_bits: np.ndarray
    s_of: np.ndarray
    agg_idx: np.ndarray
    agg_ptr: np.ndarray
    components: tuple[Component, ...]
    free: np.ndarray
    infeasible: str | None

    @property
    def n_supers(self) -> int:
        return len(self.members)

    def super_weights(self, w: np.ndarray) -> np.ndarray:
        """Per-option weights ``w`` [n_options] summed into super-option weights."""
        if len(self.agg_idx) == 0:
            return np.zeros(0)
        return np.add.reduceat(np.asarray(w, dtype=np.float64)[self.agg_idx], self.agg_ptr[:-1])

    def options_of(self, s: int) -> range:
        return range(int(self.s_start[s]), int(self.s_start[s + 1]))

    def flat_choice(self, super_choice: np.ndarray, unit_of: np.ndarray) -> np.ndarray:
        """Per-unit flat option indices for one chosen super-option per super-unit."""
        ks = np.asarray(super_choice, dtype=np.int64)
        lo = self.agg_ptr[ks]
        lengths = self.agg_ptr[ks + 1] - lo
        # the concatenated member ranges agg_ptr[k]:agg_ptr[k+1] of every chosen k, vectorized
        offsets = np.cumsum(lengths) - lengths
        pos = np.repeat(lo - offsets, lengths) + np.arange(int(lengths.sum()))
        flat = self.agg_idx[pos]
        chosen = np.empty(self.n_units, dtype=np.int64)
        chosen[unit_of[flat]] = flat
        return chosen


@dataclass(frozen=True)
class MinResult:
    """Result of :func:`min_weighted`.

    Attributes:
        value: the minimum (a lower bound when ``exact`` is False; inf when the constraints
            admit no assignment at all).
        chosen: per-unit flat option indices attaining it, or None when infeasible.
        exact: whether ``value`` is the exact constrained minimum.
    """

    value: float
    chosen: np.ndarray | None
    exact: bool


def structure_of(problem: Problem) -> Structure:
    """The compiled constraint structure of ``problem`` (built once, cached on the problem)."""
    return problem.derived("structure", _build_structure)


def min_weighted(problem: Problem, w: np.ndarray) -> MinResult:
    """Minimize ``Σ_u w[u, o_u]`` over the assignments that satisfy the side constraints.

    Args:
        problem: the problem (only its units and constraints matter, not its budgets).
        w: [n_options] weights in file order.

    Returns:
        A :class:`MinResult`; ties go to the option listed first.
    """
    st = structure_of(problem)
    if st.infeasible is not None:
        return MinResult(_INF, None, True)
    ws = st.super_weights(w)
    choice = np.empty(st.n_supers, dtype=np.int64)
    value = 0.0
    if st.n_supers:
        starts = st.s_start[:-1]
        seg_min = np.minimum.reduceat(ws, starts)
        at_min = np.flatnonzero(ws <= seg_min[st.s_of])
        owner = st.s_of[at_min]
        first = np.ones(len(at_min), dtype=bool)
        first[1:] = owner[1:] != owner[:-1]
        choice[owner[first]] = at_min[first]
        value = float(seg_min[st.free].sum())
    exact = True
    for comp in st.components:
        v, picks, ok = _solve_component(st, comp, ws)
        if picks is None:
            return MinResult(_INF, None, ok)
        value += v
        exact &= ok
        for s, k in picks.items():
            choice[s] = k
    return MinResult(value, st.flat_choice(choice, problem.arrays.unit_of), exact)


def min_cost_per_resource(problem: Problem, resource: str) -> float:
    """The smallest usage of ``resource`` any assignment can have, respecting the constraints.

    Exact unless overlapping constraints form a component too large to enumerate; then a
    valid lower bound (see the module docstring). inf if the constraints admit nothing.

    Raises:
        KeyError: ``resource`` is not a resource of the problem.
    """
    return min_weighted(problem, problem.arrays.cost[resource]).value


def max_cost_per_resource(problem: Problem, resource: str) -> float:
    """The largest usage of ``resource`` any assignment can have, respecting the constraints.

    Exact under the same condition as :func:`min_cost_per_resource`, else an upper bound.
    """
    return -min_weighted(problem, -problem.arrays.cost[resource]).value


def min_cost_is_exact(problem: Problem) -> bool:
    """Whether :func:`min_weighted` is exact for every weight vector of this problem."""
    st = structure_of(problem)
    return all(not c.overlapping or _enumeration_size(st, c) <= MAX_ENUMERATION
               for c in st.components)


def constraint_violations_vectorized(problem: Problem, chosen: np.ndarray) -> np.ndarray:
    """Boolean [batch] mask: which rows of ``chosen`` [batch, n_units] satisfy the constraints.

    ``chosen`` holds flat option indices, one per unit (column u is unit u).
    """
    arrays = problem.arrays
    ok = np.ones(chosen.shape[0], dtype=bool)
    ids = _option_id_codes(problem)
    for con in problem.constraints:
        cols = [problem.unit_index[u] for u in con.units]
        sub = chosen[:, cols]
        if con.type == "same_option":
            codes = ids[sub]
            ok &= np.all(codes == codes[:, :1], axis=1)
        elif con.type == "same_bits":
            bits = arrays.bits[sub]
            kept = bits > 0
            hi = np.where(kept, bits, -1).max(axis=1)
            lo = np.where(kept, bits, 99).min(axis=1)
            ok &= (hi < 0) | (hi == lo)
        elif con.type == "min_kept":
            ok &= (arrays.bits[sub] > 0).sum(axis=1) >= (con.count or 0)
    return ok


# --------------------------------------------------------------------------------------------
# building the structure


def _option_id_codes(problem: Problem) -> np.ndarray:
    """A small integer per distinct option id, per flat option (file order)."""

    def codes_of(p: Problem) -> np.ndarray:
        codes: dict[str, int] = {}
        return np.array([codes.setdefault(o.id, len(codes)) for u in p.units
                         for o in u.options], dtype=np.int64)

    return problem.derived("option_id_codes", codes_of)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _build_structure(problem: Problem) -> Structure:
    units = problem.units
    n = len(units)
    start = problem.arrays.start
    index = problem.unit_index
    uf = _UnionFind(n)
    for con in problem.constraints:
        if con.type == "same_option":
            first = index[con.units[0]]
            for uid in con.units[1:]:
                uf.union(first, index[uid])
    groups: dict[int, list[int]] = {}
    for u in range(n):
        groups.setdefault(uf.find(u), []).append(u)
    members = tuple(tuple(g) for g in groups.values())  # ordered by smallest member
    super_of_unit = np.empty(n, dtype=np.int64)
    s_start = [0]
    s_option_id: list[str] = []
    agg_idx: list[int] = []
    agg_ptr = [0]
    infeasible = None
    for s, group in enumerate(members):
        super_of_unit[list(group)] = s
        lead = units[group[0]]
        common = [o.id for o in lead.options
                  if all(any(p.id == o.id for p in units[m].options) for m in group[1:])]
        if not common:
            infeasible = (f"the same_option constraints tie units {[units[m].id for m in group]}"
                          " which share no option id")
        for oid in common:
            s_option_id.append(oid)
            for m in group:
                j = next(j for j, o in enumerate(units[m].options) if o.id == oid)
                agg_idx.append(int(start[m]) + j)
            agg_ptr.append(len(agg_idx))
        s_start.append(len(s_option_id))
    s_start_arr = np.array(s_start, dtype=np.int64)
    s_of = np.repeat(np.arange(len(members)), np.diff(s_start_arr))

    # Side constraints over super-units; trivial ones dropped.
    ccons: list[ComponentConstraint] = []
    for ci, con in enumerate(problem.constraints):
        if con.type == "same_option":
            continue
        counts: dict[int, int] = {}
        for uid in con.units:
            s = int(super_of_unit[index[uid]])
            counts[s] = counts.get(s, 0) + 1
        supers = tuple(sorted(counts))
        if con.type == "same_bits" and len(supers) < 2:
            continue
        if con.type == "min_kept" and not con.count:
            continue
        ccons.append(ComponentConstraint(con.type, supers, tuple(counts[s] for s in supers),
                                         int(con.count or 0), ci))
    cuf = _UnionFind(len(members))
    for cc in ccons:
        for s in cc.supers[1:]:
            cuf.union(cc.supers[0], s)
    by_root: dict[int, list[ComponentConstraint]] = {}
    for cc in ccons:
        by_root.setdefault(cuf.find(cc.supers[0]), []).append(cc)
    components = []
    free = np.ones(len(members), dtype=bool)
    for cons in by_root.values():
        supers = tuple(sorted({s for cc in cons for s in cc.supers}))
        free[list(supers)] = False
        components.append(Component(supers, tuple(cons)))
    return Structure(
        n_units=n, n_options=problem.n_options, members=members, s_start=s_start_arr,
        s_option_id=tuple(s_option_id),
        s_bits=np.array([option_bits(o) for o in s_option_id], dtype=np.int64),
        s_of=s_of, agg_idx=np.array(agg_idx, dtype=np.int64),
        agg_ptr=np.array(agg_ptr, dtype=np.int64), components=tuple(components), free=free,
        infeasible=infeasible,
    )


# --------------------------------------------------------------------------------------------
# solving components


def _solve_component(st: Structure, comp: Component,
                     ws: np.ndarray) -> tuple[float, dict[int, int] | None, bool]:
    """(value, super-unit -> super-option, exact) for one component."""
    if not comp.overlapping:
        v, picks = _solve_single(st, comp.constraints[0], ws)
        return v, picks, True
    if _enumeration_size(st, comp) <= MAX_ENUMERATION:
        v, picks = _enumerate(st, comp, ws)
        return v, picks, True
    # Relaxation: each constraint alone, the rest of the component free; keep the largest.
    best: tuple[float, dict[int, int] | None] = (-_INF, None)
    for cc in comp.constraints:
        v, picks = _solve_single(st, cc, ws)
        if picks is None:
            return _INF, None, True  # one constraint alone is already infeasible
        for s in comp.supers:
            if s not in picks:
                k = _argmin(ws, st.options_of(s))
                picks[s] = k
                v += ws[k]
        if v > best[0]:
            best = (v, picks)
    return best[0], best[1], False


def _argmin(ws: np.ndarray, ks) -> int:
    best_k, best_v = -1, _INF
    for k in ks:
        if ws[k] < best_v:
            best_k, best_v = k, ws[k]
    return best_k


def _solve_single(st: Structure, cc: ComponentConstraint,
                  ws: np.ndarray) -> tuple[float, dict[int, int] | None]:
    if cc.type == "same_bits":
        return _solve_same_bits(st, cc.supers, ws)
    return _solve_min_kept(st, cc.supers, cc.weight, cc.count, ws)


def _solve_same_bits(st: Structure, supers: tuple[int, ...],
                     ws: np.ndarray) -> tuple[float, dict[int, int] | None]:
    # per super-unit: bit-width -> its options of that width (several when they differ in
    # group size: b3g32, b3g128 share the width 3), and its prune option
    by_bits: list[dict[int, list[int]]] = []
    prune: list[int | None] = []
    for s in supers:
        table: dict[int, list[int]] = {}
        p = None
        for k in st.options_of(s):
            b = int(st.s_bits[k])
            if b == 0:
                p = k
            else:
                table.setdefault(b, []).append(k)
        by_bits.append(table)
        prune.append(p)
    candidates = sorted(set().union(*by_bits)) or [0]
    best_v, best_picks = _INF, None
    for b in candidates:
        total, picks = 0.0, {}
        for s, table, p in zip(supers, by_bits, prune, strict=True):
            options = ([p] if p is not None else []) + table.get(b, [])
            if not options:
                total = _INF
                break
            k = min(options, key=lambda k: (ws[k], k))
            picks[s] = k
            total += ws[k]
        if total < best_v:
            best_v, best_picks = total, picks
    return best_v, best_picks


def _solve_min_kept(st: Structure, supers: tuple[int, ...], weight: tuple[int, ...], count: int,
                    ws: np.ndarray) -> tuple[float, dict[int, int] | None]:
    base, delta, k_any, k_kept = [], [], [], []
    for s in supers:
        ks = list(st.options_of(s))
        a = min(ks, key=lambda k: (ws[k], k))
        kept = [k for k in ks if st.s_bits[k] > 0]
        b = min(kept, key=lambda k: (ws[k], k)) if kept else None
        k_any.append(a)
        k_kept.append(b)
        base.append(ws[a])
        delta.append(0.0 if st.s_bits[a] > 0 else (ws[b] - ws[a] if b is not None else _INF))
    if all(w == 1 for w in weight):
        order = sorted(range(len(supers)), key=lambda i: (delta[i], i))
        forced = order[:count]
        if any(delta[i] == _INF for i in forced):
            return _INF, None
    else:
        forced = _cover(delta, weight, count)
        if forced is None:
            return _INF, None
    picks = {s: k_any[i] for i, s in enumerate(supers)}
    total = float(sum(base))
    for i in forced:
        if st.s_bits[k_any[i]] == 0:
            picks[supers[i]] = k_kept[i]
            total += delta[i]
    return total, picks


def _cover(delta: list[float], weight: tuple[int, ...], count: int) -> list[int] | None:
    """Cheapest items (cost ``delta``, size ``weight``) with total size >= ``count``.

    A small DP over the kept count, capped at ``count``; returns the items taken, or None.
    """
    tables = [[0.0] + [_INF] * count]  # tables[i][j]: cheapest cost over items < i, count j
    for d, w in zip(delta, weight, strict=True):
        prev = tables[-1]
        new = prev[:]
        if d < _INF:
            for j in range(count + 1):
                if prev[j] < _INF and prev[j] + d < new[min(count, j + w)]:
                    new[min(count, j + w)] = prev[j] + d
        tables.append(new)
    if tables[-1][count] == _INF:
        return None
    chosen = []
    j = count
    for i in range(len(delta) - 1, -1, -1):
        if tables[i][j] == tables[i + 1][j]:
            continue  # reachable at the same cost without item i
        for jj in range(count + 1):
            if tables[i][jj] < _INF and min(count, jj + weight[i]) == j \
                    and tables[i][jj] + delta[i] == tables[i + 1][j]:
                chosen.append(i)
                j = jj
                break
    return chosen


def _enumeration_size(st: Structure, comp: Component) -> int:
    size = 1
    for s in comp.supers:
        size *= int(st.s_start[s + 1] - st.s_start[s])
        if size > MAX_ENUMERATION:
            return size
    return size


def _enumerate(st: Structure, comp: Component,
               ws: np.ndarray) -> tuple[float, dict[int, int] | None]:
    supers = comp.supers
    pos = {s: i for i, s in enumerate(supers)}
    choices = np.array(list(itertools.product(*(st.options_of(s) for s in supers))),
                       dtype=np.int64)
    ok = np.ones(len(choices), dtype=bool)
    bits = st.s_bits[choices]
    for cc in comp.constraints:
        cols = [pos[s] for s in cc.supers]
        sub = bits[:, cols]
        kept = sub > 0
        if cc.type == "same_bits":
            hi = np.where(kept, sub, -1).max(axis=1)
            lo = np.where(kept, sub, 99).min(axis=1)
            ok &= (hi < 0) | (hi == lo)
        else:
            ok &= (kept * np.array(cc.weight)).sum(axis=1) >= cc.count
    if not ok.any():
        return _INF, None
    values = np.where(ok, ws[choices].sum(axis=1), _INF)
    best = int(np.argmin(values))
    return float(values[best]), {s: int(choices[best, i]) for i, s in enumerate(supers)}
