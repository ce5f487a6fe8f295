"""Does CPU prefill time drop in proportion when head groups and MLP blocks are pruned?

SmolLM2-135M (the embedded default), one prompt of --tokens tokens (the start of WikiText-2's
test stream), dense vs. the same model with a fraction of its head groups and of its MLP blocks
physically removed (units chosen at random, seeded). Prefill is timed as generation runs it:
the whole prompt through every layer, logits for the last position only; the median of
--repeats timed runs after --warmup untimed ones. A second column times full-sequence logits
(as perplexity evaluation does), where the unpruned 49152 x 576 lm_head weighs in.

Usage:
    python bench/prune_speed.py [--tokens 512] [--repeats 7] [--out bench/results/prune_speed.md]
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from bitsack.data import eval_tokens
from bitsack.evaluate import perplexity
from bitsack.io import atomic_write
from bitsack.models import get_adapter, model_units, prune
from bitsack.models.loading import load_model

FRACTIONS = (0.0, 0.25, 0.5)


def time_interleaved(runs: list, repeats: int, warmup: int) -> list[tuple[float, float]]:
    """(min, median) wall time (s) of each zero-argument callable in ``runs``.

    The callables take turns, one call each per round, in a rotating order, so a change of
    load on a shared machine hits every configuration alike rather than biasing one.
    """
    times: list[list[float]] = [[] for _ in runs]
    with torch.inference_mode():
        for r in range(warmup + repeats):
            for k in range(len(runs)):
                j = (k + r) % len(runs)
                t0 = time.perf_counter()
                runs[j]()
                if r >= warmup:
                    times[j].append(time.perf_counter() - t0)
    # The minimum is the least disturbed by other jobs; the median is shown beside it so that
    # a noisy run is visible as a gap between the two.
    return [(min(t), statistics.median(t)) for t in times]


def choose(units: list[str], fraction: float, rng: random.Random) -> list[str]:
    return sorted(rng.sample(units, round(fraction * len(units))))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mlp-group", type=int, default=128)
    ap.add_argument("--ppl-windows", type=int, default=4,
                    help="WikiText-2 windows of --tokens tokens for a perplexity column")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="bench/results/prune_speed.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dense = load_model("default", progress=False)
    stream = eval_tokens("wikitext2", dense.tokenizer)
    ids = stream[:, : args.tokens]
    all_units = model_units(dense.model, mlp_group=args.mlp_group)
    groups = [u.id for u in all_units if u.kind == "head_group"]
    blocks = [u.id for u in all_units if u.kind == "mlp_group"]

    load_before = os.getloadavg()
    rows, models = [], []
    for frac in FRACTIONS:
        rng = random.Random(args.seed)
        model = copy.deepcopy(dense.model) if frac else dense.model
        chosen = choose(groups, frac, rng) + choose(blocks, frac, rng)
        if chosen:
            prune(model, chosen, mlp_group=args.mlp_group)
        adapter = get_adapter(model)
        ppl = perplexity(model, stream, args.tokens, windows=args.ppl_windows, progress=False)
        rows.append(dict(frac=frac, groups=len(groups) - sum(".attn." in c for c in chosen),
                         blocks=len(blocks) - sum(".mlp." in c for c in chosen),
                         params=adapter.quantizable_params(),
                         empty_attn=sum(not lr["attn_groups"] for lr in adapter.dims()["layers"]),
                         ppl=ppl.ppl))
        models.append(model)
    configs = [(r, key, functools.partial(m, input_ids=ids, use_cache=False, logits_to_keep=keep))
               for r, m in zip(rows, models, strict=True)
               for key, keep in (("t_last", 1), ("t_full", 0))]
    timings = time_interleaved([c[2] for c in configs], args.repeats, args.warmup)
    for (r, key, _), t in zip(configs, timings, strict=True):
        r[key] = t
    load_after = os.getloadavg()
    for r in rows:
        print(f"pruned {r['frac']:.0%}: layer weights {r['params']:,}  prefill "
              f"{r['t_last'][0] * 1e3:.1f} ms  (all logits {r['t_full'][0] * 1e3:.1f} ms)  "
              f"ppl {r['ppl']:.1f}", file=sys.stderr)

    base = rows[0]
    lines = [
        "# Prefill time of pruned SmolLM2-135M on the CPU",
        "",
        "Question (issue #4): does CPU prefill time drop in proportion to the structures pruned?",
        "",
        f"Command: `python bench/prune_speed.py --tokens {args.tokens} --repeats {args.repeats}"
        f" --seed {args.seed}" + (f" --threads {args.threads}" if args.threads else "") + "`",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores visible, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread(s)), float32, Python {platform.python_version()}. "
        f"Load average (1 min) {load_before[0]:.2f} before and {load_after[0]:.2f} after the "
        "measurement (other jobs share this machine; the models are timed in interleaved "
        "rounds so that load hits them alike).",
        "",
        f"Model: SmolLM2-135M-Instruct (embedded GGUF, dequantized to float32), 30 layers, "
        f"{len(groups)} head groups (3 per layer: 1 KV head + 3 query heads each), "
        f"{len(blocks)} MLP blocks of {args.mlp_group} channels. The same fraction of head groups"
        f" and of MLP blocks is removed, chosen at random (seed {args.seed}); layers whose "
        "head groups are all chosen lose their attention block entirely.",
        "",
        f"Prefill: 1 x {args.tokens} tokens (start of the WikiText-2 test stream); "
        f"{args.repeats} timed runs after {args.warmup} warm-up runs per configuration, all "
        "six configurations interleaved; the table shows the minimum (the least disturbed by "
        "other jobs; ratios use it) and, in parentheses, the median. "
        "\"last logits\" computes logits for the last position only (what generation's "
        "prefill does); \"all logits\" for every position (what perplexity evaluation "
        "does: the 49152 x 576 lm_head is never pruned).",
        "",
        "| pruned | head groups | MLP blocks | layer weights | ratio | empty attn layers | "
        "prefill, last logits, ms | ratio | prefill, all logits, ms | ratio | "
        f"ppl ({args.ppl_windows} x {args.tokens}) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['frac']:.0%} | {r['groups']} | {r['blocks']} | {r['params']:,} | "
            f"{r['params'] / base['params']:.3f} | {r['empty_attn']} | "
            f"{r['t_last'][0] * 1e3:.0f} ({r['t_last'][1] * 1e3:.0f}) | "
            f"{r['t_last'][0] / base['t_last'][0]:.3f} | "
            f"{r['t_full'][0] * 1e3:.0f} ({r['t_full'][1] * 1e3:.0f}) | "
            f"{r['t_full'][0] / base['t_full'][0]:.3f} | {r['ppl']:.1f} |")
    noise = max(r[k][1] / r[k][0] - 1 for r in rows for k in ("t_last", "t_full"))
    findings = "; ".join(
        f"{r['frac']:.0%} pruned: layer weights x{r['params'] / base['params']:.3f}, prefill "
        f"x{r['t_last'][0] / base['t_last'][0]:.3f} (last logits), "
        f"x{r['t_full'][0] / base['t_full'][0]:.3f} (all logits)" for r in rows[1:])
    lines += [
        "",
        f"Finding: {findings}. \"Proportional\" would be a time ratio equal to the "
        "layer-weight ratio; the parts pruning does not touch (embedding lookup, norms, rotary "
        f"embeddings, the lm_head — for all {args.tokens} positions in the \"all logits\" "
        "column — and per-layer framework overhead) add a cost that does not shrink, which "
        "shows most in the \"all logits\" column. "
        f"Noise: the median exceeds the minimum by up to {noise:.0%} in this run.",
        "",
        "Perplexity of randomly pruned models is shown only to prove they still run: random "
        "units are not a pruning plan (the solver chooses them).",
        "",
    ]
    with atomic_write(args.out) as fh:
        fh.write("\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
