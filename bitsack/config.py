"""The configuration and shared state of ``bitsack run``: ``RunConfig`` (what the CLI flags
mirror), ``RunSummary``, the stage records (``Stages``) and the ``Context`` every stage of one
run shares (``bitsack.pipeline`` runs them; ``bitsack.stages`` are the stages)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitsack.errors import ValidationError
from bitsack.io import json_digest, write_json

RUN_SCHEMA = "bitsack.run/v2"
#: The scale codes' bits a config with ``scale_bits="auto"`` gets with format ``bitsack``.
DEFAULT_SCALE_BITS = 6
METHODS = ("search", "oneshot", "uniform", "sequential")
#: where the search starts (``RunConfig.search_start``)
SEARCH_STARTS = ("auto", "both", "uniform")
#: ``--units`` names -> the adapters' unit kinds.
UNIT_KINDS = {"heads": "head_group", "mlp": "mlp_group", "embed": "embedding"}


def resolve_scale_bits(scale_bits: int | None | str, fmt: str | None) -> int | None:
    """``"auto"`` -> ``DEFAULT_SCALE_BITS`` with format ``bitsack`` (or None: the default
    format), None with a format that stores fp16 scales; ``"fp16"`` -> None; any other value
    unchanged (checked where it is used)."""
    if scale_bits == "fp16":  # the CLI's word for None
        return None
    if scale_bits != "auto":
        return scale_bits  # type: ignore[return-value]
    return DEFAULT_SCALE_BITS if fmt in (None, "bitsack") else None


@dataclass(frozen=True)
class RunConfig:
    """Everything ``bitsack run`` needs; the CLI flags mirror these fields.

    Budget: ``avg_bits`` (bits per original weight, overhead included: a ``memory_bytes``
    limit) and/or ``budgets`` {resource: limit} — one ``bitsack.solver.budget.Budget``.

    ``menu``: the options a unit may take (``b<k>g<G>``, ``b16``); ``prune`` adds pruning
    (``oneshot``: a profiled option; ``uniform``, ``search``: not yet — see README).
    ``bits`` and ``group_size``: the one-shot profile's options (``b<k>`` at ``group_size``;
    the search's one-shot start uses them too).

    ``format``: the target file format (``bitsack.solver.costs.formats``): ``bitsack``
    (default; any mix of options inside a matrix), ``compressed-tensors`` or ``gguf`` (only
    the options the format stores, one per matrix, budgets in the bytes of its file).

    ``scale_bits``: None (fp16 scales) or S: every quantized group's scale stored as an S-bit
    code times an fp16 step per 256 columns (``bitsack.kernels.formats``; 3-bit g32 costs
    3.34 bits/weight instead of 3.59), format ``bitsack`` or ``gguf`` (where, with a
    symmetric ``grid``, they open the K-quants: ``kernels.formats.gguf_type``; a legacy
    type stores the scale as fp16, so there codes only cost precision). Every method prices its
    options with it; the search's variant store quantizes on that grid; the one-shot
    profile's sensitivity estimates perturb on the fp16-scale grid (its costs are exact).
    Default ``"auto"``: ``DEFAULT_SCALE_BITS`` (6) with format ``bitsack``, None (fp16) with
    the other formats — resolved when the config is made, so a config always holds the
    value it ran with (measured: ``bench/results/e2e.md``, at 3.5 bits/weight the
    search with 6-bit codes scores 0.811 / 0.824 of the best uniform that fits, with fp16
    scales 0.979 / 0.942 of it).

    ``grid``: how each quantized group's scale and zero are chosen
    (``bitsack.kernels.grid``): ``"hmse"`` (default: the group's range shrunk to the smallest
    squared error of its weights, each column's error weighted as GPTQ's loss weighs it;
    uniform GPTQ with 6-bit codes on SmolLM2, WikiText-2: 2-bit g32 366, 3-bit g64 46.2),
    ``"mse"`` (the same unweighted; 718 and 55.3) or ``"minmax"`` (the whole range; 4,456 and
    59.6). ``"sym"``, ``"sym-mse"``, ``"sym-hmse"``: the same with every zero point fixed at
    ``2**(bits − 1)`` — what ggml's Q4_0 / Q5_0 and the K-quants store exactly, so with
    ``format="gguf"`` they buy cheaper tensor types (``bitsack.export.ggml_blocks``). Every
    method and quantizer uses it (RTN, which has no Hessian, takes ``"hmse"`` as ``"mse"``);
    the one-shot profile's perturbations stay min-max.

    ``vocab_groups``: the token embedding (and an untied lm_head) as this many units of row
    ranges that halve towards the front (``bitsack.models.adapter.vocab_ranges``: frequent
    tokens have low ids in BPE vocabularies), each free to take its own option; 1 (default):
    one unit ``embed``.

    ``interactions`` weighs the profile's interaction terms in the one-shot objective
    (``bitsack.solver.with_interaction_weight``); 0 (default) is additive (README: weight 1
    let the solver prune 426 of 451 units of SmolLM2-135M at a predicted +0.08 nats/token,
    measured +18.6).
    """

    model: str = "default"
    out: str = "bitsack-run"
    avg_bits: float | None = None
    budgets: dict[str, float | None] = field(default_factory=dict)
    method: str = "search"
    menu: tuple[str, ...] = ("b2g128", "b2g64", "b2g32", "b3g128", "b3g64", "b3g32",
                             "b4g128", "b4g64", "b4g32", "b8g64", "b16")
    prune: bool = True
    format: str = "bitsack"
    calib: str = "c4"
    eval: str = "wikitext2"
    # the one-shot profile
    estimator: str = "fisher"
    interactions: float = 0.0
    profile_quantizer: str | None = None
    bits: tuple[int, ...] = (2, 3, 4, 8)
    units: tuple[str, ...] = ("heads", "mlp", "embed")
    group_size: int = 64
    mlp_group: int = 128
    vocab_groups: int = 1
    profile_nsamples: int = 32
    profile_seqlen: int = 256
    cost_models: tuple[str, ...] = ("memory", "roofline")
    device: str = "h200"
    solver: str = "auto"
    time_limit_s: float = 60.0
    gap: float = 1e-4
    # compression
    quantizer: str = "gptq"
    scale_bits: int | None | str = "auto"  # resolved in __post_init__: an int or None
    grid: str = "hmse"
    compress_nsamples: int = 32
    compress_seqlen: int = 512
    # the search
    search_start: str = "auto"
    search_budget: float = 3000.0
    search_k: int = 48
    search_window: int = 3
    search_rewalks: int = 0
    search_relinearise: str = "layers"
    search_rse: float = 0.0
    search_grow: str = "accept"
    search_stop_z: float = 0.0  # off: see SearchConfig.stop_z
    # screen 16 x 256 / select 48 x 256: on SmolLM2 at 3.5 bits/weight the search moved
    # nothing with 8 x 256 / 16 x 256 (noise as large as the effects) and beat uniform with
    # these (bench/results/e2e.md, "search-narrow" vs "search")
    screen: tuple[int, int] = (16, 256)
    select: tuple[int, int] = (48, 256)
    holdout: tuple[int, int] = (16, 256)
    # evaluation
    eval_seqlen: int = 2048
    eval_windows: int | None = 8
    frontier_points: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        budget = self.budget  # validates avg_bits / budgets together
        if budget.empty:
            raise ValidationError("budget", "none given; valid: --avg-bits B and/or "
                                  "--budget RESOURCE=VALUE")
        if self.method not in METHODS:
            raise ValidationError("method", f"{self.method!r}; valid: {', '.join(METHODS)}")
        from bitsack.solver.costs.memory import check_format

        check_format(self.format)
        from bitsack.kernels.formats import check_grid, check_scale_bits

        object.__setattr__(self, "scale_bits", resolve_scale_bits(self.scale_bits,
                                                                  self.format))
        check_grid(self.grid)

        if check_scale_bits(self.scale_bits) is not None \
                and self.format == "compressed-tensors":
            raise ValidationError("scale_bits", f"{self.scale_bits} with format "
                                  f"{self.format!r}, which stores fp16 scales; valid: "
                                  "--format bitsack or gguf, or no --scale-bits")
        if self.search_start not in SEARCH_STARTS:
            raise ValidationError("search_start", f"{self.search_start!r}; valid: auto "
                                  "(one-shot too where pruning takes part), both (uniform "
                                  "and one-shot), uniform")
        bad = [u for u in self.units if u not in UNIT_KINDS]
        if bad or not self.units:
            raise ValidationError("units", f"{list(self.units)}; valid: a non-empty subset of "
                                  f"{', '.join(UNIT_KINDS)}")
        for name in ("profile_nsamples", "profile_seqlen", "compress_nsamples",
                     "compress_seqlen", "eval_seqlen", "group_size", "mlp_group", "search_k",
                     "search_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValidationError(name, f"{value!r}; valid: a positive integer")
        from bitsack.plan import check_vocab_groups

        v = check_vocab_groups(self.vocab_groups)
        if v > 1 and "embed" not in self.units:
            raise ValidationError("vocab_groups", f"{v} with units {list(self.units)}, which "
                                  "leave the embedding out; valid: 1, or add embed to units")
        for name in ("screen", "select", "holdout"):
            value = getattr(self, name)
            if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 2
                                      for v in value):
                raise ValidationError(name, f"{value!r}; valid: (sequences, tokens), "
                                      "integers ≥ 2")
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
        if isinstance(self.search_rewalks, bool) or not isinstance(self.search_rewalks, int) \
                or self.search_rewalks < 0:
            raise ValidationError("search_rewalks", f"{self.search_rewalks!r}; valid: an integer "
                                  "≥ 0 (rounds after the first)")
        from bitsack.search import GROW, RELINEARISE

        if self.search_grow not in GROW:
            raise ValidationError("search_grow", f"{self.search_grow!r}; valid: "
                                  + ", ".join(GROW))

        if self.search_relinearise not in RELINEARISE:
            raise ValidationError("search_relinearise", f"{self.search_relinearise!r}; valid: "
                                  + ", ".join(RELINEARISE))
        if not (math.isfinite(self.search_rse) and self.search_rse >= 0):
            raise ValidationError("search_rse", f"{self.search_rse!r}; valid: a finite number "
                                  "≥ 0 (0: every linearisation on the whole screen split)")
        if not (math.isfinite(self.search_stop_z) and self.search_stop_z >= 0):
            raise ValidationError("search_stop_z", f"{self.search_stop_z!r}; valid: a finite "
                                  "number ≥ 0 (0: search until the forward budget is spent)")
        if not (math.isfinite(self.search_budget) and self.search_budget >= 0):
            raise ValidationError("search_budget", f"{self.search_budget!r}; valid: a finite "
                                  "number ≥ 0 (sequence-forwards)")
        self.menu_choices()

    @property
    def budget(self):
        from bitsack.solver.budget import Budget

        return Budget(self.avg_bits, dict(self.budgets))

    @property
    def perturbation_quantizer(self) -> str:
        """The quantizer of the profile's perturbations."""
        return self.profile_quantizer or self.quantizer

    def menu_choices(self):
        from bitsack.search.menu import Menu

        return Menu.parse(self.menu, self.group_size, scale_bits=self.scale_bits)


@dataclass(frozen=True)
class RunSummary:
    """What a run produced (also written as ``summary.json``)."""

    out: str
    method: str
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
    packed_bytes: int | None
    search: dict[str, Any] | None
    stage_seconds: dict[str, float]
    reused: tuple[str, ...]


class Stages:
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


@dataclass
class Context:
    """What every stage of one run shares: config, run directory, records, progress."""

    cfg: RunConfig
    out: Path
    stages: Stages
    say: Callable[[str], None]
    bars: bool = False
    model_id: dict[str, Any] = field(default_factory=dict)

    def timed(self, name: str, inputs: Mapping[str, Any], outputs: Sequence[Path],
              work: Callable[[], Any]) -> bool:
        """Run ``work`` unless the stage is recorded with these inputs; True if it ran."""
        if self.stages.done(name, inputs, outputs):
            return False
        t = time.perf_counter()
        work()
        self.stages.record(name, inputs, time.perf_counter() - t)
        return True


def plan_counts(units, plan: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Unit kind -> option id ('prune', 'b4g64', ...) -> count."""
    out: dict[str, dict[str, int]] = {}
    for unit in units:
        choice = plan.get(unit.id)
        label = "unplanned" if choice is None else str(choice)
        kind = unit.kind or "other"
        out.setdefault(kind, {}).setdefault(label, 0)
        out[kind][label] += 1
    return out
