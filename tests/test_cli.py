"""CLI conventions: one exit-code table, one-line errors, ``--json`` everywhere, help on every
option."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bitsack.cli import build_parser, main
from bitsack.errors import ExitCode, ValidationError

ROOT = Path(__file__).resolve().parents[1]
HAND = str(ROOT / "problems" / "knapsack-hand.yaml")
INFEASIBLE = str(ROOT / "problems" / "infeasible.yaml")

#: Commands the lead is rewriting (their flags get help strings and validators there).
REWRITING: set[str] = set()


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# ---- the exit-code table -------------------------------------------------------------------
def test_exit_codes_are_distinct_and_keep_argparse_usage_code():
    values = [int(c) for c in ExitCode]
    assert len(values) == len(set(values))
    assert ExitCode.USAGE == 2  # what argparse itself uses
    assert ExitCode.NO_SOLUTION != ExitCode.USAGE
    assert ExitCode.INTERRUPTED == 130


def test_help_and_readme_carry_the_same_exit_code_table(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", section, flags=re.M))
    assert {int(k) for k in rows} == {int(c) for c in ExitCode}
    for code in ExitCode:
        assert re.search(rf"^  {int(code)}\s+\S", help_text, flags=re.M), code


# ---- every command: --json and help strings --------------------------------------------------
@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_command_has_json(name):
    flags = {s for a in subcommands()[name]._actions for s in a.option_strings}
    assert "--json" in flags and "--debug" in flags


def _options_without_help(parser: argparse.ArgumentParser) -> list[str]:
    return [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            and (not a.help or a.help == argparse.SUPPRESS)]


def test_every_option_has_a_help_string():
    missing = {"bitsack": _options_without_help(build_parser())}
    for name, parser in subcommands().items():
        if name not in REWRITING:
            missing[name] = _options_without_help(parser)
    assert {k: v for k, v in missing.items() if v} == {}


# ---- one line, the right code ------------------------------------------------------------------
def test_usage_error_is_one_line_naming_the_flag(capsys):
    code, out, err = cli(capsys, "solve", HAND, "--time-limit", "1e308")
    assert code == ExitCode.USAGE and out == ""
    line = one_line(err)
    assert line.startswith("bitsack solve: error: argument --time-limit: '1e308' is out of range")
    assert "valid: seconds in (0, 1e+07]" in line and "bitsack solve --help" in line


def test_unknown_flag_blames_the_command_not_bitsack(capsys):
    code, _, err = cli(capsys, "solve", HAND, "--bogus")
    assert code == ExitCode.USAGE
    assert one_line(err) == ("bitsack solve: error: unrecognized arguments: --bogus; see "
                             "'bitsack solve --help'")


def test_no_command_prints_help_with_the_usage_code(capsys):
    code, _, err = cli(capsys)
    assert code == ExitCode.USAGE and "exit codes:" in err


def test_infeasible_is_not_a_usage_error(capsys):
    code, out, _ = cli(capsys, "solve", INFEASIBLE, "--json")
    assert code == ExitCode.NO_SOLUTION
    assert json.loads(out)["status"] == "infeasible"


def test_bad_input_is_1_and_names_the_field(capsys, tmp_path):
    code, out, err = cli(capsys, "solve", str(tmp_path / "missing.yaml"))
    assert code == ExitCode.BAD_INPUT and out == ""
    assert "problem:" in one_line(err) and "missing.yaml" in err


def test_out_naming_a_folder_is_refused_before_the_work(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("bitsack.solver.solve", lambda *a, **k: pytest.fail("solved"))
    code, _, err = cli(capsys, "solve", HAND, "--out", str(tmp_path))
    assert code == ExitCode.BAD_INPUT
    assert one_line(err).startswith(f"bitsack solve: error: --out: {str(tmp_path)!r} is a "
                                    "folder; valid: a file path")
    code, _, err = cli(capsys, "generate", "--out", str(tmp_path))
    assert code == ExitCode.BAD_INPUT and "--out" in one_line(err)


def test_an_os_error_is_bad_input_not_a_traceback(capsys, tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "p.yaml"))

    monkeypatch.setattr("bitsack.solver.schema.load_problem", denied)
    code, _, err = cli(capsys, "solve", HAND)
    assert code == ExitCode.BAD_INPUT
    assert "Permission denied" in one_line(err)


def _boom(*a, **k):
    raise RuntimeError("boom\nsecond line")


def test_unexpected_exception_is_one_line_exit_5(capsys, monkeypatch):
    monkeypatch.setattr("bitsack.solver.schema.load_problem", _boom)
    monkeypatch.delenv("BITSACK_DEBUG", raising=False)
    code, out, err = cli(capsys, "solve", HAND)
    assert code == ExitCode.INTERNAL and out == ""
    assert one_line(err) == ("bitsack solve: internal error: RuntimeError: boom | second line; "
                             "rerun with --debug for the traceback")


@pytest.mark.parametrize("how", ["after", "before", "env"])
def test_debug_prints_the_traceback(capsys, monkeypatch, how):
    monkeypatch.setattr("bitsack.solver.schema.load_problem", _boom)
    argv = {"after": ["solve", HAND, "--debug"], "before": ["--debug", "solve", HAND],
            "env": ["solve", HAND]}[how]
    if how == "env":
        monkeypatch.setenv("BITSACK_DEBUG", "1")
    code, _, err = cli(capsys, *argv)
    assert code == ExitCode.INTERNAL
    assert "Traceback" in err and "RuntimeError: boom" in err
    assert err.strip().splitlines()[-1].startswith("bitsack solve: internal error: RuntimeError")


def test_interrupt_exits_130(capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("bitsack.solver.schema.load_problem", interrupted)
    code, _, err = cli(capsys, "solve", HAND)
    assert code == ExitCode.INTERRUPTED
    assert one_line(err) == "bitsack solve: interrupted: stopped by the user"


def test_a_huge_message_is_capped(capsys, monkeypatch):
    def loud(*a, **k):
        raise ValidationError("units[0].id", "x" * 100_000)

    monkeypatch.setattr("bitsack.solver.schema.load_problem", loud)
    code, _, err = cli(capsys, "solve", HAND)
    assert code == ExitCode.BAD_INPUT
    assert len(one_line(err)) < 2200 and "more characters" in err


# ---- --json: one object on success, one object on failure -------------------------------------
def test_json_success_is_one_object_for_the_solver_commands(capsys, tmp_path):
    sol = tmp_path / "sol.json"
    code, out, _ = cli(capsys, "solve", HAND, "--json", "--quiet", "--out", str(sol))
    assert code == 0 and json.loads(out)["status"] == "optimal"
    code, out, _ = cli(capsys, "check", HAND, str(sol), "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    code, out, _ = cli(capsys, "generate", "--out", str(tmp_path / "g.yaml"), "--json")
    assert code == 0 and json.loads(out)["units"] == 6
    code, out, _ = cli(capsys, "pareto", HAND, "--resource", "memory_bytes", "--points", "2",
                       "--solver", "dp", "--out", str(tmp_path / "f"), "--json")
    assert code == 0 and len(json.loads(out)["points"]) == 2
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "knapsack-hand.yaml").write_text(Path(HAND).read_text())
    (folder / "knapsack-hand.golden.json").write_text(
        (ROOT / "problems" / "knapsack-hand.golden.json").read_text())
    code, out, _ = cli(capsys, "regress", str(folder), "--solver", "dp", "--json")
    assert code == 0 and json.loads(out)["ok"] is True


@pytest.mark.parametrize("argv, code, kind, field", [
    (["solve", HAND, "--gap", "1", "--json"], ExitCode.USAGE, "UsageError", "--gap"),
    (["solve", "missing.yaml", "--json"], ExitCode.BAD_INPUT, "ValidationError", "problem"),
    (["eval", "--model", "m", "--seqlen", "1", "--json"], ExitCode.USAGE, "UsageError",
     "--seqlen"),
])
def test_json_errors_are_one_object_on_stdout(capsys, argv, code, kind, field):
    got, out, err = cli(capsys, *argv)
    assert got == code
    obj = json.loads(out)
    assert obj["error"]["exit_code"] == code and obj["error"]["type"] == kind
    assert obj["error"]["field"] == field
    assert obj["error"]["message"] in one_line(err)


def test_subprocess_refusal_is_fast_small_and_one_line(tmp_path):
    """The acceptance shape: a refused number exits 2 within 10 s and 1 GB, one line."""
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "from bitsack.cli import main\n"
            f"sys.exit(main(['solve', {HAND!r}, '--time-limit', '1e308']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=10)
    assert proc.returncode == ExitCode.USAGE
    assert "--time-limit" in one_line(proc.stderr)
