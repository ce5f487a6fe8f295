"""``bitsack compress``: apply a solved plan to a model and save the packed result."""

from __future__ import annotations

import argparse
import json
import sys

from bitsack.commands._args import (
    GRID_HELP,
    GROUP,
    POSITIVE_INT,
    SEED,
    SEQLEN,
    check_scale_format,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compress", help="prune + quantize + pack a model according to a solution",
        description="Apply SOLUTION (a solved PROBLEM) to MODEL: physical pruning, quantization "
        "(sequential GPTQ or RTN) and packing; writes safetensors + bitsack.json to --out.")
    p.add_argument("--model", required=True, help="'default', a .gguf file, a checkpoint dir, "
                   "or a hub id (the model the problem was profiled on)")
    p.add_argument("--problem", required=True, help="problem.yaml (its metadata gives "
                   "group size and MLP block size)")
    p.add_argument("--solution", required=True, help="solution.json from `bitsack solve`")
    p.add_argument("--quantizer", default="gptq", choices=["gptq", "rtn"],
                   help="gptq (sequential, on calibration data; default) or rtn (round to "
                   "nearest, no data)")
    p.add_argument("--calib", default="c4", help="calibration data for gptq: wikitext2 | c4 | "
                   "a text file (default c4)")
    p.add_argument("--nsamples", type=POSITIVE_INT, default=64,
                   help="calibration sequences (gptq; default 64)")
    p.add_argument("--seqlen", type=SEQLEN, default=512,
                   help=f"tokens per calibration sequence (default 512; {SEQLEN.valid})")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the calibration sample "
                   "(default 0)")
    p.add_argument("--group-size", type=GROUP, default=None,
                   help="override the problem's group size (must match how it was profiled)")
    p.add_argument("--mlp-group", type=GROUP, default=None, help="override the MLP block size")
    p.add_argument("--no-act-order", action="store_true", help="GPTQ without act-order")
    from bitsack.commands._args import add_scale_bits_arg

    add_scale_bits_arg(p, "as the solution was priced (default auto: the solution's "
                       "record, else the problem's metadata scale_bits, else fp16 scales)")
    from bitsack.kernels.formats import GRIDS

    p.add_argument("--grid", default=None, choices=GRIDS,
                   help=f"{GRID_HELP}; default: the grid the solution records (solve "
                   "--grid), sym-hmse where the problem was priced for symmetric grids "
                   "(GGUF), else hmse")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier "
                   "bitsack model folder (replaced atomically); anything else is refused")
    p.add_argument("--force", action="store_true", help="replace --out even when it is a "
                   "non-empty folder that is not a bitsack model (its contents are deleted)")
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitsack.apply import (
        ApplyConfig,
        compress,
        is_model_dir,
        plan_from_solution,
        save_compressed,
    )
    from bitsack.errors import ValidationError
    from bitsack.io import check_output_dir
    from bitsack.kernels.formats import symmetric
    from bitsack.models.loading import load_model
    from bitsack.progress import Progress, progress_mode
    from bitsack.solver.schema import load_problem
    from bitsack.solver.solution import load_solution

    # before any work: refuse an output folder we would destroy
    check_output_dir(args.out, what="bitsack model folder", is_ours=is_model_dir,
                     force=args.force)
    problem = load_problem(args.problem)
    solution = load_solution(args.solution)
    if solution.problem != problem.name:
        raise ValidationError("solution.problem", f"{solution.problem!r} does not match the "
                              f"problem's name {problem.name!r}")
    plan = plan_from_solution(problem, solution)
    meta = problem.metadata or {}
    group_size = args.group_size or int(meta.get("group_size", 64))
    mlp_group = args.mlp_group or int(meta.get("mlp_group", 128))
    mode = progress_mode(quiet=args.json or args.quiet)
    scale_bits = args.scale_bits
    priced = solution.extra.get("scale_bits", meta.get("scale_bits"))
    if meta.get("format", "bitsack") == "compressed-tensors":  # it stores fp16 scales
        priced = None
        check_scale_format(meta.get("format"), None if scale_bits == "auto" else scale_bits)
    if scale_bits == "auto":  # as the solution was priced
        scale_bits = priced
    elif scale_bits != priced:
        print(f"bitsack compress: warning: --scale-bits {scale_bits or 'fp16'}, but the "
              f"solution was priced with {'scale_bits ' + str(priced) if priced else 'fp16 scales'}"
              ": its packed bytes will differ from the plan's (drop --scale-bits to pack as "
              "priced)", file=sys.stderr)
    # the grid the plan was priced for: the solution's record (solve --grid), else the
    # problem's (a gguf problem priced for symmetric grids)
    priced_grid = solution.extra.get("grid") or ("sym-hmse" if meta.get("symmetric") else None)
    grid = args.grid or priced_grid or "hmse"
    if priced_grid is not None and symmetric(priced_grid) != symmetric(grid):
        print(f"bitsack compress: warning: --grid {grid}, but the plan was priced for "
              f"{'symmetric' if symmetric(priced_grid) else 'min-max'} grids: its exported "
              "bytes will differ from the plan's (drop --grid to quantize as priced)",
              file=sys.stderr)
    cfg = ApplyConfig(quantizer=args.quantizer, group_size=group_size, mlp_group=mlp_group,
                      act_order=not args.no_act_order, scale_bits=scale_bits, grid=grid,
                      vocab_groups=int(meta.get("vocab_groups", 1)))
    with Progress("bitsack compress", unit="layers", mode=mode) as prog:
        prog.stage("loading the model")
        lm = load_model(args.model, progress=mode == "bar")
        calib = None
        if args.quantizer == "gptq":
            from bitsack.data import calibration_tokens

            prog.stage("calibration data")
            calib = calibration_tokens(args.calib, lm.tokenizer, args.nsamples, args.seqlen,
                                       seed=args.seed)
        prog.stage("compressing")
        result = compress(lm.model, plan, calib, cfg, progress=prog)
        prog.stage("saving")
        usage = solution.certificate.usage.get("memory_bytes")
        calibration = None if calib is None else {"spec": args.calib, "nsamples": args.nsamples,
                                                  "seqlen": args.seqlen, "seed": args.seed}
        out = save_compressed(lm.model, args.out, tokenizer=lm.tokenizer, force=args.force,
                              extra={"base_model": lm.source, "problem": problem.name,
                                     "solution_status": solution.status,
                                     "calibration": calibration, "plan_memory_bytes": usage})
    fmt = solution.extra.get("format", meta.get("format", "bitsack"))
    if usage is not None and fmt == "bitsack" and result.packed_bytes > usage * (1 + 1e-9):
        # the plan's budget was priced in other bytes (e.g. another --scale-bits)
        print(f"bitsack compress: warning: packed {result.packed_bytes:,} bytes, but the "
              f"solution was priced at {usage:,.0f}: over its budget", file=sys.stderr)
    summary = {"out": str(out), "packed_bytes": result.packed_bytes,
               "plan_memory_bytes": usage, "scale_bits": scale_bits,
               "untouched_units": list(result.untouched),
               "pruned_units": sum(1 for c in plan.values() if c.pruned),
               "timings_s": result.report["timings_s"]}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"compressed model written to {out}")
        print(f"packed weights: {result.packed_bytes} bytes (plan: {usage} bytes)")
        if result.untouched:
            print(f"left dense (not in the plan): {', '.join(result.untouched)}")
        print(f"pruned units: {summary['pruned_units']}; time "
              f"{result.report['timings_s']['total']:.1f} s")
    return 0
