"""bench/format_cost.py end to end on a tiny model: cells through ``bitsack run --format``,
the exports' bytes checked against the budget, a cell with no plan recorded, the cache."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from bitsack.models.testing import ByteTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[2] / "bench" / "format_cost.py"


@pytest.fixture
def bench(monkeypatch):
    from bitsack.models import loading

    def fake(*args, **kwargs):
        return loading.LoadedModel(model=tiny_model("llama", seed=3), tokenizer=ByteTokenizer(),
                                   source={"kind": "test", "spec": "tiny"})

    monkeypatch.setattr(loading, "load_model", fake)
    spec = importlib.util.spec_from_file_location("bench_format_cost", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # the tiny model's head groups hold 32 columns of o_proj: group size 32 everywhere
    monkeypatch.setattr(mod, "GROUP", dict.fromkeys(mod.FORMATS, 32))
    return mod


def test_cells_exports_and_cache(bench, tmp_path, capsys):
    sys.path.insert(0, str(BENCH.parents[1] / "tests" / "export"))
    from export_helpers import write_tokenizer_gguf

    tok = write_tokenizer_gguf(tmp_path / "tok.gguf", 128)
    args = ["--methods", "uniform,oneshot", "--budgets", "4.5", "--eval-windows", "2",
            "--profile-nsamples", "4", "--compress-nsamples", "4", "--profile-quantizer",
            "rtn", "--model", "tiny", "--tokenizer-gguf", str(tok),
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]
    assert bench.main(args) == 0
    res = {p.stem: json.loads(p.read_text())
           for p in (tmp_path / "res" / "format_cost").glob("*.json")}
    assert len(res) == 6
    # gguf stores 1-3-bit grids as Q4_0, 4.5 bits per weight: uniform 3-bit fits exactly
    assert res["uniform-gguf_4.5"]["status"] != "no plan"
    assert set(res["uniform-gguf_4.5"]["export"]["types"]) <= {"Q4_0", "F32", "F16"}
    for name, r in res.items():
        if r["status"] == "no plan":
            continue
        assert r["bits_per_weight"] <= 4.5 + 1e-9
        if "bitsack" not in name:
            assert r["export"]["equal"], (name, r["export"])
    # the one-shot cells share one profile
    reused = [r["summary"]["reused"] for n, r in res.items() if n.startswith("oneshot")]
    assert sum("profile" in x for x in reused) == 2
    md = (tmp_path / "res" / "format_cost.md").read_text()
    assert "| 4.5 | oneshot | gguf |" in md and "Machine:" in md
    capsys.readouterr()
    assert bench.main(args) == 0
    assert capsys.readouterr().err.count("cached") == 6
    # below Q4_0's 4.5 nothing uniform fits gguf here: a cell with no plan, recorded
    assert bench.main(["--methods", "uniform", "--formats", "gguf", "--budgets", "2.0",
                       *args[4:]]) == 0
    low = json.loads((tmp_path / "res" / "format_cost" / "uniform-gguf_2.0.json").read_text())
    assert low["status"] == "no plan" and low["reason"].startswith("budget")
    assert "no plan" in (tmp_path / "res" / "format_cost.md").read_text()
