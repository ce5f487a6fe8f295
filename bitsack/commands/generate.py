"""``bitsack generate``: write a model-shaped synthetic problem (YAML or JSON by extension)."""

from __future__ import annotations

import argparse

_SHAPE_FLAGS = ("layers", "kv_groups", "mlp_groups", "hidden", "head_dim", "q_per_kv",
                "kv_per_group", "mlp_block", "group_size")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="write a model-shaped synthetic problem instance",
        description="Generate a seeded, model-shaped problem: real packed-memory and roofline "
        "latency costs, synthetic losses of realistic shape, optional low-rank interactions "
        "(bitsack.solver.generate). Flags override the preset's shape.")
    p.add_argument("--preset", default="tiny", help="shape preset: llama-2-7b, smollm2-135m, "
                   "tiny (default)")
    for flag in _SHAPE_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, dest=flag, metavar="N")
    p.add_argument("--options", help="comma-separated option ids (default "
                   "prune,b2,b3,b4,b8,b16)")
    p.add_argument("--resources", help="comma-separated budgeted resources (default "
                   "memory_bytes,decode_latency_us)")
    p.add_argument("--tightness", type=float, default=0.5,
                   help="each limit at min + t·(max − min) usage, t in (0, 1] (default 0.5)")
    p.add_argument("--rank", type=int, default=0, help="rows of the interaction factor U")
    p.add_argument("--min-kept-heads", type=int, default=0, dest="min_kept_heads",
                   help="a min_kept constraint per layer over its head groups")
    p.add_argument("--avg-bits", type=float, metavar="B", help="set the memory budget to B "
                   "bits per weight instead of the tightness rule (other budgets removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="problem name")
    p.add_argument("--out", required=True, help="output file (.yaml, .yml or .json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitsack.errors import ValidationError
    from bitsack.solver.generate import PRESETS, generate_problem
    from bitsack.solver.schema import avg_bits_limit, dump_problem, with_limits

    if args.preset not in PRESETS:
        raise ValidationError("--preset", f"{args.preset!r} is not a preset; valid: "
                              f"{sorted(PRESETS)}")
    kwargs = dict(PRESETS[args.preset])
    for flag in _SHAPE_FLAGS:
        if getattr(args, flag) is not None:
            kwargs[flag] = getattr(args, flag)
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
    print(f"wrote {args.out}: {len(problem.units)} units, {problem.n_options} options, budgets "
          + ", ".join(f"{r} <= {v:.6g}" for r, v in problem.limits.items()))
    return 0
