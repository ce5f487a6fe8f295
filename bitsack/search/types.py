"""The search's data: its settings (``SearchConfig``) and its record (``Step``,
``SearchResult``, written to ``solution.json``'s ``search`` section)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from bitsack.errors import ValidationError
from bitsack.plan import Choice
from bitsack.search import GROW, RELINEARISE

#: The token splits of the search (``bitsack.search.loop``): linearise and screen, decide,
#: accept.
SPLITS = ("screen", "select", "holdout")


@dataclass(frozen=True)
class SearchConfig:
    """Knobs of the search (defaults are ``bitsack run``'s).

    Attributes:
        budget_forwards: sequence-forwards the search may spend (measurement only).
        k: initial trust region (units that may change in one step).
        k_min: stop once the trust region falls below this.
        k_max: the trust region never grows beyond this.
        grow: how an accepted step moves the trust region. ``accept``: k doubles. ``ratio``:
            by how well the step was predicted, ρ = measured ΔKL on ``select`` / predicted
            ΔKL (the classic trust-region test, Nocedal & Wright, Alg. 4.1): k doubles when
            ρ ≥ 0.75, stays when 0.25 ≤ ρ < 0.75, halves when ρ < 0.25 — and then every
            group is linearised again (a poorly predicted step says the Δ's around the new
            plan are not the old ones: at 2.5 bits/weight a second step predicted −2.54
            measured −0.147). A rejected step halves k either way.
        z: a step is accepted if it beats the incumbent by more than ``z`` paired standard
            errors on ``select`` (and is not worse on ``holdout``).
        alternatives: Thompson-style resampled proposals per step (besides k and k/2).
        refresh: re-measure every group after this many accepted steps (else the groups
            ``relinearise`` names).
        relinearise: after an accepted step (between full refreshes), re-measure ``layers``:
            every group of a layer the step changed (attention and MLP alike), or ``moved``:
            only the groups whose own units moved — the others keep Δ's measured in the
            context before the step (about 60 % of ``layers``' groups at 2.5–4 bits/weight on
            SmolLM2, so more steps per forward budget). With ``moved``, a descended start
            also keeps its descent's down and prune Δ's of the groups the descent left, and
            the first linearisation measures only the rest.
        rse: sequential screening of the linearisations (0: off). A group move is measured
            on the first half of ``screen``'s batches; when that Δ's standard error is at most
            ``rse``·|Δ| it stands, else the second half is measured too and the Δ is the
            whole split's. Large effects (2-bit moves, pruning) are settled on half the
            tokens; small ones (3 ↔ 4 bits) still get all of them.
        stop_z: the search has converged, and stops, when the best proposal around the
            incumbent is predicted to gain less than ``stop_z`` standard errors of the last
            ``select`` measurement — less than a step of that size can show. Off (0) by
            default: at 3.5 bits/weight on SmolLM2 (calibration draw 3) it never fired at 2,
            and a step accepted after three rejections (12 units, −0.011 ± 0.004 select)
            shows that late proposals can pay (``bench/results/e2e.md``).
        caution: proposals price each measured Δ at ``mean + caution·SE`` (a gain only beyond
            its noise); the resampled alternatives draw around the mean instead.
        reach: menu steps a unit may move in one proposal (2: the second step measured for
            the ``far`` most promising groups per direction, else extrapolated from the
            measured first); the trust region counts steps. After a rejected step the reach
            is one step until the next accepted one.
        far: groups per direction whose two-step move is measured (the ones whose one-step
            move buys the most per unit of budget — Σ over the limits of |Δcost| / limit —:
            the largest gain up, the smallest loss down); 0 extrapolates every two-step move.
        descend_until: the descended start is tried only while the best fitting uniform
            plan uses less than this fraction of its binding budget (at 3.5 bits/weight
            uniform 3g64 spends all of it, and the descended 3g32 was worse: 0.909 vs 0.884
            select KL, for ~850 of the 3000 forwards).
        solver: the bitsack solver backend of the proposals.
        time_limit_s: per proposal solve.
        seed: seeds the resampled proposals.
        descend: also start from the smallest uniform plan over budget, moved down until it
            fits by one knapsack over measured down moves (``Search.descend``).
        rewalks: rounds after the first: the variant store is walked again along the
            incumbent (``VariantStore.build(walk=plan)``: Hessians from the plan's own
            layers, as its sequential apply takes them) and, if that measures better on
            ``select`` and no worse on ``holdout``, the search continues from there with
            ``budget_forwards`` more (``bitsack.search.driver``). 0: one round.
    """

    budget_forwards: float = 3000.0
    k: int = 48
    k_min: int = 2
    k_max: int = 96
    grow: str = "accept"
    z: float = 2.0
    alternatives: int = 2
    refresh: int = 3
    relinearise: str = "layers"
    rse: float = 0.0
    caution: float = 1.0
    stop_z: float = 0.0
    reach: int = 2
    far: int = 8
    descend_until: float = 0.99
    solver: str = "highs"
    time_limit_s: float = 20.0
    seed: int = 0
    descend: bool = True
    rewalks: int = 0

    def __post_init__(self) -> None:
        if not (self.budget_forwards >= 0 and math.isfinite(self.budget_forwards)):
            raise ValidationError("search_budget", f"{self.budget_forwards!r}; valid: a "
                                  "finite number ≥ 0 (sequence-forwards)")
        if not 1 <= self.k_min <= self.k <= self.k_max:
            raise ValidationError("k", f"k_min {self.k_min}, k {self.k}, k_max {self.k_max}; "
                                  "valid: 1 ≤ k_min ≤ k ≤ k_max")
        if not self.z >= 0:
            raise ValidationError("z", f"{self.z!r}; valid: ≥ 0")
        if not (self.stop_z >= 0 and math.isfinite(self.stop_z)):
            raise ValidationError("search_stop_z", f"{self.stop_z!r}; valid: a finite number "
                                  "≥ 0 (0: search until the forward budget is spent)")
        if not (isinstance(self.far, int) and self.far >= 0):
            raise ValidationError("far", f"{self.far!r}; valid: an integer ≥ 0")
        if self.reach not in (1, 2):
            raise ValidationError("reach", f"{self.reach!r}; valid: 1 or 2")
        if self.grow not in GROW:
            raise ValidationError("search_grow", f"{self.grow!r}; valid: " + ", ".join(GROW))
        if self.relinearise not in RELINEARISE:
            raise ValidationError("relinearise", f"{self.relinearise!r}; valid: "
                                  + ", ".join(RELINEARISE))
        if not (self.rse >= 0 and math.isfinite(self.rse)):
            raise ValidationError("search_rse", f"{self.rse!r}; valid: a finite number ≥ 0 "
                                  "(0: every linearisation on the whole screen split)")
        if not (isinstance(self.rewalks, int) and self.rewalks >= 0):
            raise ValidationError("rewalks", f"{self.rewalks!r}; valid: an integer ≥ 0")


@dataclass
class Step:
    """One iteration: what was proposed, measured and decided."""

    iteration: int
    k: int
    changed: dict[str, list[str]]  # unit -> [from, to] option ids
    predicted: float
    screen: dict[str, float]
    select: dict[str, float] | None
    holdout: dict[str, float] | None
    accepted: bool
    reason: str
    candidates: int
    forwards: float
    certificate: dict[str, Any] | None = None
    reach: int | None = None  # menu steps a unit could move in this step's proposals
    round: int = 0  # the search round (a re-walk starts the next: ``SearchConfig.rewalks``)
    # the best prediction among the candidates (``predicted`` is the one measured best on
    # screen): what the ``stop_z`` rule compares
    best_predicted: float | None = None


@dataclass
class SearchResult:
    """What the search did (``solution.json``'s ``search`` section)."""

    start: dict[str, Any]
    plan: dict[str, Choice]
    kl: dict[str, float]
    steps: list[Step] = field(default_factory=list)
    forwards: float = 0.0
    linearisations: int = 0
    stopped: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "kl": self.kl, "forwards": round(self.forwards, 3),
                "linearisations": self.linearisations, "stopped": self.stopped,
                "plan": {u: c.option_id for u, c in self.plan.items()},
                "steps": [asdict(s) for s in self.steps]}


def trust_ratio(step: Step) -> float:
    """ρ of an accepted step: its measured ΔKL on ``select`` over its predicted ΔKL (1 when
    nothing was predicted to help)."""
    if not step.predicted < 0 or not step.select:
        return 1.0
    return step.select["delta"] / step.predicted

