"""``profile``: model + units + calibration tokens -> problem + report; ``write_profile``."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bitsack.errors import ValidationError
from bitsack.models import get_adapter
from bitsack.models.base import UnitSpec
from bitsack.profiling.build import (
    INTERACTIONS_FILE,
    build_problem,
    jsonable,
    make_cost_models,
    unit_shapes,
)
from bitsack.profiling.capture import ResourceMeter, check_tokens
from bitsack.profiling.distributed import Dist
from bitsack.profiling.estimators import Context, EstimatorOptions, get_estimator
from bitsack.profiling.layout import OptionLayout
from bitsack.profiling.perturb import QUANTIZERS
from bitsack.solver.costs.formats import (
    check_format,
    geometry_metadata,
    retarget,
    stores_pruned,
    target_options,
)
from bitsack.solver.problem import Problem

PROFILE_SCHEMA = "bitsack.profile/v1"


@dataclass(frozen=True, eq=False)
class ProfileResult:
    """A profile: the problem to solve and what went into it.

    Attributes:
        problem: the ``bitsack.problem/v1`` instance (losses, costs, interactions, metadata).
        report: JSON-able record written to ``profile.json``: model, data, estimator and its
            options, seed, timings per phase, peak memory, calibration fit, estimator facts.
    """

    problem: Problem
    report: dict[str, Any] = field(default_factory=dict)


def _infer_mlp_group(units: Sequence[UnitSpec]) -> int | None:
    widths = [s.shape[1] for u in units if u.kind == "mlp_group" for s in u.slices if s.dim == 1]
    return max(widths) if widths else None


def profile(model: torch.nn.Module, units: Sequence[UnitSpec], calib_tokens: torch.Tensor, *,
            estimator: str = "fisher", bits: Sequence[int] = (1, 2, 3, 4, 8),
            group_size: int = 64, quantizer: str = "rtn",
            cost_models: Sequence[str] = ("memory", "roofline"),
            cost_model_args: Mapping[str, Mapping[str, Any]] | None = None, seed: int = 0,
            progress: bool = True, metadata: Mapping[str, Any] | None = None,
            options: EstimatorOptions | None = None,
            holdout_tokens: torch.Tensor | None = None, dist: Dist | None = None,
            name: str | None = None, format: str = "bitsack") -> ProfileResult:  # noqa: A002
    """Estimate every unit's options and build the problem.

    Args:
        model: a transformers causal LM of a supported architecture (unpruned).
        units: the adapter's units (``bitsack.models.model_units``), possibly filtered.
        calib_tokens: ``[nsamples, seqlen]`` calibration token ids (all ranks pass the same).
        estimator: ``fisher`` (default), ``fisher-diag``, ``hutchinson``, ``layerwise``,
            ``measured``, ``calibrated`` (see ``bitsack.profiling.estimators``).
        bits: bit-widths offered besides ``b16`` (which is always offered) and ``prune``.
        group_size: quantization group size along the input dimension.
        quantizer: ``rtn`` (min-max round to nearest) or ``gptq`` (one-shot per matrix).
        cost_models: registered cost models giving the options' costs.
        cost_model_args: keyword arguments per cost model, e.g.
            ``{"roofline": {"device": "h200"}}``.
        seed: seeds sampled labels, probes and subsets.
        progress: progress bars on stderr (rank 0 only).
        metadata: extra problem metadata (e.g. ``model``, ``calib``, ``mlp_group``).
        options: estimator knobs.
        holdout_tokens: sequences for ``measured`` (default: ``calibrated`` holds out the
            last ``options.holdout`` calibration sequences; ``measured`` uses them all).
        dist: process group (default: from the environment, e.g. under torchrun).
        name: problem name (default ``<model name>-<estimator>``).
        format: the target file format (``bitsack.solver.costs.formats``): ``bitsack``
            (default: any mix inside a matrix), ``compressed-tensors`` or ``gguf`` (only the
            options the format stores are estimated; ``memory_bytes`` in its bytes; one
            option per matrix by constraints).

    Returns:
        The ``ProfileResult``.

    Raises:
        ValidationError: a bad argument (names the field and what is valid).
        NumericalError: a non-finite estimate (names the unit and option).
        ModelError: units that do not belong to the model or misaligned group size.
    """
    t_start = time.perf_counter()
    opts = options or EstimatorOptions()
    get_estimator(estimator)
    if quantizer not in QUANTIZERS:
        raise ValidationError("quantizer", f"{quantizer!r}; valid: {', '.join(QUANTIZERS)}")
    tokens = check_tokens(calib_tokens)
    check_format(format)
    shapes = {s.id: s for s in unit_shapes(model, units)}
    layout = OptionLayout.build(units, bits, prune=stores_pruned(format, list(shapes.values())))
    models = make_cost_models(cost_models, cost_model_args)
    left_out: dict[str, str] = {}
    if format != "bitsack":
        allowed = target_options(format, list(shapes.values()),
                                 dict(zip([u.id for u in layout.units], layout.option_ids,
                                          strict=True)), group_size, left_out)
        layout = OptionLayout(layout.units, tuple(allowed[u.id] for u in layout.units))
    dist = dist or Dist.from_env()
    grad_tokens, holdout = tokens, None
    if holdout_tokens is not None:
        holdout = check_tokens(holdout_tokens, "holdout_tokens")
    elif estimator == "calibrated":
        k = opts.holdout or max(1, tokens.shape[0] // 4)
        if k >= tokens.shape[0]:
            raise ValidationError("holdout", f"{k} of {tokens.shape[0]} calibration sequences; "
                                  "valid: fewer than nsamples (calibrated needs sequences for "
                                  "both gradients and measurement)")
        grad_tokens, holdout = tokens[:-k], tokens[-k:]
    device = next(model.parameters()).device
    meter = ResourceMeter().start(device)
    ctx = Context(model=model, layout=layout, tokens=grad_tokens, group_size=group_size,
                  quantizer=quantizer, options=opts, holdout=holdout, seed=seed, dist=dist,
                  progress=progress, meter=meter)
    was_training = model.training
    model.eval()
    try:
        est = get_estimator(estimator)(ctx)
    finally:
        model.train(was_training)
    adapter = get_adapter(model)
    with meter.phase("build"):
        unit_list = [shapes[u.id] for u in est.layout.units]
        meta: dict[str, Any] = {
            "estimator": estimator,
            "quantizer": quantizer,
            "group_size": group_size,
            "mlp_group": _infer_mlp_group(units),
            "bits": sorted({int(o[1:]) for ids in layout.option_ids for o in ids if o != "prune"}),
            "adapter": type(adapter).__name__,
            "model_type": model.config.model_type,
            "loss_units": ("squared activation error per token" if estimator == "layerwise"
                           else "nats/token"),
            "seed": seed,
            "nsamples": int(tokens.shape[0]),
            "seqlen": int(tokens.shape[1]),
            "cost_models": [m.describe() for m in models],
        }
        if ctx.perturbations_ready and ctx.perturbations.rtn_fallback:
            meta["rtn_fallback"] = list(ctx.perturbations.rtn_fallback)
        if "calibration" in est.info:
            meta["calibration"] = est.info["calibration"]
        if est.layout is not layout:
            meta["units_subset"] = len(est.layout.units)
        meta.update(dict(metadata or {}))
        meta["geometry"] = geometry_metadata(unit_list)
        if left_out:
            meta["format_left_out"] = dict(sorted(left_out.items()))
        meta = jsonable(meta)
        pname = name or f"{_model_name(model)}-{estimator}"
        problem = build_problem(est.layout, est.loss, est.U, shapes=unit_list,
                                group_size=group_size, cost_models=models, name=pname,
                                metadata=meta)
        problem = retarget(problem, format, unit_list)
    report = {
        "schema": PROFILE_SCHEMA,
        "model": meta.get("model", _model_name(model)),
        "model_type": model.config.model_type,
        "data": {"calib": meta.get("calib"), "nsamples": int(tokens.shape[0]),
                 "seqlen": int(tokens.shape[1]),
                 "gradient_sequences": int(grad_tokens.shape[0]),
                 "heldout_sequences": None if holdout is None else int(holdout.shape[0])},
        "estimator": estimator,
        "format": format,
        "estimator_options": jsonable(dataclasses.asdict(opts)),
        "quantizer": quantizer,
        "group_size": group_size,
        "bits": meta["bits"],
        "seed": seed,
        "units": len(est.layout.units),
        "options": est.layout.n_options,
        "interaction_rows": None if est.U is None else int(est.U.shape[0]),
        "estimate": jsonable(est.info),
        "calibration": meta.get("calibration"),
        "resources": {**meter.describe(), "wall_s": round(time.perf_counter() - t_start, 3),
                      "delta_bytes": ctx.perturbations.nbytes if ctx.perturbations_ready
                      else 0},
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(device), "cpus": os.cpu_count(),
                    "platform": platform.platform(), **dist.describe()},
    }
    return ProfileResult(problem, jsonable(report))


def _model_name(model: torch.nn.Module) -> str:
    path = str(getattr(model.config, "_name_or_path", "") or "")
    base = Path(path).name if path else ""
    return base or str(model.config.model_type)


def write_profile(result: ProfileResult, out_dir: str | os.PathLike) -> Path:
    """Write ``problem.yaml``, ``interactions.npz`` (when U exists) and ``profile.json``.

    Every file is written atomically (a temporary file renamed into place); the sidecar is
    written before the problem that names it. A stale ``interactions.npz`` from an earlier
    profile without interactions is removed.

    Returns:
        The path of ``problem.yaml``.
    """
    from bitsack.io import write_json
    from bitsack.solver.schema import dump_problem

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problem_file = out / "problem.yaml"
    dump_problem(result.problem, problem_file)
    inter = result.problem.interactions
    if inter is None or inter.U is None:
        stale = out / INTERACTIONS_FILE
        if stale.is_file():
            stale.unlink()
    write_json(out / "profile.json", result.report)
    return problem_file


__all__ = ["ProfileResult", "profile", "write_profile", "EstimatorOptions"]
