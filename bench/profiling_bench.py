"""Profiling validation benchmark (issue #3): do the estimators predict the measured loss?

    python bench/profiling_bench.py                   # real run on SmolLM2-135M (resumable)
    python bench/profiling_bench.py --pieces timing_plain,timing_fisher   # only time/memory
    python bench/profiling_bench.py --report          # rebuild profiling.md / .json / plots
    python bench/profiling_bench.py --quick --out DIR # tiny random model, seconds (smoke test)

A thin driver: the scoring (Spearman ρ and magnitude per option, multi-unit plans, the noise
and test–retest of the ground truth) is ``bitsack.profiling.validate``; the estimators, the
gradient pass and the measurement are the library's (``bitsack.profiling``). This file chooses
what to run, caches each piece, and writes the report.

A FIXED seeded subset of units (head groups and MLP blocks across layers) with the options
prune, b2, b3, b4 (RTN, group 64). Ground truth is ``measured``: each option applied alone,
``ℓ(W + δ) − ℓ(W)`` on held-out C4 sequences drawn with a different seed from the estimators'
calibration sequences (``Measurer``, the code of the ``measured`` estimator, called per option
so a crash loses at most a few options).

Estimators on the calibration tokens:

- Fisher variants come from three raw gradient passes whose per-row projections
  ``v_r = g_r·δ`` (and diagonal rows) are cached, so every variant is computed from the same
  numbers: sampled labels on 32 sequences (the default fisher = the first 16; fisher-diag from
  the same pass), sampled labels in 4 position chunks on the first 16 sequences (same labels,
  finer rows; the chunks collapse exactly to the per-sequence rows, which is checked), and data
  labels on the first 16 (empirical Fisher, with and without the first-order term).
- ``calibrated`` is the default fisher rescaled per (unit kind, option) to the measured singles
  of a seeded subset of the units (``calibration_units`` / ``fit_calibration``), and is scored
  on the OTHER units only (cross-validated; the ``calibrated`` estimator inside ``profile()``
  does the same fit with its own held-out sequences).
- ``layerwise`` and ``hutchinson`` run through ``profile()``.

Multi-unit plans (a few units with random options applied together) are measured jointly and
compared with the sum of predictions with and without the Fisher interaction term U.

The time/memory row runs the full default ``fisher`` profile (every unit, bits 1,2,3,4,8) on
32 x 512 tokens and, in another process, one plain forward+backward over the same tokens
(batches of 8). Each piece is cached under ``runs/profiling-bench/<mode>/<piece>.json`` with
the hash of the configuration; a piece whose file holds the same hash is not run again.

Torch runs on one thread (the machine has 2 shared cores; see bench/e2e.py for why).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULT_SCHEMA = "bitsack.bench.profiling/v1"
QUANT_OPTIONS = ("b2", "b3", "b4")
EVAL_OPTIONS = ("prune", *QUANT_OPTIONS)
PIECES = ("measured", "measured_retest", "grad_sampled", "grad_chunks", "grad_data", "plans",
          "layerwise", "hutchinson", "timing_plain", "timing_fisher")
RETEST_NAME = "measured again on other {n} × {L} held-out tokens"
NOTES_BEGIN, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one benchmark run (``REAL`` or ``QUICK``)."""

    mode: str
    model: str
    seed: int = 0
    head_units: int = 12
    mlp_units: int = 12
    bits: tuple[int, ...] = (2, 3, 4)
    group_size: int = 64
    mlp_group: int = 128
    seqlen: int = 256
    n_grad: int = 16
    n_grad_more: int = 32
    chunks: int = 4
    n_holdout: int = 8
    holdout_seed: int = 1000
    n_plans_mixed: int = 4
    n_plans_quant: int = 4
    plan_min: int = 4
    plan_max: int = 8
    calib_min_units: int = 4
    hutch_samples: int = 4
    hutch_probes: int = 2
    batch_size: int = 8
    timing_nsamples: int = 32
    timing_seqlen: int = 512
    timing_bits: tuple[int, ...] = (1, 2, 3, 4, 8)
    timing_target_nsamples: int = 128

    def key(self, piece: str) -> str:
        """Hash of the configuration a piece depends on (all of it: simple and safe)."""
        from bitsack.io import json_digest

        return json_digest({"piece": piece, **dataclasses.asdict(self)})[:16]


REAL = BenchConfig(mode="real", model="default")
QUICK = BenchConfig(mode="quick", model="tiny-llama", head_units=2, mlp_units=3, group_size=16,
                    mlp_group=32, seqlen=32, n_grad=4, n_grad_more=6, chunks=2, n_holdout=2,
                    n_plans_mixed=2, n_plans_quant=1, plan_min=2, plan_max=3,
                    calib_min_units=1, hutch_samples=2, hutch_probes=1, batch_size=4,
                    timing_nsamples=4, timing_seqlen=64, timing_bits=(2, 4, 8),
                    timing_target_nsamples=8)



# ---- setup ---------------------------------------------------------------------------------
@dataclass
class Setup:
    """The model, the chosen units and the token sets of a run."""

    model: Any
    tokenizer: Any
    units: list  # the seeded subset, model order
    layout: Any
    grad_tokens: Any  # [n_grad_more, seqlen]
    holdout: Any  # [n_holdout, seqlen]
    source: dict[str, Any]


def load(cfg: BenchConfig) -> tuple[Any, Any, dict[str, Any]]:
    """The model (eval mode, float32) and tokenizer (None for the tiny model)."""
    import torch

    if cfg.model == "tiny-llama":
        from bitsack.models.testing import tiny_model

        return tiny_model("llama", seed=cfg.seed), None, {"kind": "tiny-llama random"}
    from bitsack.models.loading import load_model

    lm = load_model(cfg.model, dtype=torch.float32, progress=False)
    src = {k: lm.source.get(k) for k in ("kind", "spec", "gguf_file", "sha256")}
    return lm.model, lm.tokenizer, src


def tokens(cfg: BenchConfig, tokenizer, n: int, seqlen: int, seed: int):
    """``n`` c4 windows of ``seqlen`` tokens (random ids from the seed for the tiny model)."""
    import torch

    if tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, 128, (n, seqlen), generator=gen)
    from bitsack.data import calibration_tokens

    return calibration_tokens("c4", tokenizer, n, seqlen, seed=seed)


def choose_units(cfg: BenchConfig, model) -> list:
    """A seeded subset: ``head_units`` head groups and ``mlp_units`` MLP blocks, model order."""
    from bitsack.models import model_units

    units = model_units(model, mlp_group=cfg.mlp_group,
                        embeddings=False)
    rng = np.random.default_rng(cfg.seed + 11)
    pick: set[str] = set()
    for kind, k in (("head_group", cfg.head_units), ("mlp_group", cfg.mlp_units)):
        ids = [u.id for u in units if u.kind == kind]
        pick.update(rng.choice(ids, size=min(k, len(ids)), replace=False).tolist())
    return [u for u in units if u.id in pick]


def make_setup(cfg: BenchConfig) -> Setup:
    from bitsack.profiling.layout import OptionLayout

    model, tok, src = load(cfg)
    units = choose_units(cfg, model)
    layout = OptionLayout.build(units, cfg.bits)
    grad = tokens(cfg, tok, cfg.n_grad_more, cfg.seqlen, cfg.seed)
    hold = tokens(cfg, tok, cfg.n_holdout, cfg.seqlen, cfg.seed + cfg.holdout_seed)
    return Setup(model, tok, units, layout, grad, hold, src)


# ---- cache ---------------------------------------------------------------------------------
class Cache:
    """One JSON per piece under ``work``, valid while it holds the configuration's hash."""

    def __init__(self, cfg: BenchConfig, work: Path):
        self.cfg, self.work = cfg, work

    def path(self, piece: str) -> Path:
        return self.work / f"{piece}.json"

    def get(self, piece: str) -> dict[str, Any] | None:
        p = self.path(piece)
        if not p.is_file():
            return None
        data = json.loads(p.read_text())
        return data if data.get("key") == self.cfg.key(piece) else None

    def partial(self, piece: str) -> dict[str, Any]:
        """A piece's saved partial state (same hash), or empty."""
        p = self.work / f"{piece}.partial.json"
        if p.is_file():
            data = json.loads(p.read_text())
            if data.get("key") == self.cfg.key(piece):
                return data
        return {}

    def save_partial(self, piece: str, data: dict[str, Any]) -> None:
        from bitsack.io import write_json

        self.work.mkdir(parents=True, exist_ok=True)
        write_json(self.work / f"{piece}.partial.json", {"key": self.cfg.key(piece), **data})

    def put(self, piece: str, data: dict[str, Any]) -> dict[str, Any]:
        from bitsack.io import write_json

        self.work.mkdir(parents=True, exist_ok=True)
        out = {"key": self.cfg.key(piece), "piece": piece, **data}
        write_json(self.path(piece), out)
        part = self.work / f"{piece}.partial.json"
        if part.is_file():
            part.unlink()
        return out


def machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "platform": platform.platform(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}



# ---- pieces --------------------------------------------------------------------------------
def _context(cfg: BenchConfig, s: Setup, progress: bool, n: int | None = None):
    from bitsack.profiling.capture import ResourceMeter
    from bitsack.profiling.estimators import Context, EstimatorOptions

    s.model.eval()
    return Context(model=s.model, layout=s.layout, tokens=s.grad_tokens[:n or cfg.n_grad],
                   group_size=cfg.group_size,
                   options=EstimatorOptions(batch_size=cfg.batch_size),
                   seed=cfg.seed, progress=progress, meter=ResourceMeter().start())


def run_measured(cfg: BenchConfig, s: Setup, cache: Cache, progress: bool, log,
                 piece: str = "measured") -> dict:
    """Every (unit, option) alone on the held-out tokens, saved every few options.

    ``measured_retest``: the quantized options again on OTHER held-out sequences (seed
    ``seed + 2·holdout_seed``), to see how reproducible the ground truth itself is.
    """
    from tqdm.auto import tqdm

    from bitsack.profiling.measure import Measurer
    from bitsack.profiling.validate import measure_singles, pair_key

    t0 = time.perf_counter()
    holdout, options = s.holdout, EVAL_OPTIONS
    if piece == "measured_retest":
        holdout = tokens(cfg, s.tokenizer, cfg.n_holdout, cfg.seqlen,
                         cfg.seed + 2 * cfg.holdout_seed)
        options = QUANT_OPTIONS
    meas = Measurer(_context(cfg, s, progress), holdout)
    state = cache.partial(piece)
    done = state.get("values", {})
    todo = sum(1 for ui, oid in s.layout.flat
               if oid in options and pair_key(s.layout.units[ui].id, oid) not in done)
    last = [time.perf_counter()]
    with tqdm(total=todo, desc=piece, disable=not progress, leave=False) as bar:

        def on_value(values: dict[str, float]) -> None:
            bar.update()
            if time.perf_counter() - last[0] > 30:
                cache.save_partial(piece, {"values": values, "wall_s": state.get("wall_s", 0.0)
                                           + time.perf_counter() - t0})
                last[0] = time.perf_counter()
                log(f"{piece} {len(values)} options")

        values = measure_singles(meas, s.layout, options, done, on_value)
    return {"values": values, "base_loss": float(meas.base_loss), "tokens": meas.n_tokens,
            "wall_s": round(time.perf_counter() - t0 + state.get("wall_s", 0.0), 2)}


def _grad_pass(cfg: BenchConfig, s: Setup, progress: bool, n: int, source: str, chunks: int,
               diag: bool) -> dict:
    from bitsack.profiling.fisher import gradient_stats

    ctx = _context(cfg, s, progress, n)
    t0 = time.perf_counter()
    st = gradient_stats(ctx, sources=(source,), chunks=chunks, diag=diag)
    return {**st.to_dict(), "wall_s": round(time.perf_counter() - t0, 2),
            "timings_s": ctx.meter.describe()["timings_s"], "rows": int(st.V.shape[0])}


def run_plans(cfg: BenchConfig, s: Setup, cache: Cache, progress: bool, log) -> dict:
    """Random multi-unit plans, each measured jointly on the held-out tokens."""
    from bitsack.profiling.measure import Measurer
    from bitsack.profiling.validate import sample_plans

    choices = [EVAL_OPTIONS] * cfg.n_plans_mixed + [QUANT_OPTIONS] * cfg.n_plans_quant
    plans = sample_plans([u.id for u in s.layout.units], choices, cfg.plan_min, cfg.plan_max,
                         seed=cfg.seed + 7)
    meas = Measurer(_context(cfg, s, progress), s.holdout)
    by_id = {u.id: u for u in s.layout.units}
    out = []
    t0 = time.perf_counter()
    for p, plan in enumerate(plans):
        dl = meas.delta_loss([(by_id[uid], oid) for uid, oid in plan])
        out.append({"plan": plan, "kind": "mixed" if p < cfg.n_plans_mixed else "quant",
                    "measured": float(dl)})
        log(f"plan {p}: {len(plan)} units, measured {dl:.4g}")
    return {"plans": out, "wall_s": round(time.perf_counter() - t0, 2)}


def _via_profile(cfg: BenchConfig, s: Setup, progress: bool, estimator: str, **opts) -> dict:
    from bitsack.profiling import EstimatorOptions, profile

    res = profile(s.model, s.units, s.grad_tokens[:cfg.n_grad], estimator=estimator,
                  bits=cfg.bits, group_size=cfg.group_size, cost_models=("memory",),
                  seed=cfg.seed, progress=progress,
                  options=EstimatorOptions(batch_size=cfg.batch_size, **opts))
    loss = {f"{u.id}|{o.id}": float(o.loss) for u in res.problem.units for o in u.options}
    return {"loss": loss, "wall_s": res.report["resources"]["wall_s"],
            "resources": res.report["resources"], "estimate": res.report["estimate"]}


def _fwd_bwd(model, toks, batch_size: int) -> float:
    """One plain forward+backward over ``toks`` (loss on the data labels), in batches."""
    t0 = time.perf_counter()
    for b in range(0, toks.shape[0], batch_size):
        ids = toks[b:b + batch_size]
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def run_timing(cfg: BenchConfig, piece: str, progress: bool, log) -> dict:
    """One side of the time/memory row, in this (fresh) process: plain fwd+bwd or fisher."""
    from bitsack.models import model_units
    from bitsack.profiling import profile
    from bitsack.profiling.capture import ResourceMeter

    model, tok, src = load(cfg)
    toks = tokens(cfg, tok, cfg.timing_nsamples, cfg.timing_seqlen, cfg.seed)
    mach = machine()
    if piece == "timing_plain":
        model.eval()
        meter = ResourceMeter().start()
        wall = _fwd_bwd(model, toks, cfg.batch_size)
        d = meter.describe()
        return {"wall_s": round(wall, 2), "peak_memory_bytes": d["peak_memory_bytes"],
                "peak_memory_what": d["peak_memory_what"], "batch_size": cfg.batch_size,
                "machine": mach, "loadavg_end": list(os.getloadavg())}
    units = model_units(model, mlp_group=cfg.mlp_group,
                        embeddings=True)
    res = profile(model, units, toks, estimator="fisher", bits=cfg.timing_bits,
                  group_size=cfg.group_size, seed=cfg.seed, progress=progress)
    r = res.report["resources"]
    return {"wall_s": r["wall_s"], "timings_s": r["timings_s"],
            "peak_memory_bytes": r["peak_memory_bytes"], "peak_memory_what":
            r["peak_memory_what"], "delta_bytes": r["delta_bytes"], "units": len(units),
            "options": res.report["options"], "machine": mach,
            "loadavg_end": list(os.getloadavg())}


def run_piece(piece: str, cfg: BenchConfig, s: Setup | None, cache: Cache, progress: bool,
              log) -> dict:
    if piece in ("measured", "measured_retest"):
        return run_measured(cfg, s, cache, progress, log, piece)
    if piece == "grad_sampled":
        return _grad_pass(cfg, s, progress, cfg.n_grad_more, "sampled", 1, True)
    if piece == "grad_chunks":
        return _grad_pass(cfg, s, progress, cfg.n_grad, "sampled", cfg.chunks, False)
    if piece == "grad_data":
        return _grad_pass(cfg, s, progress, cfg.n_grad, "data", 1, True)
    if piece == "plans":
        return run_plans(cfg, s, cache, progress, log)
    if piece == "layerwise":
        return _via_profile(cfg, s, progress, "layerwise")
    if piece == "hutchinson":
        return _via_profile(cfg, s, progress, "hutchinson", hutchinson_samples=cfg.hutch_samples,
                            hutchinson_probes=cfg.hutch_probes)
    if piece in ("timing_plain", "timing_fisher"):
        return run_timing(cfg, piece, progress, log)
    raise ValueError(piece)



# ---- analysis ------------------------------------------------------------------------------
def predictions(cfg: BenchConfig, layout, res: dict[str, dict]) -> tuple[list, dict]:
    """Every estimator variant computable from the finished pieces, and consistency facts."""
    from bitsack.profiling.calibrate import calibration_units, fit_calibration
    from bitsack.profiling.fisher import GradientStats, diag_from_stats, fisher_from_stats
    from bitsack.profiling.validate import Prediction, pair_keys

    out: list[Prediction] = []
    facts: dict[str, Any] = {}
    n = cfg.n_grad
    keys = pair_keys(layout)
    S = GradientStats.from_dict(res["grad_sampled"]) if "grad_sampled" in res else None
    if S is not None:
        S16 = S.select(S.seq < n)
        f16 = fisher_from_stats(layout, S16)
        out.append(Prediction(f"fisher (sampled, {n} seq)", f16.loss, f16.U, note="default"))
        f32 = fisher_from_stats(layout, S)
        out.append(Prediction(f"fisher (sampled, {cfg.n_grad_more} seq)", f32.loss, f32.U))
        out.append(Prediction(f"fisher-diag (sampled, {n} seq)",
                              diag_from_stats(layout, S16).loss))
        if "measured" in res:
            m = res["measured"]["values"]
            ids = calibration_units(layout, 0.1, cfg.calib_min_units, cfg.seed)
            _, cols = layout.subset(ids)
            cols = [j for j in cols if layout.flat[j][1] in EVAL_OPTIONS]
            cal = fit_calibration(layout, f16.loss, np.array([m[keys[j]] for j in cols]), cols,
                                  seed=cfg.seed)
            loss, U = cal.apply(layout, f16.loss, f16.U)
            rest = frozenset(u.id for u in layout.units) - set(ids)
            out.append(Prediction(f"calibrated (fisher {n} seq)", loss, U, eval_units=rest,
                                  note=f"fit on {len(ids)} units, scored on the other "
                                  f"{len(rest)}"))
            # the uncalibrated default on the same units, for a like-for-like comparison
            out.append(Prediction(f"fisher (sampled, {n} seq) on calibrated's units", f16.loss,
                                  None, eval_units=rest, note=f"the same {len(rest)} units"))
            facts["calibration"] = {"fit_units": ids, **cal.to_dict()}
    if "grad_chunks" in res:
        C = GradientStats.from_dict(res["grad_chunks"])
        fc = fisher_from_stats(layout, C)
        out.append(Prediction(f"fisher (sampled, {n} seq × {cfg.chunks} chunks)", fc.loss, fc.U))
        if S is not None:
            # the chunk rows must collapse to the per-sequence rows (same labels, linear g)
            Vc = C.per_sequence().V
            Vs = S.select(S.seq < n).V
            facts["chunk_collapse_max_rel_diff"] = float(
                np.abs(Vc - Vs).max() / max(np.abs(Vs).max(), 1e-300))
    if "grad_data" in res:
        Dd = GradientStats.from_dict(res["grad_data"])
        for fo in ("off", "significant", "on"):
            e = fisher_from_stats(layout, Dd, fo)
            label = "" if fo == "off" else f", first-order {fo}"
            out.append(Prediction(f"fisher (data labels, {n} seq{label})", e.loss, e.U))
        out.append(Prediction(f"fisher-diag (data labels, {n} seq)",
                              diag_from_stats(layout, Dd).loss))
    for name, label in (("layerwise", "layerwise (‖δX‖², not nats)"),
                        ("hutchinson", f"hutchinson ({cfg.hutch_samples} seq × "
                                       f"{cfg.hutch_probes} probes)")):
        if name in res:
            lv = res[name]["loss"]
            out.append(Prediction(label, np.array([lv[k] for k in keys])))
    return out, facts


# ---- report --------------------------------------------------------------------------------
def _fmt(x: float | None, nd: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"



def build_report(cfg: BenchConfig, res: dict[str, dict], layout, units_info: list[dict],
                 out_dir: Path, commands: Sequence[str], old_notes: str) -> dict:
    """Write profiling.md, profiling.json and the plots from whatever pieces are finished."""
    from bitsack.io import atomic_write, write_json
    from bitsack.profiling.build import jsonable
    from bitsack.profiling.validate import (
        Prediction,
        measurement_noise,
        pair_keys,
        plan_errors,
        predict_plans,
        score,
    )

    ests, facts = predictions(cfg, layout, res) if layout is not None else ([], {})
    measured = res.get("measured", {}).get("values")
    rows = list(ests)
    if measured and "measured_retest" in res and layout is not None:
        rt = res["measured_retest"]["values"]
        rows.insert(0, Prediction(RETEST_NAME.format(n=cfg.n_holdout, L=cfg.seqlen),
                                  np.array([rt.get(k, np.nan) for k in pair_keys(layout)]),
                                  note="ceiling: the ground truth against itself"))
    scores = {e.name: score(layout, e, measured, EVAL_OPTIONS) for e in rows} if measured \
        else {}
    noise = (measurement_noise(layout, res["grad_data"]["V"], cfg.n_holdout, measured,
                               EVAL_OPTIONS) if measured and "grad_data" in res else {})
    # layerwise is not in nats; the like-for-like row repeats the default
    summed = [e for e in ests if not e.name.startswith("layerwise")
              and "on calibrated's units" not in e.name]
    plans = (predict_plans(layout, summed, res["plans"]["plans"], measured)
             if "plans" in res else [])
    summary = {"schema": RESULT_SCHEMA, "config": dataclasses.asdict(cfg),
               "pieces_done": sorted(res), "units": units_info, "scores": scores,
               "plans": plans, "timing": _timing(cfg, res), "facts": facts, "noise": noise,
               "walls_s": {k: v.get("wall_s") for k, v in res.items()},
               "machine": res.get("measured", {}).get("machine") or machine(),
               "measured_base_loss": res.get("measured", {}).get("base_loss")}
    if plans:
        summary["plan_errors"] = plan_errors(plans)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = _plots(layout, ests + rows[:len(rows) - len(ests)], measured, plans, out_dir) \
        if measured else []
    md = _markdown(cfg, res, summary, rows, figs, commands, old_notes)
    write_json(out_dir / "profiling.json", jsonable(summary))
    with atomic_write(out_dir / "profiling.md", "w", encoding="utf-8") as fh:
        fh.write(md)
    return summary


def _timing(cfg: BenchConfig, res: dict[str, dict]) -> dict[str, Any]:
    plain, fish = res.get("timing_plain"), res.get("timing_fisher")
    out: dict[str, Any] = {"tokens": [cfg.timing_nsamples, cfg.timing_seqlen]}
    if plain:
        out["plain_wall_s"] = plain["wall_s"]
        out["plain_peak_bytes"] = plain["peak_memory_bytes"]
    if fish:
        out["fisher_wall_s"] = fish["wall_s"]
        out["fisher_peak_bytes"] = fish["peak_memory_bytes"]
        out["fisher_timings_s"] = fish["timings_s"]
        scale = cfg.timing_target_nsamples / cfg.timing_nsamples
        t = fish["timings_s"]
        per_seq = sum(v for k, v in t.items() if k in ("gradients", "gather"))
        fixed = fish["wall_s"] - per_seq
        out["fisher_extrapolated_s"] = {"linear": fish["wall_s"] * scale,
                                        "phasewise": fixed + per_seq * scale}
    if plain and fish:
        out["ratio"] = fish["wall_s"] / plain["wall_s"]
        scale = cfg.timing_target_nsamples / cfg.timing_nsamples
        out["ratio_extrapolated_phasewise"] = (out["fisher_extrapolated_s"]["phasewise"]
                                               / (plain["wall_s"] * scale))
    return out



def _plots(layout, ests: list, measured: dict[str, float], plans: list[dict],
           out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    retest = [e for e in ests if e.name.startswith("measured again")]
    pick = [e for e in ests if not e.name.startswith(("layerwise", "measured again"))
            and "on calibrated's units" not in e.name][:5]
    pick += retest
    if pick:
        ncol = 3
        nrow = math.ceil(len(pick) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.9 * nrow), squeeze=False)
        colors = {"prune": "tab:red", "b2": "tab:orange", "b3": "tab:green", "b4": "tab:blue"}
        for ax, e in zip(axes.flat, pick, strict=False):
            for opt, c in colors.items():
                xs, ys = [], []
                for j, (ui, oid) in enumerate(layout.flat):
                    uid = layout.units[ui].id
                    if oid == opt and (e.eval_units is None or uid in e.eval_units):
                        xs.append(measured[f"{uid}|{oid}"])
                        ys.append(e.loss[j])
                xs, ys = np.array(xs), np.array(ys)
                ok = (xs > 0) & (ys > 0)
                ax.scatter(xs[ok], ys[ok], s=14, c=c, label=opt, alpha=0.8)
            lo, hi = ax.get_xlim()
            ax.set_xscale("log")
            ax.set_yscale("log")
            both = [v for v in (*ax.get_xlim(), *ax.get_ylim()) if v > 0]
            if both:
                lo, hi = min(both), max(both)
                ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_title(e.name, fontsize=9)
            ax.set_xlabel("measured ΔL (nats/token)")
            ax.set_ylabel("predicted ΔL")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(pick):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out_dir / "profiling_scatter.png", dpi=110)
        plt.close(fig)
        figs.append("profiling_scatter.png")
    if plans:
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        meas = np.array([p["measured"] for p in plans])
        first = next((e for e in ests if e.U is not None), None)
        if first is not None:
            add = np.array([p["pred"][first.name]["additive"] for p in plans])
            wu = np.array([p["pred"][first.name]["with_U"] for p in plans])
            ax.scatter(meas, add, label=f"{first.name}: additive", marker="o")
            ax.scatter(meas, wu, label=f"{first.name}: with U", marker="x")
        if "sum_measured_singles" in plans[0]:
            ax.scatter(meas, [p["sum_measured_singles"] for p in plans],
                       label="Σ measured singles", marker="^")
        lo, hi = float(min(meas.min(), 1e-4)), float(meas.max()) * 1.5
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("measured joint ΔL of the plan")
        ax.set_ylabel("predicted ΔL")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "profiling_plans.png", dpi=110)
        plt.close(fig)
        figs.append("profiling_plans.png")
    return figs



def _markdown(cfg: BenchConfig, res, summary, ests, figs, commands, old_notes) -> str:
    from bitsack.profiling.validate import relative_error

    mach = summary["machine"]
    L = ["# Profiling validation (issue 3)", ""]
    L += [f"Mode `{cfg.mode}`, model `{cfg.model}` "
          f"({'SmolLM2-135M, the embedded GGUF, float32' if cfg.model == 'default' else 'random'}"
          f"). Generated by `bench/profiling_bench.py`; pieces finished: "
          f"{', '.join(summary['pieces_done']) or 'none'}.", ""]
    L += ["## How it was run", "", "```"] + list(commands) + ["```", ""]
    L += [f"Machine: {mach.get('cpus')} CPUs shared with other helpers' long benchmark processes "
          f"(load average {mach.get('loadavg')} recorded during the run), torch "
          f"{mach.get('torch')} on {mach.get('torch_threads')} thread(s), {mach.get('platform')}. "
          "Times are wall-clock under that load.", ""]
    L += [f"Units: {cfg.head_units} head groups + {cfg.mlp_units} MLP blocks of "
          f"{cfg.mlp_group} channels, chosen with seed {cfg.seed + 11} (list in "
          f"profiling.json): " + ", ".join(u["id"] for u in summary["units"]) + ".", ""]
    L += [f"Options: prune, b2, b3, b4 (RTN min-max, group {cfg.group_size}). Ground truth "
          f"`measured`: each option applied alone, ΔL on {cfg.n_holdout} × {cfg.seqlen} held-out "
          f"C4 tokens (seed {cfg.seed + cfg.holdout_seed}; the estimators use seed {cfg.seed}: "
          "other windows, possibly of the same 900 documents). Base loss "
          f"{_g(summary['measured_base_loss'])} nats/token. Estimators: {cfg.n_grad} × "
          f"{cfg.seqlen} tokens ({cfg.n_grad_more} for the 32-sequence Fisher).", ""]
    # ---- ranking table
    L += ["## Ranking: Spearman ρ of predicted vs measured ΔL", ""]
    if summary["scores"]:
        L += ["ρ per option over the units (n per column in profiling.json); `ratio` is the "
              "median predicted/measured (magnitude; 1 = right size).", "",
              "| estimator | ρ prune | ρ b2 | ρ b3 | ρ b4 | ρ pooled | ratio prune | ratio b2 "
              "| ratio b3 | ratio b4 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for e in ests:
            s = summary["scores"][e.name]
            name = e.name + (f" ({e.note})" if e.note else "")
            L.append(f"| {name} | "
                     + " | ".join(_fmt(s.get(o, {}).get("rho")) for o in EVAL_OPTIONS)
                     + f" | {_fmt(s['pooled']['rho'])} | "
                     + " | ".join(_g(s.get(o, {}).get("median_ratio")) for o in EVAL_OPTIONS)
                     + " |")
        missing = [p for p in ("measured_retest", "grad_sampled", "grad_chunks", "grad_data",
                               "layerwise", "hutchinson") if p not in res]
        if missing:
            L += ["", f"Not run (time): {', '.join(missing)}."]
        if "chunk_collapse_max_rel_diff" in summary["facts"]:
            L += ["", "Check: the chunk rows collapsed to per-sequence rows match the "
                  "per-sequence pass to a max relative difference of "
                  f"{summary['facts']['chunk_collapse_max_rel_diff']:.2e}."]
    else:
        L += ["not run (time): `measured` (or every estimator) is missing."]
    L.append("")
    if summary.get("noise"):
        L += ["### How noisy is the ground truth?", "",
              f"A measured ΔL on {cfg.n_holdout} held-out sequences includes the first-order "
              "term ḡ·δ of that sample (zero only on average), with a standard deviation of "
              f"about sd_r(g_r·δ)/√{cfg.n_holdout} (per-sequence data-label gradients g_r of "
              "the empirical-Fisher pass). Per option, the median of that noise over the units "
              "against the median |measured ΔL|:", "",
              "| option | median noise sd | median abs measured | units with abs measured "
              "< 2 sd | measured ≤ 0 |", "|---|---|---|---|---|"]
        for o, v in summary["noise"].items():
            L.append(f"| {o} | {_g(v['median_noise_sd'])} | {_g(v['median_abs_measured'])} "
                     f"| {v['frac_within_2sd']:.0%} | {v['n_nonpositive']} of {v['n']} |")
        L.append("")
    # ---- plans
    L += ["## Multi-unit plans: joint ΔL vs the sum of predictions", ""]
    if summary["plans"]:
        with_u = [e.name for e in ests if e.U is not None]
        # the per-plan table shows the default and the calibrated Fisher (a readable width);
        # the error summary below covers every estimator
        names = [e.name for e in ests if e.U is not None and (e.note == "default"
                                                              or e.name.startswith("calibrated"))]
        names = names or with_u[:2]
        L += ["Relative error (predicted − measured) / measured per plan; `+U` includes the "
              "interaction term Σ_{i<j} U_i·U_j. `mixed` plans draw options from prune/b2/b3/b4, "
              "`quant` from b2/b3/b4.", ""]
        head = ["plan", "units", "measured", "Σ measured singles"]
        for n in names:
            head += [f"{n} additive", f"{n} +U"]
        head += ["measured interaction (joint − Σ singles)", f"U term of {names[0]}"]
        L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, p in enumerate(summary["plans"]):
            cells = [f"{i} ({p['kind']})", " ".join(f"{u}:{o}" for u, o in p["plan"]),
                     _g(p["measured"])]
            sm = p.get("sum_measured_singles")
            cells.append("—" if sm is None else
                         f"{_g(sm)} ({relative_error(sm, p['measured']):+.0%})")
            for n in names:
                for k in ("additive", "with_U"):
                    v = p["pred"][n][k]
                    cells.append(f"{_g(v)} ({relative_error(v, p['measured']):+.0%})")
            pr0 = p["pred"][names[0]]
            cells += ["—" if sm is None else f"{p['measured'] - sm:+.4f}",
                      f"{pr0['with_U'] - pr0['additive']:+.4f}"]
            L.append("| " + " | ".join(cells) + " |")
        L += ["", "Over all plans (a plan whose measured ΔL is near 0 makes relative errors "
              "explode; the absolute error in nats/token does not):", "",
              "| prediction | median abs rel error | mean abs rel error | mean abs error "
              "(nats/token) |", "|---|---|---|---|"]
        for k, v in summary["plan_errors"].items():
            L.append(f"| {k} | {v['median_rel']:.0%} | {v['mean_rel']:.0%} | "
                     f"{v['mean_abs']:.4f} |")
    else:
        L += ["not run (time)."]
    L.append("")
    # ---- timing
    t = summary["timing"]
    L += ["## Time and memory: fisher profile vs one plain forward+backward", ""]
    n, sl = t["tokens"]
    if "fisher_wall_s" in t or "plain_wall_s" in t:
        L += [f"Measured on {n} × {sl} c4 tokens (target: {cfg.timing_target_nsamples} × {sl}). "
              f"Fisher: the full default profile (every unit incl. the embedding, bits "
              f"{','.join(map(str, cfg.timing_bits))}, sampled labels, one backward per "
              f"sequence) through `profile()`; plain: forward+backward of the data loss in "
              f"batches of {cfg.batch_size}, separate process. Peak memory is the peak resident "
              "set (VmHWM) since the measured part started (the loaded model included).", "",
              "| | wall s | peak RSS GiB | phases |", "|---|---|---|---|"]
        if "plain_wall_s" in t:
            L.append(f"| plain fwd+bwd | {t['plain_wall_s']:.1f} | "
                     f"{t['plain_peak_bytes'] / 2**30:.2f} | |")
        else:
            L.append("| plain fwd+bwd | not run (time) | | |")
        if "fisher_wall_s" in t:
            ph = ", ".join(f"{k} {v:.0f}" for k, v in t["fisher_timings_s"].items())
            L.append(f"| fisher profile | {t['fisher_wall_s']:.1f} | "
                     f"{t['fisher_peak_bytes'] / 2**30:.2f} | {ph} |")
        else:
            L.append("| fisher profile | not run (time) | | |")
        L.append("")
        if "ratio" in t:
            L += [f"Ratio fisher / plain at {n} × {sl}: **{t['ratio']:.2f}×** (target ≤ 2×); "
                  f"peak {t['fisher_peak_bytes'] / 2**30:.2f} GiB (target ≤ 4 GB)."]
        if "fisher_extrapolated_s" in t:
            ex = t["fisher_extrapolated_s"]
            L += [f"EXTRAPOLATED, not measured: {cfg.timing_target_nsamples} × {sl} would take "
                  f"≈ {ex['linear']:.0f} s scaling the whole run linearly, ≈ "
                  f"{ex['phasewise']:.0f} s scaling only the per-sequence phases (gradients, "
                  "gather) and keeping quantize/build fixed"
                  + (f"; ratio ≈ {t['ratio_extrapolated_phasewise']:.2f}× against "
                     f"{cfg.timing_target_nsamples / n:g}× the plain pass."
                     if "ratio_extrapolated_phasewise" in t else ".")]
    else:
        L += ["not run (time)."]
    L.append("")
    if figs:
        L += ["## Plots", "", "Log-log axes: options whose measured (or predicted) ΔL is ≤ 0 "
              "are not drawn (counts in the noise table); dashed line: prediction = "
              "measurement.", ""] + [f"![{f}]({f})" for f in figs] + [""]
    L += ["## Wall time per piece (s)", "", "| piece | wall s |", "|---|---|"]
    L += [f"| {k} | {_fmt(v, 1)} |" for k, v in summary["walls_s"].items()] + [""]
    L += ["## Findings", "", NOTES_BEGIN, old_notes.strip() or "(to be written)", NOTES_END, ""]
    return "\n".join(L)


# ---- main ----------------------------------------------------------------------------------
def read_notes(md: Path) -> str:
    if not md.is_file():
        return ""
    m = re.search(re.escape(NOTES_BEGIN) + r"(.*?)" + re.escape(NOTES_END), md.read_text(),
                  re.S)
    return m.group(1) if m else ""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model (smoke test)")
    ap.add_argument("--pieces", default=None,
                    help=f"comma-separated subset of {','.join(PIECES)} (default: all but the "
                    "timing pieces, which run in their own processes at the end)")
    ap.add_argument("--report", action="store_true", help="only rebuild the report")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    ap.add_argument("--work", default=None,
                    help="cache directory (default runs/profiling-bench/<mode>)")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    # a timing piece in this process: the parent launched a fresh one for it
    ap.add_argument("--_inproc", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    cfg = QUICK if args.quick else REAL
    out = Path(args.out) if args.out else ROOT / "bench" / "results"
    work = Path(args.work) if args.work else ROOT / "runs" / "profiling-bench" / cfg.mode
    cache = Cache(cfg, work)
    progress = not args.quiet and sys.stderr.isatty()

    def log(msg: str) -> None:
        if not args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    if args.pieces:
        pieces = [p.strip() for p in args.pieces.split(",") if p.strip()]
        bad = [p for p in pieces if p not in PIECES]
        if bad:
            from bitsack.errors import ValidationError

            raise ValidationError("--pieces", f"{bad}; valid: {', '.join(PIECES)}")
    else:
        pieces = [p for p in PIECES if not p.startswith("timing")]
        if args.quick:
            pieces = list(PIECES)
    if args._inproc:
        for piece in pieces:
            data = run_timing(cfg, piece, progress, log)
            cache.put(piece, data)
            log(f"{piece}: done in {data['wall_s']} s")
        return 0
    if args.report:
        pieces = []
    setup: Setup | None = None
    needs_setup = [p for p in pieces if not p.startswith("timing") and cache.get(p) is None]
    if needs_setup or not args.report:
        # the layout and units are needed for the report too (cheap for the tiny model;
        # loading SmolLM2 takes ~20 s)
        setup = make_setup(cfg)
    for piece in pieces:
        if cache.get(piece) is not None:
            log(f"{piece}: cached")
            continue
        log(f"{piece}: running")
        if piece.startswith("timing") and not args.quick:
            # a fresh process per side, so the peak resident set is its own
            cmd = [sys.executable, __file__, "--pieces", piece, "--work", str(work), "--_inproc"]
            subprocess.run(cmd + (["--quiet"] if args.quiet else []), check=True)
            continue
        data = run_piece(piece, cfg, setup, cache, progress, log)
        if piece == "measured":
            data["machine"] = machine()
        cache.put(piece, data)
        log(f"{piece}: done in {data.get('wall_s')} s")
        if not args.quick:  # a partial report after every real piece (it takes hours)
            _report(cfg, cache, setup, out, log)
    if args.report or not pieces or args.quick:
        if setup is None:
            setup = make_setup(cfg)
        _report(cfg, cache, setup, out, log)
    return 0


def _report(cfg: BenchConfig, cache: Cache, setup: Setup | None, out: Path,
            log: Callable[[str], None]) -> None:
    res = {p: d for p in PIECES if (d := cache.get(p)) is not None}
    units_info = [] if setup is None else [{"id": u.id, "kind": u.kind, "layer": u.layer}
                                           for u in setup.units]
    run = "python bench/profiling_bench.py"
    cmds = ([f"{run} --quick"] if cfg.mode == "quick" else
            [f"# what `{run}` does in one process, run here as three",
             "# concurrent processes to get more of the shared CPUs:",
             f"{run} --pieces measured,plans",
             f"{run} --pieces grad_sampled,grad_chunks,grad_data,layerwise,hutchinson",
             f"{run} --pieces timing_plain,timing_fisher  # 1 process each",
             f"{run} --report"])
    build_report(cfg, res, None if setup is None else setup.layout, units_info, out, cmds,
                 read_notes(out / "profiling.md"))
    log(f"report written to {out / 'profiling.md'}")


if __name__ == "__main__":
    sys.exit(main())
