"""The methods of the head-to-head benchmark (``bench/e2e.py``) and the problem edits they need.

Every method turns (model, units, calibration tokens, a memory budget in bits per original
weight) into a compressed model whose packed bytes are counted with the same size function
(``bitsack.kernels.formats.packed_nbytes``), so "3.5 bits/weight" means the same bytes for all:

- ``uniform``: one bit-width b everywhere (embedding included), applied with RTN or GPTQ;
  b = budget − 32/group_size (fp16 scale + fp16 zero per group: 0.5 bits at g64).
- ``hqq``: HQQ (Badri & Shaji 2023, the PyPI ``hqq`` package) uniform b-bit, groups of
  ``group_size`` along the input dimension; its half-quadratic optimizer picks zero (and
  scale) per group; the scale and zero are rounded to fp16 — what our format stores — and the
  weights replaced by ``scale·(q − zero)`` (fake quantization, memory counted as packed).
- ``solve``: a profiled problem (estimator), the budget, a solver backend, then apply.
- ``sequential``: prune first — the prunable units with the smallest Fisher ``prune`` loss,
  as many as the joint plan prunes (or as many as a latency budget needs) — then
  mixed-precision quantization of the rest by the same solver on the same objective.

This module imports torch lazily (the problem edits need only the solver's dataclasses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bitsack.errors import ValidationError

#: Method kinds the runner knows.
#: ``mp``: the solver's mixed precision with the prune option removed (bits only).
KINDS = ("uniform", "hqq", "solve", "sequential", "mp")


@dataclass(frozen=True)
class Method:
    """One row of the benchmark.

    Attributes:
        name: key used in result file names (``<name>@<budget>.json``).
        label: what the report prints.
        kind: one of ``KINDS``.
        quantizer: apply quantizer (``rtn`` or ``gptq``); unused by ``hqq``.
        estimator: profiling estimator of the problem (``solve`` / ``sequential``).
        solver: solver backend name.
        interactions: keep the problem's interaction factor (off = additive objective).
        bitsack: a bitsack method (the rest are peers for the "ratio to best peer").
    """

    name: str
    label: str
    kind: str
    quantizer: str = "gptq"
    estimator: str | None = None
    solver: str = "auto"
    interactions: bool = True
    bitsack: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValidationError("method.kind", f"{self.kind!r}; valid: {list(KINDS)}")
        if self.kind in ("solve", "sequential", "mp") and not self.estimator:
            raise ValidationError("method.estimator", f"None for {self.name!r}; a "
                                  f"{self.kind} method needs a profiling estimator")


#: The benchmark's rows (issue #5, "Head-to-head benchmark"), then the ablation-only rows.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rtn", "uniform RTN", "uniform", quantizer="rtn"),
    Method("gptq", "uniform GPTQ", "uniform", quantizer="gptq"),
    Method("hqq", "uniform HQQ", "hqq"),
    Method("layerwise", "layer-wise MP (layerwise + solver + GPTQ)", "solve",
           estimator="layerwise"),
    Method("fdiag-greedy", "greedy on fisher-diag (HAWQ/NNCF-style) + GPTQ", "solve",
           estimator="fisher-diag", solver="greedy"),
    Method("sequential", "sequential: Fisher prune, then MP (fisher + solver) + GPTQ",
           "sequential", estimator="fisher", interactions=False),
    # bitsack's default (`bitsack run`): the additive fisher objective. With the low-rank
    # interaction factor of N calibration rows the solver can pick plans whose errors cancel
    # in those N directions only (an N-dimensional form over hundreds of units), so the
    # interaction objective is kept as the `joint-int` ablation, not the default.
    Method("joint", "bitsack joint (fisher, additive + GPTQ)", "solve",
           estimator="fisher", interactions=False, bitsack=True),
    Method("joint-cal", "bitsack joint (calibrated fisher + GPTQ)", "solve",
           estimator="calibrated", bitsack=True),
    # the profile's perturbations from one-shot GPTQ per matrix (what apply will do) instead
    # of RTN: RTN perturbations overstate what quantization costs after GPTQ's compensation
    # (uniform 3-bit: RTN ppl 159, GPTQ 64), which makes pruning look relatively cheap
    Method("joint-gq", "bitsack joint (fisher on GPTQ perturbations, additive + GPTQ)",
           "solve", estimator="fisher+gptq", interactions=False, bitsack=True),
    # ablations (equal budget): objective, interactions, apply quantizer
    Method("fdiag-solver", "fisher-diag objective + solver + GPTQ", "solve",
           estimator="fisher-diag"),
    Method("joint-int", "bitsack joint with fisher interactions (low-rank U)", "solve",
           estimator="fisher", bitsack=True),
    Method("mp", "bitsack, bits only (fisher, additive, no pruning) + GPTQ", "mp",
           estimator="fisher", interactions=False, bitsack=True),
    Method("mp-gq", "bitsack, bits only (fisher on GPTQ perturbations, no pruning) + GPTQ",
           "mp", estimator="fisher+gptq", interactions=False, bitsack=True),
    Method("joint-rtn", "bitsack joint, RTN apply", "solve", estimator="fisher",
           quantizer="rtn", bitsack=True),
)}


def uniform_bits(budget_bpw: float, group_size: int) -> int:
    """The bit-width whose uniform g-grouped packing costs ``budget_bpw`` bits per weight.

    Raises:
        ValidationError: the budget is not ``b + 32/group_size`` for a packable ``b``.
    """
    from bitsack.kernels.formats import PACKABLE_BITS

    overhead = 32.0 / group_size  # fp16 scale + fp16 zero per group
    bits = budget_bpw - overhead
    if abs(bits - round(bits)) > 1e-9 or int(round(bits)) not in PACKABLE_BITS:
        raise ValidationError("budget", f"{budget_bpw} bits/weight is not a uniform budget at "
                              f"group size {group_size}; valid: b + {overhead:g} for b in "
                              f"{[b for b in PACKABLE_BITS if b < 16]}")
    return int(round(bits))


def uniform_plan(unit_ids: Iterable[str], bits: int) -> dict[str, int]:
    """Every unit at ``bits``."""
    return {uid: bits for uid in unit_ids}


def units_nbytes(units, plan: Mapping[str, int], group_size: int) -> int:
    """Packed bytes of ``units`` under ``plan`` (bits, 0 = pruned), from the format's size."""
    from bitsack.kernels.formats import packed_nbytes

    return sum(packed_nbytes(s.shape[0], s.shape[1], plan[u.id], group_size)
               for u in units for s in u.slices)


def hqq_fake_quantize_(model, units, bits: int, group_size: int) -> int:
    """Quantize every weight the units own with HQQ at ``bits`` (in place); return packed bytes.

    Uniform, so each matrix is quantized whole (the units tile it exactly); a tied embedding
    is one parameter and is quantized once. HQQ's defaults for a base config are used
    (``optimize=True``, proximal solver, ``round_zero`` only at 4 bits, as
    ``hqq_base_quant_config`` sets), on the CPU in float32. Its scale and zero are then rounded
    to fp16 and the weight set to ``scale·(q − zero)`` computed by our own dequantizer, so the
    model is exactly what our packed format would store.
    """
    import torch
    from hqq.core.quantize import Quantizer

    from bitsack.kernels.quantizers import QuantizedTensor

    slices = {}
    for unit in units:
        for s in unit.slices:
            slices.setdefault(s.param, s.transposed)
    with torch.no_grad():
        for name, transposed in sorted(slices.items()):
            param = model.get_parameter(name)
            w = param.detach().to(torch.float32)
            w = w.t().contiguous() if transposed else w
            rows, cols = w.shape
            codes, meta = Quantizer.quantize(
                w, nbits=bits, channel_wise=True, group_size=group_size, optimize=True,
                round_zero=bits == 4, axis=1, bitpack=False, device="cpu")
            # axis=1 groups consecutive elements of the row-major matrix: group k of row r is
            # flat group r·(cols/g) + k, so the [rows·cols/g, 1] metadata reshapes row-major.
            qt = QuantizedTensor(
                codes=codes.reshape(rows, cols).round().to(torch.uint8),
                scale=meta["scale"].reshape(rows, cols // group_size).to(torch.float16),
                zero=meta["zero"].reshape(rows, cols // group_size).to(torch.float16),
                bits=bits, group_size=group_size)
            w_hat = qt.dequantize(torch.float32)
            param.copy_((w_hat.t() if transposed else w_hat).to(param.dtype))
    return units_nbytes(units, uniform_plan((u.id for u in units), bits), group_size)


# ------------------------------------------------------------------------------------------
# problem edits (no torch)
# ------------------------------------------------------------------------------------------

def restrict_options(problem, allowed: Mapping[str, Iterable[str]], name: str | None = None):
    """``bitsack.solver.schema.restrict_options`` (kept here for the harness's callers)."""
    from bitsack.solver.schema import restrict_options as restrict

    return restrict(problem, allowed, name=name)


def without_interactions(problem, name: str | None = None):
    """A copy of ``problem`` with the interaction terms removed (additive objective)."""
    return dataclasses.replace(problem, name=name or problem.name, interactions=None)


def prune_order(problem) -> list[str]:
    """Prunable units by increasing standalone ``prune`` loss (ties by id): the Fisher mask."""
    losses = []
    for unit in problem.units:
        for opt in unit.options:
            if opt.is_prune:
                losses.append((opt.loss, unit.id))
    return [uid for _, uid in sorted(losses)]


def sequential_problem(problem, n_prune: int, name: str | None = None):
    """Stage 1 of the sequential baseline fixed: the ``n_prune`` cheapest units pruned.

    The first ``n_prune`` units of ``prune_order`` get only ``prune``; every other unit loses
    its ``prune`` option. What is left is the mixed-precision problem of stage 2.
    """
    order = prune_order(problem)
    if not 0 <= n_prune <= len(order):
        raise ValidationError("n_prune", f"{n_prune}; valid: 0..{len(order)} (prunable units)")
    pruned = set(order[:n_prune])
    allowed = {u.id: (["prune"] if u.id in pruned else
                      [o.id for o in u.options if not o.is_prune]) for u in problem.units}
    return restrict_options(problem, allowed, name=name)


def min_usage(problem, resource: str) -> float:
    """Smallest possible usage of ``resource`` (each unit at its cheapest option; constraints
    ignored, so a lower bound)."""
    return sum(min(o.cost.get(resource, 0.0) for o in u.options) for u in problem.units)


def sequential_latency_prune_count(problem, resources: Iterable[str], start: int = 0) -> int:
    """Smallest ``n ≥ start`` such that pruning the first ``n`` of ``prune_order`` leaves the
    bits-only rest able to meet every listed budget (cheapest option per unit).

    Raises:
        ValidationError: no number of pruned units meets the budgets.
    """
    order = prune_order(problem)
    limits = {r: problem.limits[r] for r in resources if r in problem.limits}
    by_id = {u.id: u for u in problem.units}

    def cheapest(unit, res: str, pruned: bool) -> float:
        return min(o.cost.get(res, 0.0) for o in unit.options if o.is_prune == pruned)

    # usage with the first n units of ``order`` pruned, every other unit at its cheapest bits
    usage = {r: sum(cheapest(u, r, u.id in set(order[:start])) for u in problem.units)
             for r in limits}
    for n in range(start, len(order) + 1):
        if all(usage[r] <= lim * (1 + 1e-12) for r, lim in limits.items()):
            return n
        if n < len(order):
            unit = by_id[order[n]]
            for r in limits:
                usage[r] += cheapest(unit, r, True) - cheapest(unit, r, False)
    raise ValidationError("budget", f"{limits} cannot be met even with all {len(order)} "
                          "prunable units pruned")
