"""``bitsack run``: the whole job as stage functions sharing one record of their inputs.

Methods (``RunConfig.method``):

- ``search`` (default): the measured trust-region search (``bitsack.search``): the solver
  proposes, KL to the base model on calibration tokens decides; starts from the best of the
  fitting uniform configurations and the one-shot Fisher plan;
- ``oneshot``: one solve of the profiled (Fisher) objective, then compression;
- ``uniform``: the best uniform configuration of the menu that fits the budget (the baseline
  every comparison uses, with the same quantizer and calibration);
- ``sequential``: prune first (the cheapest Fisher prunes the non-memory budgets need), then
  one solve of the bits (``bitsack.baselines``): the staged pipeline joint planning is
  compared with.

Every stage writes its files under the run directory and a record ``<stage>.stage.json``
holding the SHA-256 of its inputs (parameters and upstream files). A stage whose record
matches is not run again, so an interrupted or re-parameterised run redoes only what changed
(the search and its variant store also resume mid-way).

    out/
      profile/problem.yaml, profile.json          (bitsack.profiling; oneshot, search start)
      problem.yaml                                (oneshot / sequential: the problem solved)
      solution.json                               (the plan: solver certificate, search record)
      store/, search.json                         (bitsack.search)
      model/ (safetensors + bitsack.json)         (bitsack.apply, bitsack.checkpoint)
      eval_base.json, eval.json                   (bitsack.evaluate)
      summary.json, report.md, allocation.png
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bitsack.config import (
    METHODS,
    RUN_SCHEMA,
    UNIT_KINDS,
    Context,
    RunConfig,
    RunSummary,
    Stages,
    is_run_dir,
    plan_counts,
)
from bitsack.io import write_json

__all__ = ["METHODS", "RUN_SCHEMA", "UNIT_KINDS", "Context", "RunConfig", "RunSummary",
           "Stages", "evaluate_base", "is_run_dir", "plan_counts", "run"]

def run(cfg: RunConfig, progress: Callable[[str], None] | None = None,
        bars: bool = False, force: bool = False, loaded: Any = None) -> RunSummary:
    """Plan, compress and evaluate, reusing finished stages. See module docstring.

    ``cfg.out`` may be new, empty or an earlier run directory; another non-empty folder is
    refused unless ``force`` (then the run writes its files into it, deleting nothing else).
    ``loaded``: a ``bitsack.models.LoadedModel`` to use instead of loading ``cfg.model`` (it
    is consumed: its model becomes the compressed one).
    """
    import torch

    from bitsack.io import check_output_dir
    from bitsack.models.loading import load_model
    from bitsack.stages import (
        evaluate_stage,
        plan_stage,
        run_units,
        tensor_bytes,
    )

    say = progress or (lambda msg: None)
    out = check_output_dir(cfg.out, what="bitsack run directory", is_ours=is_run_dir,
                           force=force)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if loaded is None:
        say(f"loading {cfg.model}")
        lm = load_model(cfg.model, progress=bars)
    else:
        lm = loaded
    ctx = _context(cfg, out, lm, say, bars)
    units = run_units(lm.model, cfg)
    memory_before = tensor_bytes(lm.model)
    base = evaluate_stage(ctx, "eval_base", lm.model, lm.tokenizer, None)
    planned = plan_stage(ctx, lm, units, force=force)
    after = evaluate_stage(ctx, "eval", planned.model, lm.tokenizer, out / "model")
    ppl_before, ppl_after = base["ppl"], after["ppl"]
    measured = math.log(ppl_after) - math.log(ppl_before) if ppl_before and ppl_after else None
    params = sum(u.params for u in units) or None
    summary = RunSummary(
        out=str(out), method=cfg.method, plan_counts=plan_counts(units, planned.plan),
        certificate=planned.certificate, status=planned.status,
        predicted_loss_increase=planned.predicted, measured_loss_increase=measured,
        ppl_before=ppl_before, ppl_after=ppl_after, memory_before_bytes=memory_before,
        memory_after_bytes=tensor_bytes(planned.model),
        bits_per_weight=8 * planned.packed_bytes / params if params else None,
        packed_bytes=planned.packed_bytes,
        search={**planned.search, "seconds": planned.seconds} if planned.search and
        planned.seconds else planned.search,
        stage_seconds=dict(ctx.stages.seconds), reused=tuple(ctx.stages.reused))
    write_json(out / "summary.json", {"schema": RUN_SCHEMA, "config": _config_dict(cfg),
                                      **asdict(summary)})
    from bitsack.report import write_report

    write_report(out, cfg, units, planned, summary)
    return summary


def evaluate_base(cfg: RunConfig, progress: Callable[[str], None] | None = None
                  ) -> tuple[Any, dict[str, Any]]:
    """Only ``run``'s ``eval_base`` stage, in ``cfg.out`` (reused when its inputs match):
    the loaded model and the stage's record (``ppl`` …). Benchmarks evaluate the base model
    once this way and copy the record into each run directory."""
    from bitsack.models.loading import load_model
    from bitsack.stages import evaluate_stage

    say = progress or (lambda msg: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(cfg.model, progress=False)
    record = evaluate_stage(_context(cfg, out, lm, say, False), "eval_base", lm.model,
                            lm.tokenizer, None)
    return lm, record


def _context(cfg: RunConfig, out: Path, lm: Any, say: Callable[[str], None],
             bars: bool) -> Context:
    return Context(cfg, out, Stages(out, say), say, bars,
                   {k: lm.source.get(k) for k in ("kind", "spec", "path", "gguf_file",
                                                   "sha256")})


def _config_dict(cfg: RunConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["budget"] = cfg.budget.to_dict()
    return d


