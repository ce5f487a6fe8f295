"""Every number on the command line is range-checked while parsing: one line naming the flag,
the bad value and what is valid, exit 2, before any file is read or model loaded."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bitsack.cli import main
from bitsack.commands._args import (
    BITS_LIST,
    FRACTION,
    GAP,
    POSITIVE_INT,
    SECONDS,
    SEED,
    deferred,
    integer,
    name_list,
    real,
)
from bitsack.errors import ExitCode

HAND = str(Path(__file__).resolve().parents[1] / "problems" / "knapsack-hand.yaml")


# ---- the validators ---------------------------------------------------------------------------
@pytest.mark.parametrize("check, text, value", [
    (POSITIVE_INT, "64", 64), (POSITIVE_INT, " +7 ", 7), (POSITIVE_INT, "1_000", 1000),
    (SEED, "0", 0), (SECONDS, "0.5", 0.5), (SECONDS, "1e7", 1e7), (GAP, "0", 0.0),
    (FRACTION, "1", 1.0), (BITS_LIST, "2,3, 4,16", [2, 3, 4, 16]),
    (name_list(["heads", "mlp"]), "mlp,heads", ["mlp", "heads"]),
])
def test_validators_accept(check, text, value):
    assert check(text) == value


@pytest.mark.parametrize("check, text, why", [
    (POSITIVE_INT, "0", "'0' is out of range; valid: a positive integer in [1, 2147483647]"),
    (POSITIVE_INT, "1e3", "'1e3' is not an integer"),
    (POSITIVE_INT, str(2**40), "is out of range; valid: a positive integer in [1, "),
    (SEED, "-1", "'-1' is out of range; valid: a seed in [0, 2147483647]"),
    (SECONDS, "1e308", "'1e308' is out of range; valid: seconds in (0, 1e+07]"),
    (SECONDS, "0", "'0' is out of range"),
    (SECONDS, "nan", "'nan' is not a finite number"),
    (SECONDS, "-inf", "'-inf' is not a finite number"),
    (SECONDS, "soon", "'soon' is not a number"),
    (GAP, "1", "'1' is out of range; valid: a relative gap in [0, 1)"),
    (FRACTION, "0", "'0' is out of range; valid: a fraction in (0, 1]"),
    (BITS_LIST, "2,9", "'9' in '2,9' is out of range; valid: comma-separated bit-widths in "
     "1..8 or 16"),
    (BITS_LIST, ",", "',' is empty"),
    (name_list(["heads", "mlp"]), "heads,convs", "'convs' in 'heads,convs' is not valid"),
    (BITS_LIST, "2,x", "'x' in '2,x' is not an integer"),
    (POSITIVE_INT, "9" * 100, "'" + "9" * 40 + "...' is out of range"),  # value shown capped
])
def test_validators_refuse_with_the_value_and_the_range(check, text, why):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        check(text)
    assert why in str(info.value)
    assert "valid:" in str(info.value)


def test_range_descriptions():
    assert integer(2, 5).valid == "an integer in [2, 5]"
    assert integer(None, None).valid == "an integer"
    assert real(0, None, lo_open=True).valid == "a number > 0"
    assert real().valid == "a finite number"


def test_deferred_builds_once_on_first_use():
    calls = []

    def make():
        calls.append(1)
        return integer(1, 3)

    check = deferred(make)
    assert calls == []  # building the parser imports nothing
    assert check("2") == 2 and check("3") == 3 and calls == [1]
    with pytest.raises(argparse.ArgumentTypeError, match="in \\[1, 3\\]"):
        check("4")


# ---- every command refuses its out-of-range numbers on parse ---------------------------------
_REQUIRED = {
    "solve": [HAND],
    "check": [HAND, "s.json"],
    "pareto": [HAND, "--resource", "memory_bytes"],
    "generate": ["--out", "g.yaml"],
    "regress": [],
    "compress": ["--model", "m", "--problem", "p.yaml", "--solution", "s.json", "--out", "o"],
    "eval": ["--model", "m"],
    "generate-text": ["--model", "m", "--prompt", "hi"],
    "profile": ["--model", "m", "--out", "o"],
    "run": ["--avg-bits", "3.5"],
}

REFUSALS = [
    ("solve", "--time-limit", "1e308"), ("solve", "--time-limit", "nan"),
    ("solve", "--time-limit", "-1"), ("solve", "--gap", "inf"), ("solve", "--gap", "-0.1"),
    ("solve", "--seed", "-1"), ("solve", "--seed", "1.5"), ("solve", "--threads", "0"),
    ("solve", "--avg-bits", "0"), ("solve", "--avg-bits", "nan"), ("solve", "--avg-bits", "17"),
    ("check", "--avg-bits", "-3"),
    ("pareto", "--points", "0"), ("pareto", "--points", "1001"), ("pareto", "--points", "x"),
    ("pareto", "--time-limit", "inf"),
    ("regress", "--time-limit", "1e308"),
    ("generate", "--layers", "0"), ("generate", "--hidden", "1e3"), ("generate", "--rank", "-1"),
    ("generate", "--tightness", "0"), ("generate", "--tightness", "1.5"),
    ("generate", "--seed", "-3"), ("generate", "--avg-bits", "inf"),
    ("compress", "--nsamples", "0"), ("compress", "--seqlen", "1"),
    ("compress", "--group-size", "0"), ("compress", "--mlp-group", "-1"),
    ("compress", "--seed", "nan"),
    ("eval", "--seqlen", "1"), ("eval", "--windows", "0"), ("eval", "--batch-size", "0"),
    ("eval", "--verify-sample", "-1"),
    ("generate-text", "--max-new-tokens", "0"), ("generate-text", "--max-new-tokens", "1e9"),
    ("profile", "--bits", "9"), ("profile", "--bits", "0,2"), ("profile", "--bits", "2,x"),
    ("profile", "--group-size", "0"), ("profile", "--mlp-group", "0"),
    ("profile", "--nsamples", "0"), ("profile", "--seqlen", "99999999"),
    ("profile", "--measure-subset", "0"), ("profile", "--measure-subset", "1.5"),
    ("profile", "--calibrate-fraction", "nan"), ("profile", "--nproc", "0"),
    ("profile", "--fisher-draws", "0"), ("profile", "--fisher-chunks", "0"),
    ("profile", "--holdout", "0"), ("profile", "--hutchinson-probes", "0"),
    ("profile", "--hutchinson-samples", "-2"), ("profile", "--batch-size", "0"),
    ("profile", "--seed", "-1"), ("profile", "--units", "heads,convs"),
]


@pytest.mark.parametrize("command, flag, value", REFUSALS)
def test_out_of_range_number_is_a_one_line_usage_error(capsys, monkeypatch, command, flag,
                                                       value):
    monkeypatch.setattr("bitsack.models.loading.load_model",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr("bitsack.solver.schema.load_problem",
                        lambda *a, **k: pytest.fail("the problem was read"))
    code = main([command, *_REQUIRED[command], flag, value])
    out, err = capsys.readouterr()
    assert code == ExitCode.USAGE and out == ""
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"bitsack {command}: error: argument {flag}: ")
    assert repr(value) in lines[0] or f"{value!r}"[1:-1] in lines[0]
    assert "valid:" in lines[0]


@pytest.mark.parametrize("command, flag, value", [
    ("eval", "--dtype", "float8"), ("generate-text", "--dtype", "int4"),
    ("profile", "--dtype", "half"), ("compress", "--quantizer", "awq"),
    ("compress", "--grid", "mean"), ("run", "--grid", "mean"),
])
def test_unknown_choice_is_a_one_line_usage_error(capsys, command, flag, value):
    code = main([command, *_REQUIRED[command], flag, value])
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE
    assert err.count("\n") == 1 and f"argument {flag}: invalid choice: {value!r}" in err
