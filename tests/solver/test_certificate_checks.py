"""A certificate cannot lie: backend claims are checked against bitsack's own bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bitsack.cli import main
from bitsack.errors import ExitCode
from bitsack.solver import solve
from bitsack.solver.backends.base import SolveOptions, make_solution
from bitsack.solver.certify import own_bounds, verify
from bitsack.solver.schema import load_problem
from bitsack.solver.solution import Solution, evaluate

PROBLEMS = Path(__file__).resolve().parents[2] / "problems"
HAND = PROBLEMS / "knapsack-hand.yaml"  # optimum 0.35: {a: b4, b: prune, c: b4}
WORSE = {"a": "b4", "b": "b4", "c": "prune"}  # feasible (3000 bytes), objective 0.53


def _mathopt(name):
    from bitsack.solver.backends.base import registry

    if not registry()[name].is_available():
        pytest.skip(f"{name} is not available here")


def test_own_bounds_bracket_the_optimum():
    p = load_problem(HAND)
    own = own_bounds(p)
    assert own.lower <= 0.35 + 1e-12 <= own.upper + 1e-12
    assert evaluate(p, own.plan).objective == pytest.approx(own.upper)


@pytest.mark.parametrize("backend", ["highs", "scip"])
def test_a_mip_whose_scaling_loses_the_objective_cannot_claim_optimal(monkeypatch, backend):
    """The issue's failure mode, reproduced on a real solver run.

    A loss of 1e308 made the MIP backends' objective scale σ ~ 1e-301, every other loss fell
    below the solvers' tolerances, and they reported "optimal" for a bad plan with a dual
    bound equal to its objective. Such losses are now refused on input; forcing the same tiny
    σ shows the certificate check catching what the solver gets wrong.
    """
    import bitsack.solver.backends.mathopt_model as mathopt_model

    _mathopt(backend)
    monkeypatch.setattr(mathopt_model, "objective_scale", lambda problem, U: 4.0 ** -250)
    p = load_problem(HAND)
    sol = solve(p, backend, SolveOptions(time_limit_s=30))
    check = sol.certificate.params["bound_check"]
    assert check["claimed_dual_bound"] > 0.35 + 1e-6  # the solver's claim was false
    assert "above the objective" in check["contradiction"]
    assert sol.status == "feasible"  # never "optimal" on a refuted bound
    assert sol.objective == pytest.approx(0.35)  # bitsack's own plan was better; kept
    assert sol.certificate.dual_bound <= 0.35  # a valid bound stands in
    assert "bitsack's own Lagrangian bound" in sol.message
    assert all(item.ok for item in verify(p, sol))


def test_refuted_claims_without_a_solver_run():
    p = load_problem(HAND)
    opts = SolveOptions()

    def made(**kw):
        return make_solution(p, solver="liar", solver_version="0", options=opts,
                             wall_time_s=0.0, **kw)

    # a worse plan "proved" optimal: its dual bound is above bitsack's own plan
    sol = made(assignment=WORSE, dual_bound=0.53)
    assert sol.status == "feasible" and sol.objective == pytest.approx(0.35)
    assert "liar's dual bound 0.53 is above the objective 0.35" in sol.message
    # a dual bound above the backend's own plan: refuted, not an exception
    sol = made(assignment=WORSE, dual_bound=0.6)
    assert sol.status == "feasible" and "above the objective 0.53 of its own plan" in sol.message
    # "infeasible" while a plan meets every budget
    sol = made(assignment=None, dual_bound=None, infeasible=True)
    assert sol.status == "feasible" and sol.objective == pytest.approx(0.35)
    assert "reported the problem infeasible" in sol.message
    # an honest answer passes unchanged, with bitsack's bounds recorded
    sol = made(assignment={"a": "b4", "b": "prune", "c": "b4"}, dual_bound=0.35)
    assert sol.status == "optimal" and sol.message == ""
    assert sol.certificate.params["bound_check"]["contradiction"] is None
    # no bound from the backend: bitsack's own lower bound is reported
    sol = made(assignment={"a": "b4", "b": "prune", "c": "b4"}, dual_bound=None)
    assert sol.certificate.dual_bound == pytest.approx(own_bounds(p).lower)


def _forged(tmp_path: Path, capsys, **changes) -> Path:
    """An honest solution file of HAND, then edited."""
    path = tmp_path / "sol.json"
    assert main(["solve", str(HAND), "--solver", "brute", "--quiet", "--out", str(path)]) == 0
    capsys.readouterr()
    doc = json.loads(path.read_text())
    doc.update({k: v for k, v in changes.items() if k != "certificate"})
    doc["certificate"].update(changes.get("certificate", {}))
    path.write_text(json.dumps(doc))
    return path


def test_check_refuses_a_certificate_whose_dual_bound_is_above_a_feasible_plan(tmp_path,
                                                                               capsys):
    # self-consistent: objective, primal and dual all 0.53, gap 0, status optimal
    path = _forged(tmp_path, capsys, assignment=WORSE, objective=0.53,
                   certificate={"primal_bound": 0.53, "dual_bound": 0.53, "abs_gap": 0.0,
                                "rel_gap": 0.0, "usage": {"memory_bytes": 3000.0}})
    assert main(["check", str(HAND), str(path)]) == ExitCode.VERIFY_FAILED
    out = capsys.readouterr().out
    assert "FAIL  dual <= independent plan: dual 0.53, objective of bitsack's own plan 0.35" in out
    assert "ok    gap" in out and "INVALID" in out  # every other check passes: only this catches it


def test_check_refuses_a_false_infeasible_claim(tmp_path, capsys):
    path = _forged(tmp_path, capsys, status="infeasible", assignment={}, objective=None,
                   certificate={"primal_bound": None, "dual_bound": None, "abs_gap": None,
                                "rel_gap": None, "usage": {}})
    assert main(["check", str(HAND), str(path)]) == ExitCode.VERIFY_FAILED
    assert "FAIL  infeasible vs independent plan" in capsys.readouterr().out


def test_check_still_accepts_honest_solutions(tmp_path, capsys):
    for name in ("infeasible", "knapsack-hand", "tiny-two-budgets", "interactions"):
        problem = PROBLEMS / f"{name}.yaml"
        out = tmp_path / f"{name}.json"
        code = main(["solve", str(problem), "--quiet", "--out", str(out)])
        assert code in (ExitCode.OK, ExitCode.NO_SOLUTION)
        sol = Solution.from_dict(json.loads(out.read_text()))
        assert main(["check", str(problem), str(out)]) == 0, (name, capsys.readouterr().out)
        assert sol.status in ("optimal", "infeasible")
