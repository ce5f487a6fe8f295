"""The solver CLI: exit codes, JSON output, check, generate, regress, pareto."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitsack.cli import main
from bitsack.errors import ExitCode
from bitsack.solver.schema import load_problem

PROBLEMS = Path(__file__).resolve().parents[2] / "problems"
HAND = str(PROBLEMS / "knapsack-hand.yaml")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_solve_prints_plan_and_certificate(capsys):
    code, out, _ = run(capsys, "solve", HAND, "--solver", "dp")
    assert code == 0
    assert "status   optimal" in out and "objective 0.35 " in out
    assert "memory_bytes 3000" in out and "dual 0.35" in out
    # counts per option per kind: a (head_group) b4, b (head_group) pruned, c (mlp_group) b4
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.startswith(("head_group", "mlp_group"))}
    assert rows == {"head_group": ["1", "0", "1"], "mlp_group": ["0", "0", "1"]}


def test_solve_json_parses_and_out_is_written(capsys, tmp_path):
    out_file = tmp_path / "sol.json"
    code, out, _ = run(capsys, "solve", HAND, "--json", "--out", str(out_file))
    assert code == 0
    data = json.loads(out)
    assert data["status"] == "optimal" and data["objective"] == pytest.approx(0.35)
    assert data["assignment"] == {"a": "b4", "b": "prune", "c": "b4"}
    assert data["certificate"]["params"]["auto"]["picked"] in ("brute", "dp")
    assert json.loads(out_file.read_text()) == data


def test_infeasible_exits_3_with_the_smallest_feasible_limit(capsys):
    code, out, _ = run(capsys, "solve", str(PROBLEMS / "infeasible.yaml"))
    assert code == ExitCode.NO_SOLUTION == 3
    assert "status   infeasible" in out
    assert "smallest feasible limit is 200" in out


def test_budget_override_can_make_it_feasible(capsys):
    code, out, _ = run(capsys, "solve", str(PROBLEMS / "infeasible.yaml"), "--budget",
                       "memory_bytes=200", "--json")
    assert code == 0 and json.loads(out)["objective"] == pytest.approx(0.7)  # b2 + b2 + prune


@pytest.mark.parametrize("argv, fragment", [
    (["--budget", "memory_bytes=-3"], "--budget memory_bytes: -3.0 is negative"),
    (["--budget", "energy=3"], "budget.energy: is not a resource"),
    (["--budget", "memory_bytes"], "--budget: 'memory_bytes' is not RESOURCE=VALUE"),
    (["--solver", "magic"], "solver: 'magic' is not a backend"),
    (["--param", "bogus=1", "--solver", "dp"], "not understood by dp"),
])
def test_bad_input_exits_1_with_a_message(capsys, argv, fragment):
    code, out, err = run(capsys, "solve", HAND, *argv)
    assert code == 1
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize("argv, fragment", [
    (["--avg-bits", "0"], "--avg-bits: '0' is out of range; valid: bits per weight in (0, 16]"),
    (["--gap", "2"], "--gap: '2' is out of range; valid: a relative gap in [0, 1)"),
])
def test_out_of_range_flag_is_a_usage_error(capsys, argv, fragment):
    code, out, err = run(capsys, "solve", HAND, *argv)
    assert code == ExitCode.USAGE
    assert fragment in err and "Traceback" not in err


def test_bad_file_exits_1_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: bitsack.problem/v1\nname: x\nunits: [{id: a, options: []}]\n")
    proc = subprocess.run([sys.executable, "-m", "bitsack.cli", "solve", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "units[0].options" in proc.stderr and "Traceback" not in proc.stderr


def test_avg_bits_sets_the_memory_budget(capsys):
    path = str(PROBLEMS / "smollm2-135m.yaml")
    problem = load_problem(path)
    code, out, _ = run(capsys, "solve", path, "--avg-bits", "2.5", "--json", "--solver", "dp")
    assert code == 0
    cert = json.loads(out)["certificate"]
    limit = 2.5 * problem.total_params / 8
    assert cert["limits"]["memory_bytes"] == pytest.approx(limit)
    assert cert["usage"]["memory_bytes"] <= limit


def test_check_accepts_a_solution_and_catches_tampering(capsys, tmp_path):
    sol_file = tmp_path / "sol.json"
    assert run(capsys, "solve", HAND, "--quiet", "--out", str(sol_file))[0] == 0
    code, out, _ = run(capsys, "check", HAND, str(sol_file))
    assert code == 0 and "valid: optimal" in out
    data = json.loads(sol_file.read_text())

    def tampered(**changes):
        doc = json.loads(json.dumps(data))
        for key, value in changes.items():
            target = doc
            *path, last = key.split(".")
            for k in path:
                target = target[k]
            target[last] = value
        path = tmp_path / "t.json"
        path.write_text(json.dumps(doc))
        return run(capsys, "check", HAND, str(path))

    code, out, _ = tampered(objective=0.30)
    assert code == ExitCode.VERIFY_FAILED and "FAIL  objective" in out
    code, out, _ = tampered(**{"assignment.b": "b4"})  # 4500 bytes > 3000
    assert code == ExitCode.VERIFY_FAILED and "FAIL  feasible" in out
    code, out, _ = tampered(**{"certificate.dual_bound": 0.2, "certificate.abs_gap": 0.15,
                               "certificate.rel_gap": 0.43})  # "optimal" with a wide gap
    assert code == ExitCode.VERIFY_FAILED and "FAIL  optimal status" in out
    code, out, err = tampered(**{"assignment.zz": "b4"})  # malformed, not a failed check
    assert code == ExitCode.BAD_INPUT and "unknown unit" in err


def test_generate_is_seeded_and_writes_both_formats(capsys, tmp_path):
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.json"
    for path in (a, b):
        assert run(capsys, "generate", "--preset", "tiny", "--rank", "2", "--seed", "5",
                   "--out", str(path))[0] == 0
    assert a.read_text().replace("b.interactions", "a.interactions") == a.read_text()
    assert (tmp_path / "a.interactions.npz").exists()
    pa, pb = load_problem(a), load_problem(b)
    assert pa.units == pb.units and pa.limits == pb.limits
    assert run(capsys, "generate", "--preset", "tiny", "--seed", "5", "--rank", "2",
               "--out", str(c))[0] == 0
    assert load_problem(c).units == pa.units
    code, _, err = run(capsys, "generate", "--preset", "gpt-9", "--out", str(c))
    assert code == 1 and "--preset: 'gpt-9' is not a preset" in err


def test_regress_passes_on_committed_goldens(capsys):
    code, out, _ = run(capsys, "regress", str(PROBLEMS))
    assert code == 0, out
    assert "FAIL" not in out and "passed:" in out


def test_regress_fails_on_a_tampered_golden(capsys, tmp_path):
    copy = tmp_path / "problems"
    shutil.copytree(PROBLEMS, copy)
    golden = copy / "knapsack-hand.golden.json"
    doc = json.loads(golden.read_text())
    doc["objective"] = 0.36
    golden.write_text(json.dumps(doc))
    code, out, _ = run(capsys, "regress", str(copy), "--solver", "brute", "dp")
    assert code == ExitCode.VERIFY_FAILED
    assert "FAIL    brute    " in out and "knapsack-hand" in out
    doc["objective"], doc["status"] = 0.35, "infeasible"
    golden.write_text(json.dumps(doc))
    code, out, _ = run(capsys, "regress", str(copy), "--solver", "dp")
    assert code == ExitCode.VERIFY_FAILED and "status optimal != golden infeasible" in out


def test_regress_update_writes_goldens_that_then_pass(capsys, tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    shutil.copy(PROBLEMS / "min-kept.yaml", folder)
    code, out, _ = run(capsys, "regress", str(folder), "--update", "--solver", "brute", "dp")
    assert code == 0 and "updated" in out
    golden = json.loads((folder / "min-kept.golden.json").read_text())
    assert golden["objective"] == pytest.approx(0.245) and golden["reference"] == "brute"
    assert golden["cross_checked"] == ["dp"]
    assert run(capsys, "regress", str(folder), "--solver", "dp")[0] == 0


def test_pareto_table_png_and_json(capsys, tmp_path):
    prefix = tmp_path / "front"
    code, out, _ = run(capsys, "pareto", HAND, "--resource", "memory_bytes", "--points", "4",
                       "--solver", "dp", "--out", str(prefix))
    assert code == 0
    png = prefix.with_name("front.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(prefix.with_name("front.json").read_text())
    limits = [p["limit"] for p in data["points"]]
    assert limits == pytest.approx([0.0, 1500.0, 3000.0, 4500.0])
    objectives = [p["objective"] for p in data["points"]]
    assert objectives == sorted(objectives, reverse=True)  # more budget never hurts
    assert objectives[0] == pytest.approx(1.2) and objectives[-1] == pytest.approx(0.07)
    assert "optimal" in out


def test_help_lists_the_solver_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("solve", "check", "generate", "regress", "pareto"):
        assert name in out
