"""bench/vocab_ranges.py on a tiny model: the share of each token-id range, written whole."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bitsack.models.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[2] / "bench" / "vocab_ranges.py"


def test_shares_per_range(tmp_path, monkeypatch, fake_load_model):
    from bitsack import data

    fake_load_model(tiny_model("llama", seed=3))
    text = tmp_path / "t.txt"
    text.write_text("abc " * 50 + "~" * 10)
    real = data.eval_tokens
    monkeypatch.setattr(data, "eval_tokens", lambda spec, tok: real(str(text), tok))
    spec = importlib.util.spec_from_file_location("bench_vocab", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "v.md"
    assert mod.main(["--groups", "3", "--out", str(out)]) == 0
    md = out.read_text()
    rows = [line for line in md.splitlines() if line.startswith("| v")]
    assert [r.split("|")[2].strip() for r in rows] == ["0–31", "32–63", "64–127"]
    # ByteTokenizer ids are the bytes (+ an offset): the shares per corpus sum to ≤ 100 %
    share = [float(r.split("|")[5].strip().rstrip("%")) for r in rows]
    assert 0 < sum(share) <= 100.0 + 1e-6
    assert mod.shares(__import__("numpy").array([0, 1, 40, 100]), [(0, 32), (32, 64),
                                                                   (64, 128)]) == [0.5, 0.25, 0.25]
