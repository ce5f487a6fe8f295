"""The MIP of a bitsack problem, built once for the MathOpt backends (``highs``, ``scip``).

The model is the one stated in ``solver/__init__.py`` (variables x, y, z, w, t; rows
``one_option[u]``, ``budget[r]``, ``same_option[c,u,o]``, ``same_bits[c]``,
``same_bits[c,u,o]``, ``min_kept[c]``, ``interaction[k]``, ``pair[p]``, cuts ``oa_cut``);
``build_mip`` adds each row under that label. What is particular to this builder:

- the objective carries σ (``objective_scale``), so the model's y is √σ·Ux and its bounds are
  divided by σ; each ``budget[r]`` row is divided by ``max(L_r, max a_r)``;
- it is assembled as a ``ModelProto`` from NumPy arrays and loaded with
  ``Model.from_model_proto``: the interaction rows of a 7B-shaped instance hold ~2M nonzeros,
  and building them through MathOpt's expression API takes ~9 s against ~1.5 s this way;
- interaction modes (``interactions=``): ``objective`` (½Σy² as the quadratic objective:
  MIQP), ``epigraph`` (t_k ≥ y_k² as quadratic constraints, objective ½Σt), ``direct``
  (½ xᵀUᵀUx with no y: dense n×n, small instances only), ``outer`` (t_k ≥ 0 with no cut yet;
  ``bitsack.solver.backends.outer`` adds the tangent cuts), ``outer_aggregated`` (one t ≥ 0,
  no y; aggregated cuts).

Running the model and reading its answer is ``bitsack.solver.backends.mathopt_base``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from bitsack.errors import SolverError
from bitsack.solver.backends.base import UnsupportedProblem
from bitsack.solver.problem import Problem

if TYPE_CHECKING:
    from ortools.math_opt.python import mathopt

#: Interaction formulations ``build_mip`` knows.
INTERACTION_MODES = ("objective", "epigraph", "direct", "outer", "outer_aggregated")

#: ``direct`` writes UᵀU densely; refuse beyond this many options (n² terms).
DIRECT_MAX_OPTIONS = 3000


@dataclass
class MipFormulation:
    """A built MathOpt model and the handles a backend needs to read its answer.

    Attributes:
        model: the MathOpt model.
        x: one variable per option, flat file order.
        y: one variable per interaction factor row (empty when there is none or ``U`` is
            folded into the objective directly).
        t: epigraph variables (``epigraph``/``outer``: one per factor row; ``outer_aggregated``:
            one).
        linear: c_i, the objective coefficient of x_i (ℓ_i − ½‖U_i‖²).
        U: the interaction factor as float64 (None without one).
        budget_rows: resource -> (row id, row scale): the ``budget[r]`` row and the factor its
            coefficients were divided by.
        objective_scale: σ, the factor the model's objective carries (a power of 4); the
            model's objective is σ·f(x) and its y is √σ·Ux. Divide model bounds by σ.
        counts: variables / rows / nonzeros, for the certificate's params.
    """

    model: mathopt.Model
    x: list
    y: list = field(default_factory=list)
    t: list = field(default_factory=list)
    linear: np.ndarray | None = None
    U: np.ndarray | None = None
    budget_rows: dict[str, tuple[int, float]] = field(default_factory=dict)
    objective_scale: float = 1.0
    counts: dict[str, int] = field(default_factory=dict)


class _ProtoBuilder:
    """Collects variables, rows (COO) and the objective as arrays; emits one ModelProto."""

    def __init__(self) -> None:
        self.n_vars = 0
        self.var_lb: list[np.ndarray] = []
        self.var_ub: list[np.ndarray] = []
        self.var_int: list[np.ndarray] = []
        self.var_names: list[str] = []
        self.n_rows = 0
        self.row_lb: list[float] = []
        self.row_ub: list[float] = []
        self.row_names: list[str] = []
        self.coo_r: list[np.ndarray] = []
        self.coo_c: list[np.ndarray] = []
        self.coo_v: list[np.ndarray] = []

    def add_vars(self, names: list[str], lb: float, ub: float, integer: bool) -> np.ndarray:
        k = len(names)
        ids = np.arange(self.n_vars, self.n_vars + k, dtype=np.int64)
        self.n_vars += k
        self.var_lb.append(np.full(k, lb, dtype=np.float64))
        self.var_ub.append(np.full(k, ub, dtype=np.float64))
        self.var_int.append(np.full(k, integer, dtype=bool))
        self.var_names.extend(names)
        return ids

    def add_row(self, name: str, cols: np.ndarray, vals: np.ndarray,
                lb: float = -math.inf, ub: float = math.inf) -> int:
        row = self.n_rows
        self.n_rows += 1
        self.row_lb.append(lb)
        self.row_ub.append(ub)
        self.row_names.append(name)
        cols = np.asarray(cols, dtype=np.int64)
        self.coo_r.append(np.full(cols.size, row, dtype=np.int64))
        self.coo_c.append(cols)
        self.coo_v.append(np.asarray(vals, dtype=np.float64))
        return row

    def add_rows(self, names: list[str], rows: np.ndarray, cols: np.ndarray, vals: np.ndarray,
                 lb: float | np.ndarray, ub: float | np.ndarray) -> None:
        """Add len(names) rows at once; ``rows`` indexes them from 0."""
        k = len(names)
        base = self.n_rows
        self.n_rows += k
        self.row_lb.extend(np.broadcast_to(np.asarray(lb, dtype=np.float64), (k,)).tolist())
        self.row_ub.extend(np.broadcast_to(np.asarray(ub, dtype=np.float64), (k,)).tolist())
        self.row_names.extend(names)
        self.coo_r.append(np.asarray(rows, dtype=np.int64) + base)
        self.coo_c.append(np.asarray(cols, dtype=np.int64))
        self.coo_v.append(np.asarray(vals, dtype=np.float64))

    def set_upper(self, ids: np.ndarray, ub: float) -> None:
        allub = np.concatenate(self.var_ub)
        allub[ids] = ub
        self.var_ub = [allub]

    def proto(self, name: str, objective: np.ndarray,
              quad: tuple[np.ndarray, np.ndarray, np.ndarray] | None):
        from ortools.math_opt import model_pb2

        p = model_pb2.ModelProto(name=name)
        p.variables.ids.extend(range(self.n_vars))
        p.variables.lower_bounds.extend(np.concatenate(self.var_lb).tolist())
        p.variables.upper_bounds.extend(np.concatenate(self.var_ub).tolist())
        p.variables.integers.extend(np.concatenate(self.var_int).tolist())
        p.variables.names.extend(self.var_names)
        p.linear_constraints.ids.extend(range(self.n_rows))
        p.linear_constraints.lower_bounds.extend(self.row_lb)
        p.linear_constraints.upper_bounds.extend(self.row_ub)
        p.linear_constraints.names.extend(self.row_names)
        if self.coo_r:
            r, c, v = _canonical_coo(np.concatenate(self.coo_r), np.concatenate(self.coo_c),
                                     np.concatenate(self.coo_v))
            p.linear_constraint_matrix.row_ids.extend(r.tolist())
            p.linear_constraint_matrix.column_ids.extend(c.tolist())
            p.linear_constraint_matrix.coefficients.extend(v.tolist())
        nz = np.flatnonzero(objective)
        p.objective.maximize = False
        p.objective.linear_coefficients.ids.extend(nz.tolist())
        p.objective.linear_coefficients.values.extend(objective[nz].tolist())
        if quad is not None:
            r, c, v = _canonical_coo(*quad)
            p.objective.quadratic_coefficients.row_ids.extend(r.tolist())
            p.objective.quadratic_coefficients.column_ids.extend(c.tolist())
            p.objective.quadratic_coefficients.coefficients.extend(v.tolist())
        return p


def _canonical_coo(r: np.ndarray, c: np.ndarray, v: np.ndarray):
    """Sort by (row, col), sum duplicates, drop zeros: MathOpt's sparse matrices require it."""
    order = np.lexsort((c, r))
    r, c, v = r[order], c[order], v[order]
    if r.size:
        new = np.ones(r.size, dtype=bool)
        new[1:] = (r[1:] != r[:-1]) | (c[1:] != c[:-1])
        starts = np.flatnonzero(new)
        v = np.add.reduceat(v, starts)
        r, c = r[starts], c[starts]
    keep = v != 0.0
    return r[keep], c[keep], v[keep]


def build_mip(problem: Problem, *, interactions: str = "objective") -> MipFormulation:
    """Build the MIP of ``problem`` (math model in the module docstring).

    Args:
        problem: the instance.
        interactions: how ``U`` enters the model, one of ``INTERACTION_MODES`` (ignored when the
            problem has no ``U``).

    Raises:
        SolverError: unknown ``interactions`` mode, or ``direct`` on an instance too large.
    """
    from ortools.math_opt.python import mathopt

    if interactions not in INTERACTION_MODES:
        raise SolverError(f"interactions: {interactions!r} is not a formulation; "
                          f"valid: {list(INTERACTION_MODES)}")
    arrays = problem.arrays
    n = problem.n_options
    units = problem.units
    start = arrays.start
    b = _ProtoBuilder()

    budget_rows: dict[str, tuple[int, float]] = {}
    x_ids = b.add_vars([f"x[{u.id},{o.id}]" for u in units for o in u.options], 0.0, 1.0, True)

    # one_option[u]
    b.add_rows([f"one_option[{u.id}]" for u in units], arrays.unit_of, x_ids,
               np.ones(n), 1.0, 1.0)

    # budget[r]: rows scaled to O(1) coefficients so the solver's absolute feasibility
    # tolerance means the same for bytes (~1e9) and microseconds (~1e3).
    for res in problem.resources:
        if res.limit is None:
            continue
        cost = arrays.cost[res.name]
        scale = max(abs(res.limit), float(np.max(np.abs(cost), initial=0.0)), 1e-300)
        nz = np.flatnonzero(cost)
        row = b.add_row(f"budget[{res.name}]", x_ids[nz], cost[nz] / scale,
                        ub=res.limit / scale)
        budget_rows[res.name] = (row, scale)

    excluded: list[int] = []
    for ci, con in enumerate(problem.constraints):
        idx = [problem.unit_index[uid] for uid in con.units]
        if con.type == "same_option":
            common = set.intersection(*({o.id for o in units[ui].options} for ui in idx))
            u0 = idx[0]
            for ui in idx:
                for j, opt in enumerate(units[ui].options):
                    if opt.id not in common:
                        excluded.append(int(start[ui]) + j)
            for ui in dict.fromkeys(idx[1:]):
                if ui == u0:
                    continue
                for oid in sorted(common):
                    i, i0 = problem.option_index(units[ui].id, oid), \
                        problem.option_index(units[u0].id, oid)
                    b.add_row(f"same_option[{ci},{units[ui].id},{oid}]",
                              x_ids[[i, i0]], np.array([1.0, -1.0]), 0.0, 0.0)
        elif con.type == "same_bits":
            widths = sorted({o.bits for ui in idx for o in units[ui].options if not o.is_prune})
            z_ids = b.add_vars([f"z[{ci},b{w}]" for w in widths], 0.0, 1.0, True)
            zmap = dict(zip(widths, z_ids.tolist(), strict=True))
            b.add_row(f"same_bits[{ci}]", z_ids, np.ones(len(widths)), ub=1.0)
            for ui in dict.fromkeys(idx):
                for j, opt in enumerate(units[ui].options):
                    if opt.is_prune:
                        continue
                    b.add_row(f"same_bits[{ci},{units[ui].id},{opt.id}]",
                              np.array([x_ids[start[ui] + j], zmap[opt.bits]]),
                              np.array([1.0, -1.0]), ub=0.0)
        elif con.type == "min_kept":
            cols = [int(start[ui]) + j for ui in idx
                    for j, opt in enumerate(units[ui].options) if not opt.is_prune]
            b.add_row(f"min_kept[{ci}]", x_ids[cols], np.ones(len(cols)),
                      lb=float(con.count or 0))
        else:  # validation rejects these; a backend must not silently drop a constraint
            raise SolverError(f"constraints[{ci}].type: {con.type!r} is not supported; "
                              f"valid: same_option, same_bits, min_kept")
    if excluded:
        b.set_upper(x_ids[np.unique(excluded)], 0.0)

    # interaction[k]
    inter = problem.interactions
    U = None
    if inter is not None and inter.U is not None and np.any(inter.U):
        U = np.asarray(inter.U, dtype=np.float64)
    sigma = objective_scale(problem, U)
    col_sq = None if U is None else np.einsum("ki,ki->i", U, U)
    objective_x = arrays.loss.copy()
    if col_sq is not None:
        objective_x -= 0.5 * col_sq
    objective_x *= sigma
    quad = None
    y_ids = t_ids = np.zeros(0, dtype=np.int64)
    if U is not None:
        U = U * math.sqrt(sigma)  # exact: σ is a power of 4
        N = U.shape[0]
        if interactions == "direct":
            if n > DIRECT_MAX_OPTIONS:
                raise UnsupportedProblem(f"params.interactions: 'direct' writes UᵀU densely and "
                                  f"allows at most {DIRECT_MAX_OPTIONS} options, this problem "
                                  f"has {n}; valid: 'objective', 'epigraph'")
            Q = U.T @ U
            iu, ju = np.triu_indices(n)
            # ½ xᵀQx = Σ_i ½Q_ii x_i² + Σ_{i<j} Q_ij x_i x_j
            vals = np.where(iu == ju, 0.5, 1.0) * Q[iu, ju]
            quad = (x_ids[iu], x_ids[ju], vals)
        elif interactions != "outer_aggregated":
            y_ids = b.add_vars([f"y[{k}]" for k in range(N)], -math.inf, math.inf, False)
            rk, ci_ = np.nonzero(U)
            rows = np.concatenate([rk, np.arange(N)])
            cols = np.concatenate([x_ids[ci_], y_ids])
            vals = np.concatenate([-U[rk, ci_], np.ones(N)])
            b.add_rows([f"interaction[{k}]" for k in range(N)], rows, cols, vals, 0.0, 0.0)
            if interactions == "objective":
                quad = (y_ids, y_ids, np.full(N, 0.5))
            else:  # epigraph / outer: objective ½Σt_k, t_k ≥ y_k² (a constraint or cuts)
                t_ids = b.add_vars([f"t[{k}]" for k in range(N)], 0.0, math.inf, False)
        else:
            t_ids = b.add_vars(["t"], 0.0, math.inf, False)

    # pair[p]
    pair_w: list[tuple[int, float]] = []
    if inter is not None:
        for p, pair in enumerate(inter.pairs):
            if pair.value == 0.0:
                continue
            i = problem.option_index(*pair.a)
            j = problem.option_index(*pair.b)
            (w,) = b.add_vars([f"w[{p}]"], 0.0, 1.0, False)
            if pair.value > 0:
                b.add_row(f"pair[{p}]", np.array([x_ids[i], x_ids[j], w]),
                          np.array([1.0, 1.0, -1.0]), ub=1.0)
            else:
                b.add_row(f"pair[{p}].a", np.array([w, x_ids[i]]), np.array([1.0, -1.0]), ub=0.0)
                b.add_row(f"pair[{p}].b", np.array([w, x_ids[j]]), np.array([1.0, -1.0]), ub=0.0)
            pair_w.append((int(w), sigma * pair.value))

    objective = np.zeros(b.n_vars)
    objective[x_ids] = objective_x
    if t_ids.size:
        objective[t_ids] = 0.5 if interactions != "outer_aggregated" else 1.0
    for w, value in pair_w:
        objective[w] += value

    proto = b.proto(problem.name, objective, quad)
    model = mathopt.Model.from_model_proto(proto)
    x = [model.get_variable(int(i)) for i in x_ids]
    y = [model.get_variable(int(i)) for i in y_ids]
    t = [model.get_variable(int(i)) for i in t_ids]
    if U is not None and interactions == "epigraph":
        for k, (yk, tk) in enumerate(zip(y, t, strict=True)):
            model.add_quadratic_constraint(yk * yk - tk <= 0.0, name=f"epigraph[{k}]")
    counts = {"variables": b.n_vars, "rows": b.n_rows,
              "nonzeros": len(proto.linear_constraint_matrix.coefficients),
              "quadratic_terms": len(proto.objective.quadratic_coefficients.coefficients)}
    return MipFormulation(model=model, x=x, y=y, t=t, linear=objective_x, U=U,
                         budget_rows=budget_rows, objective_scale=sigma, counts=counts)


#: σ aims to put the optimum near this many model units (see ``objective_scale``).
OBJECTIVE_TARGET = 1e3
#: ... while no objective coefficient exceeds this (LP numerics).
MAX_SCALED_COEFFICIENT = 1e7


def objective_scale(problem: Problem, U: np.ndarray | None) -> float:
    """σ, the power of 4 that brings the model's objective to a magnitude solvers handle well.

    MIP solvers close and prune with absolute epsilons (~1e-6): HiGHS, for one, reported a
    "proven" bound 1.4e-4 *above* a feasible plan's objective on a 7B-shaped instance whose
    optimum is 1e-3 nats. So σ puts a lower estimate of the optimum near ``OBJECTIVE_TARGET``:
    the MCKP linear-relaxation bound of the linear part (``mckp_lower_bound``, each budget on
    its own, the best of them; a valid lower bound since ½‖y‖² ≥ 0 and negative pairs are
    counted at their value), capped so no coefficient exceeds ``MAX_SCALED_COEFFICIENT``. When
    that estimate is not positive, Σ_u mean_o |ℓ_{u,o}| stands in for it. A power of 4 keeps
    the scaling of ℓ and of U (by √σ) exact in floating point.
    """
    arrays = problem.arrays
    linear = arrays.loss.copy()
    if U is not None:
        linear -= 0.5 * np.einsum("ki,ki->i", U, U)
    negative_pairs = 0.0
    if problem.interactions is not None:
        negative_pairs = sum(min(p.value, 0.0) for p in problem.interactions.pairs)
    estimate = mckp_lower_bound(problem, linear) + negative_pairs
    if not (math.isfinite(estimate) and estimate > 0.0):
        counts = np.diff(arrays.start).astype(np.float64)
        estimate = float(np.sum(np.add.reduceat(np.abs(linear), arrays.start[:-1]) / counts))
    if not (math.isfinite(estimate) and estimate > 0.0):
        return 1.0
    sigma = OBJECTIVE_TARGET / estimate
    biggest = float(np.max(np.abs(linear), initial=0.0))
    if biggest > 0.0:
        sigma = min(sigma, MAX_SCALED_COEFFICIENT / biggest)
    return 4.0 ** math.floor(math.log(sigma, 4))


def mckp_lower_bound(problem: Problem, linear: np.ndarray) -> float:
    """A lower bound on min Σ_i linear_i x_i over one-option-per-unit plans within the budgets.

    For each budget r on its own, the Lagrangian dual max_λ≥0 Σ_u min_o (linear + λ a_r) − λ L_r
    (= the MCKP linear relaxation; bisection on λ over its subgradient), the best over r and
    over λ = 0. Side constraints are ignored (still a lower bound). −inf when a budget cannot
    be met even at each unit's cheapest option.
    """
    arrays = problem.arrays
    heads = arrays.start[:-1]
    best = float(np.sum(np.minimum.reduceat(linear, heads)))
    for res in problem.resources:
        if res.limit is None:
            continue
        cost = arrays.cost[res.name]
        if float(np.sum(np.minimum.reduceat(cost, heads))) > res.limit:
            return -math.inf

        def usage(lam: float, cost: np.ndarray = cost) -> tuple[float, float]:
            vals = linear + lam * cost
            mins = np.minimum.reduceat(vals, heads)
            # the cheapest among each unit's minimisers gives the subgradient's lower end
            at_min = vals <= np.repeat(mins, np.diff(arrays.start)) + 1e-15 * np.abs(vals)
            used = np.minimum.reduceat(np.where(at_min, cost, np.inf), heads)
            return float(np.sum(mins)), float(np.sum(used))

        lo, hi = 0.0, 1.0
        for _ in range(200):
            if usage(hi)[1] <= res.limit:
                break
            lo, hi = hi, 2.0 * hi
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if usage(mid)[1] <= res.limit:
                hi = mid
            else:
                lo = mid
        for lam in (lo, hi):
            total, _ = usage(lam)
            best = max(best, total - lam * res.limit)
    return best
