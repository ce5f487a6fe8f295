"""``bitsack generate``: write a model-shaped synthetic problem (YAML or JSON by extension)."""

from __future__ import annotations

import argparse
import json

from bitsack.commands._args import FRACTION, deferred, integer

#: Shape flags and their help (ranges: ``bitsack.solver.generate.ARG_RANGES``).
_SHAPE_FLAGS = {
    "layers": "decoder layers",
    "kv_groups": "head-group units per layer",
    "mlp_groups": "MLP-block units per layer",
    "hidden": "hidden size (input width of q/k/v and the MLP)",
    "head_dim": "width of one attention head",
    "q_per_kv": "query heads per KV head",
    "kv_per_group": "KV heads per head-group unit",
    "mlp_block": "MLP channels per MLP-block unit",
    "group_size": "quantization group size (must divide the widths)",
}


def _ranged(flag: str):
    """``flag``'s validator, its range from ``ARG_RANGES`` (numpy is imported only on use)."""

    def make():
        from bitsack.solver.generate import ARG_RANGES

        return integer(*ARG_RANGES[flag])

    return deferred(make, flag)


def register(subparsers: argparse._SubParsersAction) -> None:
    from bitsack.commands.solve import add_budget_arguments

    p = subparsers.add_parser(
        "generate", help="write a model-shaped synthetic problem instance",
        description="Generate a seeded, model-shaped problem: real packed-memory and roofline "
        "latency costs, synthetic losses of realistic shape, optional low-rank interactions "
        "(bitsack.solver.generate). Flags override the preset's shape. Budgets: every "
        "resource's limit follows --tightness; --avg-bits / --budget then set or remove "
        "limits the same way as for solve.")
    p.add_argument("--preset", default="tiny", help="shape preset: llama-2-7b, smollm2-135m, "
                   "tiny (default)")
    for flag, text in _SHAPE_FLAGS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, metavar="N",
                       type=_ranged(flag), help=f"{text} (default: the preset's)")
    p.add_argument("--options", help="comma-separated option ids (default "
                   "prune,b2,b3,b4,b8,b16; b<k>g<G> for an explicit group size)")
    p.add_argument("--resources", help="comma-separated budgeted resources (default "
                   "memory_bytes,decode_latency_us)")
    p.add_argument("--tightness", default="0.5", type=FRACTION,
                   help="each limit at min + t·(max − min) usage, t in (0, 1] (default 0.5)")
    p.add_argument("--rank", default="0", type=_ranged("rank"),
                   help="rows of the interaction factor U (default 0: additive)")
    p.add_argument("--min-kept-heads", default="0", dest="min_kept_heads",
                   type=_ranged("min_kept_heads"),
                   help="a min_kept constraint per layer over its head groups (default 0: none)")
    add_budget_arguments(p)
    p.add_argument("--seed", default="0", type=_ranged("seed"),
                   help="the only source of randomness (default 0)")
    p.add_argument("--name", help="problem name (default: describes the shape)")
    p.add_argument("--out", required=True, help="output file (.yaml, .yml or .json)")
    p.add_argument("--json", action="store_true", help="print a summary as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitsack.commands.solve import budget_of, number, out_file
    from bitsack.errors import ValidationError
    from bitsack.solver.generate import ARG_RANGES, PRESETS, generate_problem
    from bitsack.solver.schema import dump_problem

    if args.preset not in PRESETS:
        raise ValidationError("--preset", f"{args.preset!r} is not a preset; valid: "
                              f"{sorted(PRESETS)}")
    budget = budget_of(args)
    out = out_file(args.out)
    kwargs = dict(PRESETS[args.preset])
    for flag in _SHAPE_FLAGS:
        if getattr(args, flag) is not None:
            lo, hi = ARG_RANGES[flag]
            kwargs[flag] = number(getattr(args, flag), f"--{flag.replace('_', '-')}", lo, hi,
                                  integer=True)
    for flag in ("rank", "seed", "min_kept_heads"):
        lo, hi = ARG_RANGES[flag]
        kwargs[flag] = number(getattr(args, flag), f"--{flag.replace('_', '-')}", lo, hi,
                              integer=True)
    if args.options:
        kwargs["options"] = tuple(s.strip() for s in args.options.split(","))
    if args.resources:
        kwargs["resources"] = tuple(s.strip() for s in args.resources.split(","))
    tightness = number(args.tightness, "--tightness", 0, 1, lo_open=True)
    problem = generate_problem(**kwargs, tightness=tightness, name=args.name)
    problem = budget.apply(problem)
    dump_problem(problem, out)
    if args.json:
        print(json.dumps({"out": str(out), "name": problem.name, "units": len(problem.units),
                          "options": problem.n_options, "limits": dict(problem.limits)},
                         indent=2))
        return 0
    print(f"wrote {out}: {len(problem.units)} units, {problem.n_options} options, budgets "
          + ", ".join(f"{r} <= {v:.6g}" for r, v in problem.limits.items()))
    return 0
