"""bench/param_storage.py: the emulated double-quantized scales and the byte counts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bitsack.models.testing import ByteTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[2] / "bench" / "param_storage.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_param_storage", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scales_are_multiples_of_the_super_block_step_only_inside_the_patch(bench):
    from bitsack.kernels import quantizers
    from bitsack.kernels.grid import _fp16_round_up
    from bitsack.kernels.quantizers import GPTQ

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(16, 512, generator=gen)
    g = GPTQ(512)
    g.add_batch(torch.randn(256, 512, generator=gen))
    before = g.quantize(W, 3, 32)
    before_rtn = quantizers.rtn_quantize(W, 3, 32)
    with bench.double_quantized_scales(4, 256) as counter:
        inside = g.quantize(W, 3, 32)
        rtn = quantizers.rtn_quantize(W, 3, 32)  # looked up when called: patched
    after = g.quantize(W, 3, 32)
    assert torch.equal(after.codes, before.codes) and torch.equal(after.scale, before.scale)
    assert torch.equal(quantizers.rtn_quantize(W, 3, 32).scale, before_rtn.scale)
    ranges = bench._max_ranges(W, 32, 256)  # [16, 2]: the step of each super-block
    step = _fp16_round_up(ranges / 7 / 15).to(torch.float64).repeat_interleave(8, dim=1)
    for qt in (inside, rtn):
        k = qt.scale.to(torch.float64) / step
        # k·d rounded up to the next fp16 (11 significant bits): at most 2⁻¹⁰ relative above
        assert float((k / k.round() - 1).min()) >= 0 and float((k / k.round() - 1).max()) < 2**-10
        assert 1 <= float(k.round().min()) and float(k.round().max()) <= 15
        assert not torch.equal(qt.scale, before.scale)
    assert counter.groups == 2 * 16 * 16 and 0 <= counter.clipped < counter.groups
    # the dequantized weight is still a fair 3-bit approximation
    err = (inside.weight - W).pow(2).mean() / (before.weight - W).pow(2).mean()
    assert 0.9 < float(err) < 1.5


def test_runs_count_bytes_of_each_storage_and_are_cached(bench, monkeypatch, tmp_path, capsys):
    from bitsack.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loading.LoadedModel(
        model=tiny_model("llama", seed=3, tie_word_embeddings=True),  # as SmolLM2
        tokenizer=ByteTokenizer(),
        source={"kind": "test", "spec": "tiny"}))
    args = ["--configs", "b3g32,b3g32:dq6", "--seed", "1", "--eval-windows", "2",
            "--compress-nsamples", "4", "--model", "tiny", "--runs", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res")]
    assert bench.main(args) == 0
    runs = {json.loads(p.read_text())["config"]: json.loads(p.read_text())
            for p in (tmp_path / "res" / "param_storage").glob("*.json")}
    assert set(runs) == {"b3g32", "b3g32:dq6"}
    plain, dq = runs["b3g32"], runs["b3g32:dq6"]
    b = plain["bytes"]
    # the count is the packed format's (a tied embedding and lm_head counted once)
    assert b["intzero"] == plain["summary"]["packed_bytes"]
    assert b["fp16"] - b["intzero"] == pytest.approx(b["groups"] * 13 / 8, abs=64)
    assert dq["bytes"]["dq"] < dq["bytes"]["intzero"] < dq["bytes"]["fp16"]
    assert dq["clipped"][1] > 0 and plain["clipped"] is None
    assert dq["wikitext2"] != plain["wikitext2"]  # the patch reached the quantized model
    md = (tmp_path / "res" / "param_storage.md").read_text()
    assert md.count("| b3g32 |") == 2 and "4-bit" not in md and "6-bit × fp16 per 256" in md
    capsys.readouterr()
    with pytest.raises(SystemExit, match="dq<S>"):
        bench.main(["--configs", "b3g32:q6"])
    assert bench.main(args) == 0
    assert capsys.readouterr().err.count("cached") == 2


def test_an_all_zero_super_block_dequantizes_to_zeros(bench):
    from bitsack.kernels import quantizers

    W = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    W[:, 256:] = 0.0  # the second super-block of every row
    with bench.double_quantized_scales(6, 256):
        qt = quantizers.rtn_quantize(W, 3, 32)
    w = qt.dequantize()
    assert torch.isfinite(qt.scale.float()).all() and bool((w[:, 256:] == 0).all())

