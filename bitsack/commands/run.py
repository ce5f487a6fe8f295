"""``bitsack run``: profile → solve → compress → evaluate in one resumable command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import Any


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers "
                                         "(e.g. 2,3,4,8)") from None


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="profile -> solve -> compress -> evaluate, resumable",
        description="The whole job in one command: profile MODEL on calibration text, solve "
        "the joint prune-and-precision plan under the budgets with a certificate, compress "
        "(physical pruning, sequential GPTQ, packing), evaluate perplexity before and after, "
        "and write OUT/report.md. A finished stage is reused when its inputs (recorded by "
        "hash in OUT/<stage>.stage.json) are unchanged.")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M GGUF), a .gguf "
                   "file, a checkpoint directory, or a hub id")
    add_budget_args(p)
    add_job_args(p)
    p.add_argument("--out", required=True, help="run directory (created; stages reused)")
    p.set_defaults(func=run)


def add_budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--avg-bits", type=float, default=None, metavar="B",
                   help="memory budget as bits per original weight (overhead included)")
    p.add_argument("--budget", action="append", default=[], metavar="RESOURCE=VALUE",
                   help="resource limit, e.g. memory_bytes=6e7 or prefill_latency_us=900 "
                   "(repeatable)")


def add_job_args(p: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """Flags shared by ``run`` and ``demo`` (``demo`` passes its smaller defaults)."""
    from bitsack.pipeline import RunConfig

    d = {**asdict(RunConfig(avg_bits=4.0)), **(defaults or {})}
    p.add_argument("--calib", default=d["calib"], help=f"calibration data: wikitext2 | c4 | a "
                   f"text file (default {d['calib']})")
    p.add_argument("--eval", default=d["eval"], help=f"evaluation data: wikitext2 | c4 | a text "
                   f"file (default {d['eval']})")
    p.add_argument("--estimator", default=d["estimator"], help="profiling estimator "
                   f"(default {d['estimator']}; see `bitsack profile --help`)")
    p.add_argument("--interactions", type=float, default=d["interactions"], metavar="W",
                   help="weight in [0, 1] of the profile's interaction terms in the objective "
                   f"(default {d['interactions']:g}: additive; see README)")
    p.add_argument("--no-prune", dest="prune", action="store_false", default=d["prune"],
                   help="bits only: no unit may be pruned")
    p.add_argument("--bits", type=_int_list, default=d["bits"], help="bit-widths offered "
                   f"besides b16 and prune (default {','.join(map(str, d['bits']))})")
    p.add_argument("--units", type=_str_list, default=d["units"],
                   help=f"unit kinds heads,mlp,embed (default {','.join(d['units'])})")
    p.add_argument("--group-size", type=int, default=d["group_size"])
    p.add_argument("--mlp-group", type=int, default=d["mlp_group"])
    p.add_argument("--nsamples", type=int, default=d["profile_nsamples"],
                   help=f"profiling sequences (default {d['profile_nsamples']})")
    p.add_argument("--seqlen", type=int, default=d["profile_seqlen"],
                   help=f"profiling tokens per sequence (default {d['profile_seqlen']})")
    p.add_argument("--quantizer", default=d["quantizer"], choices=["gptq", "rtn"],
                   help="apply quantizer (default gptq: sequential GPTQ)")
    p.add_argument("--profile-quantizer", default=d["profile_quantizer"],
                   choices=["gptq", "rtn"], help="quantizer of the profile's perturbations "
                   "(default: the apply quantizer; rtn profiles faster)")
    p.add_argument("--compress-nsamples", type=int, default=d["compress_nsamples"])
    p.add_argument("--compress-seqlen", type=int, default=d["compress_seqlen"])
    p.add_argument("--eval-seqlen", type=int, default=d["eval_seqlen"])
    p.add_argument("--eval-windows", type=int, default=d["eval_windows"],
                   help=f"first K evaluation windows (default {d['eval_windows']})")
    p.add_argument("--solver", default=d["solver"], help=f"default {d['solver']}")
    p.add_argument("--time-limit", type=float, default=d["time_limit_s"],
                   help=f"solver seconds (default {d['time_limit_s']:g})")
    p.add_argument("--gap", type=float, default=d["gap"], help="target relative gap")
    p.add_argument("--device", default=d["device"], help="roofline device (h200, a100, l40, "
                   f"cpu-2c; default {d['device']})")
    p.add_argument("--frontier-points", type=int, default=d["frontier_points"],
                   help="points of the predicted frontier in the report (0 = none)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.add_argument("--force", action="store_true", help="write into --out even when it is a "
                   "non-empty folder that is not a bitsack run directory")


def config_from_args(args: argparse.Namespace, model: str, out: str):
    from bitsack.commands.solve import parse_budgets
    from bitsack.pipeline import RunConfig

    return RunConfig(
        model=model, out=out, avg_bits=args.avg_bits, budgets=parse_budgets(args.budget),
        calib=args.calib, eval=args.eval, estimator=args.estimator,
        interactions=args.interactions, prune=args.prune, bits=tuple(args.bits),
        units=tuple(args.units), group_size=args.group_size, mlp_group=args.mlp_group,
        profile_nsamples=args.nsamples, profile_seqlen=args.seqlen, quantizer=args.quantizer,
        profile_quantizer=args.profile_quantizer,
        compress_nsamples=args.compress_nsamples, compress_seqlen=args.compress_seqlen,
        eval_seqlen=args.eval_seqlen, eval_windows=args.eval_windows, solver=args.solver,
        time_limit_s=args.time_limit, gap=args.gap, device=args.device,
        frontier_points=args.frontier_points, seed=args.seed)


def execute(cfg, args: argparse.Namespace) -> int:
    """Run the pipeline and print the summary (text or ``--json``)."""
    from bitsack.pipeline import RUN_SCHEMA
    from bitsack.pipeline import run as run_pipeline

    start = time.monotonic()
    quiet = args.json or args.quiet

    def say(msg: str) -> None:
        if not quiet:
            print(f"[{time.monotonic() - start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    summary = run_pipeline(cfg, progress=say, bars=not quiet and sys.stderr.isatty(),
                           force=args.force)
    if args.json:
        print(json.dumps({"schema": RUN_SCHEMA, **asdict(summary)}, indent=2, default=str))
        return 0
    print(format_summary(summary))
    return 0


def format_summary(s) -> str:
    cert = s.certificate
    lines = [f"plan ({s.status}, solver {cert.get('solver')}, relative gap "
             f"{_g(cert.get('rel_gap'))}, dual bound {_g(cert.get('dual_bound'))}):"]
    for kind, counts in s.plan_counts.items():
        lines.append(f"  {kind:12s} " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
    lines += [
        f"loss increase (nats/token): predicted {_g(s.predicted_loss_increase)}, "
        f"measured {_g(s.measured_loss_increase)}",
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
