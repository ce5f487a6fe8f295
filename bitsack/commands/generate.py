"""``bitsack generate``: write a model-shaped synthetic problem (YAML or JSON by extension)."""

from __future__ import annotations

import argparse
import json

from bitsack.commands._args import FRACTION, GROUP, SEED, check_output_file, integer

#: Shape flags: their ranges (generous for any real model) and help.
_SHAPE_FLAGS = {
    "layers": (integer(1, 1024), "decoder layers"),
    "kv_groups": (integer(1, 1024), "head-group units per layer"),
    "mlp_groups": (integer(1, 4096), "MLP-block units per layer"),
    "hidden": (integer(1, 2**18), "hidden size (input width of q/k/v and the MLP)"),
    "head_dim": (integer(1, 4096), "width of one attention head"),
    "q_per_kv": (integer(1, 1024), "query heads per KV head"),
    "kv_per_group": (integer(1, 1024), "KV heads per head-group unit"),
    "mlp_block": (integer(1, 2**16), "MLP channels per MLP-block unit"),
    "group_size": (GROUP, "quantization group size (must divide the widths)"),
}
#: Largest instance generated: units, and entries of the interaction factor (rank x options).
MAX_UNITS = 1_000_000
MAX_FACTOR_ENTRIES = 200_000_000
#: Interaction rank.
RANK = integer(0, 4096, what="a rank")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="write a model-shaped synthetic problem instance",
        description="Generate a seeded, model-shaped problem: real packed-memory and roofline "
        "latency costs, synthetic losses of realistic shape, optional low-rank interactions "
        "(bitsack.solver.generate). Flags override the preset's shape.")
    p.add_argument("--preset", default="tiny", help="shape preset: llama-2-7b, smollm2-135m, "
                   "tiny (default)")
    for flag, (check, text) in _SHAPE_FLAGS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", type=check, dest=flag, metavar="N",
                       help=f"{text} (default: the preset's; {check.valid})")
    p.add_argument("--options", help="comma-separated option ids (default "
                   "prune,b2,b3,b4,b8,b16)")
    p.add_argument("--resources", help="comma-separated budgeted resources (default "
                   "memory_bytes,decode_latency_us)")
    p.add_argument("--tightness", type=FRACTION, default=0.5,
                   help="each limit at min + t·(max − min) usage, t in (0, 1] (default 0.5)")
    p.add_argument("--rank", type=RANK, default=0, help="rows of the interaction factor U "
                   f"(default 0: additive; {RANK.valid})")
    p.add_argument("--min-kept-heads", type=integer(0, 1024), default=0, dest="min_kept_heads",
                   help="a min_kept constraint per layer over its head groups (default 0: none)")
    p.add_argument("--avg-bits", type=float, metavar="B", help="set the memory budget to B "
                   "bits per weight instead of the tightness rule (other budgets removed)")
    p.add_argument("--seed", type=SEED, default=0, help="the only source of randomness "
                   "(default 0)")
    p.add_argument("--name", help="problem name (default: describes the shape)")
    p.add_argument("--out", required=True, help="output file (.yaml, .yml or .json)")
    p.add_argument("--json", action="store_true", help="print a summary as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitsack.errors import ValidationError
    from bitsack.solver.generate import PRESETS, generate_problem
    from bitsack.solver.schema import avg_bits_limit, dump_problem, with_limits

    check_output_file(args.out)
    if args.preset not in PRESETS:
        raise ValidationError("--preset", f"{args.preset!r} is not a preset; valid: "
                              f"{sorted(PRESETS)}")
    kwargs = dict(PRESETS[args.preset])
    for flag in _SHAPE_FLAGS:
        if getattr(args, flag) is not None:
            kwargs[flag] = getattr(args, flag)
    _check_size(kwargs, args.rank, len(args.options.split(",")) if args.options else 6)
    if args.options:
        kwargs["options"] = tuple(s.strip() for s in args.options.split(","))
    if args.resources:
        kwargs["resources"] = tuple(s.strip() for s in args.resources.split(","))
    problem = generate_problem(**kwargs, tightness=args.tightness, rank=args.rank,
                               seed=args.seed, name=args.name,
                               min_kept_heads=args.min_kept_heads)
    if args.avg_bits is not None:
        limits = {r.name: None for r in problem.resources}
        limits["memory_bytes"] = avg_bits_limit(problem, args.avg_bits)
        problem = with_limits(problem, limits)
    dump_problem(problem, args.out)
    if args.json:
        print(json.dumps({"out": str(args.out), "name": problem.name,
                          "units": len(problem.units), "options": problem.n_options,
                          "limits": dict(problem.limits)}, indent=2))
        return 0
    print(f"wrote {args.out}: {len(problem.units)} units, {problem.n_options} options, budgets "
          + ", ".join(f"{r} <= {v:.6g}" for r, v in problem.limits.items()))
    return 0


def _check_size(shape: dict, rank: int, n_options: int) -> None:
    """Refuse an instance too large to build before building it (each flag alone is in range;
    their product may not be)."""
    from bitsack.errors import ValidationError

    units = shape["layers"] * (shape["kv_groups"] + shape["mlp_groups"])
    if units > MAX_UNITS:
        raise ValidationError("--layers", f"{shape['layers']} layers x "
                              f"{shape['kv_groups'] + shape['mlp_groups']} units per layer = "
                              f"{units} units; valid: at most {MAX_UNITS}")
    if rank * units * n_options > MAX_FACTOR_ENTRIES:
        raise ValidationError("--rank", f"{rank} x {units * n_options} options = "
                              f"{rank * units * n_options} factor entries; valid: at most "
                              f"{MAX_FACTOR_ENTRIES}")
