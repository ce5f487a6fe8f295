"""``measured_search``: base distributions, variant store, search, and the final model.

The final plan is packed two ways and the one that measures better on the held-out split is
kept (measurement decides, to the end):

- *stitched*: the plan's units packed from the variant store (``bitsack.apply.assemble``),
  exactly the model the search measured;
- *sequential*: the plan applied for real (``bitsack.apply.compress``: sequential GPTQ,
  Hessians from the plan's own compressed layers).

Both figures are recorded, so the record says how far the stitched estimate was from a real
sequential apply.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bitsack.apply import ApplyConfig, CompressResult, assemble, compress
from bitsack.errors import ValidationError
from bitsack.plan import Choice
from bitsack.search.loop import Search
from bitsack.search.menu import Menu
from bitsack.search.meter import KLMeter, Paired
from bitsack.search.store import StoreConfig, VariantStore
from bitsack.search.types import SearchConfig, SearchResult, Step


@dataclass
class SearchOutcome:
    """The searched plan, its record, and the packed model chosen by measurement."""

    result: SearchResult
    compressed: CompressResult
    final: dict[str, Any] = field(default_factory=dict)
    #: wall seconds per phase in this process (a resumed search counts only what it redid)
    seconds: dict[str, float] = field(default_factory=dict)


def uniform_fits(choice: Choice, unit_costs: Mapping[str, Mapping[str, Mapping[str, float]]],
                 limits: Mapping[str, float]) -> bool:
    """Whether ``choice`` on every unit meets ``limits``."""
    return all(_total(unit_costs, choice, r) <= lim * (1 + 1e-12) for r, lim in limits.items())


def store_incumbent(menu: Menu, unit_costs: Mapping[str, Mapping[str, Mapping[str, float]]],
                    limits: Mapping[str, float]) -> Choice:
    """The uniform menu choice with the most bytes that fits ``limits``: whose sequential walk
    makes the store's Hessians (the model the search most likely starts from).

    Raises:
        ValidationError: no uniform menu choice fits.
    """
    for c in sorted(menu.steps, key=lambda c: -menu.nominal_bits(c)):
        if uniform_fits(c, unit_costs, limits):
            return c
    raise ValidationError("budget", f"{dict(limits)}: no uniform choice of the menu "
                          f"{list(menu.option_ids)} fits; valid: a larger budget or a menu "
                          "with smaller options")


def store_walk(menu: Menu, unit_costs: Mapping[str, Mapping[str, Mapping[str, float]]],
               limits: Mapping[str, float]) -> Choice:
    """The uniform menu choice whose sequential walk makes the store's Hessians: the largest
    that fits ``limits``, unless the next one up is nearer the memory budget (a budget just
    below a uniform level, e.g. 3.25 bits/weight under 3g128's 3.276, where the search starts
    from that level descended to fit: its variants then take their Hessians from a model
    quantized like the plans the search measures, not from a collapsed 2-bit one).

    Raises:
        ValidationError: no uniform menu choice fits (memory alone, when a latency budget
            needs pruning).
    """
    try:
        fit = store_incumbent(menu, unit_costs, limits)
    except ValidationError:
        return store_incumbent(menu, unit_costs, {k: v for k, v in limits.items()
                                                  if k == "memory_bytes"})
    above = menu.step(fit, +1)
    if above is None or "memory_bytes" not in limits:
        return fit
    lim = limits["memory_bytes"]
    over = _total(unit_costs, above, "memory_bytes") / lim - 1.0
    under = 1.0 - _total(unit_costs, fit, "memory_bytes") / lim
    return above if over < under else fit


def _total(unit_costs: Mapping[str, Mapping[str, Mapping[str, float]]], choice: Choice,
           resource: str) -> float:
    return sum(per[choice.option_id].get(resource, 0.0) for per in unit_costs.values())


def measured_search(model: nn.Module, units: Sequence[Any], *, menu: Menu,
                    unit_costs: Mapping[str, Mapping[str, Mapping[str, float]]],
                    limits: Mapping[str, float], splits: Mapping[str, torch.Tensor],
                    calib_tokens: torch.Tensor | None, apply: ApplyConfig,
                    config: SearchConfig, run_dir: Path, store_key: Any,
                    starts: Mapping[str, Mapping[str, Choice]] | None = None,
                    batch_size: int = 4, window: int | None = 3,
                    progress: Callable[[str], None] | None = None,
                    constraints: Sequence[Any] = (),
                    prune_starts: bool = False) -> SearchOutcome:
    """Search ``model``'s plan under ``limits`` and pack the result (see module docstring).

    ``model`` is consumed (its weights are rewritten, then it becomes the packed model).
    ``run_dir/store`` holds the variant store, ``run_dir/search.json`` the search's
    checkpoint: an interrupted call resumes from both, and a call with a larger forward
    budget continues a finished search (``resumable``). ``window``: the store (and the search)
    keep the menu choices within that many steps of the store's uniform walk (None: all) —
    choices farther away need more accepted moves than a search makes, and each costs a GPTQ
    run per matrix. ``constraints`` (``bitsack.solver.problem.Constraint``) bind every
    proposal (e.g. one option per matrix for a target file format). ``starts`` are projected
    onto the (windowed) menu (``project``); one that prunes is kept when the menu prunes or
    ``prune_starts`` (the search then measures pruning moves if it starts there).
    """
    say = progress or (lambda msg: None)
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(phase: str) -> None:
        now = time.perf_counter()
        seconds[phase] = seconds.get(phase, 0.0) + now - clock[0]
        clock[0] = now

    base = copy.deepcopy(model)
    head_layers = _head_layers(model, units)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in splits.items())
    say(f"search: base distributions on {shapes}")
    meter = KLMeter(model, splits, batch_size=batch_size, head_layers=head_layers)
    lap("base distributions")
    incumbent = store_walk(menu, unit_costs, limits)
    if window is not None:
        menu = menu.window(incumbent, window)
    kept_starts = {}
    for name, plan in (starts or {}).items():
        if any(c.pruned for c in plan.values()) and not (menu.prune or prune_starts):
            say(f"search: start {name!r} left out: it prunes, and pruning is off")
            continue
        kept_starts[name], moved = project(plan, menu)
        if moved:
            say(f"search: start {name!r}: {moved} units moved to the nearest menu choice")
    starts = kept_starts
    say(f"search: variant store ({', '.join(menu.option_ids)}; walk at uniform "
        f"{incumbent.option_id})")
    store_cfg = StoreConfig(quantizer=apply.quantizer, damp=apply.damp,
                            act_order=apply.act_order, batch_size=apply.batch_size,
                            true_sequential=apply.true_sequential,
                            scale_bits=apply.scale_bits, grid=apply.grid)

    def tick(done: int, total: int) -> None:
        if done == total or done % max(1, total // 5) == 0:
            say(f"search: store {done}/{total}")

    store = VariantStore.build(model, units, menu, incumbent, calib_tokens, store_cfg,
                               root=run_dir / "store", key=store_key, progress=tick)
    lap("store")
    ck_file = run_dir / "search.json"
    search = Search(model, units, store, meter, unit_costs, limits, config, progress=say,
                    checkpoint=_checkpointer(ck_file, store_key, config),
                    constraints=constraints)
    result = search.run(extra_starts=starts, resume=_resume(ck_file, store_key, config, say))
    searches = [search]
    rounds = [result]
    for r in range(1, config.rewalks + 1):
        if config.budget_forwards <= 0:
            break
        # round r: a store walked along the incumbent, then the search from there
        prev_kl = dict(search.kl)
        say(f"search: round {r + 1}: the variant store walked along the incumbent")
        lap("search")
        _load_weights(model, base)
        key = {"store": store_key, "round": r}
        walked = VariantStore.build(model, units, menu, result.plan, calib_tokens, store_cfg,
                                    root=run_dir / f"store_round{r + 1}", key=key,
                                    progress=tick)
        lap("store")
        rcfg = replace(config, budget_forwards=config.budget_forwards * (r + 1))
        ck_r = run_dir / f"search_round{r + 1}.json"
        nxt = Search(model, units, walked, meter, unit_costs, limits, rcfg, progress=say,
                     checkpoint=_checkpointer(ck_r, key, rcfg), constraints=constraints)
        resume = _resume(ck_r, key, rcfg, say)
        if resume is None:
            new_kl = nxt.adopt(result.plan)
            walk = {sp: Paired.of(new_kl[sp], prev_kl[sp]) for sp in ("select", "holdout")}
            better = walk["select"].mean < 0 and walk["holdout"].mean <= 0
            say(f"search: round {r + 1}: the re-walked incumbent, select "
                f"{walk['select'].mean:+.5f} ± {walk['select'].se:.5f}, holdout "
                f"{walk['holdout'].mean:+.5f}: "
                + ("continuing from it" if better else "worse; the previous round stands"))
            info = {"incumbent": f"round {r} plan re-walked", "forwards": meter.forwards,
                    "rewalk": {sp: w.as_dict() for sp, w in walk.items()}}
            if not better:
                _load_weights(model, base)  # back to the previous store's plan
                search.plan = {}
                search.adopt(result.plan)
                rounds.append(SearchResult(start={**info, "accepted": False},
                                           plan=dict(result.plan), kl=dict(result.kl),
                                           forwards=meter.forwards, stopped="re-walk worse"))
                break
            nxt_result = nxt.run(start_info={**info, "accepted": True}, round=r)
        else:
            nxt_result = nxt.run(resume=resume, round=r)
        search, store, result = nxt, walked, nxt_result
        searches.append(nxt)
        rounds.append(result)
    lap("search")
    result = _merged(rounds)
    plan = dict(result.plan)
    x = {"stitched_holdout_kl": result.kl["holdout"]}
    say(f"search: done ({result.stopped}); final plan stitched holdout KL "
        f"{result.kl['holdout']:.5f}")
    uniform_plan = all(c == incumbent for c in plan.values())
    sequential = None
    if not uniform_plan and apply.quantizer == "gptq":
        say("search: the plan applied for real (sequential GPTQ) to compare")
        sequential = compress(copy.deepcopy(base), plan, calib_tokens, apply)
        x["sequential_holdout_kl"] = float(np.mean(meter.kl_of(sequential.model, "holdout")))
    else:
        # the stitched uniform incumbent *is* the sequential apply (bitsack.search.store)
        x["sequential_holdout_kl"] = x["stitched_holdout_kl"]
    del model
    if sequential is not None and x["sequential_holdout_kl"] < x["stitched_holdout_kl"]:
        x["kept"] = "sequential"
        compressed = sequential
    else:
        x["kept"] = "stitched"
        compressed = assemble(base, plan, store.part, apply)
    x["stitched_minus_sequential"] = x["stitched_holdout_kl"] - x["sequential_holdout_kl"]
    say(f"search: kept the {x['kept']} model (holdout KL stitched "
        f"{x['stitched_holdout_kl']:.5f}, sequential {x['sequential_holdout_kl']:.5f})")
    lap("final")
    return SearchOutcome(result=result, compressed=compressed, final=x,
                         seconds=_phases(seconds, searches))


def _phases(seconds: Mapping[str, float], searches: Sequence[Search]) -> dict[str, float]:
    """Wall seconds per phase: the driver's laps, the search's split into its own phases
    (what they did not count — checkpoints, a round's adoption — is ``search: other``)."""
    inner = {k: sum(s.seconds[k] for s in searches) for k in searches[0].seconds}
    out = {k: seconds.get(k, 0.0) for k in ("base distributions", "store")}
    out.update({f"search: {k}": v for k, v in inner.items()})
    out["search: other"] = max(0.0, seconds.get("search", 0.0) - sum(inner.values()))
    out["final"] = seconds.get("final", 0.0)
    return {k: round(v, 3) for k, v in out.items()}


def _checkpointer(path: Path, key: Any, config: SearchConfig) -> Callable[[dict], None]:
    def checkpoint(ck: dict) -> None:
        from bitsack.io import write_json

        write_json(path, {"key": _jsonable(key), "config": _cfg(config), "checkpoint": ck})

    return checkpoint


def _resume(path: Path, key: Any, config: SearchConfig,
            say: Callable[[str], None]) -> dict | None:
    """The checkpoint at ``path`` if it was written for ``key`` under a config that
    continues under ``config`` (``resumable``)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("key") != _jsonable(key) or not resumable(saved.get("config"), config):
        return None
    was = saved["config"]["budget_forwards"]
    say(f"search: resuming after step {len(saved['checkpoint']['result']['steps'])}"
        + (f" (forward budget {was:g} → {config.budget_forwards:g})"
           if was != config.budget_forwards else ""))
    return saved["checkpoint"]


def _load_weights(model: nn.Module, base: nn.Module) -> None:
    """Copy ``base``'s parameters into ``model`` (same architecture, unpruned)."""
    with torch.no_grad():
        for p, q in zip(model.parameters(), base.parameters(), strict=True):
            p.copy_(q)


def _merged(rounds: Sequence[SearchResult]) -> SearchResult:
    """One record of every round: the first round's start, the steps in order (a re-walk
    between rounds as a step of its own, changing no unit), the last round's plan."""
    first, last = rounds[0], rounds[-1]
    if len(rounds) == 1:
        return first
    steps = list(first.steps)
    records = []
    for r, res in enumerate(rounds[1:], start=1):
        walk = res.start.get("rewalk", {})
        accepted = bool(res.start.get("accepted"))
        sel, hold = walk.get("select"), walk.get("holdout")
        steps.append(Step(len(steps) + 1, 0, {}, 0.0, {}, sel, hold, accepted,
                          f"store re-walked along the incumbent (round {r + 1})", 0,
                          res.start.get("forwards", 0.0), round=r))
        for st in res.steps:
            steps.append(replace(st, iteration=len(steps) + 1))
        records.append({"round": r + 1, "accepted": accepted, "select": sel, "holdout": hold,
                        "kl": res.kl, "stopped": res.stopped})
    return SearchResult(start={**first.start, "rounds": records}, plan=dict(last.plan),
                        kl=dict(last.kl), steps=steps, forwards=last.forwards,
                        linearisations=sum(r.linearisations for r in rounds),
                        stopped=last.stopped)


def project(plan: Mapping[str, Choice], menu: Menu) -> tuple[dict[str, Choice], int]:
    """``plan`` with every choice off ``menu`` replaced by the menu choice nearest in nominal
    bits (a one-shot plan's 8-bit units become the window's top); pruned units stay pruned.
    Returns the plan and how many units moved (a plan over budget afterwards is descended
    by the search's start)."""
    out, moved = {}, 0
    for uid, c in plan.items():
        if c.pruned or c in menu.steps:
            out[uid] = c
            continue
        out[uid] = min(menu.steps, key=lambda m: (abs(menu.nominal_bits(m)
                                                      - menu.nominal_bits(c)), -m.bits))
        moved += 1
    return out, moved


def _head_layers(model: nn.Module, units: Sequence[Any]) -> float:
    """The head's weights in average-decoder-layer units (for the forward counter)."""
    layers = [u for u in units if u.layer is not None]
    n_layers = max((u.layer for u in layers), default=0) + 1
    per_layer = sum(u.params for u in layers) / max(1, n_layers)
    head = model.get_output_embeddings()
    if head is None or per_layer == 0:
        return 1.0
    return float(head.weight.numel()) / per_layer


def resumable(saved: Any, config: SearchConfig) -> bool:
    """Whether a checkpoint written under the search config ``saved`` (JSON) continues under
    ``config``: every knob equal but the forward budget and the number of rounds. The budget
    is only read at the top of the loop, so a search stopped by its budget and resumed with a
    larger one ends exactly as one run with the larger budget from the start (a smaller one
    stops at once)."""
    if not isinstance(saved, dict):
        return False
    free = {"budget_forwards": None, "rewalks": None}  # neither changes a round's course
    return {**saved, **free} == {**_cfg(config), **free}


def _cfg(config: SearchConfig) -> dict:
    from dataclasses import asdict

    return _jsonable(asdict(config))


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))
