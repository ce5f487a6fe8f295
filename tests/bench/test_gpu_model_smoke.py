"""bench/gpu_model.py runs end to end on the CPU (``--smoke``; its figures need a GPU)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from bitsack.apply import ApplyConfig, compress, save_compressed
from bitsack.models import model_units
from bitsack.models.testing import tiny_model, tiny_tokenizer

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_model.py"


def test_gpu_model_bench_smoke(tmp_path, one_thread):
    model = tiny_model("llama", seed=0)
    units = model_units(model, mlp_group=32)
    compress(model, {u.id: (3, 4)[i % 2] for i, u in enumerate(units)},
             config=ApplyConfig(quantizer="rtn", group_size=16, mlp_group=32, scale_bits=6))
    folder = save_compressed(model, tmp_path / "m", tokenizer=tiny_tokenizer())
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    spec = importlib.util.spec_from_file_location("bench_gpu_model", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        rc = mod.main([str(folder), "--smoke", "--eval", str(text), "--windows", "2",
                       "--seqlen", "64", "--decode", "3", "--out", str(tmp_path / "r.md"),
                       "--json", str(tmp_path / "r.json")])
    finally:
        sys.modules.pop(spec.name, None)
    assert rc == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["config"] for r in rows][0] == "cpu backend, CPU, fp32" and len(rows) == 3
    # every backend computes the same model: perplexities agree, logits nearly
    ref = rows[0]["ppl"]
    assert all(abs(r["ppl"] / ref - 1) < 1e-4 for r in rows), rows
    assert all(r["max_logit_diff"] < 1e-3 * (1 + r["logit_scale"]) for r in rows)
    assert all(r["decode_ms"] > 0 and r["prefill_ms"] > 0 for r in rows[1:])
    assert "| configuration |" in (tmp_path / "r.md").read_text()
