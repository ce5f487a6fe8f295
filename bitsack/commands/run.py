"""``bitsack run``: plan (search / one-shot / uniform) → compress → evaluate, resumable."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import Any


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="plan (measured search by default) -> compress -> evaluate, resumable",
        description="The whole job in one command. --method search (default): the measured "
        "trust-region search (the solver proposes plans around a measured incumbent, KL to "
        "the base model on calibration tokens decides); oneshot: one solve of the profiled "
        "Fisher objective with a certificate; uniform: the best uniform option of the menu "
        "that fits. Then compression (sequential GPTQ, packing), perplexity before and after, "
        "and OUT/report.md. A finished stage is reused when its inputs (recorded by hash in "
        "OUT/<stage>.stage.json) are unchanged; the search and its variant store resume.")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M GGUF), a .gguf "
                   "file, a checkpoint directory, or a hub id")
    add_budget_args(p)
    add_job_args(p)
    p.add_argument("--out", required=True, help="run directory (created; stages reused)")
    p.set_defaults(func=run)


def add_budget_args(p: argparse.ArgumentParser, avg_bits: float | None = None) -> None:
    from bitsack.commands._args import AVG_BITS

    p.add_argument("--avg-bits", type=AVG_BITS, default=avg_bits, metavar="B",
                   help="memory budget as bits per original weight, overhead included "
                   f"({AVG_BITS.valid})" + (f"; default {avg_bits:g}" if avg_bits else ""))
    p.add_argument("--budget", action="append", default=[], metavar="RESOURCE=VALUE",
                   help="resource limit, e.g. prefill_latency_us=900 (repeatable; 'none' "
                   "removes a limit; memory_bytes and --avg-bits are one budget: give one)")


def _pair(text: str) -> tuple[int, int]:
    try:
        n, length = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not SEQUENCESxTOKENS (e.g. "
                                         "16x256)") from None
    if n < 2 or length < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: sequences and tokens must be ≥ 2")
    return n, length


def add_job_args(p: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """Flags shared by ``run`` and ``demo`` (``demo`` passes its smaller defaults)."""
    from bitsack.commands._args import (
        BITS_LIST,
        GAP,
        GRID_HELP,
        GROUP,
        NONNEG_INT,
        POSITIVE_INT,
        SECONDS,
        SEED,
        SEQLEN,
        VOCAB_GROUPS,
        VOCAB_GROUPS_HELP,
        add_format_arg,
        name_list,
        real,
        scale_bits_arg,
    )
    from bitsack.config import SEARCH_STARTS
    from bitsack.kernels.formats import GRIDS, SCALE_BITS
    from bitsack.pipeline import METHODS, RunConfig

    # scale_bits: the field's default ("auto", resolved by format), not the resolved value
    d = {**asdict(RunConfig(avg_bits=4.0)), "scale_bits": "auto", **(defaults or {})}
    p.add_argument("--method", default=d["method"], choices=METHODS,
                   help=f"how the plan is made (default {d['method']}; see the description)")
    p.add_argument("--menu", type=_str_list, default=d["menu"],
                   help="options a unit may take, b<k>g<G> or b16 (default "
                   f"{','.join(d['menu'])})")
    p.add_argument("--calib", default=d["calib"], help=f"calibration data: wikitext2 | c4 | a "
                   f"text file (default {d['calib']})")
    p.add_argument("--eval", default=d["eval"], help=f"evaluation data: wikitext2 | c4 | a text "
                   f"file (default {d['eval']})")
    p.add_argument("--search-budget", type=real(0, 1e9, what="sequence-forwards"),
                   default=d["search_budget"], help="forward passes the search may spend "
                   "(one full forward of one calibration sequence = 1; default "
                   f"{d['search_budget']:g})")
    p.add_argument("--search-start", default=d["search_start"], choices=SEARCH_STARTS,
                   help="the search starts from the better, measured, of the uniform plans "
                   "and the one-shot plan of the profile (both), from the uniform plans only "
                   "(uniform: no profile stage), or (auto, default) from both where pruning "
                   "takes part and from uniform where bits alone meet the budgets (the "
                   "one-shot start won only where pruning did: bench/results/e2e.md)")
    p.add_argument("--search-window", type=POSITIVE_INT, default=d["search_window"],
                   help="the variant store keeps the menu options within this many steps of "
                   f"the uniform start (default {d['search_window']}): fewer is a faster store")
    p.add_argument("--search-rewalks", type=NONNEG_INT, default=d["search_rewalks"],
                   help="search rounds after the first: the variant store is quantized again "
                   "along the searched plan (Hessians from its own layers) and the search goes "
                   "on from there if that measures better, with --search-budget more forwards "
                   f"each (default {d['search_rewalks']})")
    p.add_argument("--search-relinearise", default=d["search_relinearise"],
                   choices=("layers", "moved"),
                   help="after an accepted search step, re-measure the groups of every layer it "
                   "changed (layers) or only the groups that moved (moved: fewer forwards per "
                   f"step, Δ's of the others from before the step; default "
                   f"{d['search_relinearise']})")
    p.add_argument("--search-rse", type=real(0, 1e6, what="a relative standard error"),
                   default=d["search_rse"],
                   help="sequential screening: a linearisation's group move is measured on "
                   "half the screen split, and on the other half only when its standard error "
                   "exceeds this fraction of its |Δ| (0: always the whole split; default "
                   f"{d['search_rse']:g})")
    p.add_argument("--search-grow", default=d["search_grow"], choices=("accept", "ratio"),
                   help="after an accepted search step the trust region doubles (accept), or "
                   "moves by measured / predicted ΔKL (ratio: doubles at ≥ 0.75, halves below "
                   f"0.25 and re-measures every group; default {d['search_grow']})")
    p.add_argument("--search-stop-z", type=real(0, 1e6, what="a number of standard errors"),
                   default=d["search_stop_z"],
                   help="the search has converged and stops when no proposal is predicted to "
                   "gain this many standard errors of its last select measurement, e.g. 2 "
                   "(0: search until the forward budget is spent; default "
                   f"{d['search_stop_z']:g})")
    p.add_argument("--trust-region", type=POSITIVE_INT, default=d["search_k"],
                   help=f"units the first search step may change (default {d['search_k']})")
    for split in ("screen", "select", "holdout"):
        n, length = d[split]
        p.add_argument(f"--{split}", type=_pair, default=(n, length), metavar="NxL",
                       help=f"search {split} split: sequences x tokens (default {n}x{length})")
    p.add_argument("--estimator", default=d["estimator"], help="one-shot profiling estimator "
                   f"(default {d['estimator']}; see `bitsack profile --help`)")
    p.add_argument("--interactions", type=real(0, 1), default=d["interactions"], metavar="W",
                   help="weight in [0, 1] of the profile's interaction terms in the one-shot "
                   f"objective (default {d['interactions']:g}: additive; see README)")
    p.add_argument("--no-prune", dest="prune", action="store_false", default=d["prune"],
                   help="the one-shot plan may not prune")
    add_format_arg(p, d["format"])
    p.add_argument("--bits", type=BITS_LIST, default=d["bits"], help="one-shot profile: "
                   f"bit-widths at --group-size (default {','.join(map(str, d['bits']))})")
    p.add_argument("--units", type=name_list(("heads", "mlp", "embed")), default=d["units"],
                   help=f"unit kinds heads,mlp,embed (default {','.join(d['units'])})")
    p.add_argument("--group-size", type=GROUP, default=d["group_size"],
                   help=f"the group size plain b<k> options mean (default {d['group_size']})")
    p.add_argument("--mlp-group", type=GROUP, default=d["mlp_group"],
                   help=f"MLP channels per unit (default {d['mlp_group']})")
    p.add_argument("--vocab-groups", type=VOCAB_GROUPS, default=d["vocab_groups"], metavar="N",
                   help=VOCAB_GROUPS_HELP)
    p.add_argument("--nsamples", type=POSITIVE_INT, default=d["profile_nsamples"],
                   help=f"profiling sequences (default {d['profile_nsamples']})")
    p.add_argument("--seqlen", type=SEQLEN, default=d["profile_seqlen"],
                   help=f"profiling tokens per sequence (default {d['profile_seqlen']})")
    p.add_argument("--quantizer", default=d["quantizer"], choices=["gptq", "rtn"],
                   help="apply quantizer (default gptq: sequential GPTQ)")
    p.add_argument("--scale-bits", type=scale_bits_arg(), default=d["scale_bits"],
                   metavar="S", help="store each group's scale as an S-bit code times an fp16 "
                   f"step per 256 columns ({SCALE_BITS[0]}..{SCALE_BITS[-1]}; fp16: fp16 scales) "
                   "instead of fp16 "
                   "(3-bit g32: 3.34 bits/weight with 6, 3.59 with fp16); every method, "
                   "--format bitsack or gguf (there, with --grid sym..., they open the "
                   "K-quants: 2-bit Q2_K with S <= 4, 3-bit Q3_K with S <= 5) (default auto: "
                   "6 with --format bitsack, fp16 with the other formats)")
    p.add_argument("--grid", default=d["grid"], choices=GRIDS,
                   help=f"{GRID_HELP}; default {d['grid']}")
    p.add_argument("--profile-quantizer", default=d["profile_quantizer"],
                   choices=["gptq", "rtn"], help="quantizer of the one-shot profile's "
                   "perturbations (default: the apply quantizer; rtn profiles faster)")
    p.add_argument("--compress-nsamples", type=POSITIVE_INT, default=d["compress_nsamples"],
                   help=f"GPTQ calibration sequences (default {d['compress_nsamples']})")
    p.add_argument("--compress-seqlen", type=SEQLEN, default=d["compress_seqlen"],
                   help=f"GPTQ calibration tokens per sequence (default {d['compress_seqlen']})")
    p.add_argument("--eval-seqlen", type=SEQLEN, default=d["eval_seqlen"],
                   help=f"evaluation window (default {d['eval_seqlen']})")
    p.add_argument("--eval-windows", type=POSITIVE_INT, default=d["eval_windows"],
                   help=f"first K evaluation windows (default {d['eval_windows']})")
    p.add_argument("--solver", default=d["solver"], help=f"solver backend (default "
                   f"{d['solver']})")
    p.add_argument("--time-limit", type=SECONDS, default=d["time_limit_s"],
                   help=f"solver seconds ({SECONDS.valid}; default {d['time_limit_s']:g})")
    p.add_argument("--gap", type=GAP, default=d["gap"], help=f"target relative gap "
                   f"({GAP.valid})")
    p.add_argument("--device", default=d["device"], help="roofline device (h200, a100, l40, "
                   f"cpu-2c; default {d['device']})")
    p.add_argument("--frontier-points", type=NONNEG_INT, default=d["frontier_points"],
                   help="unused (kept for compatibility of scripts)")
    p.add_argument("--seed", type=SEED, default=d["seed"], help=f"seed of calibration windows "
                   f"and the search ({SEED.valid}; default {d['seed']})")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.add_argument("--force", action="store_true", help="write into --out even when it is a "
                   "non-empty folder that is not a bitsack run directory")


def config_from_args(args: argparse.Namespace, model: str, out: str):
    from bitsack.pipeline import RunConfig
    from bitsack.solver.budget import Budget

    budget = Budget.parse(args.avg_bits, args.budget)
    return RunConfig(
        model=model, out=out, avg_bits=budget.avg_bits, budgets=dict(budget.limits),
        method=args.method, menu=tuple(args.menu), calib=args.calib, eval=args.eval,
        estimator=args.estimator, interactions=args.interactions, prune=args.prune,
        bits=tuple(args.bits), units=tuple(args.units), group_size=args.group_size,
        mlp_group=args.mlp_group, vocab_groups=args.vocab_groups,
        profile_nsamples=args.nsamples, profile_seqlen=args.seqlen,
        format=args.format,
        quantizer=args.quantizer, profile_quantizer=args.profile_quantizer,
        scale_bits=args.scale_bits, grid=args.grid,
        compress_nsamples=args.compress_nsamples, compress_seqlen=args.compress_seqlen,
        search_start=args.search_start, search_budget=args.search_budget,
        search_k=args.trust_region, search_window=args.search_window,
        search_rewalks=args.search_rewalks, search_relinearise=args.search_relinearise,
        search_rse=args.search_rse, search_grow=args.search_grow,
        search_stop_z=args.search_stop_z,
        screen=tuple(args.screen), select=tuple(args.select),
        holdout=tuple(args.holdout), eval_seqlen=args.eval_seqlen,
        eval_windows=args.eval_windows, solver=args.solver, time_limit_s=args.time_limit,
        gap=args.gap, device=args.device, frontier_points=args.frontier_points,
        seed=args.seed)


def execute(cfg, args: argparse.Namespace) -> int:
    """Run the pipeline and print the summary (text or ``--json``)."""
    from bitsack.pipeline import RUN_SCHEMA
    from bitsack.pipeline import run as run_pipeline
    from bitsack.progress import Progress, progress_mode

    start = time.monotonic()
    quiet = args.json or args.quiet
    mode = progress_mode(quiet)
    # not on a terminal: a heartbeat line when a stage is silent for 30 s
    beat = Progress("bitsack run", mode="lines" if mode == "lines" else "off")

    def say(msg: str) -> None:
        if not quiet:
            print(f"[{time.monotonic() - start:6.0f} s] {msg}", file=sys.stderr, flush=True)
            beat.stage(clip(msg, 60))

    with beat:
        summary = run_pipeline(cfg, progress=say, bars=mode == "bar", force=args.force)
    if args.json:
        print(json.dumps({"schema": RUN_SCHEMA, **asdict(summary)}, indent=2, default=str))
        return 0
    print(format_summary(summary))
    return 0


def clip(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` characters at a word boundary, ``…`` marking the cut
    (the heartbeat line repeats a stage's message; a mid-word cut read as a typo)."""
    if len(text) <= width:
        return text
    head = text[:width - 1]
    cut = head.rfind(" ")
    return (head[:cut] if cut > width // 2 else head).rstrip(" ,;:(") + "…"


def format_summary(s) -> str:
    cert = s.certificate or {}
    lines = [f"plan ({s.method}, {s.status}):"]
    for kind, counts in s.plan_counts.items():
        lines.append(f"  {kind:12s} " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
    if s.search:
        st = s.search
        acc = sum(1 for x in st.get("steps", []) if x["accepted"])
        lines.append(f"search: from {st['start'].get('incumbent')}, {acc} of "
                     f"{len(st.get('steps', []))} steps accepted, holdout KL "
                     f"{_g(st['start']['kl'].get('holdout'))} -> {_g(st['kl'].get('holdout'))}"
                     f", {st.get('forwards', 0):.0f} forwards; kept the "
                     f"{st.get('final', {}).get('kept')} model")
    elif cert.get("rel_gap") is not None:
        lines.append(f"certificate: solver {cert.get('solver')}, relative gap "
                     f"{_g(cert.get('rel_gap'))}, dual bound {_g(cert.get('dual_bound'))}")
    lines += [
        f"loss increase (nats/token): measured {_g(s.measured_loss_increase)}"
        + (f", predicted {_g(s.predicted_loss_increase)}"
           if s.predicted_loss_increase is not None else ""),
        f"perplexity: {_g(s.ppl_before)} -> {_g(s.ppl_after)}",
        f"memory: {s.memory_before_bytes:,} -> {s.memory_after_bytes:,} bytes"
        + (f" ({s.bits_per_weight:.3f} bits per weight of the planned units)"
           if s.bits_per_weight is not None else ""),
        "stages: " + ", ".join(f"{k} {v:.0f} s" + (" (reused)" if k in s.reused else "")
                               for k, v in s.stage_seconds.items()),
        f"report: {s.out}/report.md",
    ]
    return "\n".join(lines)


def _g(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run(args: argparse.Namespace) -> int:
    return execute(config_from_args(args, args.model, args.out), args)
