"""Property tests on small random instances, brute force as the oracle.

Random instances carry random constraints (each type, overlapping or not), one or two
budgets, integer or fractional costs, and sometimes a low-rank factor and explicit pairs.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bitsack.errors import ValidationError
from bitsack.solver import solve
from bitsack.solver.backends.base import SolveOptions, UnsupportedProblem, registry
from bitsack.solver.certify import verify
from bitsack.solver.feasibility import (
    max_cost_per_resource,
    min_cost_is_exact,
    min_cost_per_resource,
)
from bitsack.solver.problem import (
    Constraint,
    Interactions,
    Option,
    Pair,
    Problem,
    Resource,
    Unit,
)
from bitsack.solver.schema import validate_problem, with_limits

TIGHT = SolveOptions(rel_gap=1e-7, abs_gap=1e-12, time_limit_s=30)
OPTION_IDS = ["prune", "b1", "b2", "b3", "b4", "b8", "b16"]
RTOL = 1e-6
# modest by default (the folder stays fast); BITSACK_HYPOTHESIS_EXAMPLES=1000 for a deep run
SETTINGS = settings(max_examples=int(os.environ.get("BITSACK_HYPOTHESIS_EXAMPLES", 40)),
                    deadline=None)


@st.composite
def problems(draw, interactions=True):
    n = draw(st.integers(1, 5))
    integer = draw(st.booleans())
    resources = ["memory_bytes"] + (["decode_latency_us"] if draw(st.booleans()) else [])
    units = []
    for u in range(n):
        ids = draw(st.lists(st.sampled_from(OPTION_IDS), min_size=1, max_size=4, unique=True))
        ids.sort(key=OPTION_IDS.index)
        opts = []
        for oid in ids:
            cost = {}
            for r in resources:
                if oid == "prune":
                    cost[r] = 0.0
                elif integer:
                    cost[r] = float(draw(st.integers(0, 20)))
                else:
                    cost[r] = draw(st.floats(0, 10, allow_nan=False).map(lambda x: round(x, 3)))
            # losses on a 1e-9 grid: realistic magnitudes (subnormal floats are not losses)
            loss = draw(st.floats(-0.5, 2.0, allow_nan=False).map(lambda x: round(x, 9)))
            opts.append(Option(oid, loss, cost))
        units.append(Unit(f"u{u}", tuple(opts), kind="head_group" if u % 2 else "mlp_group",
                          layer=u // 2, params=100 * (u + 1)))
    uids = [u.id for u in units]
    constraints = []
    for _ in range(draw(st.integers(0, 2))):
        if n < 2:
            break
        members = draw(st.lists(st.sampled_from(uids), min_size=2, max_size=n, unique=True))
        ctype = draw(st.sampled_from(["same_option", "same_bits", "min_kept"]))
        count = None
        if ctype == "min_kept":
            keepable = sum(any(o.id != "prune" for o in units[uids.index(m)].options)
                           for m in members)
            count = draw(st.integers(0, keepable))
        constraints.append(Constraint(ctype, tuple(members), count))
    inter = None
    if interactions and draw(st.booleans()):
        n_opt = sum(len(u.options) for u in units)
        rank = draw(st.integers(1, 2))
        seed = draw(st.integers(0, 2**16))
        U = np.random.default_rng(seed).normal(0, 0.3, size=(rank, n_opt))
        pairs = ()
        if n >= 2 and draw(st.booleans()):
            a, b = units[0], units[1]
            pairs = (Pair((a.id, a.options[-1].id), (b.id, b.options[0].id),
                          draw(st.floats(-0.3, 0.3, allow_nan=False))),)
        inter = Interactions(U=U, pairs=pairs)
    problem = Problem("random", tuple(units), tuple(Resource(r) for r in resources),
                      tuple(constraints), inter)
    limits = {}
    for r in resources:
        lo, hi = min_cost_per_resource(problem, r), max_cost_per_resource(problem, r)
        if not hi > 0:
            continue
        # from slightly infeasible to slack
        frac = draw(st.floats(-0.1, 1.1, allow_nan=False))
        limits[r] = max(0.0, round(lo + frac * (hi - lo), 6))
    try:
        problem = with_limits(problem, limits)
        validate_problem(problem)
    except ValidationError:
        assume(False)
    return problem


def _backends():
    out = []
    for name, cls in sorted(registry().items()):
        if name != "brute" and cls.is_available():
            out.append(name)
    return out


def _solve(problem, name, options=TIGHT):
    try:
        return solve(problem, name, options)
    except UnsupportedProblem:
        return None


def _close(a, b):
    return abs(a - b) <= RTOL * max(1.0, abs(a), abs(b))


@SETTINGS
@given(problem=problems())
def test_backends_agree_with_brute_force(problem):
    oracle = solve(problem, "brute", TIGHT)
    assert all(c.ok for c in verify(problem, oracle))
    for name in _backends():
        sol = _solve(problem, name)
        if sol is None:
            continue
        bad = [c for c in verify(problem, sol) if not c.ok]
        assert not bad, (name, bad)  # feasible, and its recorded numbers recompute
        dual = sol.certificate.dual_bound
        if oracle.status == "infeasible":
            assert not sol.has_solution, name
            if dual is not None and sol.status == "infeasible":
                pass  # a proof of infeasibility may carry any bound
            continue
        opt = oracle.objective
        if dual is not None:  # dual <= optimum <= primal
            assert dual <= opt + RTOL * max(1.0, abs(opt)), (name, dual, opt)
        if sol.has_solution:
            assert sol.objective >= opt - RTOL * max(1.0, abs(opt)), (name, sol.objective, opt)
        if sol.status == "optimal":
            assert _close(sol.objective, opt), (name, sol.objective, opt)
        if sol.status == "infeasible":
            pytest.fail(f"{name} claims infeasible; brute found {opt}")


@SETTINGS
@given(problem=problems(interactions=False))
def test_dp_is_exact_on_integer_costs(problem):
    integral = all(float(v).is_integer() for u in problem.units for o in u.options
                   for v in o.cost.values())
    sol = _solve(problem, "dp")
    assume(sol is not None)
    oracle = solve(problem, "brute", TIGHT)
    # grid mode (fractional costs) may leave a gap, or find no plan on a razor-tight budget
    assert sol.status == oracle.status or (
        not integral and oracle.has_solution and sol.status in ("feasible", "no_solution"))
    if integral:
        assert sol.certificate.params["mode"] in ("exact", None) or \
            sol.certificate.params["resource"] is None
        if oracle.has_solution:
            assert _close(sol.objective, oracle.objective)


@SETTINGS
@given(problem=problems(), extra=st.floats(0.0, 5.0, allow_nan=False))
def test_loosening_a_budget_never_worsens_the_optimum(problem, extra):
    tight = solve(problem, "brute", TIGHT)
    loose = with_limits(problem, {r: v + extra for r, v in problem.limits.items()})
    relaxed = solve(loose, "brute", TIGHT)
    if tight.has_solution:
        assert relaxed.has_solution
        assert relaxed.objective <= tight.objective + 1e-12
    for name in _backends():
        a, b = _solve(problem, name), _solve(loose, name)
        if a is not None and b is not None and a.status == b.status == "optimal":
            assert b.objective <= a.objective + RTOL * max(1.0, abs(a.objective)), name


@SETTINGS
@given(problem=problems())
def test_same_seed_same_answer(problem):
    for name in ["brute"] + _backends():
        a = _solve(problem, name, dataclasses.replace(TIGHT, seed=7))
        b = _solve(problem, name, dataclasses.replace(TIGHT, seed=7))
        if a is None:
            continue
        assert (a.status, a.assignment, a.objective, a.certificate.dual_bound) == \
            (b.status, b.assignment, b.objective, b.certificate.dual_bound), name


@SETTINGS
@given(problem=problems())
def test_greedy_bound_and_plan(problem):
    oracle = solve(problem, "brute", TIGHT)
    sol = solve(problem, "greedy", TIGHT)
    assert all(c.ok for c in verify(problem, sol))
    if not oracle.has_solution:
        assert not sol.has_solution
        return
    opt = oracle.objective
    if sol.certificate.dual_bound is not None:
        assert sol.certificate.dual_bound <= opt + RTOL * max(1.0, abs(opt))
    binding = [r for r, v in problem.limits.items() if max_cost_per_resource(problem, r) > v]
    if len(binding) <= 1 and min_cost_is_exact(problem):
        # one budget: the cheapest plan respecting the constraints fits, and greedy tries it
        assert sol.has_solution


def test_infeasible_is_a_status_with_the_smallest_feasible_limit():
    units = tuple(Unit(f"u{i}", (Option("b2", 0.1, {"memory_bytes": 100.0}),
                                 Option("b4", 0.01, {"memory_bytes": 200.0})))
                  for i in range(3))
    problem = Problem("inf", units, (Resource("memory_bytes", 250.0),))
    for name in ["brute", "dp", "greedy", "auto"]:
        sol = solve(problem, name)
        assert sol.status == "infeasible", name
        (inf,) = sol.infeasibility
        assert inf.resource == "memory_bytes" and inf.min_achievable == 300.0
        assert "300" in sol.message


def test_two_budgets_each_feasible_alone_but_not_together():
    opts = (Option("b2", 0.1, {"m": 1.0, "t": 3.0}), Option("b4", 0.0, {"m": 3.0, "t": 1.0}))
    problem = Problem("both", (Unit("u", opts),), (Resource("m", 2.0), Resource("t", 2.0)))
    sol = solve(problem, "brute")
    assert sol.status == "infeasible" and sol.infeasibility == ()
    assert "not all together" in sol.message


def test_dp_grid_mode_is_honest_about_its_gap():
    rng = np.random.default_rng(3)
    units = tuple(Unit(f"u{i}", tuple(Option(o, float(rng.random()), {"t": float(rng.random())})
                                      for o in ("prune", "b2", "b4")))
                  for i in range(8))
    problem = Problem("grid", units, (Resource("t"),))
    lo, hi = min_cost_per_resource(problem, "t"), max_cost_per_resource(problem, "t")
    problem = with_limits(problem, {"t": lo + 0.4 * (hi - lo)})
    sol = solve(problem, "dp", SolveOptions(params={"max_cells": 50}))
    oracle = solve(problem, "brute")
    assert sol.certificate.params["mode"] == "grid"
    assert sol.certificate.dual_bound <= oracle.objective + 1e-12 <= sol.objective + 1e-12
    fine = solve(problem, "dp")  # default grid: the two passes meet
    assert fine.status == "optimal" and _close(fine.objective, oracle.objective)
