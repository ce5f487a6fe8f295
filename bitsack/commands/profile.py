"""``bitsack profile``: model + calibration text -> problem.yaml, interactions.npz, profile.json."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from bitsack.commands._args import (
    BITS_LIST,
    DTYPES,
    FRACTION,
    GROUP,
    POSITIVE_INT,
    SEED,
    SEQLEN,
    VOCAB_GROUPS,
    VOCAB_GROUPS_HELP,
    integer,
    name_list,
)

UNIT_KINDS = {"heads": "head_group", "mlp": "mlp_group", "embed": "embedding"}
#: Local processes of a profile.
NPROC = integer(1, 256, what="a number of processes")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "profile", help="estimate every unit's loss per option and write the problem",
        description="Profile MODEL on calibration text: the predicted global-loss increase of "
        "every unit (head group, MLP block, embedding) under every option (prune, b<k>, b16), "
        "with costs from cost models. Writes OUT/problem.yaml, OUT/interactions.npz (fisher) "
        "and OUT/profile.json.")
    p.add_argument("--model", required=True, help="'default' (SmolLM2-135M GGUF), a .gguf "
                   "file, a checkpoint directory, or a hub id")
    p.add_argument("--calib", default="c4", help="wikitext2 | c4 | a text file (default c4)")
    p.add_argument("--estimator", default="fisher", choices=["fisher", "fisher-diag",
                   "hutchinson", "layerwise", "measured", "calibrated"],
                   help="how losses are estimated (default fisher; see the README)")
    p.add_argument("--bits", type=BITS_LIST, default=[1, 2, 3, 4, 8],
                   help=f"bit-widths offered besides b16 (default 1,2,3,4,8; {BITS_LIST.valid})")
    p.add_argument("--group-size", type=GROUP, default=64,
                   help="quantization group size (default 64)")
    p.add_argument("--units", type=name_list(UNIT_KINDS), default=["heads", "mlp", "embed"],
                   help="unit kinds: heads,mlp[,embed] (default heads,mlp,embed)")
    p.add_argument("--mlp-group", type=GROUP, default=128,
                   help="MLP channels per unit (default 128)")
    p.add_argument("--vocab-groups", type=VOCAB_GROUPS, default=1, metavar="N",
                   help=VOCAB_GROUPS_HELP)
    p.add_argument("--nsamples", type=POSITIVE_INT, default=64,
                   help="calibration sequences (default 64)")
    p.add_argument("--seqlen", type=SEQLEN, default=256,
                   help=f"tokens per sequence (default 256; {SEQLEN.valid})")
    p.add_argument("--quantizer", default="rtn", choices=["rtn", "gptq"],
                   help="quantizer of the perturbations (default rtn)")
    from bitsack.commands._args import add_format_arg

    add_format_arg(p)
    from bitsack.commands._args import add_scale_bits_arg

    add_scale_bits_arg(p, "memory_bytes priced with them, recorded in the problem's metadata "
                       "for `bitsack compress` (default auto: 6 with --format bitsack, fp16 "
                       "scales with a format that stores them)")
    p.add_argument("--cost-model", action="append", dest="cost_models", metavar="NAME",
                   help="cost model (repeatable; default memory and roofline)")
    p.add_argument("--device", default="h200", help="roofline device table entry (h200, "
                   "a100, l40, cpu-2c)")
    p.add_argument("--latency-table", default=None, help="JSON table for --cost-model "
                   "latency-table")
    p.add_argument("--torch-device", default="cpu", help="where the model runs (default cpu)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="model dtype (default: the checkpoint's)")
    p.add_argument("--fisher-labels", default="sampled", choices=["sampled", "data"],
                   help="labels of the Fisher gradients: sampled from the model (default) or "
                   "the data (empirical Fisher)")
    p.add_argument("--fisher-draws", type=POSITIVE_INT, default=1,
                   help="label draws per sequence (default 1)")
    p.add_argument("--fisher-chunks", type=POSITIVE_INT, default=1,
                   help="gradients per sequence (positions split in chunks; 1 = per sequence)")
    p.add_argument("--first-order", default="off", choices=["off", "significant", "on"],
                   help="first-order term (default off)")
    p.add_argument("--measure-subset", type=FRACTION, default=None, metavar="FRACTION",
                   help=f"measured: a seeded fraction of the units ({FRACTION.valid})")
    p.add_argument("--holdout", type=POSITIVE_INT, default=None,
                   help="calibrated: sequences held out for measurement (default nsamples/4)")
    p.add_argument("--calibrate-fraction", type=FRACTION, default=0.1,
                   help="calibrated: fraction of units measured per kind (default 0.1)")
    p.add_argument("--hutchinson-probes", type=POSITIVE_INT, default=4,
                   help="hutchinson: Rademacher probes per sample (default 4)")
    p.add_argument("--hutchinson-samples", type=POSITIVE_INT, default=8,
                   help="hutchinson: calibration sequences used (default 8)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8,
                   help="sequences per forward pass (default 8)")
    p.add_argument("--nproc", type=NPROC, default=1, help="local processes (gloo); under "
                   f"torchrun the group comes from the environment ({NPROC.valid})")
    p.add_argument("--seed", type=SEED, default=0, help="seeds sampled labels, probes and "
                   "subsets (default 0)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object, "
                   "no progress")
    p.add_argument("--quiet", action="store_true", help="print nothing on success, no "
                   "progress")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _rank_main(dist, cfg: dict[str, Any], stage: Callable[[str], None] | None = None):
    """One process's profile (module-level so spawned processes can import it); ``stage``
    is told each coarse step (``Progress.stage``)."""
    from bitsack.data import calibration_tokens
    from bitsack.models import model_units
    from bitsack.models.loading import load_model
    from bitsack.profiling.estimators import EstimatorOptions
    from bitsack.profiling.run import profile

    progress = cfg["_progress"] and dist.is_main
    say = stage or (lambda name: None)
    say("loading the model")
    lm = load_model(cfg["model"], dtype=cfg["dtype"], device=cfg["torch_device"],
                    progress=progress)
    kinds = {UNIT_KINDS[k] for k in cfg["units"]}
    units = [u for u in model_units(lm.model, mlp_group=cfg["mlp_group"],
                                    embeddings="embed" in cfg["units"],
                                    vocab_groups=cfg["vocab_groups"]) if u.kind in kinds]
    say("calibration data")
    calib = calibration_tokens(cfg["calib"], lm.tokenizer, cfg["nsamples"], cfg["seqlen"],
                               seed=cfg["seed"])
    opts = EstimatorOptions(
        fisher_labels=cfg["fisher_labels"], fisher_draws=cfg["fisher_draws"],
        fisher_chunks=cfg["fisher_chunks"], first_order=cfg["first_order"],
        measure_fraction=cfg["measure_subset"], holdout=cfg["holdout"],
        calibrate_fraction=cfg["calibrate_fraction"],
        hutchinson_probes=cfg["hutchinson_probes"],
        hutchinson_samples=cfg["hutchinson_samples"], batch_size=cfg["batch_size"])
    cost_models = cfg["cost_models"] or ["memory", "roofline"]
    cm_args: dict[str, dict[str, Any]] = {"roofline": {"device": cfg["device"]}}
    if cfg["latency_table"]:
        cm_args["latency-table"] = {"path": cfg["latency_table"]}
    extra = {}
    if cfg["scale_bits"] is not None:
        cm_args["memory"] = {"scale_bits": cfg["scale_bits"]}
        extra["scale_bits"] = cfg["scale_bits"]
    if cfg["vocab_groups"] != 1:
        extra["vocab_groups"] = cfg["vocab_groups"]
    model_id = {k: lm.source.get(k) for k in ("kind", "spec", "path", "gguf_file", "sha256")}
    say(f"estimating ({cfg['estimator']}, {len(units)} units)")
    return profile(lm.model, units, calib, estimator=cfg["estimator"], bits=cfg["bits"],
                   group_size=cfg["group_size"], quantizer=cfg["quantizer"],
                   cost_models=cost_models, cost_model_args=cm_args, seed=cfg["seed"],
                   progress=progress, options=opts, dist=dist, format=cfg["format"],
                   metadata={"model": model_id, "calib": cfg["calib"],
                             "mlp_group": cfg["mlp_group"], **extra})


def run(args: argparse.Namespace) -> int:
    from bitsack.commands._args import check_scale_format
    from bitsack.config import resolve_scale_bits
    from bitsack.profiling.distributed import Dist, spawn
    from bitsack.profiling.run import write_profile
    from bitsack.progress import Progress, progress_mode

    args.scale_bits = resolve_scale_bits(args.scale_bits, args.format)
    check_scale_format(args.format, args.scale_bits)
    if args.vocab_groups != 1 and "embed" not in args.units:
        from bitsack.errors import ValidationError

        raise ValidationError("--vocab-groups", f"{args.vocab_groups} with --units "
                              f"{','.join(args.units)}, which leave the embedding out; "
                              "valid: 1, or add embed to --units")
    cfg = _config(args)
    mode = progress_mode(quiet=args.json or args.quiet)
    # on a terminal the estimators draw their own bars; in a log, a line every 30 s says
    # which step runs and for how long (profiling reports no counts to the command yet)
    cfg["_progress"] = mode == "bar"
    lines = "lines" if mode == "lines" else "off"
    if args.nproc > 1:
        with Progress("bitsack profile", mode=lines) as prog:
            prog.stage(f"profiling in {args.nproc} processes")
            result = spawn(args.nproc, _rank_main, cfg)
        is_main = True
    else:
        dist = Dist.from_env()
        with Progress("bitsack profile", mode=lines if dist.is_main else "off") as prog:
            result = _rank_main(dist, cfg, stage=prog.stage)
        is_main = dist.is_main
    if not is_main:
        return 0
    problem_file = write_profile(result, args.out)
    rep = result.report
    if args.json:
        print(json.dumps({"problem": str(problem_file), "report": rep}, indent=2))
    elif not args.quiet:
        res = rep["resources"]
        print(f"profiled {rep['units']} units, {rep['options']} options with {rep['estimator']}"
              f" on {rep['data']['nsamples']} x {rep['data']['seqlen']} tokens of "
              f"{rep['data']['calib']} in {res['wall_s']:.1f} s (peak memory "
              f"{res['peak_memory_bytes'] / 2**30:.2f} GiB)")
        print(f"wrote {problem_file}" + (f", {problem_file.parent / 'interactions.npz'}"
                                         if rep["interaction_rows"] else "")
              + f", {problem_file.parent / 'profile.json'}")
    return 0
