"""Sensitivity estimators: the predicted loss increase of every (unit, option).

A registry (a dict and a decorator) of functions ``estimator(ctx) -> Estimate`` (``Context`` and
``Estimate``: ``context.py``); the machinery of two of them has its own module: the gradient
pass of ``fisher`` and ``fisher-diag`` (``fisher.py``) and the applied options of ``measured``
(``measure.py``). This module re-exports their public names. Notation:
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

from collections.abc import Callable, Sequence

import numpy as np
import torch

from bitsack.errors import ValidationError
from bitsack.profiling.calibrate import calibration_units, fit_calibration
from bitsack.profiling.capture import input_hessians, param_names_by_id, seed_for
from bitsack.profiling.context import FIRST_ORDER_MODES, Context, Estimate, EstimatorOptions
from bitsack.profiling.fisher import (
    GradientStats,
    diag_from_stats,
    fisher_from_stats,
    gradient_stats,
    project_rows,
)
from bitsack.profiling.measure import (
    Measurer,
    measure_units,
    measured_subset,
    unit_start_layer,
)
from bitsack.profiling.perturb import Perturbations, check_finite

__all__ = [
    "ESTIMATORS",
    "FIRST_ORDER_MODES",
    "Context",
    "Estimate",
    "EstimatorOptions",
    "GradientStats",
    "Measurer",
    "calibration_units",
    "diag_from_stats",
    "fisher_from_stats",
    "get_estimator",
    "gradient_stats",
    "hutchinson_loss",
    "hutchinson_sums",
    "measure_units",
    "measured_subset",
    "project_rows",
    "register_estimator",
    "unit_start_layer",
]

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


# ---- fisher, fisher-diag (the gradient pass: fisher.py) -------------------------------------
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


# ---- measured (measure.py), calibrated (calibrate.py) ---------------------------------------
@register_estimator("measured")
def measured(ctx: Context) -> Estimate:
    """Each option applied alone, ``ℓ(W+δ) − ℓ(W)`` on the held-out sequences (ground truth)."""
    return measure_units(ctx, measured_subset(ctx.layout, ctx.options, ctx.seed))


@register_estimator("calibrated")
def calibrated(ctx: Context) -> Estimate:
    """A cheap estimator rescaled per (unit kind, option) to measured singles."""
    opts = ctx.options
    base = get_estimator(opts.calibrate_base)(ctx)
    ids = calibration_units(ctx.layout, opts.calibrate_fraction, opts.calibrate_min_units,
                            ctx.seed)
    meas = measure_units(ctx, ids)
    _, cols = ctx.layout.subset(ids)
    cal = fit_calibration(ctx.layout, base.loss, meas.loss, cols, seed=ctx.seed)
    loss, U = cal.apply(ctx.layout, base.loss, base.U)
    info = {"base": opts.calibrate_base, "base_info": base.info, "measured": meas.info,
            "calibration": cal.to_dict()}
    return Estimate(ctx.layout, loss, U, info)

