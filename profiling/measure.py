"""Applying options for real and measuring the loss change: the ``measured`` estimator's engine.

``exact_slice_weights`` gives the weights a unit's slices hold under an option (the numbers
apply packs, for RTN); ``applied`` writes them into the model and restores the originals;
``Measurer`` evaluates the loss of such a model on cached layer inputs, re-running only the
layers from the first one a change touches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bitsack.errors import ValidationError
from bitsack.models.base import Slice, UnitSpec
from bitsack.profiling.capture import build_layer_cache, cached_nll, param_names_by_id, seed_for
from bitsack.profiling.context import Context, Estimate, EstimatorOptions
from bitsack.profiling.layout import OptionLayout, option_key
from bitsack.profiling.perturb import Perturbations, check_finite, output_slices, weight_2d

__all__ = ["Measurer", "applied", "exact_slice_weights", "measure_units", "measured_subset",
           "unit_start_layer"]


def _slice_view(param: torch.Tensor, s: Slice) -> torch.Tensor:
    w = weight_2d(param, s.transposed)
    return w[s.start:s.stop] if s.dim == 0 else w[:, s.start:s.stop]


def exact_slice_weights(unit: UnitSpec, option_id: str, group_size: int,
                        params: Mapping[str, torch.nn.Parameter], quantizer: str = "rtn",
                        perturbations: Perturbations | None = None
                        ) -> list[tuple[Slice, torch.Tensor]]:
    """The weights each slice of ``unit`` holds under ``option_id`` (``[out, in]`` views).

    RTN is separable (see module docstring), so each slice is quantized on its own and gets
    exactly the numbers apply packs. GPTQ reads the stored per-matrix δ (fp16, 11 significant
    bits) from ``perturbations``. ``prune`` zeroes the output slices.
    """
    from bitsack.kernels.quantizers import fake_quantize

    out: list[tuple[Slice, torch.Tensor]] = []
    if option_id == "prune":
        for s in output_slices(unit):
            out.append((s, torch.zeros_like(_slice_view(params[s.param], s))))
        return out
    bits = option_key(option_id)
    for s in unit.slices:
        w = _slice_view(params[s.param].detach(), s)
        if quantizer == "rtn" or bits == 16:
            hat = fake_quantize(w.float(), bits, group_size, "rtn").to(w.dtype)
        else:
            if perturbations is None:
                raise ValidationError("perturbations", "None; the gptq quantizer's measured "
                                      "weights come from the stored per-matrix δ")
            d = perturbations.delta(s.param, bits)
            d = d[s.start:s.stop] if s.dim == 0 else d[:, s.start:s.stop]
            hat = (w.float() + d).to(w.dtype)
        out.append((s, hat))
    return out


class applied:  # noqa: N801 - used as a context manager, reads like a function
    """Context manager: write slice weights into the model, restore the originals on exit.

    Example:
        >>> with applied(params, exact_slice_weights(unit, "b3", 64, params)):  # doctest: +SKIP
        ...     loss = evaluate(model)
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter],
                 writes: Iterable[tuple[Slice, torch.Tensor]]):
        self.params = params
        self.writes = list(writes)
        self.saved: list[tuple[Slice, torch.Tensor]] = []

    def __enter__(self) -> applied:
        with torch.no_grad():
            for s, value in self.writes:
                view = _slice_view(self.params[s.param], s)
                self.saved.append((s, view.clone()))
                view.copy_(value)
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for s, value in reversed(self.saved):
                _slice_view(self.params[s.param], s).copy_(value)
        self.saved.clear()



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
