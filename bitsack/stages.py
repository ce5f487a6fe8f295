"""The stages of ``bitsack run`` as library functions (the benchmarks call them too).

Each stage takes the run ``Context`` (``bitsack.pipeline``), records its inputs' hash, and is
skipped when an earlier run recorded the same inputs and left its outputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bitsack.config import UNIT_KINDS, Context, RunConfig
from bitsack.errors import ValidationError
from bitsack.io import file_sha256, write_json
from bitsack.kernels.formats import LAYOUT_VERSION, symmetric


@dataclass
class Planned:
    """A run's plan and the compressed model it became."""

    model: Any
    plan: dict[str, Any]
    packed_bytes: int
    status: str
    certificate: dict[str, Any] = field(default_factory=dict)
    predicted: float | None = None
    search: dict[str, Any] | None = None
    solution: Any = None  # the solver's Solution of a one-shot plan
    #: wall seconds per phase of a search run in this process (summary.json only: the
    #: solution stays the same file for the same inputs)
    seconds: dict[str, float] | None = None


def run_units(model, cfg: RunConfig) -> list:
    """The model's units of the kinds ``cfg.units`` names."""
    from bitsack.models import model_units

    kinds = {UNIT_KINDS[k] for k in cfg.units}
    return [u for u in model_units(model, mlp_group=cfg.mlp_group,
                                   embeddings="embed" in cfg.units,
                                   vocab_groups=cfg.vocab_groups) if u.kind in kinds]


def _vocab(cfg: RunConfig) -> dict[str, int]:
    """``vocab_groups`` for a record or a cache key, absent at 1 (records made before it
    existed stay valid)."""
    return {"vocab_groups": cfg.vocab_groups} if cfg.vocab_groups != 1 else {}


def tensor_bytes(model) -> int:
    """Bytes of a model's tensors as held (parameters and buffers: packed codes, scales,
    norms), shared tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def unit_costs_for(model, units, menu, cfg: RunConfig):
    """unit -> option -> {resource: cost} for every menu choice, and the cost models."""
    from bitsack.profiling.build import make_cost_models, unit_shapes
    from bitsack.search.loop import unit_costs

    models = make_cost_models(cfg.cost_models, {"roofline": {"device": cfg.device},
                                                "memory": {"format": cfg.format,
                                                           "scale_bits": cfg.scale_bits,
                                                           "symmetric": symmetric(cfg.grid)}})
    return unit_costs(unit_shapes(model, units), menu, models)


def run_menu(ctx: Context, model, units):
    """The menu of ``cfg.menu`` that ``cfg.format`` can store (``bitsack``: all of it)."""
    from bitsack.search.menu import Menu
    from bitsack.solver.costs.formats import target_menu

    cfg = ctx.cfg
    menu = cfg.menu_choices()
    if cfg.format == "bitsack":
        return menu
    from bitsack.profiling.build import unit_shapes

    left_out: dict[str, str] = {}
    ids = target_menu(cfg.format, unit_shapes(model, units),
                      [c.option_id for c in menu.steps], cfg.group_size, left_out,
                      cfg.scale_bits, symmetric(cfg.grid))
    if left_out:
        ctx.say(f"format {cfg.format}: menu {', '.join(ids)}; left out "
                + "; ".join(f"{o} ({r})" for o, r in left_out.items()))
    return Menu.parse(ids, cfg.group_size, prune=menu.prune, scale_bits=cfg.scale_bits)


def format_constraints(cfg: RunConfig, model, units, menu) -> tuple:
    """The side constraints that keep a plan of ``menu`` choices storable in ``cfg.format``."""
    from bitsack.solver.costs.formats import target_constraints

    if cfg.format == "bitsack":
        return ()
    from bitsack.profiling.build import unit_shapes

    ids = list(menu.option_ids)
    return target_constraints(cfg.format, unit_shapes(model, units),
                              {u.id: ids for u in units}, cfg.group_size)


def limits_for(cfg: RunConfig, units) -> dict[str, float]:
    """The budgets as resource limits (``avg_bits`` over the units' parameters)."""
    budget = cfg.budget
    limits = {k: v for k, v in budget.limits.items() if v is not None}
    if budget.avg_bits is not None:
        limits["memory_bytes"] = budget.avg_bits * sum(u.params for u in units) / 8
    return limits


def calibration(cfg: RunConfig, tokenizer):
    """GPTQ calibration tokens (the quantizer pool; the same call as ``bitsack compress``)."""
    from bitsack.data import calibration_tokens

    if cfg.quantizer != "gptq":
        return None
    return calibration_tokens(cfg.calib, tokenizer, cfg.compress_nsamples, cfg.compress_seqlen,
                              seed=cfg.seed)


def apply_config(cfg: RunConfig):
    from bitsack.apply import ApplyConfig

    return ApplyConfig(quantizer=cfg.quantizer, group_size=cfg.group_size,
                       mlp_group=cfg.mlp_group, scale_bits=cfg.scale_bits,
                       vocab_groups=cfg.vocab_groups, grid=cfg.grid)


# ---- evaluation ---------------------------------------------------------------------------
def evaluate_stage(ctx: Context, name: str, model, tokenizer, model_dir) -> dict[str, Any]:
    """Perplexity of ``model`` on ``cfg.eval`` (cached as ``<name>.json``)."""
    from bitsack.data import eval_tokens
    from bitsack.evaluate import perplexity

    cfg = ctx.cfg
    path = ctx.out / f"{name}.json"
    what = ctx.model_id if model_dir is None else \
        file_sha256(model_dir / "model.safetensors")

    def work():
        ctx.say(f"eval: {'base model' if model_dir is None else 'compressed model'} on "
                f"{cfg.eval}")
        res = perplexity(model, eval_tokens(cfg.eval, tokenizer), cfg.eval_seqlen,
                         windows=cfg.eval_windows, progress=ctx.bars)
        write_json(path, res.to_dict())

    ctx.timed(name, {"model": what, "eval": cfg.eval, "seqlen": cfg.eval_seqlen,
                     "windows": cfg.eval_windows}, [path], work)
    return json.loads(path.read_text())


# ---- the plan -----------------------------------------------------------------------------
def plan_stage(ctx: Context, lm, units, force: bool = False) -> Planned:
    """Plan by ``cfg.method``, compress, save ``model/``; reuse a finished one."""
    from bitsack.checkpoint import cache_dequantized, load_compressed, save_compressed

    cfg = ctx.cfg
    model_dir = ctx.out / "model"
    sol_file = ctx.out / "solution.json"
    inputs = _plan_inputs(ctx)
    if ctx.stages.done("compress", inputs, [model_dir / "bitsack.json", sol_file]):
        sol = json.loads(sol_file.read_text())
        loaded = load_compressed(model_dir)
        cache_dequantized(loaded.model)  # CPU evaluation speed; outputs unchanged
        return _planned_from(loaded.model, sol, cfg.group_size)
    import time

    t = time.perf_counter()
    if cfg.method in ("oneshot", "sequential"):
        planned = _oneshot(ctx, lm, units)
    elif cfg.method == "uniform":
        planned = _uniform(ctx, lm, units)
    else:
        planned = _search(ctx, lm, units)
    save_compressed(planned.model, model_dir, tokenizer=lm.tokenizer, force=force,
                    extra={"base_model": ctx.model_id, "method": cfg.method})
    write_json(sol_file, _solution_dict(cfg, planned))
    ctx.stages.record("compress", inputs, time.perf_counter() - t)
    cache_dequantized(planned.model)
    return planned


def _plan_inputs(ctx: Context) -> dict[str, Any]:
    from dataclasses import asdict

    cfg = asdict(ctx.cfg)
    for k in ("out", "eval", "eval_seqlen", "eval_windows", "frontier_points"):
        cfg.pop(k)
    if cfg["format"] == "bitsack":  # the default: records of earlier runs stay valid
        cfg.pop("format")
    if cfg["scale_bits"] is None:  # likewise
        cfg.pop("scale_bits")
    for k, off in (("search_rse", 0.0), ("search_grow", "accept"), ("search_stop_z", 0.0),
                   ("vocab_groups", 1), ("grid", "minmax")):
        if cfg[k] == off:  # likewise (the search as before)
            cfg.pop(k)
    return {"model": ctx.model_id, "config": cfg, "packed_layout": LAYOUT_VERSION}


def _solution_dict(cfg: RunConfig, p: Planned) -> dict[str, Any]:
    """``solution.json``: the solver's ``Solution`` of a one-shot plan (``bitsack check``
    reads it; run facts under ``extra``), else the plan with its usage and search record."""
    extra = {"method": cfg.method, "packed_bytes": p.packed_bytes,
             "scale_bits": cfg.scale_bits}  # how it was priced (`bitsack compress` reads it)
    if p.solution is not None:
        d = p.solution.to_dict()
        d["extra"] = {**d.get("extra", {}), **extra}
        return d
    return {**extra, "status": p.status, "assignment": {u: str(c) for u, c in p.plan.items()},
            "objective": p.predicted, "certificate": p.certificate, "search": p.search}


def _planned_from(model, sol: Mapping[str, Any], group_size: int) -> Planned:
    from bitsack.plan import parse_choice

    extra = sol.get("extra") or sol
    return Planned(model=model, plan={u: parse_choice(o, group_size) for u, o in
                                      sol["assignment"].items()},
                   packed_bytes=int(extra["packed_bytes"]), status=sol["status"],
                   certificate=sol.get("certificate") or {}, predicted=sol.get("objective"),
                   search=sol.get("search"))


def _usage_certificate(costs, plan, limits) -> dict[str, Any]:
    usage: dict[str, float] = {}
    for u, c in plan.items():
        for res, v in costs[u][str(c)].items():
            usage[res] = usage.get(res, 0.0) + v
    return {"usage": usage, "limits": dict(limits),
            "max_violation": max([usage.get(r, 0.0) - lim for r, lim in limits.items()]
                                 + [0.0])}


def _uniform(ctx: Context, lm, units) -> Planned:
    from bitsack.apply import compress
    from bitsack.search.driver import store_incumbent

    cfg = ctx.cfg
    menu = run_menu(ctx, lm.model, units)
    costs = unit_costs_for(lm.model, units, menu, cfg)
    limits = limits_for(cfg, units)
    choice = store_incumbent(menu, costs, limits)
    plan = {u.id: choice for u in units}
    ctx.say(f"uniform: {choice} everywhere ({cfg.quantizer})")
    res = compress(lm.model, plan, calibration(cfg, lm.tokenizer), apply_config(cfg),
                   progress=_layer_progress(ctx))
    return Planned(model=res.model, plan=plan, packed_bytes=res.packed_bytes,
                   status="feasible", certificate=_usage_certificate(costs, plan, limits))


def profile_problem(ctx: Context, model, tokenizer, units):
    """The one-shot Fisher problem (``profile/problem.yaml``, cached), budgets applied."""
    from bitsack.data import calibration_tokens
    from bitsack.profiling import profile, write_profile
    from bitsack.solver.schema import load_problem, with_interaction_weight, without_option

    cfg = ctx.cfg
    prof_dir = ctx.out / "profile"
    problem_file = prof_dir / "problem.yaml"
    inputs = {"model": ctx.model_id, "calib": cfg.calib, "estimator": cfg.estimator,
              "quantizer": cfg.perturbation_quantizer, "bits": list(cfg.bits),
              "units": list(cfg.units), "group_size": cfg.group_size,
              "mlp_group": cfg.mlp_group, **_vocab(cfg), "nsamples": cfg.profile_nsamples,
              "seqlen": cfg.profile_seqlen, "cost_models": list(cfg.cost_models),
              "device": cfg.device, "seed": cfg.seed, "packed_layout": LAYOUT_VERSION}

    def work():
        ctx.say(f"profile: {cfg.estimator} on {cfg.profile_nsamples} x {cfg.profile_seqlen} "
                f"tokens of {cfg.calib}")
        calib = calibration_tokens(cfg.calib, tokenizer, cfg.profile_nsamples,
                                   cfg.profile_seqlen, seed=cfg.seed)
        result = profile(model, units, calib, estimator=cfg.estimator, bits=cfg.bits,
                         group_size=cfg.group_size, quantizer=cfg.perturbation_quantizer,
                         cost_models=cfg.cost_models,
                         cost_model_args={"roofline": {"device": cfg.device}},
                         seed=cfg.seed, progress=ctx.bars,
                         metadata={"model": ctx.model_id, "calib": cfg.calib,
                                   "mlp_group": cfg.mlp_group, **_vocab(cfg)})
        write_profile(result, prof_dir)

    ctx.timed("profile", inputs, [problem_file], work)
    problem = load_problem(problem_file)
    if cfg.format != "bitsack" or cfg.scale_bits is not None:
        # the profile is format-free, priced with fp16 scales: reused across formats and
        # scale codes (the losses are the same; the bytes are re-priced)
        from bitsack.profiling.build import unit_shapes
        from bitsack.solver.costs.formats import retarget, with_scale_bits

        shapes = unit_shapes(model, units)
        if cfg.format == "bitsack":
            problem = with_scale_bits(problem, cfg.scale_bits, shapes)
        else:
            problem = retarget(problem, cfg.format, shapes, cfg.scale_bits, symmetric(cfg.grid))
    problem = cfg.budget.apply(problem)
    problem = with_interaction_weight(problem, cfg.interactions)
    if not cfg.prune:
        problem = without_option(problem, "prune")
    return problem


def solve_problem(ctx: Context, problem):
    """Solve the one-shot problem (certificate recomputed by ``evaluate``)."""
    from bitsack.solver import solve
    from bitsack.solver.backends import SolveOptions

    cfg = ctx.cfg
    ctx.say(f"solve: {cfg.solver}, limits {problem.limits}")
    sol = solve(problem, cfg.solver, SolveOptions(time_limit_s=cfg.time_limit_s,
                                                  rel_gap=cfg.gap, seed=cfg.seed))
    if not sol.has_solution:
        raise ValidationError("budget", f"no plan: {sol.status}: {sol.message}")
    return sol


def _oneshot(ctx: Context, lm, units) -> Planned:
    """One solve of the profiled objective (``sequential``: prunes fixed first)."""
    from bitsack.apply import compress
    from bitsack.plan import plan_from_solution

    cfg = ctx.cfg
    problem = profile_problem(ctx, lm.model, lm.tokenizer, units)
    if cfg.method == "sequential":
        from bitsack.baselines import sequential

        problem = sequential(problem)
    sol = solve_problem(ctx, problem)
    from bitsack.solver.schema import dump_problem

    # the problem exactly as solved (re-priced for the format and scale codes, the budget
    # applied): `bitsack check OUT/problem.yaml OUT/solution.json` re-checks the certificate
    dump_problem(problem, ctx.out / "problem.yaml")
    plan = plan_from_solution(problem, sol)
    ctx.say(f"compress: {cfg.quantizer}, {sum(c.pruned for c in plan.values())} units pruned")
    res = compress(lm.model, plan, calibration(cfg, lm.tokenizer), apply_config(cfg),
                   progress=_layer_progress(ctx))
    return Planned(model=res.model, plan=plan, packed_bytes=res.packed_bytes,
                   status=sol.status, certificate=sol.to_dict()["certificate"],
                   predicted=sol.objective, solution=sol)


def _search(ctx: Context, lm, units) -> Planned:
    from dataclasses import replace

    from bitsack.data import calibration_splits
    from bitsack.profiling.build import unit_shapes
    from bitsack.search.driver import measured_search, uniform_fits
    from bitsack.search.types import SearchConfig
    from bitsack.solver.costs.formats import stores_pruned

    cfg = ctx.cfg
    menu = run_menu(ctx, lm.model, units)
    limits = limits_for(cfg, units)
    costs = unit_costs_for(lm.model, units, replace(menu, prune=True), cfg)
    # pruning enters as measured moves where bits alone cannot meet the budget
    prunable = stores_pruned(cfg.format, unit_shapes(lm.model, units))
    bits_fit = any(uniform_fits(c, costs, limits) for c in menu.steps)
    if cfg.prune and not bits_fit and prunable:
        menu = replace(menu, prune=True)
        ctx.say("search: no uniform plan meets the budget; pruning moves are measured too")
    starts = {}
    if cfg.search_start == "both" or cfg.search_start == "auto" and menu.prune:
        from bitsack.plan import plan_from_solution

        problem = profile_problem(ctx, lm.model, lm.tokenizer, units)
        sol = solve_problem(ctx, problem)
        starts["oneshot"] = plan_from_solution(problem, sol)
    splits = calibration_splits(cfg.calib, lm.tokenizer,
                                {"screen": tuple(cfg.screen), "select": tuple(cfg.select),
                                 "holdout": tuple(cfg.holdout)}, seed=cfg.seed)
    config = SearchConfig(budget_forwards=cfg.search_budget, k=cfg.search_k, seed=cfg.seed,
                          time_limit_s=min(cfg.time_limit_s, 30.0),
                          rewalks=cfg.search_rewalks, relinearise=cfg.search_relinearise,
                          rse=cfg.search_rse, grow=cfg.search_grow,
                          stop_z=cfg.search_stop_z)
    store_key = {"model": ctx.model_id, "menu": list(menu.option_ids),
                 "window": cfg.search_window, "calib": cfg.calib,
                 "quantizer": cfg.quantizer, "nsamples": cfg.compress_nsamples,
                 "seqlen": cfg.compress_seqlen, "mlp_group": cfg.mlp_group, **_vocab(cfg),
                 "seed": cfg.seed,
                 "limits": limits, "units": list(cfg.units), "splits": [cfg.screen,
                                                                        cfg.select,
                                                                        cfg.holdout],
                 "packed_layout": LAYOUT_VERSION}  # its bytes price the walk and the moves
    if cfg.format != "bitsack":  # its prices and constraints shape the search's record
        store_key["format"] = cfg.format
    if cfg.scale_bits is not None:  # absent: fp16 scales (stores built before stay valid)
        store_key["scale_bits"] = cfg.scale_bits
    outcome = measured_search(
        lm.model, units, menu=menu, unit_costs=costs, limits=limits, splits=splits,
        calib_tokens=calibration(cfg, lm.tokenizer), apply=apply_config(cfg), config=config,
        run_dir=ctx.out, store_key=store_key, starts=starts, window=cfg.search_window,
        progress=ctx.say, constraints=format_constraints(cfg, lm.model, units, menu),
        prune_starts=cfg.prune and prunable)
    record = {**outcome.result.to_dict(), "final": outcome.final}
    accepted = [s for s in outcome.result.steps if s.accepted and s.certificate]
    cert = {**_usage_certificate(costs, outcome.result.plan, limits),
            "last_proposal": accepted[-1].certificate if accepted else None}
    return Planned(model=outcome.compressed.model, plan=outcome.result.plan,
                   packed_bytes=outcome.compressed.packed_bytes, status="feasible",
                   certificate=cert, predicted=None, search=record, seconds=outcome.seconds)


def _layer_progress(ctx: Context):
    """A compress progress callback that reports every tenth of the layers."""
    last = [-1]

    def tick(stage: str, done: int, total: int) -> None:
        step = max(1, total // 10)
        if done == total or done // step != last[0]:
            last[0] = done // step
            ctx.say(f"compress: {stage} {done}/{total}")

    return tick


__all__: Sequence[str] = ("Planned", "run_units", "tensor_bytes", "evaluate_stage",
                          "plan_stage", "profile_problem", "solve_problem", "limits_for",
                          "unit_costs_for", "run_menu", "format_constraints", "calibration",
                          "apply_config")
