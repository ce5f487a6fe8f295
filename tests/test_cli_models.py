"""The model commands on a tiny model: ``--json`` prints exactly one object and no progress;
without it, a log (stderr not a terminal) gets timestamped progress lines."""

from __future__ import annotations

import json
import re

import pytest

from bitsack.cli import main

STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


@pytest.fixture
def tiny(monkeypatch, tmp_path, one_thread):
    """Every load_model call gets a fresh copy of the same seeded tiny Llama (compress changes
    the model it is given)."""
    from bitsack.models import loading
    from bitsack.models.testing import ByteTokenizer, tiny_model

    def load(*a, **k):
        return loading.LoadedModel(model=tiny_model("llama", seed=3), tokenizer=ByteTokenizer(),
                                   source={"kind": "test", "spec": "tiny"})

    monkeypatch.setattr(loading, "load_model", load)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return text


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def progress_lines(err: str, command: str) -> list[str]:
    return [line for line in err.splitlines()
            if re.match(STAMP + f"bitsack {command}: ", line)]


def test_profile_solve_compress_eval_generate_json_and_progress(tiny, tmp_path, capsys,
                                                                 monkeypatch):
    # a line per update: a tiny profile may finish inside any longer interval (CI on a fast
    # machine did, inside 50 ms)
    monkeypatch.setattr("bitsack.progress.DEFAULT_INTERVAL", 1e-6)
    prof = tmp_path / "prof"
    common = ["--model", "tiny", "--calib", str(tiny), "--bits", "2,4", "--group-size", "16",
              "--mlp-group", "32", "--nsamples", "2", "--seqlen", "16", "--units", "heads,mlp",
              "--estimator", "layerwise", "--out", str(prof)]
    code, out, err = run_cli(capsys, "profile", *common, "--json")
    assert code == 0 and json.loads(out)["problem"].endswith("problem.yaml")
    assert progress_lines(err, "profile") == []
    code, out, err = run_cli(capsys, "profile", *common)
    assert code == 0 and out.startswith("profiled ")
    lines = progress_lines(err, "profile")
    assert " done in " in lines[-1]
    assert any(re.search(r"profile: (loading the model|calibration data|estimating)", line)
               for line in lines[:-1])

    problem, sol = prof / "problem.yaml", tmp_path / "sol.json"
    code, out, _ = run_cli(capsys, "solve", str(problem), "--avg-bits", "5", "--solver",
                           "greedy", "--out", str(sol), "--json")
    assert code == 0 and json.loads(out)["status"] in ("optimal", "feasible")

    plan = ["--model", "tiny", "--problem", str(problem), "--solution", str(sol),
            "--quantizer", "rtn"]
    code, out, err = run_cli(capsys, "compress", *plan, "--out", str(tmp_path / "c1"), "--json")
    assert code == 0 and json.loads(out)["packed_bytes"] > 0
    assert progress_lines(err, "compress") == []
    code, out, err = run_cli(capsys, "compress", *plan, "--out", str(tmp_path / "c2"))
    assert code == 0 and "compressed model written to" in out
    lines = progress_lines(err, "compress")
    assert " done in " in lines[-1] and len(lines) >= 2

    evaluation = ["--model", "tiny", "--data", str(tiny), "--seqlen", "32", "--windows", "2"]
    code, out, err = run_cli(capsys, "eval", *evaluation, "--json")
    assert code == 0 and json.loads(out)["result"]["windows"] == 2
    assert progress_lines(err, "eval") == []
    code, out, err = run_cli(capsys, "eval", *evaluation, "--quiet")
    assert code == 0 and "perplexity" in out and progress_lines(err, "eval") == []
    monkeypatch.setattr("bitsack.progress.DEFAULT_INTERVAL", 1e-6)  # a line per update
    code, out, err = run_cli(capsys, "eval", *evaluation)
    lines = progress_lines(err, "eval")
    assert code == 0 and " done in " in lines[-1]
    assert any("bitsack eval: 2/2 windows (100%), 0s elapsed" in line for line in lines), lines

    code, out, _ = run_cli(capsys, "generate-text", "--model", "tiny", "--prompt", "hi",
                           "--max-new-tokens", "3", "--json")
    assert code == 0 and len(json.loads(out)["token_ids"]) <= 3


def test_scale_codes_through_profile_solve_and_compress(tiny, tmp_path, capsys):
    common = ["--model", "tiny", "--calib", str(tiny), "--bits", "2,3,4", "--group-size", "16",
              "--mlp-group", "32", "--nsamples", "2", "--seqlen", "16", "--units", "heads,mlp",
              "--estimator", "layerwise", "--json"]
    assert run_cli(capsys, "profile", *common, "--scale-bits", "fp16",
                   "--out", str(tmp_path / "p"))[0] == 0
    # the default with format bitsack: 6-bit codes
    assert run_cli(capsys, "profile", *common, "--out", str(tmp_path / "p6"))[0] == 0

    def solve(problem, name, *extra):
        code, out, _ = run_cli(capsys, "solve", str(problem), "--avg-bits", "3.5", "--out",
                               str(tmp_path / name), "--json", *extra)
        assert code == 0
        return json.loads(out)["certificate"]["usage"]["memory_bytes"]

    def compress(problem, sol, name, *extra):
        code, out, err = run_cli(capsys, "compress", "--model", "tiny", "--problem",
                                 str(problem), "--solution", str(tmp_path / sol), "--quantizer",
                                 "rtn", "--out", str(tmp_path / name), "--json", *extra)
        assert code == 0
        return json.loads(out), err

    plain = tmp_path / "p" / "problem.yaml"
    # priced with the codes at profile time: the solution records them, compress packs them
    priced = solve(tmp_path / "p6" / "problem.yaml", "s6.json")
    got, err = compress(tmp_path / "p6" / "problem.yaml", "s6.json", "c6")
    assert got["scale_bits"] == 6 and got["packed_bytes"] == priced and "warning" not in err
    # re-priced at solve time: the same bytes; the solution records the pricing, so compress
    # packs the codes without being told
    assert solve(plain, "r6.json", "--scale-bits", "6") == priced
    assert json.loads((tmp_path / "r6.json").read_text())["extra"]["scale_bits"] == 6
    got, err = compress(plain, "r6.json", "r6")
    assert got["scale_bits"] == 6 and got["packed_bytes"] == priced and "warning" not in err
    # ... told otherwise, it packs fp16 scales over the plan's bytes and says so
    got, err = compress(plain, "r6.json", "r16", "--scale-bits", "fp16")
    assert got["packed_bytes"] > priced and "solution was priced with scale_bits 6" in err
    assert "over its budget" in err
    got, err = compress(plain, "r6.json", "r4", "--scale-bits", "4")  # fewer bytes: said too
    assert got["packed_bytes"] < priced and "solution was priced with scale_bits 6" in err
    # and a problem priced with codes re-prices to fp16 scales: the plain problem's bytes
    fp16 = solve(plain, "f.json")
    assert solve(tmp_path / "p6" / "problem.yaml", "f16.json", "--scale-bits", "fp16") == fp16
    assert json.loads((tmp_path / "f16.json").read_text())["extra"]["scale_bits"] is None
    code, _, err = run_cli(capsys, "solve", str(plain), "--avg-bits", "3.5", "--format",
                           "compressed-tensors", "--scale-bits", "6")
    assert code == 1 and "scale_bits: 6 with format 'compressed-tensors'" in err
    # GGUF takes them (its K-quants store scale codes); the solution records them
    assert solve(plain, "g6.json", "--format", "gguf", "--scale-bits", "6") > 0
    assert json.loads((tmp_path / "g6.json").read_text())["extra"]["scale_bits"] == 6


def test_a_refusal_inside_a_long_stage_is_still_one_line(monkeypatch, tmp_path, capsys):
    from bitsack.errors import ModelError

    def refuse(*a, **k):
        raise ModelError("model: 'nope' is neither a file, a folder nor a hub id")

    monkeypatch.setattr("bitsack.models.loading.load_model", refuse)
    text = tmp_path / "t.txt"
    text.write_text("hello " * 50)
    code, out, err = run_cli(capsys, "eval", "--model", "nope", "--data", str(text))
    assert code == 1 and out == ""
    assert err == "bitsack eval: error: model: 'nope' is neither a file, a folder nor a hub id\n"
