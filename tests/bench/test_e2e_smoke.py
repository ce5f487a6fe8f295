"""Smoke test of the head-to-head benchmark harness (bench/e2e.py) on a tiny random model.

It checks the plumbing — cells run end to end, bytes are accounted exactly, results are
cached by hash and recomputed when an input changes, the report is written — not quality:
a random model's perplexity says nothing about a method.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import e2e  # noqa: E402
import e2e_methods  # noqa: E402

GROUP, MLP_GROUP, SEQ = 16, 32, 32


def _bench(tmp_path: Path, **cfg_overrides) -> e2e.Bench:
    from bitsack.models.testing import tiny_model

    kwargs = dict(model="tiny-llama", calib_nsamples=4, calib_seqlen=SEQ,
                  eval_sets=("wikitext2", "c4"), eval_seqlen=SEQ, eval_windows=2,
                  group_size=GROUP, mlp_group=MLP_GROUP, bits=(2, 3, 4, 8),
                  solver_time_limit_s=10.0)
    cfg = e2e.BenchConfig(**{**kwargs, **cfg_overrides})
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 128, (4, SEQ), generator=gen)
    evals = {name: torch.randint(0, 128, (1, 3 * SEQ), generator=gen)
             for name in cfg.eval_sets}
    return e2e.Bench(cfg, tmp_path / "results", tmp_path / "work",
                     model=tiny_model("llama", seed=0), tokenizer=None, calib=calib,
                     evals=evals)


def test_uniform_cells_end_to_end_cached_and_reported(tmp_path):
    bench = _bench(tmp_path)
    base = bench.run_base()
    # uniform b-bit with fp16 scale + zero per group of 16 costs b + 2 bits per weight
    cells = [e2e.Cell(m, b) for m in ("rtn", "gptq") for b in ("4", "10")]
    results = {c.key: bench.run_cell(c) for c in cells}
    for cell in cells:
        r = results[cell.key]
        bits = int(cell.budget) - 2
        assert r["bits_per_weight"] == pytest.approx(bits + 2.0, abs=1e-12)
        assert r["packed_bytes"] == e2e_methods.units_nbytes(
            bench.units, {u.id: bits for u in bench.units}, GROUP)
        assert r["n_pruned"] == 0
        for name in ("wikitext2", "c4"):
            assert math.isfinite(r["ppl"][name]) and r["ppl"][name] > 1
        saved = json.loads((tmp_path / "results" / f"{cell.key}.json").read_text())
        assert saved["config_sha256"] == r["config_sha256"]
    # 8-bit is nearly the unquantized model; 2-bit is not (the bits were really applied)
    for m in ("rtn", "gptq"):
        d8 = abs(results[f"{m}@10"]["nll"]["wikitext2"] - base["nll"]["wikitext2"])
        d2 = abs(results[f"{m}@4"]["nll"]["wikitext2"] - base["nll"]["wikitext2"])
        assert d8 < 0.01 < d2

    # the base model was not modified by the cells (each works on a copy)
    again = _bench(tmp_path).run_base()
    assert again["nll"] == base["nll"]

    # a second run reuses every cell, a changed input recomputes
    mtimes = {c.key: bench.result_path(c).stat().st_mtime_ns for c in cells}
    bench2 = _bench(tmp_path)
    for c in cells:
        bench2.run_cell(c)
    assert sorted(bench2.reused) == sorted(c.key for c in cells)
    assert all(bench2.result_path(c).stat().st_mtime_ns == mtimes[c.key] for c in cells)
    bench3 = _bench(tmp_path, eval_windows=1)
    r = bench3.run_cell(cells[0])
    assert bench3.reused == [] and r["eval"]["wikitext2"]["windows"] == 1
    # a report never mixes configurations silently
    from bitsack.errors import ValidationError

    with pytest.raises(ValidationError, match="configurations"):
        e2e.write_report(tmp_path / "results", tmp_path / "e2e.md", bench.cfg, "test")
    bench.run_cell(cells[0])

    md = e2e.write_report(tmp_path / "results", tmp_path / "e2e.md", bench.cfg, "test")
    text = md.read_text()
    assert "uniform RTN" in text and "uniform GPTQ" in text
    assert (tmp_path / "e2e_ppl.png").stat().st_size > 0
    # hand-written notes survive a rebuild
    md.write_text(text.replace("_(findings: to be written)_", "NOTE 42"))
    e2e.write_report(tmp_path / "results", md, bench.cfg, "test")
    assert "NOTE 42" in md.read_text()


def test_uniform_bits_rejects_a_non_uniform_budget():
    from bitsack.errors import ValidationError

    assert e2e_methods.uniform_bits(3.5, 64) == 3
    with pytest.raises(ValidationError, match="budget"):
        e2e_methods.uniform_bits(3.2, 64)


def test_hqq_fake_quantize_lies_on_a_grid():
    pytest.importorskip("hqq")
    from bitsack.models import model_units
    from bitsack.models.testing import tiny_model

    model = tiny_model("llama", seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    units = model_units(model, mlp_group=MLP_GROUP)
    nbytes = e2e_methods.hqq_fake_quantize_(model, units, 3, GROUP)
    assert nbytes == e2e_methods.units_nbytes(units, {u.id: 3 for u in units}, GROUP)
    for u in units:
        for s in u.slices:
            w = model.get_parameter(s.param).detach()
            assert not torch.equal(w, before[s.param])
            groups = w.reshape(-1, GROUP)
            # at most 2**3 distinct values per group, and close to the original weights
            assert max(len(torch.unique(g)) for g in groups) <= 8
            err = (w - before[s.param]).abs().max()
            assert err < 0.5 * (before[s.param].abs().max())


def test_restrict_options_keeps_objective_of_surviving_plans():
    import numpy as np

    from bitsack.solver import evaluate
    from bitsack.solver.generate import generate_problem

    problem = generate_problem(layers=2, kv_groups=2, mlp_groups=3, rank=4, seed=3)
    assert problem.interactions is not None and problem.interactions.U is not None
    seq = e2e_methods.sequential_problem(problem, 2)
    order = e2e_methods.prune_order(problem)
    for u in seq.units:
        ids = [o.id for o in u.options]
        if u.id in order[:2]:
            assert ids == ["prune"]
        else:
            assert "prune" not in ids and ids
    rng = np.random.default_rng(0)
    for _ in range(5):
        plan = {u.id: u.options[int(rng.integers(len(u.options)))].id for u in seq.units}
        assert evaluate(seq, plan).objective == pytest.approx(
            evaluate(problem, plan).objective, rel=1e-12, abs=1e-12)


def test_profiled_cells_joint_sequential_latency(tmp_path):
    """The solve path: a fisher profile (cached), joint, sequential (its prune count copied
    from joint), interactions off, and the latency-bound pair."""
    bench = _bench(tmp_path, calib_nsamples=4)
    budget = "5"  # 3 bits + 2 bits of overhead per weight at g16
    joint = bench.run_cell(e2e.Cell("joint", budget))
    assert joint["solution"]["status"] in ("optimal", "feasible")
    assert joint["bits_per_weight"] <= 5.0 + 1e-12
    assert joint["packed_bytes"] <= joint["limits"]["memory_bytes"]
    seq = bench.run_cell(e2e.Cell("sequential", budget))
    assert seq["sequential_n_pruned"] == joint["n_pruned"] == seq["n_pruned"]
    inter = bench.run_cell(e2e.Cell("joint-int", budget))
    # the additive plan is judged by the full objective too; joint-int minimises that one
    assert joint["objective_full"] >= inter["solution"]["objective"] - 1e-9 - \
        abs(inter["solution"]["abs_gap"] or 0)
    bits_only = bench.run_cell(e2e.Cell("mp", budget))
    assert bits_only["n_pruned"] == 0 and bits_only["bits_per_weight"] <= 5.0 + 1e-12
    # the bits-only optimum cannot beat the joint optimum on the same objective
    assert bits_only["solution"]["objective"] >= joint["solution"]["objective"] - 1e-9 - \
        abs(joint["solution"]["abs_gap"] or 0)
    record = json.loads((tmp_path / "work" / "profiles" / "fisher" / "record.json").read_text())
    assert record["inputs"]["estimator"] == "fisher"

    lat = bench.run_cell(e2e.Cell("joint", e2e.LATENCY))
    lat_seq = bench.run_cell(e2e.Cell("sequential", e2e.LATENCY))
    for r in (lat, lat_seq):
        assert r["n_pruned"] > 0  # the prefill budget cannot be met by bits alone
        assert r["solution"]["usage"]["prefill_latency_us"] <= \
            r["limits"]["prefill_latency_us"] * (1 + 1e-9)
