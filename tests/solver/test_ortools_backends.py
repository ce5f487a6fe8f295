"""The OR-Tools backends (scip, highs, cpsat) against exhaustive enumeration on small instances.

The oracle is written here (itertools over every plan, scored by bitsack's ``evaluate``), so
these tests do not depend on any other backend.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from bitsack.errors import SolverError
from bitsack.solver.backends import SolveOptions, get_backend, registry
from bitsack.solver.backends.base import UnsupportedProblem
from bitsack.solver.problem import (
    Constraint,
    Interactions,
    Option,
    Pair,
    Problem,
    Resource,
    Unit,
)
from bitsack.solver.solution import evaluate

ORTOOLS = ("scip", "highs", "cpsat")
TIGHT = SolveOptions(rel_gap=1e-9, abs_gap=1e-12, time_limit_s=20)
# A quadratic objective is handled within the solvers' nonlinear feasibility tolerance
# (~1e-6 of the scaled objective), so MIQP / OA answers are proven to 1e-6, not 1e-9.
QUADRATIC = SolveOptions(rel_gap=1e-6, abs_gap=1e-12, time_limit_s=20)


def _available(name: str) -> bool:
    return name in registry() and registry()[name].is_available()


def _backends(*names: str):
    return [pytest.param(n, marks=pytest.mark.skipif(not _available(n),
                                                      reason=f"{n} not available"))
            for n in names]


def enumerate_optimum(problem: Problem) -> tuple[float, dict[str, str] | None]:
    """Exhaustive: the best feasible plan and its objective (inf, None if none)."""
    best, best_plan = math.inf, None
    for combo in itertools.product(*[[o.id for o in u.options] for u in problem.units]):
        plan = dict(zip([u.id for u in problem.units], combo, strict=True))
        ev = evaluate(problem, plan)
        if ev.feasible and ev.objective < best:
            best, best_plan = ev.objective, plan
    return best, best_plan


def random_problem(seed: int, n_units: int = 5, *, budgets: int = 2, constraints=(),
                   rank: int = 0, pairs: int = 0, tightness: float = 0.5,
                   integer_costs: bool = False) -> Problem:
    """Small model-like instance: loss falls with bits, cost grows with bits."""
    rng = np.random.default_rng(seed)
    ids = ["prune", "b2", "b3", "b4", "b8"]
    names = ["memory_bytes", "decode_latency_us"][:budgets]
    units = []
    for u in range(n_units):
        k = int(rng.integers(3, len(ids) + 1))
        chosen = sorted(rng.choice(len(ids), size=k, replace=False))
        scale = rng.lognormal(0, 1)
        opts = []
        for j in chosen:
            bits = 0 if j == 0 else int(ids[j][1:])
            loss = scale * (3.0 if bits == 0 else 4.0 ** (-(bits - 2))) * rng.uniform(0.5, 1.5)
            cost = {}
            for r in names:
                c = bits * rng.uniform(50, 150)
                cost[r] = float(np.ceil(c)) if integer_costs else float(c)
            opts.append(Option(ids[j], float(loss), cost))
        units.append(Unit(f"u{u}", tuple(opts), kind="mlp_group", layer=u // 2))
    base = Problem("rand", tuple(units), tuple(Resource(r) for r in names))
    resources = []
    for r in names:
        col = base.arrays.cost[r]
        lo = sum(col[base.arrays.start[i]:base.arrays.start[i + 1]].min()
                 for i in range(n_units))
        hi = sum(col[base.arrays.start[i]:base.arrays.start[i + 1]].max()
                 for i in range(n_units))
        limit = lo + tightness * (hi - lo)
        resources.append(Resource(r, float(np.floor(limit)) if integer_costs else limit))
    inter = None
    if rank or pairs:
        U = None
        if rank:
            U = rng.normal(size=(rank, base.n_options)) * 0.3
        plist = []
        for _ in range(pairs):
            a, b = rng.choice(n_units, size=2, replace=False)
            oa = units[a].options[int(rng.integers(len(units[a].options)))].id
            ob = units[b].options[int(rng.integers(len(units[b].options)))].id
            plist.append(Pair((f"u{a}", oa), (f"u{b}", ob), float(rng.normal(0, 0.3))))
        inter = Interactions(U=U, pairs=tuple(plist))
    return Problem("rand", tuple(units), tuple(resources), tuple(constraints), inter)


def assert_matches_oracle(problem: Problem, solution, rel: float = 1e-7) -> None:
    best, _ = enumerate_optimum(problem)
    assert math.isfinite(best), "test instance must be feasible"
    assert solution.status == "optimal", solution.message
    assert evaluate(problem, solution.assignment).feasible
    assert solution.objective == pytest.approx(best, rel=rel, abs=1e-9)
    cert = solution.certificate
    assert cert.dual_bound <= best + 1e-9 * max(1.0, abs(best))
    assert cert.solver_version.startswith("ortools ")
    assert cert.wall_time_s > 0


@pytest.mark.parametrize("name", _backends(*ORTOOLS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_additive_two_budgets_matches_enumeration(name, seed):
    problem = random_problem(seed, n_units=6)
    assert_matches_oracle(problem, get_backend(name).solve(problem, TIGHT))


@pytest.mark.parametrize("name", _backends(*ORTOOLS))
def test_integer_costs_one_budget(name):
    problem = random_problem(7, n_units=6, budgets=1, integer_costs=True, tightness=0.3)
    assert_matches_oracle(problem, get_backend(name).solve(problem, TIGHT))


CONSTRAINTS = {
    "same_option": [Constraint("same_option", ("u0", "u1", "u2"))],
    "same_bits": [Constraint("same_bits", ("u1", "u2", "u3", "u4"))],
    "min_kept": [Constraint("min_kept", ("u0", "u1", "u2", "u3"), count=4)],
    "all": [Constraint("same_option", ("u0", "u1")),
            Constraint("same_bits", ("u2", "u3", "u4")),
            Constraint("min_kept", ("u1", "u2", "u3", "u5"), count=3)],
}


@pytest.mark.parametrize("name", _backends(*ORTOOLS))
@pytest.mark.parametrize("kind", sorted(CONSTRAINTS))
def test_each_constraint_kind(name, kind):
    # tight budget so the constraints bind rather than being satisfied by the free optimum
    for seed in range(20):
        problem = random_problem(seed, n_units=6, constraints=CONSTRAINTS[kind], tightness=0.35)
        best, _ = enumerate_optimum(problem)
        free, _ = enumerate_optimum(Problem(problem.name, problem.units, problem.resources))
        if math.isfinite(best) and best > free + 1e-9:
            break
    else:
        pytest.fail("no seed where the constraint binds")
    assert_matches_oracle(problem, get_backend(name).solve(problem, TIGHT))


@pytest.mark.parametrize("name", _backends("scip", "highs"))
@pytest.mark.parametrize("seed", [0, 1])
def test_interactions_low_rank_and_pairs(name, seed):
    problem = random_problem(seed, n_units=5, rank=3, pairs=4)
    assert_matches_oracle(problem, get_backend(name).solve(problem, QUADRATIC), rel=1e-6)


@pytest.mark.parametrize("name", _backends(*ORTOOLS))
def test_pairs_only(name):
    problem = random_problem(3, n_units=5, pairs=6)
    assert_matches_oracle(problem, get_backend(name).solve(problem, TIGHT))


@pytest.mark.parametrize("cuts", ["per_factor", "aggregated"])
def test_highs_outer_approximation_bound_is_valid(cuts):
    if not _available("highs"):
        pytest.skip("highs not available")
    problem = random_problem(11, n_units=6, rank=4, pairs=2)
    best, _ = enumerate_optimum(problem)
    # every round's bound must stay below the true optimum, even when stopped early
    for rounds in (1, 2, 3, 50):
        sol = get_backend("highs").solve(problem, SolveOptions(
            rel_gap=1e-6, abs_gap=1e-12, time_limit_s=20,
            params={"cuts": cuts, "max_rounds": rounds}))
        assert sol.certificate.dual_bound <= best + 1e-9 * max(1.0, abs(best))
        assert sol.objective >= best - 1e-9 * max(1.0, abs(best))
    assert sol.status == "optimal"
    assert sol.objective == pytest.approx(best, rel=1e-6)
    assert sol.certificate.params["cuts_added"] > 0


def test_cpsat_refuses_low_rank_interactions():
    if not _available("cpsat"):
        pytest.skip("cpsat not available")
    problem = random_problem(0, n_units=3, rank=2)
    with pytest.raises(UnsupportedProblem, match=r"interactions\.U.*scip.*highs"):
        get_backend("cpsat").solve(problem, TIGHT)


def _three_prunes() -> Problem:
    # Three units, prune (loss 0.6, free) or b4 (loss 0.1, cost 1); budget 1 keeps one unit.
    # True optimum 0.6 + 0.6 + 0.1 = 1.3. Rounded to the nearest integer (scale 1) the
    # losses are 1, 1, 0: a naive bound of 2 would sit above the true optimum.
    units = tuple(Unit(f"u{i}", (Option("prune", 0.6, {"memory_bytes": 0.0}),
                                 Option("b4", 0.1, {"memory_bytes": 1.0})))
                  for i in range(3))
    return Problem("three", units, (Resource("memory_bytes", 1.0),))


def test_cpsat_scaling_error_is_folded_into_the_bound():
    if not _available("cpsat"):
        pytest.skip("cpsat not available")
    problem = _three_prunes()
    best, _ = enumerate_optimum(problem)
    assert best == pytest.approx(1.3)
    naive = min(sum(round(problem.units[i].option(plan[f"u{i}"]).loss) for i in range(3))
                for plan in [dict(zip(["u0", "u1", "u2"], c, strict=True))
                             for c in itertools.product(["prune", "b4"], repeat=3)]
                if evaluate(problem, plan).feasible)
    assert naive > best  # the trap: nearest rounding over-estimates the optimum
    coarse = get_backend("cpsat").solve(problem, SolveOptions(params={"objective_scale": 1.0}))
    # floor rounding + the per-unit correction: bound = Σ_u min_o frac(S·loss) = 3 × 0.1
    assert coarse.certificate.dual_bound == pytest.approx(0.3)
    assert coarse.certificate.dual_bound <= best
    assert coarse.status == "feasible"  # the coarse model cannot prove anything tighter
    fine = get_backend("cpsat").solve(problem, TIGHT)
    assert fine.status == "optimal"
    assert fine.objective == pytest.approx(best)
    assert fine.certificate.dual_bound <= best + 1e-12


def test_cpsat_float_budget_relaxed_then_restricted():
    if not _available("cpsat"):
        pytest.skip("cpsat not available")
    # Keeping both units costs 2.6 > 2.599; with a coarse cost grid (T = 64) floor-rounded
    # costs (83 + 83 ≤ ⌊64 · 2.599⌋ = 166) admit both, so the relaxed plan misses the budget
    # and the restricted model (⌈T a⌉ = 84 each) must supply the plan.
    units = tuple(Unit(f"u{i}", (Option("prune", 1.0, {"decode_latency_us": 0.0}),
                                 Option("b4", 0.0, {"decode_latency_us": 1.3})))
                  for i in range(2))
    problem = Problem("float", units, (Resource("decode_latency_us", 2.599),))
    best, _ = enumerate_optimum(problem)
    coarse = get_backend("cpsat").solve(problem, SolveOptions(params={"cost_bits": 8}))
    phases = [p["model"] for p in coarse.certificate.params["phases"]]
    assert phases == ["relaxed", "restricted"]
    assert coarse.objective == pytest.approx(best)  # the restricted plan is optimal here ...
    assert coarse.certificate.dual_bound <= best  # ... but only the relaxed bound is valid
    assert coarse.status == "feasible"
    fine = get_backend("cpsat").solve(problem, TIGHT)
    assert [p["model"] for p in fine.certificate.params["phases"]] == ["relaxed"]
    assert fine.status == "optimal" and fine.objective == pytest.approx(best)


@pytest.mark.parametrize("name", _backends(*ORTOOLS))
def test_infeasible_budget_is_a_status(name):
    problem = random_problem(4, n_units=4, budgets=1)
    units = tuple(Unit(u.id, tuple(o for o in u.options if not o.is_prune))
                  for u in problem.units)  # every option now costs something
    name_r = problem.resources[0].name
    low = sum(min(o.cost[name_r] for o in u.options) for u in units)
    bad = Problem(problem.name, units, (Resource(name_r, 0.5 * low),))
    sol = get_backend(name).solve(bad, TIGHT)
    assert sol.status == "infeasible"
    assert sol.assignment == {}
    assert name_r in sol.message


@pytest.mark.parametrize("name", _backends(*ORTOOLS))
def test_infeasible_constraints(name):
    # same_option over units with no option id in common
    units = (Unit("a", (Option("b2", 0.1), Option("b4", 0.0))),
             Unit("b", (Option("prune", 1.0), Option("b8", 0.0))))
    problem = Problem("noshared", units, (), (Constraint("same_option", ("a", "b")),))
    assert get_backend(name).solve(problem, TIGHT).status == "infeasible"


@pytest.mark.parametrize("name", _backends(*ORTOOLS))
def test_time_limited_certificate_is_consistent(name):
    problem = random_problem(5, n_units=300, tightness=0.4)
    sol = get_backend(name).solve(problem, SolveOptions(time_limit_s=0.05, rel_gap=1e-12,
                                                        abs_gap=0.0))
    assert sol.status in ("optimal", "feasible", "no_solution")
    if sol.has_solution:
        assert evaluate(problem, sol.assignment).feasible
        cert = sol.certificate
        if cert.dual_bound is not None:
            assert cert.dual_bound <= cert.primal_bound
    else:
        assert sol.assignment == {}
    assert sol.certificate.wall_time_s < 30


@pytest.mark.parametrize("name", _backends("scip", "highs"))
def test_time_limited_with_interactions(name):
    problem = random_problem(6, n_units=200, rank=8, tightness=0.4)
    sol = get_backend(name).solve(problem, SolveOptions(time_limit_s=0.3, rel_gap=1e-12,
                                                        abs_gap=0.0))
    assert sol.status in ("optimal", "feasible", "no_solution")
    if sol.has_solution and sol.certificate.dual_bound is not None:
        assert sol.certificate.dual_bound <= sol.certificate.primal_bound
    assert sol.certificate.wall_time_s < 30


@pytest.mark.parametrize("name", _backends(*ORTOOLS))
def test_limit_far_above_any_usage(name):
    problem = random_problem(8, n_units=5, budgets=1)
    loose = Problem(problem.name, problem.units,
                    (Resource(problem.resources[0].name, 1e30),))
    best, _ = enumerate_optimum(loose)
    sol = get_backend(name).solve(loose, TIGHT)
    assert sol.status == "optimal" and sol.objective == pytest.approx(best)


@pytest.mark.parametrize("name", _backends(*ORTOOLS))
def test_same_seed_same_answer(name):
    kwargs = {"rank": 3} if name != "cpsat" else {"pairs": 4}
    problem = random_problem(9, n_units=20, constraints=CONSTRAINTS["all"], **kwargs)
    opts = SolveOptions(seed=5, time_limit_s=20)
    first = get_backend(name).solve(problem, opts)
    second = get_backend(name).solve(problem, opts)
    assert first.has_solution
    assert first.assignment == second.assignment
    assert first.certificate.dual_bound == second.certificate.dual_bound


@pytest.mark.parametrize("name", _backends(*ORTOOLS))
def test_unknown_param_is_refused(name):
    with pytest.raises(SolverError, match="not understood"):
        get_backend(name).solve(random_problem(0, 3), SolveOptions(params={"bogus": 1}))


def test_scip_formulations_agree():
    if not _available("scip"):
        pytest.skip("scip not available")
    problem = random_problem(2, n_units=5, rank=2)
    best, _ = enumerate_optimum(problem)
    for mode in ("objective", "epigraph", "direct", "outer"):
        sol = get_backend("scip").solve(problem, SolveOptions(
            rel_gap=1e-6, abs_gap=1e-12, time_limit_s=20, params={"interactions": mode}))
        assert sol.objective == pytest.approx(best, rel=1e-6), mode
        assert sol.certificate.dual_bound <= best + 1e-9


def test_model_carries_the_math_model_labels():
    pytest.importorskip("ortools")
    from bitsack.solver.backends.mathopt_model import build_mip

    problem = random_problem(0, n_units=6, constraints=CONSTRAINTS["all"], rank=2, pairs=2)
    form = build_mip(problem, interactions="objective")
    names = {c.name.split("[")[0] for c in form.model.linear_constraints()}
    assert {"one_option", "budget", "same_option", "same_bits", "min_kept", "interaction",
            "pair"} <= names
    assert len(form.x) == problem.n_options and len(form.y) == 2
    # the model's objective at an integer point is σ times evaluate's
    _, plan = enumerate_optimum(problem)
    from bitsack.solver.solution import option_vector

    x = np.zeros(problem.n_options)
    x[option_vector(problem, plan)] = 1.0
    y = form.U @ x
    model_obj = float(form.linear @ x) + 0.5 * float(y @ y)
    pair_part = sum(p.value for p in problem.interactions.pairs
                    if plan[p.a[0]] == p.a[1] and plan[p.b[0]] == p.b[1])
    assert model_obj / form.objective_scale + pair_part == pytest.approx(
        evaluate(problem, plan).objective, rel=1e-9)
