"""``bitsack profile`` writes problem.yaml, interactions.npz and profile.json; the problem
validates and solves."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitsack.cli import main
from bitsack.models.testing import ByteTokenizer, tiny_model
from bitsack.solver import avg_bits_limit, load_problem, solve, with_limits


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    from bitsack.models import loading

    model = tiny_model("llama", seed=3)
    fake = loading.LoadedModel(model=model, tokenizer=ByteTokenizer(),
                               source={"kind": "test", "spec": "tiny"})
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: fake)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return model, text


def test_cli_writes_three_files_and_the_problem_solves(tiny, tmp_path, capsys):
    _, text = tiny
    out = tmp_path / "prof"
    argv = ["profile", "--model", "tiny", "--calib", str(text), "--bits", "2,3,4",
            "--group-size", "16", "--mlp-group", "32", "--nsamples", "4", "--seqlen", "24",
            "--device", "a100", "--out", str(out), "--json"]
    assert main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {p.name for p in out.iterdir()} == {"problem.yaml", "interactions.npz",
                                                "profile.json"}
    problem = load_problem(out / "problem.yaml")
    assert problem.interactions.U.shape == (4, problem.n_options)
    assert problem.metadata["calib"] == str(text)
    assert problem.metadata["cost_models"][1]["device"]["name"] == "a100"
    assert set(problem.resources[i].name for i in range(3)) == {
        "memory_bytes", "decode_latency_us", "prefill_latency_us"}
    saved = json.loads((out / "profile.json").read_text())
    assert saved == rep["report"]
    assert saved["estimator"] == "fisher" and saved["data"]["nsamples"] == 4
    budgeted = with_limits(problem, {"memory_bytes": avg_bits_limit(problem, 3.0)})
    sol = solve(budgeted, "greedy")
    assert sol.status in ("optimal", "feasible")
    assert sol.certificate.usage["memory_bytes"] <= budgeted.limits["memory_bytes"] + 1e-6
    # same flags, same files (determinism through the CLI)
    first = (out / "problem.yaml").read_text()
    u1 = np.load(out / "interactions.npz")["U"]
    assert main(argv[:-1] + ["--quiet"]) == 0
    assert (out / "problem.yaml").read_text() == first
    np.testing.assert_array_equal(np.load(out / "interactions.npz")["U"], u1)


def test_cli_additive_estimator_removes_a_stale_sidecar(tiny, tmp_path, capsys):
    _, text = tiny
    out = tmp_path / "prof"
    base = ["profile", "--model", "tiny", "--calib", str(text), "--bits", "2",
            "--group-size", "16", "--mlp-group", "32", "--nsamples", "3", "--seqlen", "16",
            "--units", "heads,mlp", "--out", str(out), "--quiet"]
    assert main(base) == 0
    assert (out / "interactions.npz").is_file()
    assert main(base + ["--estimator", "layerwise"]) == 0
    assert not (out / "interactions.npz").exists()
    problem = load_problem(out / "problem.yaml")
    assert problem.interactions is None
    assert {u.kind for u in problem.units} == {"head_group", "mlp_group"}
    assert problem.metadata["loss_units"] == "squared activation error per token"


def test_cli_rejects_bad_flags(tiny, tmp_path, capsys):
    _, text = tiny
    assert main(["profile", "--model", "tiny", "--units", "heads,convs",
                 "--out", str(tmp_path)]) == 2  # a usage error, before any work
    assert "argument --units: 'convs' in 'heads,convs' is not valid; valid: comma-separated " \
        "names from heads, mlp, embed" in capsys.readouterr().err
    # any group size profiles now (the last group of a row may be shorter)
    rc = main(["profile", "--model", "tiny", "--calib", str(text), "--group-size", "7",
               "--nsamples", "2", "--seqlen", "16", "--out", str(tmp_path / "x")])
    assert rc == 0, capsys.readouterr().err
    assert main(["profile", "--model", "tiny", "--calib", str(text), "--group-size", "0",
                 "--out", str(tmp_path / "y")]) == 2
