"""The measured trust-region search: the solver proposes, measurement decides.

Notation: x is a plan (a ``Choice`` per unit), KL_S(x) the mean per-token KL(base ‖ x) on token
split S (``bitsack.search.meter``); splits ``screen`` (linearise, screen candidates),
``select`` (decide) and ``holdout`` (accept), disjoint from each other and from evaluation data.

1. Start: the incumbent x* is the best, measured on ``select``, of the uniform configurations
   that fit the budgets, the smallest one that does not fit *descended* to fit (its down
   moves measured, one knapsack: a budget between two uniform levels starts just under the
   upper one; skipped when a fitting uniform plan already spends the budget, where the
   descent only rearranges it at the price of a linearisation) and (if given) a one-shot
   plan of the Fisher objective.
2. Linearise around x*, in context (ExLlamaV3's in-context ΔKL): for every *group* (one unit
   kind in one layer, or an embedding) and direction d ∈ {one menu step up, one step down},
   ``Δ(g, d) = KL_screen(x* with g's units moved by d) − KL_screen(x*)``, paired over the
   same sequences, re-running only the layers from g's on. Single-unit 3↔4-bit effects lie
   below measurement noise on a small model; a group moves enough weight to be measured.
   Then Δ(g, ±2), two steps, for the ``far`` groups whose one step buys the most per unit of
   budget (returns of a second step are not the first's: on SmolLM2, 3g32 → 4g128 gains far
   more than 3g64 → 3g32).
3. Propose: a multiple-choice knapsack over units (OR-Tools through ``bitsack.solver``), each
   unit offered {its incumbent choice (0), one or two steps up, one or two steps down (two:
   as measured, else extrapolated from the one step), pruned} with loss
   ``Δ(g, d)·(params_u / params of g's movers)`` and its exact costs, under the budgets and a
   **trust region**: a resource ``changes`` (1 per moved unit) limited to k. The solver's
   certificate is kept for every proposal. Alternatives: k/2, and costs resampled within
   each Δ's standard error (Thompson-style), so a single noisy Δ cannot decide.
4. Select (EvoPress' multi-stage selection): every distinct candidate on ``screen``, the best
   two on ``select``; the best of those is accepted only if it beats x* on ``select`` by more
   than ``z`` paired standard errors **and** is not worse on ``holdout``. Accept: x* moves,
   k doubles (to ``k_max``), the groups of the changed layers are re-measured (or only the
   groups that moved: ``relinearise``; all groups every ``refresh`` accepted steps), and the
   reach is back to ``reach``. Reject: k halves and the reach drops to one step (most
   two-step moves are extrapolated: at 3.25 bits/weight on SmolLM2, before any was measured,
   both rejected proposals moved units two steps down, predicted −0.02 / −0.03, measured
   +0.12 / +0.13); below ``k_min`` the search stops.
5. Stop when the forward budget (sequence-forwards: one full forward of one sequence = 1) is
   spent or cannot pay for the next linearisation (estimated at the last one's forwards per
   group: one begun runs to its end, and on ``make demo`` a last one begun at 780 of 800
   forwards cost 519 and ended in a rejected step), k < k_min, or (``stop_z`` > 0, off by
   default) the search has converged: no proposal is predicted to gain ``stop_z`` standard
   errors of the last ``select`` measurement.

Why bounded steps: a linearisation is only trustworthy near where it was measured
(ExLlamaV3's optimizer ends worse than uniform when it moves far: issue #108); SPDY measures
every solved plan rather than trusting the model. Every accepted step is measured better than
the incumbent, so the search never ends worse (on held-out tokens) than where it started.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from torch import nn

from bitsack.errors import ValidationError
from bitsack.plan import Choice
from bitsack.search.menu import Menu
from bitsack.search.meter import KLMeter, Paired
from bitsack.search.store import Stitcher, VariantStore
from bitsack.search.types import SPLITS, SearchConfig, SearchResult, Step, trust_ratio


def groups_of(units: Sequence[Any]) -> dict[str, list[str]]:
    """Group name -> unit ids: one group per (layer, unit kind), one per embedding unit."""
    out: dict[str, list[str]] = {}
    for u in units:
        key = u.id if u.layer is None else f"L{u.layer}.{u.kind}"
        out.setdefault(key, []).append(u.id)
    return out


class Search:
    """The loop of the module docstring, over a model whose weights the search rewrites.

    Args:
        model: the dense model (its weights are stitched from ``store``).
        units: the model's units (``bitsack.models.model_units``) the plan covers.
        store: the variant store (every unit's menu choices).
        meter: the KL meter (base distributions already taken).
        unit_costs: unit id -> option id -> {resource: cost} for every menu choice (and
            prune when offered): exact bytes, latencies.
        limits: resource -> limit (the budgets).
        config: the search knobs.
        progress: called with one line after every step.
        checkpoint: called with the result so far after every step (resumption).
        constraints: side constraints of every proposal (``bitsack.solver.problem
            .Constraint``, e.g. one option per matrix for a target file format); the start
            and every accepted plan meet them, since only proposals move the incumbent.
    """

    def __init__(self, model: nn.Module, units: Sequence[Any], store: VariantStore,
                 meter: KLMeter, unit_costs: Mapping[str, Mapping[str, Mapping[str, float]]],
                 limits: Mapping[str, float], config: SearchConfig | None = None,
                 progress: Callable[[str], None] | None = None,
                 checkpoint: Callable[[SearchResult], None] | None = None,
                 constraints: Sequence[Any] = ()):
        self.model = model
        self.units = list(units)
        self.store = store
        self.menu: Menu = store.menu
        self.meter = meter
        self.unit_costs = unit_costs
        self.limits = dict(limits)
        self.cfg = config or SearchConfig()
        self.say = progress or (lambda msg: None)
        self.checkpoint = checkpoint or (lambda result: None)
        self.constraints = tuple(constraints)
        self.stitch = Stitcher(model, self.units, store)
        self.groups = groups_of(self.units)
        self.params = {u.id: u.params for u in self.units}
        self.plan: dict[str, Choice] = {}
        self.kl: dict[str, np.ndarray] = {}
        self.deltas: dict[tuple[str, int], tuple[Paired, dict[str, Choice]]] = {}
        self.rejected: set[tuple] = set()  # candidates measured and refused at this incumbent
        # relinearise "moved": per descended start, the Δ's its descent measured for groups
        # it did not move (still Δ's of those groups' moves from the descended plan)
        self._descents: dict[str, dict[tuple[str, int], tuple[Paired, dict[str, Choice]]]] = {}
        #: wall seconds of this process in each phase of ``run``: choosing the start (its
        #: descent included), linearising, and the steps (propose, screen, select, decide)
        self.seconds = {"start": 0.0, "linearise": 0.0, "steps": 0.0}
        # forwards per one-step Δ due in the last linearisation (a descent's included; two-step
        # Δ's ride along): what the next one will cost
        self.rate = 0.0

    def _timed(self, phase: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, its wall time added to ``seconds[phase]``."""
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    # ---- plans --------------------------------------------------------------------------
    def usage(self, plan: Mapping[str, Choice]) -> dict[str, float]:
        """Σ costs of ``plan`` per resource."""
        out: dict[str, float] = {}
        for uid, c in plan.items():
            for res, v in self.unit_costs[uid][c.option_id].items():
                out[res] = out.get(res, 0.0) + v
        return out

    def fits(self, plan: Mapping[str, Choice]) -> bool:
        use = self.usage(plan)
        return all(use.get(r, 0.0) <= lim * (1 + 1e-12) for r, lim in self.limits.items())

    def uniform(self, choice: Choice) -> dict[str, Choice]:
        return {u.id: choice for u in self.units}

    def _set(self, plan: Mapping[str, Choice]) -> None:
        """Make the model's weights ``plan`` (from whatever they are) and trace it."""
        changes = {u: c for u, c in plan.items() if self.plan.get(u) != c}
        if changes:
            self.stitch.write(changes)
        self.plan = dict(plan)
        self.kl = {s: self.meter.trace(s) for s in SPLITS}

    def _measure(self, changes: Mapping[str, Choice], split: str,
                 batches: Sequence[int] | None = None) -> np.ndarray:
        """KL on ``split`` (its ``batches``, default all) with ``changes`` applied to the
        incumbent (then reverted)."""
        start = self.stitch.write(changes)
        try:
            return self.meter.kl(split, start, batches)
        finally:
            self.stitch.write({u: self.plan[u] for u in changes})

    def _screened(self, moved: Mapping[str, Choice]) -> Paired:
        """Δ on ``screen`` of ``moved`` against the incumbent: on half the split's batches
        first, the other half only when that Δ is not settled (``cfg.rse``)."""
        base, nb = self.kl["screen"], self.meter.n_batches("screen")
        if not self.cfg.rse > 0 or nb < 2:
            return Paired.of(self._measure(moved, "screen"), base)
        half, rest = list(range(nb // 2)), list(range(nb // 2, nb))
        first = self._measure(moved, "screen", half)
        paired = Paired.of(first, base[self.meter.rows("screen", half)])
        if paired.se <= self.cfg.rse * abs(paired.mean):
            return paired
        return Paired.of(np.concatenate([first, self._measure(moved, "screen", rest)]), base)

    def _mean(self, split: str) -> float:
        return float(np.mean(self.kl[split]))

    # ---- 1. start -----------------------------------------------------------------------
    def start(self, extra: Mapping[str, Mapping[str, Choice]] | None = None) -> dict[str, Any]:
        """Choose the incumbent: the best on ``select`` of the fitting uniform plans, the
        smallest uniform plan that does not fit descended until it fits (``descend``), and
        ``extra`` named plans (e.g. ``{"oneshot": plan}``)."""
        cands: dict[str, dict[str, Choice]] = {}
        above = None
        for c in reversed(self.menu.steps):  # most bytes first
            plan = self.uniform(c)
            if self.fits(plan):
                cands[f"uniform {c.option_id}"] = plan
                if len(cands) >= 2:
                    break
            else:
                above = c
        info: dict[str, Any] = {}
        spent = max((self.usage(p).get(r, 0.0) / lim for p in cands.values()
                     for r, lim in self.limits.items() if lim > 0), default=0.0)
        if above is not None and cands and spent >= self.cfg.descend_until:
            info["descend"] = {"from": f"uniform {above.option_id}",
                               "skipped": f"a fitting uniform plan spends {spent:.1%} of the "
                                          "binding budget"}
        elif self.cfg.descend and above is not None and (cands or self.menu.prune):
            plan, info["descend"] = self.descend(above)
            if plan is not None:
                cands[f"uniform {above.option_id} descended"] = plan
        for name, plan in (extra or {}).items():
            if not plan:
                continue
            if self.fits(plan):
                cands[name] = dict(plan)
            elif self.cfg.descend:
                plan, info[f"descend {name}"] = self.descend(plan, name)
                if plan is not None:
                    cands[f"{name} descended"] = plan
        if not cands:
            raise ValidationError("budget", f"no uniform menu choice fits {self.limits}; "
                                  "valid: a budget at least the smallest menu choice's bytes")
        scores: dict[str, float] = {}
        best = None
        for name, plan in cands.items():
            self._set(plan)
            scores[name] = self._mean("select")
            if best is None or scores[name] < scores[best]:
                best = name
        self._set(cands[best])
        self._prune_if_pruned()
        carried = self._descents.get(best, {}) if self.cfg.relinearise == "moved" else {}
        if carried:
            self.deltas = dict(carried)
            info["carried"] = len(carried)
        self.say(f"search start: {best} (select KL {scores[best]:.5f}; "
                 + ", ".join(f"{n} {v:.5f}" for n, v in scores.items()) + ")")
        return {"incumbent": best, "select_kl": scores,
                "kl": {s: self._mean(s) for s in SPLITS}, **info}

    def _prune_if_pruned(self) -> None:
        """A start that prunes (a one-shot plan): its pruning is measured like the rest."""
        if not self.menu.prune and any(c.pruned for c in self.plan.values()):
            self.menu = replace(self.menu, prune=True)

    def descend(self, above: Choice | Mapping[str, Choice], name: str = "plan"
                ) -> tuple[dict[str, Choice] | None, dict[str, Any]]:
        """A plan over budget (a uniform choice, or a plan) moved down until it fits:
        Δ(g, −1) (and the pruning moves when the menu prunes) measured around it, then one
        knapsack with no trust region — the cheapest measured way down to the budget. A budget
        just under a uniform level (3.25 under 3g128's 3.276) then starts a few units below
        that level rather than at the collapsed level under it. Returns the plan (None: the
        knapsack found none) and its record."""
        if isinstance(above, Choice):
            name, plan = f"uniform {above.option_id}", self.uniform(above)
        else:
            plan = dict(above)
        self._set(plan)
        self.linearise(directions=(-1, 0))
        p = self.propose(2 * len(self.units))
        measured, self.deltas = self.deltas, {}
        record: dict[str, Any] = {"from": name, "forwards": self.meter.forwards}
        if p is None or not self.fits({**self.plan, **p[0]}):
            self.say(f"search start: {name} cannot be descended to fit")
            return None, record
        changes, predicted, cert = p
        self.say(f"search start: {name} descended ({len(changes)} units down, predicted "
                 f"screen KL {self._mean('screen') + predicted:.5f})")
        record.update(changed=len(changes), predicted=predicted, certificate=cert)
        self._descents[f"{name} descended"] = {
            (g, d): v for (g, d), v in measured.items()
            if not any(u in changes for u in self.groups[g])}
        return {**self.plan, **changes}, record

    # ---- 2. linearise -------------------------------------------------------------------
    def linearise(self, groups: Sequence[str] | None = None,
                  directions: Sequence[int] = (+1, -1, 0),
                  keep: frozenset[tuple[str, int]] = frozenset()) -> None:
        """``_linearise``, and its forwards per one-step Δ due (``rate``)."""
        due = self._due(groups, directions, keep)
        spent = self.meter.forwards
        self._linearise(groups, directions, keep)
        if due:
            self.rate = (self.meter.forwards - spent) / due

    def _due(self, groups: Sequence[str] | None, directions: Sequence[int],
             keep: frozenset[tuple[str, int]]) -> int:
        """The one-step Δ's a linearisation of ``groups`` (None: all) measures."""
        todo = list(self.groups) if groups is None else groups
        return sum(1 for g in todo for d in directions
                   if (d or self.menu.prune) and (g, d) not in keep and self._move(g, d))

    def _linearise(self, groups: Sequence[str] | None = None,
                   directions: Sequence[int] = (+1, -1, 0),
                   keep: frozenset[tuple[str, int]] = frozenset()) -> None:
        """Measure Δ(g, d) on ``screen`` for ``groups`` (default: all) and ``directions``:
        d = ±1, the group's units one menu step up / down; d = 0 (menu with prune), its one
        prunable kept unit whose weights are smallest (``VariantStore.error`` of pruning)
        pruned. Then d = ±2 (for each ±1 in ``directions``, with ``cfg.reach`` 2) for the
        ``cfg.far`` groups ranked best over all groups (``_far_groups``): measured where the
        group was re-measured now or has no two-step Δ yet; dropped for groups out of the
        top. ``keep``: (group, ±1 or 0) Δ's still valid (carried from a descent): neither
        they nor their two-step Δ's are measured again. Each Δ: ``_screened``."""
        todo = list(groups if groups is not None else self.groups)
        for g in todo:
            for d in (+1, -1):
                if (g, d) not in keep:
                    self.deltas.pop((g, 2 * d), None)
        for i, g in enumerate(todo):
            if i and i % max(1, len(todo) // 4) == 0:
                self.say(f"search: linearising, {i}/{len(todo)} groups measured "
                         f"({self.meter.forwards:.0f} forwards)")
            for d in directions:
                if d == 0 and not self.menu.prune or (g, d) in keep:
                    continue
                moved = self._move(g, d)
                if not moved:
                    self.deltas.pop((g, d), None)
                    continue
                self.deltas[(g, d)] = (self._screened(moved), moved)
        if self.cfg.reach < 2:
            return
        for d in (+1, -1):
            if d not in directions:
                continue
            fresh = {g for g in todo if (g, d) not in keep}
            top = set(self._far_groups(list(self.groups), d))
            for g in self.groups:  # in the groups' order: deterministic
                if g not in top:
                    self.deltas.pop((g, 2 * d), None)
                elif g in fresh or (g, 2 * d) not in self.deltas:
                    moved = self._move(g, 2 * d)
                    if moved:
                        self.deltas[(g, 2 * d)] = (self._screened(moved), moved)

    def _far_groups(self, groups: Sequence[str], d: int) -> list[str]:
        """The ``cfg.far`` groups whose one-step move in direction d buys the most: up, the
        largest measured gain per unit of budget spent; down, the smallest measured loss per
        unit of budget saved (budget = Σ over limits of |Δcost| / limit)."""
        ranked = []
        for g in groups:
            if (g, d) not in self.deltas:
                continue
            paired, moved = self.deltas[(g, d)]
            new, old = self.usage(moved), self.usage({u: self.plan[u] for u in moved})
            size = sum(abs(new.get(r, 0.0) - old.get(r, 0.0)) / lim
                       for r, lim in self.limits.items() if lim > 0)
            if not size > 0 or (d > 0 and not paired.mean < 0):
                continue  # nothing saved or spent, or a step up that does not help
            # up: −gain per budget spent; down: loss per budget saved — smallest first
            ranked.append((paired.mean / size, g))
        return [g for _, g in sorted(ranked)[:self.cfg.far]]

    def _move(self, g: str, d: int) -> dict[str, Choice]:
        from bitsack.plan import PRUNE

        if d == 0:
            kept = [u for u in self.groups[g] if self.stitch.units[u].prunable
                    and not self.plan[u].pruned]
            if not kept:
                return {}
            pick = min(kept, key=lambda u: (self.store.error(self.stitch.units[u], PRUNE), u))
            return {pick: PRUNE}
        moved = {}
        for uid in self.groups[g]:
            if abs(d) == 2 and self.plan[uid].pruned:
                continue  # a pruned unit's only way up is one step (never offered two)
            to = self.menu.step(self.plan[uid], d)
            if to is not None:
                moved[uid] = to
        return moved

    # ---- 3. propose ---------------------------------------------------------------------
    def propose(self, k: int, rng: np.random.Generator | None = None,
                reach: int | None = None):
        """The knapsack around the incumbent (trust region k, units moving at most ``reach``
        menu steps, default ``cfg.reach``); ``rng`` resamples Δ's within their standard
        errors. Returns (changes, predicted Δ, certificate) or None."""
        reach = self.cfg.reach if reach is None else reach
        from bitsack.solver import solve
        from bitsack.solver.backends import SolveOptions
        from bitsack.solver.problem import Option, Problem, Resource, Unit

        units = []
        for g, members in self.groups.items():
            moves = {}
            for d in (+1, -1, 0, +2, -2):
                if (g, d) not in self.deltas:
                    continue
                paired, moved = self.deltas[(g, d)]
                se = paired.se if math.isfinite(paired.se) else 0.0
                if rng is None:
                    # pessimistic: a gain counts only beyond its noise, a cost with it (the
                    # proposal must not chase a measurement's luck)
                    delta = paired.mean + self.cfg.caution * se
                else:  # Thompson-style: a draw within the measurement's error
                    delta = paired.mean + float(rng.normal(0.0, se))
                moves[d] = (delta, moved, self.shares(moved))
            for uid in members:
                cur = self.plan[uid]
                opts = [Option(cur.option_id, 0.0, self._cost(uid, cur, 0))]
                offered = {cur.option_id}
                for d, (delta, moved, share) in moves.items():
                    if uid not in moved or abs(d) == 2:
                        continue
                    targets = [(moved[uid], delta * share[uid], 1)]
                    far = self.menu.step(cur, 2 * d) if d != 0 and not cur.pruned else None
                    if far is not None and reach > 1:
                        if 2 * d in moves and uid in moves[2 * d][1]:  # measured
                            far_delta, _, far_share = moves[2 * d]
                            targets.append((far, far_delta * far_share[uid], 2))
                        else:
                            # extrapolated from the measured step and discounted the way
                            # returns diminish: a gain counts 1.5×, a cost 3×
                            targets.append((far, delta * share[uid]
                                            * (1.5 if delta < 0 else 3.0), 2))
                    for to, loss, steps in targets:
                        if to.option_id not in offered:
                            offered.add(to.option_id)
                            opts.append(Option(to.option_id, loss, self._cost(uid, to, steps)))
                units.append(Unit(uid, tuple(opts), params=self.params[uid]))
        resources = tuple(Resource(r, lim) for r, lim in self.limits.items()) + \
            (Resource("changes", float(k)),)
        problem = Problem(name="search-step", units=tuple(units), resources=resources,
                          constraints=self.constraints)
        sol = solve(problem, self.cfg.solver, SolveOptions(
            time_limit_s=self.cfg.time_limit_s, rel_gap=1e-6, seed=self.cfg.seed))
        if not sol.has_solution:
            return None
        changes = {}
        for uid, oid in sol.assignment.items():
            if oid != self.plan[uid].option_id:
                changes[uid] = self._choice(oid)
        return changes, float(sol.objective), _cert(sol)

    def shares(self, moved: Mapping[str, Choice]) -> dict[str, float]:
        """How a group move's measured Δ splits over its units: by how much each unit's
        weights change (``|err(current) − err(new)|``, ``VariantStore.error``), so a unit
        whose quantization error is large carries most of the group's effect; by parameters
        when no unit's error changes."""
        w = {u: abs(self.store.error(self.stitch.units[u], self.plan[u])
                    - self.store.error(self.stitch.units[u], c)) for u, c in moved.items()}
        total = sum(w.values())
        if not total > 0:
            w = {u: float(self.params[u]) for u in moved}
            total = sum(w.values())
        return {u: v / total for u, v in w.items()}

    def _cost(self, uid: str, c: Choice, steps: int) -> dict[str, float]:
        """The option's costs, and its distance in menu steps (the trust region's resource)."""
        out = dict(self.unit_costs[uid][c.option_id])
        out["changes"] = float(steps)
        return out

    def _choice(self, oid: str) -> Choice:
        from bitsack.plan import parse_choice

        return parse_choice(oid, 64, "search")

    # ---- the loop -----------------------------------------------------------------------
    def adopt(self, plan: Mapping[str, Choice]) -> dict[str, np.ndarray]:
        """Make ``plan`` the incumbent without choosing among starts (a later round's
        start); returns its per-sequence KL on every split."""
        self._set(plan)
        self._prune_if_pruned()
        return dict(self.kl)

    def run(self, extra_starts: Mapping[str, Mapping[str, Choice]] | None = None,
            resume: Mapping[str, Any] | None = None,
            start_info: Mapping[str, Any] | None = None, round: int = 0) -> SearchResult:
        """Search until the forward budget is spent or the trust region collapses.

        ``resume`` is a checkpoint (``checkpoint_dict``) of an interrupted search: the search
        continues from its last finished step and ends exactly as an uninterrupted one — also
        when it had stopped on its forward budget and ``config`` now grants a larger one.
        ``start_info``: the incumbent was set by ``adopt`` (a later round); no start is chosen
        and this is its record. ``round`` numbers the steps' round.
        """
        cfg = self.cfg
        if resume:
            result, state = self._restore(resume)
        elif start_info is not None:
            kl = {s: self._mean(s) for s in SPLITS}
            result = SearchResult(start={**start_info, "kl": kl}, plan=dict(self.plan),
                                  kl=dict(kl))
            state = {"k": cfg.k, "stale": None, "since_refresh": 0, "reach": cfg.reach}
        else:
            info = self._timed("start", self.start, extra_starts)
            result = SearchResult(start=info, plan=dict(self.plan),
                                  kl={s: self._mean(s) for s in SPLITS})
            state = {"k": cfg.k, "stale": None, "since_refresh": 0, "reach": cfg.reach}
        while True:
            result.forwards = self.meter.forwards
            if self.meter.forwards >= cfg.budget_forwards:
                result.stopped = "forward budget spent"
                break
            if state["k"] < cfg.k_min:
                result.stopped = f"trust region below k_min={cfg.k_min}"
                break
            if state["stale"] is None or state["stale"]:
                # before the first linearisation the only Δ's are a descent's carried ones
                first = result.linearisations == 0
                keep = frozenset((g, d) for g, d in self.deltas if first and d in (+1, -1, 0))
                need = self.rate * self._due(state["stale"], (+1, -1, 0), keep)
                if self.meter.forwards + need > cfg.budget_forwards:
                    result.stopped = (f"forward budget cannot pay for a linearisation (about "
                                      f"{need:.0f} forwards, "
                                      f"{cfg.budget_forwards - self.meter.forwards:.0f} left)")
                    break
                self._timed("linearise", self.linearise, state["stale"], keep=keep)
                result.linearisations += 1
                state["stale"] = []
            step = self._timed("steps", self._step, len(result.steps) + 1, state["k"],
                               state.get("reach", cfg.reach), floor=self._floor(result.steps))
            if isinstance(step, str):
                result.stopped = step
                break
            step.round = round
            result.steps.append(step)
            if step.accepted:
                self.rejected.clear()
                layers = {self.stitch.units[u].layer for u in step.changed}
                self._set({**self.plan, **{u: self._choice(v[1])
                                           for u, v in step.changed.items()}})
                state["since_refresh"] += 1
                rho = trust_ratio(step) if cfg.grow == "ratio" else 1.0
                state["k"] = min(cfg.k_max, 2 * state["k"]) if rho >= 0.75 else \
                    state["k"] if rho >= 0.25 else max(cfg.k_min, state["k"] // 2)
                state["reach"] = cfg.reach
                if state["since_refresh"] >= cfg.refresh or None in layers or rho < 0.25:
                    state["stale"], state["since_refresh"] = None, 0
                elif cfg.relinearise == "moved":
                    state["stale"] = [g for g, members in self.groups.items()
                                      if any(u in step.changed for u in members)]
                else:
                    state["stale"] = [g for g, members in self.groups.items()
                                      if self.stitch.units[members[0]].layer in layers]
            else:
                self.rejected.add(tuple(sorted((u, v[1]) for u, v in step.changed.items())))
                state["k"] //= 2
                state["reach"] = 1
                # nothing to propose: re-measure everything; else the same linearisation
                state["stale"] = None if not step.changed else []
            result.plan = dict(self.plan)
            result.kl = {s: self._mean(s) for s in SPLITS}
            result.forwards = self.meter.forwards
            self.say(f"search step {step.iteration}: "
                     f"{'accepted' if step.accepted else 'rejected'} {len(step.changed)} units"
                     f" ({step.reason}); incumbent select KL {result.kl['select']:.5f}, "
                     f"holdout {result.kl['holdout']:.5f}; {self.meter.forwards:.0f}/"
                     f"{cfg.budget_forwards:.0f} forwards")
            self.checkpoint(self.checkpoint_dict(result, state))
        result.plan = dict(self.plan)
        result.kl = {s: self._mean(s) for s in SPLITS}
        self.checkpoint(self.checkpoint_dict(result, state))
        return result

    def _floor(self, steps: Sequence[Step]) -> float:
        """The smallest predicted gain worth measuring: ``stop_z`` standard errors of the
        last ``select`` measurement (0 before the first one)."""
        last = next((st.select for st in reversed(steps) if st.select), None)
        return self.cfg.stop_z * last["se"] if last else 0.0

    def _step(self, it: int, k: int, reach: int, floor: float = 0.0) -> Step | str:
        """Propose around the incumbent, screen, select, and decide (nothing is moved).

        Returns why the search has converged instead when no proposal is predicted to gain
        ``floor`` or more.
        """
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, it])
        proposals = []
        for kk in dict.fromkeys([k, max(cfg.k_min, k // 2)]):
            proposals.append(self.propose(kk, reach=reach))
        for _ in range(cfg.alternatives):
            proposals.append(self.propose(k, rng, reach))
        seen, cands = set(), []
        for p in proposals:
            if p is None or not p[0]:
                continue
            key = tuple(sorted((u, c.option_id) for u, c in p[0].items()))
            if key not in seen and key not in self.rejected:
                seen.add(key)
                cands.append(p)
        if not cands:
            return Step(it, k, {}, 0.0, {}, None, None, False, "no move predicted to help", 0,
                        self.meter.forwards, reach=reach)
        best_pred = min(p[1] for p in cands)
        if floor > 0 and best_pred > -floor:
            return (f"converged: the best of {len(cands)} proposals (k {k}) is predicted to "
                    f"gain {-best_pred:.5f}, below {cfg.stop_z:g} select standard errors "
                    f"({floor:.5f})")
        screened = []
        for changes, pred, cert in cands:
            kl = self._measure(changes, "screen")
            screened.append((Paired.of(kl, self.kl["screen"]), changes, pred, cert))
        screened.sort(key=lambda t: t[0].mean)
        best = None
        for s_paired, changes, pred, cert in screened[:2]:
            sel = Paired.of(self._measure(changes, "select"), self.kl["select"])
            if best is None or sel.mean < best[1].mean:
                best = (s_paired, sel, changes, pred, cert)
        s_paired, sel, changes, pred, cert = best
        accept = sel.mean < -cfg.z * sel.se
        hold = None
        reason = f"select {sel.mean:+.5f} ± {sel.se:.5f}"
        if accept:
            hold = Paired.of(self._measure(changes, "holdout"), self.kl["holdout"])
            accept = hold.mean <= 0.0
            reason += f", holdout {hold.mean:+.5f} ± {hold.se:.5f}"
            if not accept:
                reason += " (worse on holdout)"
        else:
            reason += f" not below -{cfg.z:g} SE"
        return Step(it, k, {u: [self.plan[u].option_id, c.option_id]
                            for u, c in sorted(changes.items())},
                    pred, s_paired.as_dict(), sel.as_dict(), hold.as_dict() if hold else None,
                    accept, reason,
                    len(cands), self.meter.forwards, cert, reach, best_predicted=best_pred)

    # ---- resumption ---------------------------------------------------------------------
    def checkpoint_dict(self, result: SearchResult, state: Mapping[str, Any]) -> dict:
        """Everything an interrupted search needs to continue identically (JSON-able)."""
        deltas = [{"group": g, "d": d, **paired.as_dict(),
                   "moved": {u: c.option_id for u, c in moved.items()}}
                  for (g, d), (paired, moved) in sorted(self.deltas.items())]
        return {"result": result.to_dict(), "state": dict(state), "deltas": deltas,
                "forwards": self.meter.forwards, "rate": self.rate}

    def _restore(self, ck: Mapping[str, Any]) -> tuple[SearchResult, dict]:
        r = ck["result"]
        result = SearchResult(start=dict(r["start"]),
                              plan={u: self._choice(o) for u, o in r["plan"].items()},
                              kl=dict(r["kl"]), forwards=float(r["forwards"]),
                              linearisations=int(r["linearisations"]))
        result.steps = [Step(**s) for s in r["steps"]]
        self.plan = {}
        self._set(result.plan)
        self._prune_if_pruned()
        self.meter.forwards = float(ck["forwards"])
        self.rate = float(ck.get("rate", 0.0))  # (absent from a checkpoint before the estimate)
        self.deltas = {(d["group"], int(d["d"])): (Paired(d["delta"], d["se"], d["n"]),
                                                   {u: self._choice(o)
                                                    for u, o in d["moved"].items()})
                       for d in ck["deltas"]}
        self.rejected = set()
        for st in result.steps:  # the candidates refused since the last accepted step
            if st.accepted:
                self.rejected.clear()
            elif st.changed:
                self.rejected.add(tuple(sorted((u, v[1]) for u, v in st.changed.items())))
        return result, dict(ck["state"])


def _cert(sol) -> dict[str, Any]:
    c = sol.certificate
    return {"status": sol.status, "objective": sol.objective, "dual_bound": c.dual_bound,
            "rel_gap": c.rel_gap, "solver": c.solver, "usage": c.usage}


def unit_costs(shapes, menu: Menu, cost_models) -> dict[str, dict[str, dict[str, float]]]:
    """unit id -> option id -> {resource: cost} for every menu choice (and prune)."""
    from bitsack.solver.costs.base import option_costs

    out: dict[str, dict[str, dict[str, float]]] = {}
    for shape in shapes:
        per: dict[str, dict[str, float]] = {}
        for c in menu.steps:
            per[c.option_id] = option_costs(cost_models, shape, c.bits, c.group_size or 1)
        if menu.prune:
            per["prune"] = option_costs(cost_models, shape, 0, 1)
        out[shape.id] = per
    return out
