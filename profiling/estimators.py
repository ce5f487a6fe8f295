"""Sensitivity estimators: the predicted loss increase of every (unit, option).

A registry (a dict and a decorator) of functions ``estimator(ctx) -> Estimate``. Notation:
``ℓ`` is the mean next-token loss (nats/token) over the calibration positions, ``δ = δ(u, o)``
the option's weight perturbation (``perturb.py``: ``Q_b(W_u) − W_u``, or ``−W_u`` on the
unit's output slices for prune), ``g_r`` the gradient of the mean loss over the ``T_r``
positions of gradient row r (a sequence, or a chunk of one), R rows in all.

- ``fisher``: ``v_r(u,o) = g_r·δ(u,o)``; standalone ``loss = ½ · mean_r T_r v_r²`` and the
  interaction factor ``U[r, (u,o)] = sqrt(T_r / R) · v_r(u,o)``, so the problem's objective
  ``Σ_u loss + Σ_{u<u'} U_i·U_j = ½ · mean_r T_r (g_r·δ_total)²`` — the Fisher quadratic form
  ``½ δ_totalᵀ F̄ δ_total`` of the whole plan. With labels sampled from the model, F̄ is the
  Gauss-Newton matrix of the loss (label-free) and the estimate is unbiased; with data
  labels it is the empirical Fisher. An optional first-order term ``mean_r v_r`` (off by
  default) can be kept where ``|mean| > z·stderr``.
- ``fisher-diag``: ``½ Σ_i F̄_ii δ_i²`` with ``F̄_ii = mean_r T_r g_{r,i}²``; additive.
- ``hutchinson``: ``½ · (Tr(H_u)/n_u) · ‖δ_u‖²`` (HAWQ-v2, Dong et al. 2020), with
  ``Tr(H_u) ≈ mean_z Σ_{i∈u} z_i (Hz)_i`` over Rademacher probes z and Hessian-vector products
  by double backward of the data loss; additive.
- ``layerwise``: ``‖δ X‖² / n_tokens`` from each matrix's own inputs X (the local objective of
  layer-wise methods such as GPTQ), summed over the unit's slices; for prune ``‖W_u X_u‖²``
  of the removed output slices. Units: squared activations, not nats; additive.
- ``measured``: apply the option alone and measure ``ℓ(W + δ) − ℓ(W)`` on held-out sequences,
  re-running only the layers from the unit's own (cached inputs); ground truth, expensive.
- ``calibrated``: a cheap estimator (``fisher``) rescaled per (unit kind, option) to
  ``measured`` singles of a seeded subset of units (``calibrate.py``); ``U``'s columns are
  scaled by the square roots, so the interaction form stays a (rescaled) Fisher form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from bitsack.errors import ValidationError
from bitsack.profiling.capture import (
    LABEL_SOURCES,
    GradRow,
    ResourceMeter,
    build_layer_cache,
    cached_nll,
    input_hessians,
    lm_gradient_rows,
    param_names_by_id,
    seed_for,
)
from bitsack.profiling.distributed import Dist
from bitsack.profiling.layout import OptionLayout
from bitsack.profiling.perturb import (
    Perturbations,
    applied,
    check_finite,
    exact_slice_weights,
)

FIRST_ORDER_MODES = ("off", "significant", "on")


@dataclass(frozen=True)
class EstimatorOptions:
    """Knobs of the estimators (defaults are the measured-best choices, bench/profiling.py).

    Attributes:
        fisher_labels: ``sampled`` (labels drawn from the model: Gauss-Newton Fisher) or
            ``data`` (empirical Fisher).
        fisher_draws: label draws per sequence (each one backward; sampled labels only).
        fisher_chunks: gradients per sequence and draw: positions split into this many
            contiguous chunks (1 = per-sequence gradients; more = finer, one backward each).
        first_order: ``off`` | ``significant`` (keep ``mean v`` where ``|mean| > z·stderr``)
            | ``on``.
        first_order_z: z of the significance test.
        hutchinson_probes: Rademacher probes per sequence.
        hutchinson_samples: sequences used by ``hutchinson`` (the first ones).
        holdout: sequences held out (the last ones) for ``measured`` inside ``calibrated``
            when no separate held-out tokens are given; None = a quarter, at least 1.
        measure_units: unit ids ``measured`` evaluates (None: all, or ``measure_fraction``).
        measure_fraction: seeded fraction of units ``measured`` evaluates.
        calibrate_base: the cheap estimator ``calibrated`` rescales.
        calibrate_fraction: fraction of units measured to fit the calibration (stratified by
            kind, at least ``calibrate_min_units`` per kind).
        calibrate_min_units: see above.
        batch_size: sequences per forward pass (layerwise, measured, Hessians).
        diag: also compute ``fisher-diag`` rows during a ``fisher`` pass (bench).
    """

    fisher_labels: str = "sampled"
    fisher_draws: int = 1
    fisher_chunks: int = 1
    first_order: str = "off"
    first_order_z: float = 3.0
    hutchinson_probes: int = 4
    hutchinson_samples: int = 8
    holdout: int | None = None
    measure_units: tuple[str, ...] | None = None
    measure_fraction: float | None = None
    calibrate_base: str = "fisher"
    calibrate_fraction: float = 0.1
    calibrate_min_units: int = 6
    batch_size: int = 8
    diag: bool = False

    def __post_init__(self) -> None:
        if self.fisher_labels not in LABEL_SOURCES:
            raise ValidationError("fisher_labels", f"{self.fisher_labels!r}; valid: "
                                  f"{', '.join(LABEL_SOURCES)}")
        for name in ("fisher_draws", "fisher_chunks", "hutchinson_probes",
                     "hutchinson_samples", "batch_size", "calibrate_min_units"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValidationError(name, f"{v!r}; valid: a positive integer")
        if self.fisher_labels == "data" and self.fisher_draws != 1:
            raise ValidationError("fisher_draws", f"{self.fisher_draws} with data labels; "
                                  "valid: 1 (data labels are fixed; draws apply to sampled)")
        if self.first_order not in FIRST_ORDER_MODES:
            raise ValidationError("first_order", f"{self.first_order!r}; valid: "
                                  f"{', '.join(FIRST_ORDER_MODES)}")
        if not (self.first_order_z > 0 and math.isfinite(self.first_order_z)):
            raise ValidationError("first_order_z", f"{self.first_order_z!r}; valid: > 0")
        for name in ("measure_fraction", "calibrate_fraction"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ValidationError(name, f"{v!r}; valid: a fraction in (0, 1]")
        if self.holdout is not None and (isinstance(self.holdout, bool)
                                         or not isinstance(self.holdout, int)
                                         or self.holdout < 1):
            raise ValidationError("holdout", f"{self.holdout!r}; valid: a positive integer")
        if self.calibrate_base in ("measured", "calibrated"):
            raise ValidationError("calibrate_base", f"{self.calibrate_base!r}; valid: a cheap "
                                  "estimator (fisher, fisher-diag, hutchinson, layerwise)")

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.fisher_labels,) * self.fisher_draws


@dataclass(frozen=True, eq=False)
class Estimate:
    """An estimator's answer over ``layout`` (flat option order).

    Attributes:
        layout: the units and options estimated (a subset for ``measured`` on a subset).
        loss: ``[n_options]`` predicted loss increase, nats/token (``layerwise``: squared
            activation error per token).
        U: ``[N, n_options]`` interaction factor, or None (additive estimators).
        info: JSON-able facts (rows, label source, fit, ...).
    """

    layout: OptionLayout
    loss: np.ndarray
    U: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """Everything an estimator reads. ``tokens`` are the gradient/statistics sequences
    (global, unsharded); ``holdout`` the sequences ``measured`` uses (None: ``tokens``)."""

    model: torch.nn.Module
    layout: OptionLayout
    tokens: torch.Tensor
    group_size: int
    quantizer: str = "rtn"
    options: EstimatorOptions = field(default_factory=EstimatorOptions)
    holdout: torch.Tensor | None = None
    seed: int = 0
    dist: Dist = field(default_factory=Dist)
    progress: bool = False
    meter: ResourceMeter = field(default_factory=ResourceMeter)

    def local(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        """This rank's shard of ``tokens`` and the global index of its first sequence."""
        r = self.dist.shard(tokens.shape[0])
        return tokens[r.start:r.stop], r.start

    @property
    def perturbations_ready(self) -> bool:
        """Whether the δ's were computed (cheap estimators like ``measured`` may not)."""
        return "perturbations" in self.__dict__

    @cached_property
    def perturbations(self) -> Perturbations:
        pert = Perturbations(self.model, self.layout, self.group_size, self.quantizer)
        with self.meter.phase("quantize"), self._bar(len(pert.entries), "quantize") as bar:
            hess = None
            if self.quantizer == "gptq":
                hess = self._gptq_hessians
            pert.compute(hessians=hess, progress=bar.update)
        return pert

    def _gptq_hessians(self):
        local, _ = self.local(self.tokens)
        names = set(Perturbations(self.model, self.layout, self.group_size).entries)
        for name, hess in input_hessians(self.model, local, names, self.options.batch_size,
                                         dist=self.dist):
            yield name, hess.matrix()

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not (self.progress and self.dist.is_main),
                    leave=False, dynamic_ncols=True)


EstimatorFn = Callable[[Context], Estimate]
ESTIMATORS: dict[str, EstimatorFn] = {}


def register_estimator(name: str) -> Callable[[EstimatorFn], EstimatorFn]:
    """Decorator: make ``fn(ctx) -> Estimate`` available as estimator ``name``."""

    def deco(fn: EstimatorFn) -> EstimatorFn:
        ESTIMATORS[name] = fn
        return fn

    return deco


def get_estimator(name: str) -> EstimatorFn:
    """The registered estimator ``name``; ValidationError listing the valid ones."""
    if name not in ESTIMATORS:
        raise ValidationError("estimator", f"{name!r} is unknown; valid: "
                              f"{', '.join(sorted(ESTIMATORS))}")
    return ESTIMATORS[name]


# ---- gradient statistics (fisher, fisher-diag) ------------------------------------------
@dataclass(frozen=True, eq=False)
class GradientStats:
    """Per-row projections of one gradient pass, gathered over ranks in sequence order.

    Attributes:
        V: ``[R, n_options]`` ``v_r(u,o) = g_r·δ(u,o)``.
        D: ``[R, n_options]`` ``Σ_{i∈(u,o)} g_{r,i}² δ_i²`` (only with ``diag``), else None.
        T: ``[R]`` positions behind each row's mean loss.
        source: ``[R]`` label source of each row.
        seq: ``[R]`` global sequence index of each row.
    """

    V: np.ndarray
    D: np.ndarray | None
    T: np.ndarray
    source: np.ndarray
    seq: np.ndarray

    def select(self, mask: np.ndarray) -> GradientStats:
        return GradientStats(self.V[mask], None if self.D is None else self.D[mask],
                             self.T[mask], self.source[mask], self.seq[mask])


def project_rows(pert: Perturbations, rows, diag: bool = False,
                 on_row: Callable[[], None] | None = None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[GradRow]]:
    """Project each gradient row on every option (and its squared diagonal form)."""
    vs: list[torch.Tensor] = []
    ds: list[torch.Tensor] = []
    meta: list[GradRow] = []
    for row in rows:
        vs.append(pert.project(row.grads)[:-1])
        if diag:
            ds.append(_diag_row(pert, row.grads)[:-1])
        meta.append(GradRow({}, row.tokens, row.seq, row.source, row.draw, row.chunk))
        if on_row:
            on_row()
    return vs, ds, meta


def _diag_row(pert: Perturbations, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    acc = pert.new_accumulator()
    for name, entry in pert.entries.items():
        g = grads.get(name)
        if g is None:
            continue
        g2 = entry.view(g).square()
        for key in entry.maps:
            d, inv = pert.scaled_delta(name, key)
            pert.accumulate(acc, entry, key, torch.mul(g2, d).mul_(d), inv * inv)
    return acc


def gradient_stats(ctx: Context, sources: Sequence[str] | None = None, chunks: int | None = None,
                   diag: bool | None = None) -> GradientStats:
    """One gradient pass over ``ctx.tokens``: every row projected on every option.

    Memory: the model, one sequence's activations and gradients, and the stored δ's; the
    per-row projections are ``R × n_options`` float64.
    """
    opts = ctx.options
    sources = tuple(sources or opts.sources)
    chunks = chunks or opts.fisher_chunks
    diag = opts.diag if diag is None else diag
    pert = ctx.perturbations
    local, offset = ctx.local(ctx.tokens)
    names = list(pert.entries)
    n_rows = local.shape[0] * len(sources) * chunks
    with ctx.meter.phase("gradients"), ctx._bar(n_rows, "gradients") as bar:
        rows = lm_gradient_rows(ctx.model, names, local, sources=sources, chunks=chunks,
                                seed=ctx.seed, seq_offset=offset)
        vs, ds, meta = project_rows(pert, rows, diag, on_row=bar.update)
    n_opt = ctx.layout.n_options
    V = torch.stack(vs) if vs else torch.zeros((0, n_opt), dtype=torch.float64)
    D = (torch.stack(ds) if ds else torch.zeros((0, n_opt), dtype=torch.float64)) if diag \
        else None
    T = torch.tensor([m.tokens for m in meta], dtype=torch.float64)
    src = torch.tensor([LABEL_SOURCES.index(m.source) for m in meta], dtype=torch.float64)
    seq = torch.tensor([m.seq for m in meta], dtype=torch.float64)
    with ctx.meter.phase("gather"):
        V = ctx.dist.gather_rows(V)
        D = ctx.dist.gather_rows(D) if D is not None else None
        T, src, seq = (ctx.dist.gather_rows(x[:, None])[:, 0] for x in (T, src, seq))
    check_finite(V, ctx.layout, "fisher projection g·δ")
    if D is not None:
        check_finite(D, ctx.layout, "fisher-diag projection g²·δ²")
    return GradientStats(V.numpy(), None if D is None else D.numpy(), T.numpy(),
                         np.array([LABEL_SOURCES[int(s)] for s in src.numpy()]),
                         seq.numpy().astype(np.int64))


def fisher_from_stats(layout: OptionLayout, stats: GradientStats, first_order: str = "off",
                      z: float = 3.0) -> Estimate:
    """The ``fisher`` estimate from gradient rows (module docstring for the formulas)."""
    V, T = stats.V, stats.T
    R = V.shape[0]
    if R == 0:
        raise ValidationError("calib_tokens", "no gradient rows; valid: at least one sequence")
    U = np.sqrt(T / R)[:, None] * V
    second = 0.5 * np.einsum("ri,ri->i", U, U)
    loss = second.copy()
    info: dict[str, Any] = {"rows": int(R), "tokens_per_row": float(T.mean()),
                            "label_sources": sorted(set(stats.source.tolist())),
                            "first_order": first_order}
    if first_order != "off":
        # The first-order change of the mean loss over all positions is Σ_r T_r v_r / Σ_r T_r
        w = T / T.sum()
        mean = w @ V
        if R > 1:
            var = (w[:, None] * (V - mean) ** 2).sum(0) * R / (R - 1)
            stderr = np.sqrt(var / R)
        else:
            stderr = np.full_like(mean, np.inf)
        keep = np.abs(mean) > z * stderr if first_order == "significant" \
            else np.ones_like(mean, dtype=bool)
        loss = loss + np.where(keep, mean, 0.0)
        info.update(first_order_z=z, first_order_kept=int(keep.sum()))
    return Estimate(layout, loss, U, info)


def diag_from_stats(layout: OptionLayout, stats: GradientStats) -> Estimate:
    """The ``fisher-diag`` estimate: ``½ Σ_i F̄_ii δ_i²`` with ``F̄_ii = mean_r T_r g_{r,i}²``."""
    if stats.D is None:
        raise ValidationError("diag", "False; the gradient pass did not compute diagonal rows")
    R = stats.D.shape[0]
    loss = 0.5 * (stats.T @ stats.D) / R
    return Estimate(layout, loss, None, {"rows": int(R),
                                         "label_sources": sorted(set(stats.source.tolist()))})


@register_estimator("fisher")
def fisher(ctx: Context) -> Estimate:
    """Per-sample Fisher projections, standalone losses and the interaction factor U."""
    stats = gradient_stats(ctx)
    return fisher_from_stats(ctx.layout, stats, ctx.options.first_order,
                             ctx.options.first_order_z)


@register_estimator("fisher-diag")
def fisher_diag(ctx: Context) -> Estimate:
    """Diagonal Fisher: ``½ Σ_i F̄_ii δ_i²`` per option, additive."""
    stats = gradient_stats(ctx, diag=True)
    return diag_from_stats(ctx.layout, stats)


# ---- hutchinson ----------------------------------------------------------------------------
def hutchinson_sums(pert: Perturbations, params: Sequence[torch.nn.Parameter],
                    losses, probes: int, seed: int,
                    on_probe: Callable[[], None] | None = None) -> torch.Tensor:
    """``Σ_{n,p} Σ_{i∈(u,o)} z_i (H_n z)_i`` per option: Hutchinson trace sums.

    Args:
        pert: the perturbations (their slices define each option's weights).
        params: the parameters in ``pert.entries`` order.
        losses: iterable of ``(global index n, scalar loss_n)`` with a graph to ``params``.
        probes: Rademacher probes per loss, seeded by ``(seed, n, probe)``.
        seed: seed.
        on_probe: called after each probe.

    Returns:
        float64 ``[n_options + 1]`` sums; divide by (losses × probes) for the mean trace.
    """
    names = list(pert.entries)
    acc = pert.new_accumulator()
    for n, loss in losses:
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for p in range(probes):
            gen = torch.Generator().manual_seed(seed_for(seed, n, p, 7))
            zs = [(torch.randint(0, 2, q.shape, generator=gen, dtype=torch.int8)
                   .to(q.device, torch.float32) * 2 - 1) for q in params]
            gz = sum((g * z).sum() for g, z in zip(grads, zs, strict=True))
            hz = torch.autograd.grad(gz, params, retain_graph=p < probes - 1)
            zhz = {name: (z * h).detach() for name, z, h in zip(names, zs, hz, strict=True)}

            def fn(entry, key, zhz=zhz):
                return entry.view(zhz[entry.name])

            pert.reduce(fn, out=acc)
            if on_probe:
                on_probe()
        del grads
    return acc


def hutchinson_loss(pert: Perturbations, trace: np.ndarray) -> np.ndarray:
    """``½ · (Tr(H_u)/n_u) · ‖δ_u‖²`` from per-option traces (HAWQ-v2's additive form)."""
    counts = pert.counts().numpy()
    sq = pert.squared_norms().numpy()
    return 0.5 * trace / np.maximum(counts, 1.0) * sq


@register_estimator("hutchinson")
def hutchinson(ctx: Context) -> Estimate:
    """HAWQ-style ``½ · (Tr(H_u)/n_u) · ‖δ_u‖²`` with Hutchinson traces of the data-loss
    Hessian (Rademacher probes, seeded per global sequence and probe)."""
    import torch.nn.functional as F

    from bitsack.profiling.capture import _logits, grad_only

    opts = ctx.options
    pert = ctx.perturbations
    n_seq = min(opts.hutchinson_samples, ctx.tokens.shape[0])
    local, offset = ctx.local(ctx.tokens[:n_seq])
    names = list(pert.entries)
    named = dict(ctx.model.named_parameters())
    params = [named[n] for n in names]

    def losses():
        for n in range(local.shape[0]):
            ids = local[n:n + 1].to(params[0].device)
            logits = _logits(ctx.model, ids)[0, :-1]
            yield offset + n, F.cross_entropy(logits, ids[0, 1:])

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Hessian-vector products differentiate the backward pass: the fused CPU flash-attention
    # kernel has no double backward, the math kernel does (same values).
    with ctx.meter.phase("hutchinson"), ctx._bar(local.shape[0] * opts.hutchinson_probes,
                                                 "hutchinson") as bar, \
            grad_only(ctx.model, names), sdpa_kernel([SDPBackend.MATH]):
        acc = hutchinson_sums(pert, params, losses(), opts.hutchinson_probes, ctx.seed,
                              bar.update)
    acc = ctx.dist.all_reduce(acc)
    trace = (acc[:-1] / (n_seq * opts.hutchinson_probes)).numpy()
    check_finite(torch.from_numpy(trace), ctx.layout, "hutchinson trace")
    return Estimate(ctx.layout, hutchinson_loss(pert, trace), None,
                    {"sequences": int(n_seq), "probes": opts.hutchinson_probes})


# ---- layerwise -----------------------------------------------------------------------------
def _embedding_counts(ctx: Context, tokens: torch.Tensor, names: set[str]
                      ) -> dict[str, torch.Tensor]:
    """How often each row of each embedding-lookup weight in ``names`` is read by ``tokens``.

    Found with a probe weight whose row v is the number v: the lookup's output then *is* the
    index, whatever offset or position logic the module applies (OPT's learned positions).
    """
    from bitsack.models import get_adapter

    adapter = get_adapter(ctx.model)
    by_id = param_names_by_id(ctx.model)
    mods = {}
    for _, mod in ctx.model.named_modules():
        if isinstance(mod, torch.nn.Embedding) and by_id.get(id(mod.weight)) in names:
            mods[id(mod)] = (by_id[id(mod.weight)], mod)
    counts: dict[str, torch.Tensor] = {}
    calls: list[tuple[str, torch.nn.Module, tuple, dict]] = []

    probing = [False]

    def grab(mod, args, kwargs):
        if not probing[0]:  # the probe calls below run the module (and this hook) again
            calls.append((mods[id(mod)][0], mod, args, kwargs))

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for _, m in mods.values()]
    device = next(ctx.model.parameters()).device
    try:
        with torch.no_grad():
            for b in range(0, tokens.shape[0], ctx.options.batch_size):
                calls.clear()
                adapter.capture_layer_inputs(tokens[b:b + ctx.options.batch_size].to(device))
                probing[0] = True
                for name, mod, args, kwargs in calls:
                    rows = mod.weight.shape[0]
                    probe = torch.arange(rows, dtype=torch.float64, device=device)[:, None]
                    idx = torch.func.functional_call(mod, {"weight": probe}, args, kwargs)
                    c = torch.bincount(idx.reshape(-1).round().long(), minlength=rows)
                    counts[name] = counts.get(name, 0) + c.double()
                probing[0] = False
    finally:
        for h in handles:
            h.remove()
    return counts


@register_estimator("layerwise")
def layerwise(ctx: Context) -> Estimate:
    """``‖δ X‖²`` per token from each matrix's own inputs (squared output error)."""
    pert = ctx.perturbations
    local, _ = ctx.local(ctx.tokens)
    acc = pert.new_accumulator()
    n_tokens = int(ctx.dist.sum_float(float(local.numel())))
    names = set(pert.entries)
    with ctx.meter.phase("layerwise"), ctx._bar(len(names), "layerwise") as bar:
        for name, hess in input_hessians(ctx.model, local, names, ctx.options.batch_size,
                                         dist=ctx.dist):
            _layerwise_matrix(pert, name, hess.S.float(), acc)
            bar.update()
        counts = _embedding_counts(ctx, local, names)
        for name in sorted(counts):
            c = ctx.dist.all_reduce(counts[name]).float()
            entry = pert.entries[name]
            for key in entry.maps:
                d, inv = pert.scaled_delta(name, key)
                # embedding weights are stored [rows, dim] like δ (never transposed)
                pert.accumulate(acc, entry, key, c[:, None] * d.float().square(), inv * inv)
    loss = (acc[:-1] / n_tokens).numpy()
    check_finite(torch.from_numpy(loss), ctx.layout, "layerwise error")
    return Estimate(ctx.layout, loss, None, {"tokens": n_tokens,
                                             "units": "squared activation error per token"})


def _layerwise_matrix(pert: Perturbations, name: str, H: torch.Tensor,
                      acc: torch.Tensor) -> None:
    """Add ``Σ_t ‖δ x_t‖²`` of matrix ``name`` per option (H = Σ_t x_t x_tᵀ, float32)."""
    entry = pert.entries[name]
    for key in entry.maps:
        d, inv = pert.scaled_delta(name, key)
        d = d.float()
        if entry.axis == 0:
            # rows r of a unit: Σ_r δ_r H δ_rᵀ
            values = (d @ H).mul_(d)
        else:
            # columns C of a unit: Σ_r δ_{r,C} H_CC δ_{r,C}ᵀ (cross-block terms belong to
            # no single unit)
            values = torch.zeros_like(d)
            for _, s in entry.slices:
                block = d[:, s.start:s.stop]
                values[:, s.start:s.stop] = (block @ H[s.start:s.stop, s.start:s.stop]) * block
        pert.accumulate(acc, entry, key, values, inv * inv)


# ---- measured ------------------------------------------------------------------------------
def unit_start_layer(model: torch.nn.Module, unit, n_layers: int) -> int | None:
    """First decoder layer a perturbation of ``unit`` changes (None: the embeddings)."""
    if unit.layer is not None:
        return int(unit.layer)
    by_id = param_names_by_id(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {s.param for s in unit.slices}
    for _, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.nn.Parameter) and by_id.get(id(w)) in names and mod is not out_emb:
            return None  # used before the head (an embedding): re-run everything
    return n_layers


def measured_subset(layout: OptionLayout, options: EstimatorOptions, seed: int
                    ) -> list[str] | None:
    """The unit ids ``measured`` evaluates (None = all)."""
    if options.measure_units is not None:
        return list(options.measure_units)
    if options.measure_fraction is None or options.measure_fraction >= 1:
        return None
    rng = np.random.default_rng(seed_for(seed, 101))
    n = len(layout.units)
    k = max(1, round(options.measure_fraction * n))
    pick = sorted(rng.choice(n, size=k, replace=False).tolist())
    return [layout.units[i].id for i in pick]


class Measurer:
    """Applies options for real and measures the loss change on cached layer inputs."""

    def __init__(self, ctx: Context, tokens: torch.Tensor):
        self.ctx = ctx
        local, _ = ctx.local(tokens)
        with ctx.meter.phase("measure_cache"):
            self.cache = build_layer_cache(ctx.model, local, ctx.options.batch_size)
        self.n_tokens = int(ctx.dist.sum_float(float(self.cache.n_tokens)))
        self.base_nll = ctx.dist.sum_float(self.cache.base_nll)
        self.params = dict(ctx.model.named_parameters())
        self.n_layers = self.cache.n_layers

    @property
    def base_loss(self) -> float:
        return self.base_nll / self.n_tokens

    def _writes(self, unit, option_id: str):
        pert = self.ctx.perturbations if self.ctx.quantizer == "gptq" else None
        return exact_slice_weights(unit, option_id, self.ctx.group_size, self.params,
                                   self.ctx.quantizer, pert)

    def delta_loss(self, assignment: Sequence[tuple[Any, str]]) -> float:
        """``ℓ(plan) − ℓ(base)`` for ``[(unit, option id), ...]`` applied together."""
        writes = []
        start: int | None = self.n_layers
        for unit, oid in assignment:
            writes.extend(self._writes(unit, oid))
            s = unit_start_layer(self.ctx.model, unit, self.n_layers)
            start = None if s is None or start is None else min(start, s)
        with applied(self.params, writes):
            nll = cached_nll(self.ctx.model, self.cache, start)
        return (self.ctx.dist.sum_float(nll) - self.base_nll) / self.n_tokens


@register_estimator("measured")
def measured(ctx: Context) -> Estimate:
    """Each option applied alone, ``ℓ(W+δ) − ℓ(W)`` on the held-out sequences (ground truth)."""
    return measure_units(ctx, measured_subset(ctx.layout, ctx.options, ctx.seed))


def measure_units(ctx: Context, subset: Sequence[str] | None) -> Estimate:
    """``measured`` over the units ``subset`` (None: all), each option applied alone."""
    layout, _ = ctx.layout.subset(subset) if subset is not None else (ctx.layout, None)
    tokens = ctx.holdout if ctx.holdout is not None else ctx.tokens
    meas = Measurer(ctx, tokens)
    loss = np.zeros(layout.n_options)
    with ctx.meter.phase("measure"), ctx._bar(layout.n_options, "measure") as bar:
        for j, (ui, oid) in enumerate(layout.flat):
            loss[j] = meas.delta_loss([(layout.units[ui], oid)])
            bar.update()
    check_finite(torch.from_numpy(loss), layout, "measured loss change")
    return Estimate(layout, loss, None, {"tokens": meas.n_tokens, "base_loss": meas.base_loss,
                                         "units_measured": len(layout.units),
                                         "subset": subset is not None})


# ---- calibrated ----------------------------------------------------------------------------
def calibration_units(layout: OptionLayout, fraction: float, min_per_kind: int,
                      seed: int) -> list[str]:
    """A seeded subset of units, stratified by kind: ``max(min, ⌈fraction·n_kind⌉)`` each."""
    rng = np.random.default_rng(seed_for(seed, 202))
    by_kind: dict[str, list[int]] = {}
    for i, u in enumerate(layout.units):
        by_kind.setdefault(u.kind, []).append(i)
    pick: list[int] = []
    for kind in sorted(by_kind):
        idx = by_kind[kind]
        k = min(len(idx), max(min_per_kind, math.ceil(fraction * len(idx))))
        pick.extend(rng.choice(idx, size=k, replace=False).tolist())
    return [layout.units[i].id for i in sorted(pick)]


@register_estimator("calibrated")
def calibrated(ctx: Context) -> Estimate:
    """A cheap estimator rescaled per (unit kind, option) to measured singles."""
    from bitsack.profiling.calibrate import fit_calibration

    opts = ctx.options
    base = get_estimator(opts.calibrate_base)(ctx)
    ids = calibration_units(ctx.layout, opts.calibrate_fraction, opts.calibrate_min_units,
                            ctx.seed)
    meas = measure_units(ctx, ids)
    _, cols = ctx.layout.subset(ids)
    cal = fit_calibration(ctx.layout, base.loss, meas.loss, cols, seed=ctx.seed)
    scale = cal.scales(ctx.layout)
    loss = base.loss * scale
    U = None if base.U is None else base.U * np.sqrt(scale)[None, :]
    info = {"base": opts.calibrate_base, "base_info": base.info, "measured": meas.info,
            "calibration": cal.to_dict()}
    return Estimate(ctx.layout, loss, U, info)
