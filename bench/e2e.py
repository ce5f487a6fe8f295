"""Head-to-head at equal bytes (issue #13's protocol): uniform GPTQ at every group size,
bitsack one-shot, bitsack searched — a thin driver over ``bitsack.pipeline.run``.

    python bench/e2e.py                                  # every cell of the grid below
    python bench/e2e.py --cells search --budgets 3.5     # some cells
    python bench/e2e.py --latency                        # + the latency-bound case
    python bench/e2e.py --report                         # rebuild e2e.md and the plot

Cells: ``uniform:b<k>g<G>`` (k 2/3/4, G 32/64/128: budget-free, measured once; a
``s<S>`` tail, ``uniform:b3g32s6``, stores the scales as S-bit codes: ``--scale-bits S``;
a ``-<grid>`` tail, ``uniform:b3g32s6-mse``, chooses the groups' parameters so: ``--grid``),
``oneshot@B`` and ``search@B`` for each budget B in bits per original weight (overhead
included), ``<method>@lat`` for the latency-bound case (any method, a search variant
included: ``search-s6@lat~s3``); a ``~s<N>`` tail (``search@3.5~s1``)
runs the cell from calibration draw N instead of 0 (GPTQ's calibration, the search's splits:
the method's side of a comparison against GPTQ's noise floor). Each cell is one ``bitsack run`` into
``--runs/<cell>`` (resumable: stage records, the search's checkpoint); its result is written
to ``bench/results/e2e/<cell>.json`` with the hash of its configuration, and a cell whose file
holds the same hash is not run again.

Protocol: SmolLM2-135M (the embedded default), WikiText-2 and C4 perplexity on the first
``--eval-windows`` (16) windows of 2048 tokens (GPTQ protocol), one calibration set for every
method (C4, ``--compress-nsamples`` × 512, seed 0: GPTQ's and the search store's), achieved
bits per weight from the packed bytes. The best uniform configuration at a budget is the best
WikiText-2 perplexity among the uniform cells whose achieved bits fit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
#: v3: cells measured on packed layout v2 (``bits``-bit zero points); the v2 cells (fp16 zero
#: points, so other bytes at the same budget) are kept in ``bench/results/e2e_v1/``.
SCHEMA = "bitsack.bench.e2e/v3"
BUDGETS = ("2.5", "3", "3.25", "3.5", "4", "4.25")
UNIFORM = ("b3g64", "b3g128", "b3g32", "b4g128", "b2g32", "b2g64", "b4g64", "b4g32", "b2g128")
LATENCY_AVG_BITS = 3.5
LATENCY_FRACTION = 0.85
#: RunConfig fields every cell runs with unless it names them: the defaults the recorded cells
#: ran under (on 2026-12-04 ``scale_bits`` became 6 by default with format bitsack,
#: ``grid`` became hmse and ``search_start`` auto; a cell wanting them names them:
#: ``search-s6``, ``uniform:b3g32s6``, ``uniform:b3g32s6-mse``, ``search-s6v6-hmse``)
PINNED = {"scale_bits": None, "grid": "minmax", "search_start": "both"}

#: the searches a cell can run: method -> its RunConfig fields besides the common ones (the
#: default splits stated: they are hashed into the key); ``<method>-rewalk[N]`` adds N rounds
SEARCHES = {
    "search": {"screen": [16, 256], "select": [48, 256]},
    # the splits before 2026-12-02: a third of the tokens
    "search-narrow": {"screen": [8, 256], "select": [16, 256]},
    # after a step, only the groups that moved are re-measured
    "search-moved": {"screen": [16, 256], "select": [48, 256], "search_relinearise": "moved"},
    # and sequential screening: a Δ settled on half the screen split is not measured further
    "search-moved-rse": {"screen": [16, 256], "select": [48, 256],
                         "search_relinearise": "moved", "search_rse": 0.25},
    # and the trust region moved by measured / predicted ΔKL
    "search-moved-rse-ratio": {"screen": [16, 256], "select": [48, 256],
                               "search_relinearise": "moved", "search_rse": 0.25,
                               "search_grow": "ratio"},
    # every option's scales as 6-bit codes (priced, stored and searched so)
    "search-s6": {"screen": [16, 256], "select": [48, 256], "scale_bits": 6},
    # and the token embedding as 6 row ranges (vocab_groups: frequent tokens have low ids)
    "search-s6v6": {"screen": [16, 256], "select": [48, 256], "scale_bits": 6,
                    "vocab_groups": 6},
    # and group size 16 on the menu (3g16 costs 3.63 bits/weight with 6-bit codes)
    "search-s6g16": {"screen": [16, 256], "select": [48, 256], "scale_bits": 6,
                     "menu": ["b2g128", "b2g64", "b2g32", "b2g16", "b3g128", "b3g64", "b3g32",
                              "b3g16", "b4g128", "b4g64", "b4g32", "b4g16", "b8g64", "b16"]},
    # both: the embedding in six ranges and group size 16 on the menu (at 2.5, uniform 2g16
    # with codes, 2.59 bits/weight, scores 7× better than 2g32's 2.34)
    "search-s6v6g16": {"screen": [16, 256], "select": [48, 256], "scale_bits": 6,
                       "vocab_groups": 6,
                       "menu": ["b2g128", "b2g64", "b2g32", "b2g16", "b3g128", "b3g64", "b3g32",
                                "b3g16", "b4g128", "b4g64", "b4g32", "b4g16", "b8g64", "b16"]},
}
# and each with the MSE grid (``--grid mse``: each group's range shrunk to the smallest squared
# error) and the weighted one (``--grid hmse``, the default of `bitsack run`)
for _name in ("search-s6", "search-s6v6", "search-s6v6g16"):
    SEARCHES[f"{_name}-mse"] = {**SEARCHES[_name], "grid": "mse"}
    # and weighted as GPTQ's loss weighs each column (``--grid hmse``)
    SEARCHES[f"{_name}-hmse"] = {**SEARCHES[_name], "grid": "hmse"}
# `bitsack run`'s defaults, as they are (6-bit codes, the weighted MSE grid, the one-shot start
# only where pruning takes part): the cost target is stated for them
SEARCHES["search-default"] = {**SEARCHES["search-s6-hmse"], "search_start": "auto"}
#: cells that change one thing of a search: method -> (heading, what changed, the search
#: it is compared with)
VARIANTS = {
    "search-narrow": ("The search on fewer tokens, the default before",
                      "Screen 8 × 256 tokens, select 16 × 256 (default: 16 × 256, 48 × 256); "
                      "the rest as the default search.", "search"),
    "search-moved": ("Re-measuring only the groups that moved",
                     "After an accepted step only the groups whose units moved are "
                     "linearised again (`--search-relinearise moved`; default: every group of "
                     "a changed layer); the rest as the default search.", "search"),
    "search-moved-rse": ("Sequential screening of the linearisations",
                         "Each group move is measured on half the screen split first and on "
                         "the other half only when its standard error exceeds a quarter of its "
                         "|Δ| (`--search-rse 0.25`; default: the whole split); the rest as "
                         "`search-moved`.", "search-moved"),
    "search-moved-rse-ratio": ("The trust region moved by how well a step was predicted",
                               "After an accepted step k doubles only when measured / "
                               "predicted ΔKL ρ ≥ 0.75, stays for 0.25 ≤ ρ < 0.75, halves "
                               "below (and every group is linearised again) "
                               "(`--search-grow ratio`; default: k doubles); the rest as "
                               "`search-moved-rse`.", "search-moved-rse"),
    "search-s6": ("The search with 6-bit scale codes",
                  "Every quantized option stores its group scales as 6-bit codes times an "
                  "fp16 step per row and 256 columns (`--scale-bits 6`: b3g32 costs 3.37 "
                  "bits/weight instead of 3.59), priced so and built so in the variant store; "
                  "the rest as the default search.", "search"),
    "search-s6v6": ("The token embedding in six row ranges",
                    "The tied embedding (21 % of SmolLM2's weights) is six units of token-id "
                    "ranges halving towards the front (`--vocab-groups 6`: ids 0–1535, "
                    "1536–3071, 3072–6143, 6144–12287, 12288–24575, 24576–49151; on "
                    "WikiText-2 the first 1/32 of the ids carries 53 % of the tokens, the "
                    "first 1/8 78 %: `vocab_ranges.md`), each free to take its own option; "
                    "the rest as `search-s6`.", "search-s6"),
    "search-s6g16": ("Group size 16 on the menu",
                     "The menu gains b2g16, b3g16, b4g16 (with 6-bit scale codes 3g16 costs "
                     "3 + 9/16 + 16/256 = 3.63 bits/weight, between 3g32's 3.34 and 4g128's "
                     "4.14); the rest as `search-s6`.", "search-s6"),
    "search-s6v6g16": ("The embedding in ranges and group size 16 on the menu",
                       "`--vocab-groups 6` and the menu of `search-s6g16`; the rest as "
                       "`search-s6`.", "search-s6v6"),
}
for _name in ("search-s6", "search-s6v6", "search-s6v6g16"):
    VARIANTS[f"{_name}-mse"] = (
        "The MSE grid",
        "Each group's range shrunk to the smallest squared error of its weights (`--grid "
        f"mse`, factors 1, 0.975, …, 0.5; default: min-max); the rest as `{_name}`.", _name)
    VARIANTS[f"{_name}-hmse"] = (
        "The MSE grid weighted as GPTQ weighs columns",
        "As `-mse`, each column's squared error weighted by GPTQ's own weight for it, "
        f"1 / [chol(H⁻¹)]ⱼⱼ² (`--grid hmse`); the rest as `{_name}-mse`.", f"{_name}-mse")


def numeric_budgets(cells) -> list[str]:
    """The bits/weight budgets of ``cells`` in increasing order (not the uniform cells', not
    the latency case's ``@lat`` of any draw)."""
    return sorted({split_cell(c)[1] for c in cells} - {"", "lat"}, key=float)


def split_cell(cell: str) -> tuple[str, str, int]:
    """A cell's method, budget and calibration draw: ``search@3.5~s1`` -> (search, 3.5, 1),
    ``uniform:b3g64`` -> (uniform:b3g64, "", 0)."""
    head, _, draw = cell.partition("~s")
    method, _, budget = head.partition("@")
    if draw and not draw.isdigit():
        raise ValueError(f"cell {cell!r}: the draw after '~s' must be an integer ≥ 0")
    return method, budget, int(draw or 0)


def cell_config(cell: str, args) -> dict[str, Any]:
    """The ``RunConfig`` fields of a cell (JSON-able; hashed into the cell's record)."""
    method, budget, seed = split_cell(cell)
    common = {"model": args.model, "calib": "c4", "eval": "wikitext2", "eval_windows":
              args.eval_windows, "compress_nsamples": args.compress_nsamples, "seed": seed,
              "search_budget": args.search_budget}
    if method.startswith("uniform:"):
        spec, _, grid = method.split(":", 1)[1].partition("-")
        option, _, scale_bits = spec.partition("s")
        out = {**common, "method": "uniform", "menu": [option], "avg_bits": 16.0}
        if scale_bits:
            out["scale_bits"] = int(scale_bits)
        if grid:  # uniform:b3g64s6-mse
            out["grid"] = grid
        return out
    if budget == "lat":  # the latency-bound case: bits/weight and a prefill latency
        common["budgets"] = {"prefill_latency_us": args.latency_limit}
    bits = LATENCY_AVG_BITS if budget == "lat" else float(budget)
    search, rewalks = _rounds(method)
    if search not in SEARCHES or (budget == "lat" and method == "search"):
        return {**common, "method": method, "avg_bits": bits}
    out = {**common, "method": "search", "avg_bits": bits, **SEARCHES[search]}
    if rewalks:  # N rounds more, the store re-walked each time
        out["search_rewalks"] = rewalks
    return out


def run_cell(cell: str, args, base_dir: Path) -> dict[str, Any]:
    """One ``bitsack run`` and the C4 perplexity of its model; cached by configuration."""
    from bitsack.io import json_digest, write_json

    cfg_fields = cell_config(cell, args)
    key = json_digest({"schema": SCHEMA, "cell": cell, "config": cfg_fields})
    path = Path(args.results) / "e2e" / f"{cell.replace(':', '-')}.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            print(f"{cell}: cached", file=sys.stderr)
            return old
    from bitsack.pipeline import RunConfig, run

    run_dir = Path(args.runs) / cell.replace(":", "-").replace("@", "_")
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in ("eval_base.json", "eval_base.stage.json"):  # the base model is evaluated once
        if (base_dir / f).is_file() and not (run_dir / f).is_file():
            shutil.copy(base_dir / f, run_dir / f)
    method, b, seed = split_cell(cell)
    search, n = _rounds(method)
    if n:  # the rounds before are the cell's before: go on
        before = search if n == 1 else f"{search}-rewalk" + ("" if n == 2 else str(n - 1))
        _seed_rounds(Path(args.runs) / (f"{before}_{b}" + (f"~s{seed}" if seed else "")),
                     run_dir)
    elif search in SEARCHES:  # a variant of a search at this budget and draw: its store
        _share_store(Path(args.runs), run_dir)
    # one profile serves every budget (its record holds no budget): seed it, then share it
    vocab = cfg_fields.get("vocab_groups", 1)  # other units: another profile
    shared = base_dir.parent / ("profile" if vocab == 1 else f"profile-v{vocab}")
    _share_profile(shared, run_dir)
    t = time.time()
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg_fields.items()}
    summary = run(RunConfig(out=str(run_dir), **{**PINNED, **fields}),
                  progress=lambda m: print(f"[{cell} {time.time() - t:6.0f} s] {m}",
                                           file=sys.stderr, flush=True))
    _share_profile(run_dir, shared)
    c4 = c4_perplexity(run_dir / "model", args.eval_windows, args.model)
    from dataclasses import asdict

    result = {"schema": SCHEMA, "key": key, "cell": cell, "config": cfg_fields,
              "wikitext2": summary.ppl_after, "c4": c4,
              "base": {"wikitext2": summary.ppl_before},
              "bits_per_weight": summary.bits_per_weight, "packed_bytes": summary.packed_bytes,
              "summary": asdict(summary), "wall_s": time.time() - t, "machine": machine()}
    write_json(path, result)
    return result


def _rounds(method: str) -> tuple[str, int]:
    """A cell's search and its re-walk rounds: ``search-rewalk`` -> (search, 1),
    ``search-moved-rewalk2`` -> (search-moved, 2), ``search`` -> (search, 0)."""
    search, sep, tail = method.partition("-rewalk")
    return search, (int(tail) if tail else 1) if sep else 0


def _seed_rounds(src: Path, dst: Path) -> None:
    """Hard-link a search cell's variant stores and copy its checkpoints into ``dst`` (store
    files are replaced, never rewritten in place), so a cell with one round more resumes the
    rounds before it there."""
    import os

    if not (src / "search.json").is_file() or (dst / "search.json").is_file():
        return
    for store in sorted(src.glob("store*")):
        shutil.copytree(store, dst / store.name, copy_function=os.link, dirs_exist_ok=True)
    for ck in sorted(src.glob("search*.json")):
        shutil.copy(ck, dst / ck.name)


def _share_store(runs: Path, dst: Path) -> None:
    """Hard-link into ``dst`` the variant store of another search cell at the same budget and
    calibration draw (the first by name that has one). The store checks the key it was built
    from when opened: one built from other inputs is rebuilt (its files are unlinked and
    written anew, never rewritten in place, so the other cell's store is untouched)."""
    if (dst / "store").exists():
        return
    suffix = dst.name.partition("_")[2]
    for src in sorted(runs.glob(f"*_{suffix}")):
        if src != dst and (src / "store" / "store.json").is_file():
            shutil.copytree(src / "store", dst / "store", copy_function=os.link)
            return


def _share_profile(src: Path, dst: Path) -> None:
    """Copy a profile (``profile/`` and its stage record) from one run folder to another."""
    if (src / "profile" / "problem.yaml").is_file() and (src / "profile.stage.json").is_file() \
            and not (dst / "profile.stage.json").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / "profile", dst / "profile", dirs_exist_ok=True)
        shutil.copy(src / "profile.stage.json", dst / "profile.stage.json")


def c4_perplexity(model_dir: Path, windows: int, model: str) -> float:
    from bitsack.checkpoint import cache_dequantized, load_compressed
    from bitsack.data import eval_tokens
    from bitsack.evaluate import perplexity
    from bitsack.models.loading import load_model

    lm = load_compressed(model_dir)
    cache_dequantized(lm.model)
    tok = lm.tokenizer or load_model(model, progress=False).tokenizer
    return perplexity(lm.model, eval_tokens("c4", tok), 2048, windows=windows).ppl


def base_perplexity(args, base_dir: Path) -> dict[str, float]:
    """The base model on both datasets, once (its WikiText-2 record seeds every run dir)."""
    path = Path(args.results) / "e2e" / "base.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("eval_windows") == args.eval_windows and (base_dir / "eval_base.json"
                                                             ).is_file():
            return old
    from bitsack.data import eval_tokens
    from bitsack.evaluate import perplexity
    from bitsack.io import write_json
    from bitsack.pipeline import RunConfig, evaluate_base

    lm, record = evaluate_base(RunConfig(model=args.model, out=str(base_dir), avg_bits=16.0,
                                         eval_windows=args.eval_windows), print)
    wiki = record["ppl"]
    c4 = perplexity(lm.model, eval_tokens("c4", lm.tokenizer), 2048,
                    windows=args.eval_windows).ppl
    out = {"eval_windows": args.eval_windows, "wikitext2": wiki, "c4": c4}
    write_json(path, out)
    return out


def latency_limit(args) -> float:
    """``LATENCY_FRACTION`` × the smallest prefill latency quantization alone reaches."""
    from bitsack.models import model_units
    from bitsack.models.loading import load_model
    from bitsack.profiling.build import make_cost_models, unit_shapes

    lm = load_model(args.model, progress=False)
    units = model_units(lm.model, mlp_group=128)
    model = make_cost_models(["roofline"], {"roofline": {"device": "h200"}})[0]
    shapes = unit_shapes(lm.model, units)
    low = sum(min(model.cost(s, b, g)["prefill_latency_us"] for b in (2, 3, 4) for g in
                  (32, 64, 128)) for s in shapes)
    return LATENCY_FRACTION * low


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load": os.getloadavg(), "commit": _commit()}


def _commit() -> str | None:
    """The git commit of the bitsack checkout that ran the cell (None outside git)."""
    import subprocess

    import bitsack

    try:
        out = subprocess.run(["git", "-C", str(Path(bitsack.__file__).parent), "rev-parse",
                              "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


# ---- report -------------------------------------------------------------------------------
def load_results(results: Path) -> dict[str, dict]:
    out = {}
    for f in sorted((results / "e2e").glob("*.json")):
        d = json.loads(f.read_text())
        if d.get("schema") == SCHEMA:
            out[d["cell"]] = d
    return out


def cell_grid(cell: str, record: dict | None = None) -> str:
    """The grid a cell's groups were chosen on: its config's ``grid`` (the pinned min-max
    when it names none)."""
    cfg = (record or {}).get("config") or {}
    if "grid" in cfg:
        return cfg["grid"]
    method = split_cell(cell)[0]
    if method.startswith("uniform:"):
        return method.partition("-")[2] or PINNED["grid"]
    return SEARCHES.get(_rounds(method)[0], {}).get("grid", PINNED["grid"])


def best_uniform(results: dict[str, dict], budget: float,
                 grid: str | None = None) -> dict | None:
    """The uniform cell of ``results`` with the lowest WikiText-2 whose bytes fit ``budget``
    (of ``grid`` only, if given: the same quantizer as the cell it is compared with)."""
    fits = [r for c, r in results.items() if c.startswith("uniform:")
            and r["bits_per_weight"] <= budget + 1e-9
            and (grid is None or cell_grid(c, r) == grid)]
    return min(fits, key=lambda r: r["wikitext2"]) if fits else None


def write_report(args) -> Path:
    from bitsack.io import atomic_write

    results = Path(args.results)
    every = load_results(results)
    draw = args.draw if args.draw is not None else main_draw(every)
    res = {c: r for c, r in every.items() if split_cell(c)[2] == draw}
    base = json.loads((results / "e2e" / "base.json").read_text()) \
        if (results / "e2e" / "base.json").is_file() else {}
    L = ["# Head-to-head at equal bytes: uniform GPTQ vs bitsack one-shot vs bitsack search",
         "",
         "SmolLM2-135M (embedded default; its weights come from a Q4_1 GGUF, i.e. already on "
         "a 4-bit grid of 32-weight groups: 4-bit g32 is near-lossless by construction). "
         f"Perplexity on the first {args.eval_windows} windows of 2048 tokens (GPTQ protocol) "
         f"of WikiText-2 and C4; base {_f(base.get('wikitext2'))} / {_f(base.get('c4'))}. "
         "Bits per weight are achieved bytes (packed, scales and zeros included, the tied "
         "embedding counted) × 8 / original weights, in packed layout v2 (an fp16 scale and a "
         "`bits`-bit zero point per group: uniform 3-bit g64 is 3.297). One calibration set "
         "for every method. Cells measured under layout v1 (fp16 zero points: 3-bit g64 was "
         "3.5) are in `e2e_v1.md`; their models are the same, their bytes are not. "
         f"The tables and the plot show the cells of calibration draw {draw} (`~s{draw}`; "
         "the draw most searches ran from, so every comparison is within one draw); the "
         "section on draws lists every cell.",
         "", "Command: `python bench/e2e.py` (cells cached in `bench/results/e2e/*.json`).", ""]
    L += ["## Uniform GPTQ", "", "| config | bits/weight | WikiText-2 | C4 |",
          "|---|---|---|---|"]
    for c in sorted((c for c in res if c.startswith("uniform:")),
                    key=lambda c: res[c]["bits_per_weight"]):
        r = res[c]
        L.append(f"| {split_cell(c)[0][8:]} | {r['bits_per_weight']:.3f} | {_f(r['wikitext2'])} | "
                 f"{_f(r['c4'])} |")
    L += ["", "## At each budget", "",
          "Every bitsack cell at a budget beside the best uniform configuration that fits it "
          "(lowest WikiText-2 among the uniform cells of the same draw whose bytes fit) with "
          "the same quantizer — the same grid: min-max, MSE or weighted MSE (`--grid`; "
          "`-mse`, `-hmse` cells) — and, last column, its WikiText-2 over the best uniform of "
          "any grid.", "",
          "| budget | best uniform that fits (bits) | WikiText-2 | C4 | bitsack | bits | "
          "WikiText-2 | C4 | bitsack / uniform (Wiki, C4) | vs any grid (Wiki) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    budgets = numeric_budgets(res)
    for b in budgets:
        best_any = best_uniform(res, float(b))
        for c in sorted((c for c in res if split_cell(c)[1] == b),
                        key=lambda c: (c.split("@")[0] != "oneshot", c)):
            r = res[c]
            u = best_uniform(res, float(b), cell_grid(c, r))
            ucol = (f"{u['cell'][8:].split('~')[0]} ({u['bits_per_weight']:.3f}) | "
                    f"{_f(u['wikitext2'])} | {_f(u['c4'])}" if u else "none fits | — | —")
            any_col = f"{r['wikitext2'] / best_any['wikitext2']:.3f} " \
                f"({best_any['cell'][8:].split('~')[0]})" if best_any else "—"
            L.append(f"| {b} | {ucol} | {c.split('@')[0]} | {r['bits_per_weight']:.3f} | "
                     f"{_f(r['wikitext2'])} | {_f(r['c4'])} | {_ratios(r, u)} | {any_col} |")
    for method, (title, what, ref) in VARIANTS.items():
        cells = sorted((c for c in res if split_cell(c)[0] == method),
                       key=lambda c: float(split_cell(c)[1]))
        if not cells:
            continue
        L += ["", f"## {title} (`{method}`)", "", what, "",
              "| budget | bits | WikiText-2 | C4 | forwards | linearisations | steps (accepted) "
              f"| vs best uniform (Wiki, C4) | vs `{ref}` (Wiki, C4) |",
              "|---|---|---|---|---|---|---|---|---|"]
        for c in cells:
            b, r = split_cell(c)[1], res[c]
            u = best_uniform(res, float(b), cell_grid(c, r))
            s = res.get(c.replace(method + "@", ref + "@", 1))
            srch = r["summary"].get("search") or {}
            steps = srch.get("steps", [])
            L.append(f"| {b} | {r['bits_per_weight']:.3f} | {_f(r['wikitext2'])} | "
                     f"{_f(r['c4'])} | {srch.get('forwards', 0):.0f} | "
                     f"{srch.get('linearisations', 0)} | {len(steps)} "
                     f"({sum(1 for st in steps if st['accepted'])}) | {_ratios(r, u)} | "
                     f"{_ratios(r, s)} |")
    rewalk = sorted((c for c in res if split_cell(c)[1] and _rounds(split_cell(c)[0])[1]),
                    key=lambda c: (float(split_cell(c)[1]), c))
    if rewalk:
        L += ["", "## Rounds on a re-walked store (`search-rewalk`, `search-rewalkN`)", "",
              "The `search@B` cell's (or `<search>-rewalk` the `<search>@B` cell's) finished "
              "search continued: before each further round the "
              "variant store is quantized again along the plan (Hessians from the plan's own "
              "layers), kept if that measures better on select and no worse on holdout, then "
              "the search goes on with the cell's forward budget more (`--search-rewalks N`; "
              "each cell resumes the rounds of the one before it).", "",
              "| cell | bits | WikiText-2 | C4 | re-walk Δ select KL ± SE (kept?), per round | "
              "forwards (budget per round) | vs its first round (Wiki, C4) | "
              "vs best uniform (Wiki, C4) |",
              "|---|---|---|---|---|---|---|---|"]
        for c in rewalk:
            m, b, _ = split_cell(c)
            r = res[c]
            first = res.get(c.replace(m + "@", _rounds(m)[0] + "@", 1))
            u, srch = best_uniform(res, float(b), cell_grid(c, r)), \
                r["summary"].get("search") or {}
            walks = []
            for rd in srch.get("start", {}).get("rounds") or []:
                sel = rd.get("select") or {}
                walks.append(f"{sel['delta']:+.4f} ± {sel['se']:.4f} "
                             f"({'yes' if rd.get('accepted') else 'no'})" if sel else "—")
            L.append(f"| {c} | {r['bits_per_weight']:.3f} | {_f(r['wikitext2'])} | "
                     f"{_f(r['c4'])} | {'; '.join(walks) or '—'} | "
                     f"{srch.get('forwards', 0):.0f} ({r['config']['search_budget']:g}) | "
                     f"{_ratios(r, first)} | {_ratios(r, u)} |")
    lat = {c: r for c, r in res.items() if split_cell(c)[1] == "lat"}
    if lat:
        L += ["", "## Latency-bound case", "",
              f"Budgets: {LATENCY_AVG_BITS} bits/weight and `prefill_latency_us` ≤ "
              f"{LATENCY_FRACTION} × the smallest prefill time quantization alone reaches "
              "(roofline H200): bits alone cannot meet it, pruning must take part.", "",
              "| method | bits/weight | WikiText-2 | C4 | pruned units |", "|---|---|---|---|---|"]
        for c, r in sorted(lat.items()):
            pruned = sum(v.get("prune", 0) for v in r["summary"]["plan_counts"].values())
            L.append(f"| {c} | {r['bits_per_weight']:.3f} | {_f(r['wikitext2'])} | "
                     f"{_f(r['c4'])} | {pruned} |")
    L += draws_section(every, results)
    hosts: dict[str, list[str]] = {}
    for c, r in sorted(every.items()):
        hosts.setdefault(r.get("machine", {}).get("platform", "unknown"), []).append(c)
    if len(hosts) > 1:
        L += ["", "## Hosts", "",
              "Cells ran on more than one machine. The same code and seed gave a different "
              "GPTQ result on another host's CPU (float kernels round differently and GPTQ "
              "amplifies it: `bench/results/gptq_noise.md`), so compare cells of one host.", "",
              "| host | cells |", "|---|---|"]
        for h, cells in sorted(hosts.items()):
            L.append(f"| {h} | {', '.join(cells)} |")
    L += ["", "## Search cost", "",
          "Sequence-forwards count one calibration sequence through the whole model (a "
          "forward from layer l counts its share of the layers). CPU-minutes are wall time × "
          "torch threads of the cell (an upper bound on the machine's shared cores).", "",
          "| cell | sequence-forwards | linearisations | steps (accepted) | stages, seconds | "
          "CPU-minutes (whole run) | kept (stitched / sequential holdout KL) |",
          "|---|---|---|---|---|---|---|"]
    for c, r in sorted(every.items()):
        srch = r["summary"].get("search")
        if not srch:
            continue
        acc = sum(1 for s in srch["steps"] if s["accepted"])
        fin = srch.get("final", {})
        st = ", ".join(f"{k} {v:.0f}" for k, v in r["summary"]["stage_seconds"].items())
        L.append(f"| {c} | {srch['forwards']:.0f} | {srch['linearisations']} | "
                 f"{len(srch['steps'])} ({acc}) | {st} | "
                 f"{r['wall_s'] * r['machine']['threads'] / 60:.0f} | {fin.get('kept')} "
                 f"({_f(fin.get('stitched_holdout_kl'))} / "
                 f"{_f(fin.get('sequential_holdout_kl'))}) |")
    phased = {c: r["summary"]["search"]["seconds"] for c, r in sorted(every.items())
              if (r["summary"].get("search") or {}).get("seconds")}
    if phased:
        names = list(dict.fromkeys(k for ph in phased.values() for k in ph))
        L += ["", "Wall seconds per phase of the search stage (cells run since the phases are "
              "recorded): the base distributions of the KL splits, the variant store (GPTQ of "
              "every matrix at every option in the window), the search's start (uniform "
              "candidates measured, the descent), its linearisations, its steps (propose, "
              "screen, select, decide), the rest (checkpoints), and the final plan applied "
              "for real and compared.", "",
              "| cell | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        L += [f"| {c} | " + " | ".join(f"{ph.get(k, 0):.0f}" for k in names) + " |"
              for c, ph in phased.items()]
    png = plot(res, results / "e2e_ppl.png", draw)
    if png:
        L += ["", f"![perplexity vs bits per weight]({png.name})", ""]
    path = results / "e2e.md"
    findings = _findings(path)
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L) + "\n" + findings)
    return path


def draws_section(every: dict[str, dict], results: Path) -> list[str]:
    """Cells run from several calibration draws (``~s<N>``) beside the best uniform
    configuration that fits, quantized from the same draw on the same host (its e2e cells
    ``uniform:<cfg>[~sN]`` and ``bench/gptq_noise.py``'s runs): per draw and the mean ratio."""
    seeded = {(m, b) for c in every for m, b, s in [split_cell(c)] if s and b}
    if not seeded:
        return []
    uniform: dict[tuple[str, str, int], dict] = {}  # (config, host, draw) -> run
    for f in sorted((results / "gptq_noise").glob("*.json")):
        r = json.loads(f.read_text())
        uniform[(r["config"], r["machine"]["platform"], r["seed"])] = r
    bits: dict[str, float] = {}  # config -> bits per weight in this layout (any draw)
    for c, r in every.items():
        m, _, s = split_cell(c)
        if m.startswith("uniform:"):
            uniform[(m[8:], r["machine"]["platform"], s)] = r
            bits[m[8:]] = r["bits_per_weight"]

    def best(budget: float, host: str, draw: int, grid: str) -> tuple[str, dict] | None:
        fits = [(cfg, r) for (cfg, h, d), r in uniform.items()
                if (h, d) == (host, draw) and cfg in bits and bits[cfg] <= budget + 1e-9
                and cell_grid(f"uniform:{cfg}", r) == grid]
        return min(fits, key=lambda t: t[1]["wikitext2"]) if fits else None

    L = ["", "## Calibration draws", "",
         "A cell run from calibration draws 0, 1, 2 … (`<cell>~s<N>`: GPTQ's calibration "
         "sequences and the search's splits drawn with seed N) beside the best uniform "
         "configuration that fits the budget (best WikiText-2 among the uniform cells measured "
         "from the same draw on the same host with the same grid; bits per weight in this "
         "layout). One GPTQ "
         "result moves by ±5 % with its draw (`gptq_noise.md`): a claim at a budget is the "
         "mean over draws.", "",
         "| cell | host | draw | WikiText-2 | C4 | uniform | WikiText-2 | C4 | ratio (Wiki, C4) |",
         "|---|---|---|---|---|---|---|---|---|"]
    for m, b in sorted(seeded, key=lambda t: (float(t[1]) if t[1] != "lat" else 1e9, t[0])):
        ratios = []
        cells = sorted((c for c in every if split_cell(c)[:2] == (m, b)),
                       key=lambda c: split_cell(c)[2])
        for c in cells:
            r, draw = every[c], split_cell(c)[2]
            h = r["machine"]["platform"]
            found = best(float(b), h, draw, cell_grid(c, r)) if b != "lat" else None
            config, u = found if found else (None, None)
            if u:
                ratios.append((r["wikitext2"] / u["wikitext2"], r["c4"] / u["c4"]))
            L.append(f"| {m}@{b} | {h} | {draw} | {_f(r['wikitext2'])} | {_f(r['c4'])} | "
                     f"{config or '—'} | {_f(u and u['wikitext2'])} | {_f(u and u['c4'])} | "
                     f"{_ratios(r, u)} |")
        if len(ratios) > 1:
            w, c4 = zip(*ratios, strict=True)
            L.append(f"| {m}@{b}: mean of {len(ratios)} draws | | | | | | | | "
                     f"{statistics.mean(w):.3f} ± {statistics.stdev(w):.3f}, "
                     f"{statistics.mean(c4):.3f} ± {statistics.stdev(c4):.3f} |")
    return L


def _findings(path: Path) -> str:
    """Hand-written findings below the marker survive a rebuild."""
    marker = "<!-- findings -->"
    if path.is_file() and marker in path.read_text():
        return "\n" + marker + path.read_text().split(marker, 1)[1]
    return "\n" + marker + "\n"


def main_draw(every: dict[str, dict]) -> int:
    """The calibration draw most search cells ran from (the lowest on a tie; 0 without any)."""
    counts: dict[int, int] = {}
    for c in every:
        method, budget, draw = split_cell(c)
        counts.setdefault(draw, 0)
        counts[draw] += bool(budget) and not method.startswith("uniform:")
    return min(counts, key=lambda d: (-counts[d], d)) if counts else 0


def plot(res: dict[str, dict], path: Path, draw: int = 0) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not res:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g, marker in (("32", "o"), ("64", "s"), ("128", "^")):
        pts = sorted((r["bits_per_weight"], r["wikitext2"]) for c, r in res.items()
                     if c.startswith("uniform:") and split_cell(c)[0].endswith(f"g{g}"))
        if pts:
            ax.plot(*zip(*pts, strict=True), marker + "-", label=f"uniform GPTQ g{g}")
    for grid, name in (("minmax", "min-max"), ("mse", "MSE"), ("hmse", "weighted MSE")):
        dq = sorted((r["bits_per_weight"], r["wikitext2"]) for c, r in res.items()
                    if c.startswith("uniform:") and "s" in split_cell(c)[0].split(":", 1)[1]
                    and cell_grid(c, r) == grid)
        if dq:
            ax.plot(*zip(*dq, strict=True), "o--", label=f"uniform GPTQ, 6-bit codes, {name}")
    for method, style in (("oneshot", "x--"), ("search-narrow", "P:"), ("search-moved", "v:"),
                          ("search-moved-rse", "<:"), ("search-moved-rse-ratio", ">:"),
                          ("search", "*-"), ("search-s6", "*-"), ("search-s6g16", "h:"),
                          ("search-s6v6", "p-"), ("search-s6v6-mse", "p--"),
                          ("search-s6v6-hmse", "P-"), ("search-s6v6g16-mse", "h--"),
                          ("search-default", "X"),
                          ("search-rewalk", "D:"), ("search-moved-rewalk", "d:")):
        pts = sorted((r["bits_per_weight"], r["wikitext2"]) for c, r in res.items()
                     if split_cell(c)[0] == method and split_cell(c)[1] not in ("", "lat"))
        if pts:
            size = 7 if method == "search-narrow" else 12
            ax.plot(*zip(*pts, strict=True), style, markersize=size, label=f"bitsack {method}")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (achieved, overhead included)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend()
    ax.set_title(f"SmolLM2-135M: perplexity vs bytes (calibration draw {draw})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ratios(r: dict, ref: dict | None) -> str:
    """``r``'s perplexities over ``ref``'s, WikiText-2 then C4 (— without ``ref``)."""
    if not ref:
        return "—"
    return f"{r['wikitext2'] / ref['wikitext2']:.3f}, {r['c4'] / ref['c4']:.3f}"


def _f(v) -> str:
    if v is None or v == "":
        return "—" if v is None else ""
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", default="uniform,oneshot,search",
                   help="cell kinds: uniform, oneshot, search, or single cells such as "
                        "uniform:b2g64 or search@3.25 (comma-separated)")
    p.add_argument("--budgets", default=",".join(BUDGETS), help="bits per weight")
    p.add_argument("--latency", action="store_true", help="add the latency-bound case")
    p.add_argument("--report", action="store_true", help="only rebuild e2e.md and the plot")
    p.add_argument("--draw", type=int, default=None,
                   help="the calibration draw the report's tables and plot show (default: the "
                        "draw most search cells ran from)")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--compress-nsamples", type=int, default=32)
    p.add_argument("--search-budget", type=float, default=3000.0)
    p.add_argument("--runs", default=str(ROOT / "runs" / "e2e"), help="run directories")
    p.add_argument("--results", default=str(RESULTS), help="where e2e.md and the cells go")
    p.add_argument("--model", default="default", help="the model of every cell")
    args = p.parse_args(argv)
    args.latency_limit = None
    if not args.report:
        base_dir = Path(args.runs) / "base"
        base_perplexity(args, base_dir)
        kinds = [k.strip() for k in args.cells.split(",") if k.strip()]
        cells = [f"uniform:{u}" for u in UNIFORM] if "uniform" in kinds else []
        cells += [k for k in kinds if ":" in k or "@" in k]  # cells named one by one
        for b in [b.strip() for b in args.budgets.split(",") if b.strip()]:
            cells += [f"{k}@{b}" for k in ("oneshot", "search") if k in kinds]
        if args.latency:
            cells += [f"{k}@lat" for k in ("search", "sequential", "oneshot")]
        if any(split_cell(c)[1] == "lat" for c in cells):  # named one by one or --latency
            args.latency_limit = latency_limit(args)
        for cell in cells:
            run_cell(cell, args, base_dir)
    print(write_report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
