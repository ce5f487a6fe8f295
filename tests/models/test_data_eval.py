"""Data location and windows, the perplexity protocol, the eval / generate-text commands."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

import bitsack.data as data
from bitsack.data import calibration_tokens, eval_tokens, find_data_file
from bitsack.errors import DataError, ValidationError
from bitsack.evaluate import perplexity
from bitsack.models.testing import ByteTokenizer, tiny_model


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No shared data dir, no hub: only what a test puts in $BITSACK_DATA."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    work = tmp_path / "work" / "repo"
    work.mkdir(parents=True)
    monkeypatch.setenv("BITSACK_DATA", str(data_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(data, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.chdir(work)
    return data_dir


def write_fake_c4(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Document i repeats its own index, so any window tells which document it came from.
    texts = [f"[{i:04d}]" * 30 for i in range(2000)]
    pq.write_table(pa.table({"text": texts}), path)


def doc_ids(text: str) -> set[int]:
    return {int(text[k + 1:k + 5]) for k in range(len(text) - 5)
            if text[k] == "[" and text[k + 5] == "]" and text[k + 1:k + 5].isdigit()}


def test_missing_file_error_lists_every_place(isolated):
    with pytest.raises(DataError) as info:
        find_data_file("wikitext2_raw_test_rows.json")
    msg = str(info.value)
    assert str(isolated / "wikitext2_raw_test_rows.json") in msg
    assert "next to the bitsack repository: " + str(isolated.parent / "shared") in msg
    assert "next to the working directory: " + str(isolated.parent / "work" / "shared") in msg
    assert "hub: skipped: HF_HUB_OFFLINE is set" in msg
    with pytest.raises(DataError, match="no hub source"):
        find_data_file("nothing-like-this.txt")


def test_search_order_explicit_then_env(isolated, tmp_path):
    (isolated / "x.txt").write_text("env")
    explicit = tmp_path / "explicit.txt"
    explicit.write_text("explicit")
    assert find_data_file("x.txt", path=explicit) == explicit
    assert find_data_file("x.txt", path=tmp_path / "nope.txt") == isolated / "x.txt"
    assert find_data_file("x.txt") == isolated / "x.txt"
    assert find_data_file(str(explicit)) == explicit


def test_shared_data_next_to_repo_is_found(monkeypatch, tmp_path):
    monkeypatch.delenv("BITSACK_DATA", raising=False)
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    (shared / "y.txt").write_text("y")
    monkeypatch.setattr(data, "_REPO_ROOT", tmp_path / "repo")
    assert find_data_file("y.txt") == shared / "y.txt"


def test_c4_calibration_never_touches_evaluation_documents(isolated):
    write_fake_c4(isolated / data.C4_FILE)
    tok = ByteTokenizer(vocab_size=256)
    calib = calibration_tokens("c4", tok, nsamples=200, seqlen=24, seed=0)
    assert calib.shape == (200, 24)
    seen = set().union(*(doc_ids(tok.decode(row.tolist())) for row in calib))
    assert seen and min(seen) >= 1100 and max(seen) <= 1999
    assert len(seen) > 100  # windows really spread over the calibration documents
    ev = tok.decode(eval_tokens("c4", tok)[0].tolist())
    assert doc_ids(ev) == set(range(1100))


def test_c4_too_long_seqlen_is_a_clear_error(isolated):
    write_fake_c4(isolated / data.C4_FILE)
    with pytest.raises(ValidationError, match=r"seqlen: 5000 is too long .*at most 179"):
        calibration_tokens("c4", ByteTokenizer(256), nsamples=1, seqlen=5000)


@pytest.mark.parametrize("spec", ["wikitext2", "tinyshakespeare.txt"])
def test_calibration_is_seeded(spec):
    tok = ByteTokenizer()
    a = calibration_tokens(spec, tok, nsamples=4, seqlen=32, seed=7)
    b = calibration_tokens(spec, tok, nsamples=4, seqlen=32, seed=7)
    c = calibration_tokens(spec, tok, nsamples=4, seqlen=32, seed=8)
    assert a.dtype == torch.long and a.shape == (4, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_wikitext2_eval_stream_is_rows_joined_by_blank_lines():
    rows = json.loads(find_data_file(data.WIKITEXT2_TEST_ROWS).read_text(encoding="utf-8"))
    assert len(rows) == 4358
    tok = ByteTokenizer(vocab_size=256)
    ids = eval_tokens("wikitext2", tok)
    assert ids.shape == (1, len("\n\n".join(rows).encode("utf-8")))
    assert tok.decode(ids[0, :200].tolist()) == "\n\n".join(rows).encode()[:200].decode()


def test_text_file_spec_and_bad_values(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefghij" * 10)
    assert eval_tokens(str(f), ByteTokenizer()).shape == (1, 100)
    with pytest.raises(ValidationError, match="nsamples"):
        calibration_tokens(str(f), ByteTokenizer(), nsamples=0, seqlen=8)
    with pytest.raises(ValidationError, match="seqlen: 500 is longer"):
        calibration_tokens(str(f), ByteTokenizer(), nsamples=1, seqlen=500)
    with pytest.raises(DataError, match="neither one of wikitext2, c4"):
        eval_tokens(str(tmp_path / "missing.txt"), ByteTokenizer())


def hand_perplexity(model, tokens, seqlen, windows):
    total = 0.0
    for w in range(windows):
        x = tokens[:, w * seqlen:(w + 1) * seqlen]
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits.double(), dim=-1)
        nll = [-float(logp[0, t, x[0, t + 1]]) for t in range(seqlen - 1)]
        total += sum(nll) / len(nll)
    return math.exp(total / windows)


def test_perplexity_matches_hand_computation():
    model = tiny_model("llama", seed=11, init_std=0.3)
    tokens = torch.randint(0, 128, (1, 53), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, tokens, 16, progress=False)
    assert (res.windows, res.windows_available, res.tokens_evaluated) == (3, 3, 48)
    assert res.predictions == 45
    assert res.ppl == pytest.approx(hand_perplexity(model, tokens, 16, 3), rel=1e-6)
    first2 = perplexity(model, tokens, 16, windows=2, batch_size=2, progress=False)
    assert first2.ppl == pytest.approx(hand_perplexity(model, tokens, 16, 2), rel=1e-6)
    assert "windows of 16 tokens, first 2 of 3" in first2.protocol
    batched = perplexity(model, tokens, 16, batch_size=3, progress=False)
    assert batched.ppl == pytest.approx(res.ppl, rel=1e-6)


def test_perplexity_rejects_bad_windows():
    model = tiny_model("gpt2")
    tokens = torch.zeros(1, 40, dtype=torch.long)
    with pytest.raises(ValidationError, match=r"windows: 3 must be an integer in 1\.\.2"):
        perplexity(model, tokens, 20, windows=3, progress=False)
    with pytest.raises(ValidationError, match="seqlen: 64 is longer"):
        perplexity(model, tokens, 64, progress=False)


def test_eval_and_generate_commands_on_a_tiny_model(monkeypatch, tmp_path, capsys):
    from bitsack.commands import eval as eval_cmd
    from bitsack.commands import generate_text
    from bitsack.models import loading

    model = tiny_model("llama", seed=2)
    fake = loading.LoadedModel(model=model, tokenizer=ByteTokenizer(),
                               source={"kind": "test", "spec": "tiny"})
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: fake)
    text = tmp_path / "eval.txt"
    text.write_text("hello world, " * 20)

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    eval_cmd.register(sub)
    generate_text.register(sub)
    args = parser.parse_args(["eval", "--model", "tiny", "--data", str(text), "--seqlen", "32",
                              "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["result"]["windows"] == 260 // 32
    expected = perplexity(model, torch.tensor([ByteTokenizer().encode(text.read_text())]), 32,
                          progress=False)
    assert out["result"]["ppl"] == pytest.approx(expected.ppl, rel=1e-9)

    args = parser.parse_args(["generate-text", "--model", "tiny", "--prompt", "hi",
                              "--max-new-tokens", "5", "--json"])
    assert args.func(args) == 0
    gen = json.loads(capsys.readouterr().out)
    assert len(gen["token_ids"]) == 5
    with torch.no_grad():
        want = model.generate(torch.tensor([ByteTokenizer().encode("hi")]), max_new_tokens=5,
                              do_sample=False, pad_token_id=0)[0, 2:].tolist()
    assert gen["token_ids"] == want
