"""``bitsack run``: profile → solve → compress → evaluate, resumable, with a summary.

Every stage writes its files under the run directory and a record ``<stage>.stage.json``
holding the SHA-256 of its inputs (parameters and upstream files). A stage whose record
matches is not run again, so an interrupted or re-parameterised run redoes only what changed.

    out/
      profile/problem.yaml, interactions.npz, profile.json     (bitsack.profiling)
      solution.json                                             (bitsack.solver)
      model/ (safetensors + bitsack.json)                       (bitsack.apply)
      eval_base.json, eval.json                                 (bitsack.evaluate)
      summary.json, report.md, allocation.png, frontier.png
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bitsack.errors import ValidationError
from bitsack.io import file_sha256, json_digest, write_json

RUN_SCHEMA = "bitsack.run/v1"
#: ``--units`` names -> the adapters' unit kinds.
UNIT_KINDS = {"heads": "head_group", "mlp": "mlp_group", "embed": "embedding"}


@dataclass(frozen=True)
class RunConfig:
    """Everything ``bitsack run`` needs; the CLI flags mirror these fields.

    Budgets: ``avg_bits`` (bits per original weight, overhead included, on ``memory_bytes``)
    and/or explicit ``budgets`` {resource: limit}.

    ``interactions`` weighs the profile's interaction terms in the objective
    (``bitsack.solver.with_interaction_weight``): 0 (default) solves the additive objective.
    Measured on SmolLM2-135M at 3.5 bits/weight with 16 Fisher rows, weight 1 let the solver
    prune 426 of 451 units at a predicted +0.08 nats/token (errors cancelling in the 16
    sampled directions) while the real loss rose by 18.6 nats; the additive objective is the
    faithful default until the factor has many more rows than the plan has free units.

    ``profile_quantizer`` (default: the apply ``quantizer``) makes the profile's weight
    perturbations. Profiling with the quantizer that will be applied matters: with RTN
    perturbations and GPTQ apply, SmolLM2-135M at 3.5 bits/weight scored WikiText-2 ppl 121
    (quantization looks as costly as RTN makes it, so the plan pruned 64 units); with
    one-shot GPTQ perturbations 79 (25 units pruned), bench/results/e2e.md.
    """

    model: str = "default"
    out: str = "bitsack-run"
    avg_bits: float | None = None
    budgets: dict[str, float] = field(default_factory=dict)
    calib: str = "c4"
    eval: str = "wikitext2"
    estimator: str = "fisher"
    interactions: float = 0.0
    prune: bool = True
    profile_quantizer: str | None = None
    bits: tuple[int, ...] = (2, 3, 4, 8)
    units: tuple[str, ...] = ("heads", "mlp", "embed")
    group_size: int = 64
    mlp_group: int = 128
    profile_nsamples: int = 32
    profile_seqlen: int = 256
    cost_models: tuple[str, ...] = ("memory", "roofline")
    device: str = "h200"
    solver: str = "auto"
    time_limit_s: float = 60.0
    gap: float = 1e-4
    quantizer: str = "gptq"
    compress_nsamples: int = 32
    compress_seqlen: int = 512
    eval_seqlen: int = 2048
    eval_windows: int | None = 8
    frontier_points: int = 8
    seed: int = 0

    @property
    def perturbation_quantizer(self) -> str:
        """The quantizer of the profile's perturbations."""
        return self.profile_quantizer or self.quantizer

    def __post_init__(self) -> None:
        if self.avg_bits is None and not self.budgets:
            raise ValidationError("budget", "none given; valid: --avg-bits B and/or "
                                  "--budget RESOURCE=VALUE")
        if self.avg_bits is not None and not 0 < self.avg_bits <= 16:
            raise ValidationError("avg_bits", f"{self.avg_bits}; valid: a number in (0, 16]")
        for name, value in self.budgets.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValidationError(f"budgets.{name}", f"{value!r}; valid: a positive number")
        bad = [u for u in self.units if u not in UNIT_KINDS]
        if bad or not self.units:
            raise ValidationError("units", f"{list(self.units)}; valid: a non-empty subset of "
                                  f"{', '.join(UNIT_KINDS)}")
        for name in ("profile_nsamples", "profile_seqlen", "compress_nsamples",
                     "compress_seqlen", "eval_seqlen", "group_size", "mlp_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValidationError(name, f"{value!r}; valid: a positive integer")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise ValidationError("eval_windows", f"{self.eval_windows}; valid: a positive "
                                  "integer or None (all windows)")
        if isinstance(self.interactions, bool) or not 0.0 <= self.interactions <= 1.0:
            raise ValidationError("interactions", f"{self.interactions!r}; valid: a weight in "
                                  "[0, 1] (0 = additive objective)")
        if self.profile_quantizer not in (None, "gptq", "rtn"):
            raise ValidationError("profile_quantizer", f"{self.profile_quantizer!r}; valid: "
                                  "gptq, rtn, or None (the apply quantizer)")
        if self.quantizer not in ("gptq", "rtn"):
            raise ValidationError("quantizer", f"{self.quantizer!r}; valid: gptq, rtn")


@dataclass(frozen=True)
class RunSummary:
    """What a run produced (also written as ``summary.json``)."""

    out: str
    plan_counts: dict[str, dict[str, int]]
    certificate: dict[str, Any]
    status: str
    predicted_loss_increase: float | None
    measured_loss_increase: float | None
    ppl_before: float | None
    ppl_after: float | None
    memory_before_bytes: int
    memory_after_bytes: int | None
    bits_per_weight: float | None
    stage_seconds: dict[str, float]
    reused: tuple[str, ...]


class _Stages:
    """Stage records: skip a stage whose inputs hash to what its record says."""

    def __init__(self, out: Path, progress: Callable[[str], None]):
        self.out = out
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self.reused: list[str] = []

    def done(self, name: str, inputs: Mapping[str, Any], outputs: Sequence[Path]) -> bool:
        rec = self.out / f"{name}.stage.json"
        if not rec.is_file() or not all(p.exists() for p in outputs):
            return False
        try:
            saved = json.loads(rec.read_text())
        except json.JSONDecodeError:
            return False
        if saved.get("inputs_sha256") != json_digest(inputs):
            return False
        self.reused.append(name)
        self.seconds[name] = 0.0
        self.progress(f"{name}: reusing {', '.join(p.name for p in outputs)} (inputs unchanged)")
        return True

    def record(self, name: str, inputs: Mapping[str, Any], seconds: float) -> None:
        self.seconds[name] = seconds
        write_json(self.out / f"{name}.stage.json",
                   {"stage": name, "inputs_sha256": json_digest(inputs), "inputs": inputs,
                    "seconds": seconds})


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a ``bitsack run`` directory (it holds stage records)."""
    return any(path.glob("*.stage.json")) or (path / "summary.json").is_file()


def run(cfg: RunConfig, progress: Callable[[str], None] | None = None,
        bars: bool = False, force: bool = False) -> RunSummary:
    """Profile, solve, compress and evaluate, reusing finished stages. See module docstring.

    ``cfg.out`` may be new, empty or an earlier run directory; another non-empty folder is
    refused unless ``force`` (then the run writes its files into it, deleting nothing else).
    """
    import torch

    from bitsack.apply import (
        ApplyConfig,
        cache_dequantized,
        compress,
        plan_from_solution,
        save_compressed,
    )
    from bitsack.data import calibration_tokens, eval_tokens
    from bitsack.evaluate import perplexity
    from bitsack.io import check_output_dir
    from bitsack.models import model_units
    from bitsack.models.loading import load_model
    from bitsack.solver import solve
    from bitsack.solver.backends import SolveOptions
    from bitsack.solver.schema import (
        avg_bits_limit,
        load_problem,
        with_interaction_weight,
        with_limits,
        without_option,
    )
    from bitsack.solver.solution import Solution, load_solution

    say = progress or (lambda msg: None)
    out = check_output_dir(cfg.out, what="bitsack run directory", is_ours=is_run_dir,
                           force=force)
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(out, say)
    torch.manual_seed(cfg.seed)

    say(f"loading {cfg.model}")
    lm = load_model(cfg.model, progress=bars)
    model_id = {k: lm.source.get(k) for k in ("kind", "spec", "path", "gguf_file", "sha256")}

    # ---- profile -------------------------------------------------------------------
    prof_dir = out / "profile"
    prof_inputs = {"model": model_id, "calib": cfg.calib, "estimator": cfg.estimator,
                   "quantizer": cfg.perturbation_quantizer, "bits": list(cfg.bits),
                   "units": list(cfg.units),
                   "group_size": cfg.group_size, "mlp_group": cfg.mlp_group,
                   "nsamples": cfg.profile_nsamples, "seqlen": cfg.profile_seqlen,
                   "cost_models": list(cfg.cost_models), "device": cfg.device, "seed": cfg.seed}
    problem_file = prof_dir / "problem.yaml"
    if not stages.done("profile", prof_inputs, [problem_file]):
        from bitsack.profiling import profile, write_profile

        say(f"profile: {cfg.estimator} on {cfg.profile_nsamples} x {cfg.profile_seqlen} "
            f"tokens of {cfg.calib}")
        t = time.perf_counter()
        units = model_units(lm.model, mlp_group=cfg.mlp_group,
                            embeddings="embed" in cfg.units)
        kinds = {UNIT_KINDS[k] for k in cfg.units}
        units = [u for u in units if u.kind in kinds]
        calib = calibration_tokens(cfg.calib, lm.tokenizer, cfg.profile_nsamples,
                                   cfg.profile_seqlen, seed=cfg.seed)
        result = profile(lm.model, units, calib, estimator=cfg.estimator, bits=cfg.bits,
                         group_size=cfg.group_size, quantizer=cfg.perturbation_quantizer,
                         cost_models=cfg.cost_models,
                         cost_model_args={"roofline": {"device": cfg.device}},
                         seed=cfg.seed, progress=bars,
                         metadata={"model": model_id, "calib": cfg.calib,
                                   "mlp_group": cfg.mlp_group})
        write_profile(result, prof_dir)
        stages.record("profile", prof_inputs, time.perf_counter() - t)
    problem = load_problem(problem_file)

    # ---- solve ---------------------------------------------------------------------
    limits = dict(cfg.budgets)
    if cfg.avg_bits is not None:
        limits["memory_bytes"] = min(limits.get("memory_bytes", math.inf),
                                     avg_bits_limit(problem, cfg.avg_bits))
    sol_file = out / "solution.json"
    solve_inputs = {"problem": file_sha256(problem_file), "limits": limits,
                    "interactions": cfg.interactions, "prune": cfg.prune, "solver": cfg.solver,
                    "time_limit_s": cfg.time_limit_s, "gap": cfg.gap, "seed": cfg.seed}
    budgeted = with_interaction_weight(with_limits(problem, limits), cfg.interactions)
    if not cfg.prune:
        budgeted = without_option(budgeted, "prune")
    if not stages.done("solve", solve_inputs, [sol_file]):
        say(f"solve: {cfg.solver}, limits {limits}")
        t = time.perf_counter()
        solution = solve(budgeted, cfg.solver, SolveOptions(
            time_limit_s=cfg.time_limit_s, rel_gap=cfg.gap, seed=cfg.seed))
        write_json(sol_file, solution.to_dict())
        stages.record("solve", solve_inputs, time.perf_counter() - t)
    solution: Solution = load_solution(sol_file)
    if not solution.has_solution:
        raise ValidationError("budget", f"no plan: {solution.status}: {solution.message}")
    plan = plan_from_solution(problem, solution)

    # ---- compress ------------------------------------------------------------------
    model_dir = out / "model"
    comp_inputs = {"model": model_id, "solution": file_sha256(sol_file),
                   "quantizer": cfg.quantizer, "calib": cfg.calib,
                   "nsamples": cfg.compress_nsamples, "seqlen": cfg.compress_seqlen,
                   "group_size": cfg.group_size, "mlp_group": cfg.mlp_group, "seed": cfg.seed}
    memory_before = _tensor_bytes(lm.model)
    eval_toks = None
    base_file = out / "eval_base.json"
    base_inputs = {"model": model_id, "eval": cfg.eval, "seqlen": cfg.eval_seqlen,
                   "windows": cfg.eval_windows}
    if not stages.done("eval_base", base_inputs, [base_file]):
        say(f"eval: base model on {cfg.eval}")
        t = time.perf_counter()
        eval_toks = eval_tokens(cfg.eval, lm.tokenizer)
        base = perplexity(lm.model, eval_toks, cfg.eval_seqlen, windows=cfg.eval_windows,
                          progress=bars)
        write_json(base_file, base.to_dict())
        stages.record("eval_base", base_inputs, time.perf_counter() - t)
    base_ppl = json.loads(base_file.read_text())["ppl"]
    if not stages.done("compress", comp_inputs, [model_dir / "bitsack.json"]):
        say(f"compress: {cfg.quantizer}, {sum(c.pruned for c in plan.values())} units pruned")
        t = time.perf_counter()
        calib = None
        if cfg.quantizer == "gptq":
            calib = calibration_tokens(cfg.calib, lm.tokenizer, cfg.compress_nsamples,
                                       cfg.compress_seqlen, seed=cfg.seed + 1)
        compress(lm.model, plan, calib, ApplyConfig(
            quantizer=cfg.quantizer, group_size=cfg.group_size, mlp_group=cfg.mlp_group),
            progress=_layer_progress(say))
        save_compressed(lm.model, model_dir, tokenizer=lm.tokenizer,
                        extra={"base_model": model_id, "problem": problem.name}, force=force)
        stages.record("compress", comp_inputs, time.perf_counter() - t)
        compressed = lm.model
    else:
        from bitsack.apply import load_compressed

        compressed = load_compressed(model_dir).model
    cache_dequantized(compressed)  # CPU evaluation speed; outputs unchanged
    memory_after = _tensor_bytes(compressed)

    # ---- evaluate ------------------------------------------------------------------
    eval_file = out / "eval.json"
    eval_inputs = {"model_dir": file_sha256(model_dir / "model.safetensors"),
                   "eval": cfg.eval, "seqlen": cfg.eval_seqlen, "windows": cfg.eval_windows}
    if not stages.done("eval", eval_inputs, [eval_file]):
        say(f"eval: compressed model on {cfg.eval}")
        t = time.perf_counter()
        if eval_toks is None:
            eval_toks = eval_tokens(cfg.eval, lm.tokenizer)
        res = perplexity(compressed, eval_toks, cfg.eval_seqlen, windows=cfg.eval_windows,
                         progress=bars)
        write_json(eval_file, res.to_dict())
        stages.record("eval", eval_inputs, time.perf_counter() - t)
    after = json.loads(eval_file.read_text())
    ppl_after = after["ppl"]

    predicted = solution.objective
    measured = math.log(ppl_after) - math.log(base_ppl) if base_ppl and ppl_after else None
    params = problem.total_params or None
    summary = RunSummary(
        out=str(out), plan_counts=plan_counts(problem, plan),
        certificate=asdict(solution.certificate), status=solution.status,
        predicted_loss_increase=predicted, measured_loss_increase=measured,
        ppl_before=base_ppl, ppl_after=ppl_after, memory_before_bytes=memory_before,
        memory_after_bytes=memory_after,
        bits_per_weight=(8 * solution.certificate.usage.get("memory_bytes", 0) / params
                         if params else None),
        stage_seconds=dict(stages.seconds), reused=tuple(stages.reused))
    write_json(out / "summary.json", {"schema": RUN_SCHEMA, "config": asdict(cfg),
                                      **asdict(summary)})
    from bitsack.report import write_report

    write_report(out, cfg, budgeted, solution, summary, frontier_points=cfg.frontier_points)
    return summary


def _layer_progress(say: Callable[[str], None]) -> Callable[[str, int, int], None]:
    """A compress progress callback that reports every tenth of the layers."""
    last = [-1]

    def tick(stage: str, done: int, total: int) -> None:
        step = max(1, total // 10)
        if done == total or done // step != last[0]:
            last[0] = done // step
            say(f"compress: {stage} {done}/{total}")

    return tick


def _tensor_bytes(model) -> int:
    """Bytes of a model's tensors as held (parameters and buffers: packed codes, scales, norms),
    shared tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def plan_counts(problem, plan: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Unit kind -> option id ('prune', 'b4', 'b3g128', ...) -> count."""
    out: dict[str, dict[str, int]] = {}
    for unit in problem.units:
        choice = plan.get(unit.id)
        label = "unplanned" if choice is None else str(choice)
        kind = unit.kind or "other"
        out.setdefault(kind, {}).setdefault(label, 0)
        out[kind][label] += 1
    return out
