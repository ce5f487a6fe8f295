"""Smoke test of the profiling validation benchmark (bench/profiling_bench.py) on a tiny random
model.

It checks the plumbing — every piece runs, the report and JSON are written with finite numbers
and valid correlations, the cache makes a rebuild free, a missing piece is reported as not
run, and hand-written findings survive a rebuild — not the quality of any estimator (a random
model's sensitivities say nothing about SmolLM2's). The scoring itself is tested in
tests/profiling/test_validate.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("scipy")
pytest.importorskip("matplotlib")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "profiling_bench.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("profiling_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    # dataclasses look their module up while the class is built
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_run_report_cache_and_partial(bench, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--quick", "--out", str(out), "--work", str(work), "--quiet"]
    assert bench.main(args) == 0

    data = json.loads((out / "profiling.json").read_text())
    md = (out / "profiling.md").read_text()
    assert set(data["pieces_done"]) == set(bench.PIECES)
    assert "not run" not in md
    assert (out / "profiling_scatter.png").stat().st_size > 0
    assert (out / "profiling_plans.png").stat().st_size > 0

    # every estimator scored; correlations are in [-1, 1]; the default has real numbers
    names = list(data["scores"])
    assert any(n.startswith("fisher (sampled") for n in names)
    assert any(n.startswith("calibrated") for n in names)
    assert any(n.startswith("hutchinson") for n in names)
    assert any(n.startswith("layerwise") for n in names)
    assert any(n.startswith("measured again") for n in names)  # the test-retest ceiling
    for v in data["noise"].values():
        assert _finite(v["median_noise_sd"]) and v["median_noise_sd"] >= 0
        assert 0.0 <= v["frac_within_2sd"] <= 1.0
    n_rho = 0
    for name, s in data["scores"].items():
        for opt in (*bench.EVAL_OPTIONS, "pooled"):
            if opt == "prune" and name.startswith("measured again"):
                assert opt not in s  # the retest measures the quantized options only
                continue
            rho = s[opt]["rho"]
            if rho is not None:
                assert -1.0 <= rho <= 1.0
                n_rho += 1
    assert n_rho >= len(names)  # at least the pooled ρ of each estimator exists
    assert data["measured_base_loss"] > 0 and _finite(data["measured_base_loss"])

    # chunk rows collapse to per-sequence rows (the same labels; the gradient is linear)
    assert data["facts"]["chunk_collapse_max_rel_diff"] < 1e-4

    # plans: finite measured joint ΔL and finite predictions with and without U
    plans = data["plans"]
    assert len(plans) == bench.QUICK.n_plans_mixed + bench.QUICK.n_plans_quant
    for p in plans:
        assert _finite(p["measured"]) and _finite(p["sum_measured_singles"])
        fisher = next(v for k, v in p["pred"].items() if k.startswith("fisher (sampled"))
        assert _finite(fisher["additive"]) and _finite(fisher["with_U"])
        assert bench.QUICK.plan_min <= len(p["plan"]) <= bench.QUICK.plan_max

    # timing row: both sides measured, positive
    t = data["timing"]
    assert t["ratio"] > 0 and _finite(t["ratio"])
    assert t["fisher_peak_bytes"] > 0 and t["plain_peak_bytes"] > 0
    assert "EXTRAPOLATED" in md

    # hand-written findings survive a rebuild; a rebuild reruns nothing
    md = md.replace("(to be written)", "Fisher ranks well here (hand-written).")
    (out / "profiling.md").write_text(md)
    stamps = {p.name: p.stat().st_mtime_ns for p in work.glob("*.json")}
    assert bench.main([*args, "--report"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("*.json")} == stamps
    assert "Fisher ranks well here (hand-written)." in (out / "profiling.md").read_text()

    # a missing piece is reported as not run, the rest still reported
    (work / "timing_fisher.json").unlink()
    (work / "plans.json").unlink()
    assert bench.main([*args, "--report"]) == 0
    md = (out / "profiling.md").read_text()
    assert "fisher profile | not run (time)" in md
    assert "## Multi-unit plans" in md and "not run (time)." in md
    data = json.loads((out / "profiling.json").read_text())
    assert "plans" not in data["pieces_done"] and data["plans"] == []


def test_bad_piece_name_is_rejected(bench, tmp_path):
    from bitsack.errors import ValidationError

    with pytest.raises(ValidationError, match="--pieces"):
        bench.main(["--quick", "--pieces", "nope", "--out", str(tmp_path), "--quiet"])
