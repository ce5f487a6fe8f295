"""Apply a plan: prune (real surgery), quantize (RTN or sequential GPTQ), pack, save, load.

A *plan* maps unit ids to bits: 0 = prune, 1..8 = quantize, 16 = keep in fp16. Units the plan
does not name stay untouched (dense, original dtype) and are reported as such.

``compress`` runs in this order:

1. surgery: pruned head groups and MLP blocks leave the matrices (``bitsack.models.prune``);
2. permutation: inside each layer, units are reordered by bit-width so every matrix has one
   contiguous segment per bit-width (function preserving);
3. input embeddings (untied, and position embeddings) are quantized with RTN first, so the
   calibration inputs of layer 0 are what the compressed model computes;
4. the decoder layers, one at a time (only the current layer's work on the device, as GPTQ
   does, so a model larger than memory can be compressed): with ``gptq`` each layer is
   quantized on inputs produced by the *already compressed* layers before it, and inside a
   layer stage by stage ("true sequential": q/k/v, then o, then gate/up, then down — found
   generically as linears that read the same input tensor), so error propagation is
   compensated rather than ignored (Frantar et al. 2022);
5. the lm_head (tied or not) with GPTQ on the final hidden states (RTN with ``rtn``).

The packed model is saved as ``model.safetensors`` + ``bitsack.json`` (schema version, plan,
per-layer dims, segment layout, per-tensor SHA-256) + the base ``config.json`` and tokenizer;
``load_compressed`` rebuilds it and refuses a truncated file, a hash mismatch, a wrong shape
or an unknown schema version.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsack.errors import FormatError, ModelError, ValidationError
from bitsack.models import get_adapter
from bitsack.models.base import UnitSpec

MODEL_SCHEMA = "bitsack.model/v1"
QUANTIZERS = ("rtn", "gptq")


@dataclass(frozen=True)
class ApplyConfig:
    """How a plan is applied.

    Attributes:
        quantizer: ``gptq`` (needs calibration tokens) or ``rtn``.
        group_size: quantization group size along the input dimension (as profiled).
        mlp_group: MLP channels per unit (as profiled).
        damp: GPTQ damping, a fraction of mean(diag H).
        act_order: GPTQ column order by decreasing diag H (static groups).
        true_sequential: quantize a layer's linears stage by stage (see module docstring).
        batch_size: calibration sequences per forward through a layer.
        backend: kernel backend of the packed modules (``torch``, ``reference``, ``cupy``).
    """

    quantizer: str = "gptq"
    group_size: int = 64
    mlp_group: int = 128
    damp: float = 0.01
    act_order: bool = True
    true_sequential: bool = True
    batch_size: int = 8
    backend: str = "torch"

    def __post_init__(self) -> None:
        if self.quantizer not in QUANTIZERS:
            raise ValidationError("quantizer", f"{self.quantizer!r}; valid: {list(QUANTIZERS)}")
        if self.batch_size < 1:
            raise ValidationError("batch_size", f"{self.batch_size}; valid: a positive integer")


@dataclass(frozen=True)
class CompressResult:
    """A compressed model and what was done to it.

    Attributes:
        model: the compressed model (packed modules in place of the quantized linears).
        plan: unit id -> bits as applied (0 = pruned).
        dims: per-layer dims record after surgery and permutation.
        packed_bytes: bytes of the packed weights of the planned units (equals the plan's
            ``memory_bytes`` usage).
        untouched: unit ids the plan did not name (left dense).
        report: timings, GPTQ losses per matrix, damping escalations.
    """

    model: Any
    plan: dict[str, int]
    dims: dict
    packed_bytes: int
    untouched: tuple[str, ...]
    report: dict = field(default_factory=dict)


def plan_from_solution(problem, solution) -> dict[str, int]:
    """Unit id -> bits (0 = prune) from a solved problem.

    Raises:
        ValidationError: the solution has no assignment (infeasible / no solution).
    """
    from bitsack.solver.problem import option_bits

    if not solution.assignment:
        raise ValidationError("solution.status", f"{solution.status!r} has no assignment to "
                              "apply; valid: optimal or feasible")
    unknown = sorted(set(solution.assignment) - {u.id for u in problem.units})
    if unknown:
        raise ValidationError("solution.assignment", f"units {unknown[:5]} are not in problem "
                              f"{problem.name!r}")
    return {uid: option_bits(oid) for uid, oid in solution.assignment.items()}


# ------------------------------------------------------------------------------------------
# module plumbing
# ------------------------------------------------------------------------------------------

def _module_name(param: str) -> str:
    if not param.endswith(".weight"):
        raise ModelError(f"slice parameter {param!r} is not a '.weight'")
    return param[: -len(".weight")]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D stores its weight [in, out]
    return type(module).__name__ == "Conv1D"


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight in [out, in] orientation, float32."""
    w = module.weight.detach()
    return (w.t() if _is_conv1d(module) else w).to(torch.float32)


def _bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().clone()


def _runs(spec: list[tuple[int, int, int, int]]) -> tuple[int, list[tuple[int, int, int]]]:
    """Merge a matrix's unit slices ``(dim, start, stop, bits)`` into contiguous runs.

    Returns ``(axis, [(start, stop, bits), ...])`` covering the axis in order.
    """
    axes = {d for d, _, _, _ in spec}
    if len(axes) != 1:
        raise ModelError(f"a matrix is owned along both axes {sorted(axes)}; units must own "
                         "whole rows or whole columns of a matrix")
    axis = axes.pop()
    runs: list[list[int]] = []
    for _, start, stop, bits in sorted(spec, key=lambda s: s[1]):
        # Column runs merge only where the packed words stay additive (a run's bits·width a
        # multiple of 32), so the packed bytes equal the sum of the units' memory costs.
        aligned = axis == 0 or bits == 16 or not runs or \
            (bits * (runs[-1][1] - runs[-1][0])) % 32 == 0
        if runs and runs[-1][1] == start and runs[-1][2] == bits and aligned:
            runs[-1][1] = stop
        else:
            if runs and runs[-1][1] != start:
                raise ModelError(f"unit slices leave a gap at {runs[-1][1]}:{start}")
            runs.append([start, stop, bits])
    return axis, [tuple(r) for r in runs]


def _matrix_specs(units: list[UnitSpec], plan: Mapping[str, int]
                  ) -> dict[str, list[tuple[int, int, int, int]]]:
    """Module name -> [(dim, start, stop, bits)] over the planned units' slices."""
    out: dict[str, list[tuple[int, int, int, int]]] = {}
    for unit in units:
        bits = plan.get(unit.id)
        for s in unit.slices:
            out.setdefault(_module_name(s.param), []).append(
                (s.dim, s.start, s.stop, 16 if bits is None else bits))
    return out


def _pack_rtn(weight: torch.Tensor, axis: int, runs, group_size: int, bias, backend: str):
    from bitsack.kernels.packed import PackedLinear
    from bitsack.kernels.quantizers import rtn_quantize

    parts = []
    for start, stop, bits in runs:
        piece = weight[start:stop] if axis == 0 else weight[:, start:stop]
        parts.append(piece.to(torch.float16) if bits == 16 else
                     rtn_quantize(piece, bits, group_size))
    return PackedLinear.from_quantized(parts, axis, bias=bias, backend=backend)


def _pack_gptq(weight: torch.Tensor, axis: int, runs, gptq, cfg: ApplyConfig, bias):
    from bitsack.kernels.packed import PackedLinear

    g = cfg.group_size
    if axis == 0:
        bmap = torch.empty(weight.shape[0], dtype=torch.int64)
        for start, stop, bits in runs:
            bmap[start:stop] = bits
    else:
        bmap = torch.empty(weight.shape[1] // g, dtype=torch.int64)
        for start, stop, bits in runs:
            bmap[start // g: stop // g] = bits
    res = gptq.quantize(weight, bmap, g, bits_axis=axis, damp=cfg.damp,
                        act_order=cfg.act_order)
    parts = [res.segment(axis, start, stop) for start, stop, _ in runs]
    return PackedLinear.from_quantized(parts, axis, bias=bias, backend=cfg.backend), res


class _Stop(Exception):
    """Raised by a hook once it has what it needs (skips the rest of a forward)."""


# ------------------------------------------------------------------------------------------
# compress
# ------------------------------------------------------------------------------------------

def compress(model: nn.Module, plan: Mapping[str, int], calib_tokens: torch.Tensor | None = None,
             config: ApplyConfig | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> CompressResult:
    """Prune, quantize and pack ``model`` in place according to ``plan``.

    Args:
        model: a transformers causal LM of a supported architecture (unpruned).
        plan: unit id -> bits (0 prune, 1..8, 16); ids as ``model_units`` gives them.
        calib_tokens: ``[n, seqlen]`` calibration token ids (needed for ``gptq``).
        config: how to apply (quantizer, group size, ...).
        progress: optional callback ``(stage, done, total)``.

    Returns:
        The compressed model and its record.

    Raises:
        ValidationError: a plan entry names an unknown unit, prunes an unprunable one, or uses
            bits without a packed layout; gptq without calibration tokens.
    """
    cfg = config or ApplyConfig()
    from bitsack.kernels.formats import PACKABLE_BITS

    adapter = get_adapter(model)
    units = adapter.units(mlp_group=cfg.mlp_group, group_size=cfg.group_size, embeddings=True)
    by_id = {u.id: u for u in units}
    plan = {str(k): int(v) for k, v in plan.items()}
    for uid, bits in sorted(plan.items()):
        if uid not in by_id:
            raise ValidationError(f"plan.{uid}", f"is not a unit of this model (with "
                                  f"mlp_group={cfg.mlp_group}); e.g. {units[0].id!r}")
        if bits == 0 and not by_id[uid].prunable:
            raise ValidationError(f"plan.{uid}", "0 (prune) for a unit that cannot be pruned; "
                                  f"valid: bits in {[b for b in PACKABLE_BITS]}")
        if bits != 0 and bits not in PACKABLE_BITS:
            raise ValidationError(f"plan.{uid}", f"{bits} bits has no packed layout; valid: 0 "
                                  f"(prune) or {list(PACKABLE_BITS)}")
    if cfg.quantizer == "gptq" and calib_tokens is None:
        raise ValidationError("calib_tokens", "None; gptq needs calibration tokens [n, seqlen] "
                              "(or use quantizer='rtn')")
    untouched = tuple(u.id for u in units if u.id not in plan)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"config": cfg.__dict__.copy(), "gptq": {}, "timings_s": {}}
    tick = progress or (lambda stage, done, total: None)

    # 1. surgery
    pruned = [uid for uid, b in plan.items() if b == 0]
    if pruned:
        adapter.prune(pruned, mlp_group=cfg.mlp_group)
    # 2. one contiguous segment per bit-width: order each layer's units by bits (stable)
    structural = adapter.units(mlp_group=cfg.mlp_group, group_size=cfg.group_size,
                               embeddings=False)
    order = sorted(structural, key=lambda u: (u.layer, u.kind,
                                              -plan.get(u.id, 16)))
    order_ids = [u.id for u in order]
    if order_ids:
        adapter.permute_units(order_ids, mlp_group=cfg.mlp_group)
    report["timings_s"]["surgery"] = time.perf_counter() - t0

    units = adapter.units(mlp_group=cfg.mlp_group, group_size=cfg.group_size, embeddings=True)
    planned = [u for u in units if u.id in plan]
    specs = _matrix_specs(planned, plan)
    # modules outside the decoder layers: embeddings, lm_head, projections ("other")
    embed_names = {_module_name(s.param) for u in planned if u.layer is None
                   for s in u.slices}
    packed_bytes = 0

    # 3. embeddings first (tied ones wait for the lm_head)
    tied = _tied_pairs(model)
    head_names = set(tied) | {_output_name(model)}
    t1 = time.perf_counter()
    for name in sorted(embed_names - head_names):
        mod = model.get_submodule(name)
        bits = specs[name][0][3]
        if isinstance(mod, nn.Embedding):
            packed_bytes += _replace_embedding(model, name, bits, cfg)
        else:  # a projection outside the layers (OPT's project_in / project_out): RTN
            axis, runs = _runs(specs[name])
            packed = _pack_rtn(_dense_weight(mod), axis, runs, cfg.group_size, _bias(mod),
                               cfg.backend)
            _set_module(model, name, packed)
            packed_bytes += packed.nbytes
    report["timings_s"]["embeddings"] = time.perf_counter() - t1

    # 4. layers
    t2 = time.perf_counter()
    n_layers = len(adapter.layers())
    if cfg.quantizer == "gptq":
        batches = _capture(adapter, calib_tokens, cfg.batch_size)
    for i in range(n_layers):
        prefix = adapter.layer_prefix(i)
        linears = {prefix + rel: mod for rel, mod in adapter.linear_modules(i).items()}
        todo = {name: mod for name, mod in linears.items() if name in specs}
        if cfg.quantizer == "rtn":
            for name, mod in todo.items():
                axis, runs = _runs(specs[name])
                packed = _pack_rtn(_dense_weight(mod), axis, runs, cfg.group_size, _bias(mod),
                                   cfg.backend)
                _set_module(model, name, packed)
                packed_bytes += packed.nbytes
        else:
            for stage in _stages(adapter, i, todo, batches, cfg.true_sequential):
                gptqs = _accumulate(adapter, i, {n: todo[n] for n in stage}, batches)
                for name in stage:
                    mod = todo[name]
                    axis, runs = _runs(specs[name])
                    packed, res = _pack_gptq(_dense_weight(mod), axis, runs, gptqs[name], cfg,
                                             _bias(mod))
                    _set_module(model, name, packed)
                    packed_bytes += packed.nbytes
                    report["gptq"][name] = {"loss": res.loss, "damp": res.damp}
            with torch.no_grad():
                batches = [(adapter.run_layer(i, h, kw), kw) for h, kw in batches]
        tick("layers", i + 1, n_layers)
    report["timings_s"]["layers"] = time.perf_counter() - t2

    # 5. lm_head (and a tied embedding with it)
    t3 = time.perf_counter()
    for name in sorted(embed_names & head_names):
        if name in specs:
            bits = specs[name][0][3]
            hidden = batches if cfg.quantizer == "gptq" else None
            packed_bytes += _replace_head(model, adapter, name, tied.get(name), bits, cfg,
                                          hidden, report)
    report["timings_s"]["head"] = time.perf_counter() - t3
    report["timings_s"]["total"] = time.perf_counter() - t0
    model.bitsack_plan = dict(plan)
    model.bitsack_apply = {"quantizer": cfg.quantizer, "group_size": cfg.group_size,
                           "mlp_group": cfg.mlp_group}
    return CompressResult(model=model, plan=dict(plan), dims=adapter.dims(),
                          packed_bytes=int(packed_bytes), untouched=untouched, report=report)


def _tied_pairs(model: nn.Module) -> dict[str, str]:
    """Embedding module name -> lm_head module name, for embeddings shared with the head."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or getattr(out, "weight", None) is not inp.weight:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(inp)]: names[id(out)]}


def _output_name(model: nn.Module) -> str | None:
    out = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is out), None)


class PackedWeightModule(nn.Module):
    """Runs a module of its own kind (e.g. OPT's learned position embedding, an
    ``nn.Embedding`` subclass with its own ``forward``) on a packed ``weight``.

    The original module is kept as a weightless template on the meta device, outside the
    module tree (so ``state_dict`` holds only the packed buffers).
    """

    def __init__(self, template: nn.Module, packed: nn.Module):
        super().__init__()
        self.packed = packed
        object.__setattr__(self, "_template", template.to("meta"))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        weight = self.packed.dequantize(self.packed.dtype)
        return torch.func.functional_call(self._template, {"weight": weight}, args, kwargs)


def _replace_embedding(model: nn.Module, name: str, bits: int, cfg: ApplyConfig) -> int:
    from bitsack.kernels.packed import PackedEmbedding

    mod = model.get_submodule(name)
    packed = PackedEmbedding.from_dense(mod.weight.detach().float(), bits, cfg.group_size,
                                        dtype=mod.weight.dtype)
    if type(mod) is nn.Embedding:
        _set_module(model, name, packed)
    else:
        _set_module(model, name, PackedWeightModule(mod, packed))
    return packed.nbytes


def _replace_head(model, adapter, name: str, head_name: str | None, bits: int,
                  cfg: ApplyConfig, batches, report) -> int:
    """Quantize an lm_head (``name`` a Linear) or a tied embedding (``name`` the embedding,
    ``head_name`` its lm_head) — GPTQ on the final hidden states when ``batches`` is given."""
    from bitsack.kernels.packed import PackedEmbedding, PackedLinear, Segment
    from bitsack.kernels.quantizers import GPTQ, rtn_quantize

    mod = model.get_submodule(name)
    head = model.get_submodule(head_name) if head_name else mod
    weight = mod.weight.detach().float()
    if bits == 16:
        seg = Segment.from_fp16(weight, 0, 0)
    elif batches is None:
        seg = Segment.from_quantized(rtn_quantize(weight, bits, cfg.group_size), 0, 0)
    else:
        gptq = GPTQ(weight.shape[1])

        def grab(_m, args):
            gptq.add_batch(args[0])
            raise _Stop

        handle = head.register_forward_pre_hook(grab)
        try:
            for hidden, _ in batches:
                with contextlib.suppress(_Stop), torch.no_grad():
                    adapter.final_logits(hidden)
        finally:
            handle.remove()
        res = gptq.quantize(weight, bits, cfg.group_size, damp=cfg.damp,
                            act_order=cfg.act_order)
        report["gptq"][head_name or name] = {"loss": res.loss, "damp": res.damp}
        seg = Segment.from_quantized(res.to_quantized(), 0, 0)
    if head_name:
        packed = PackedEmbedding(weight.shape[0], weight.shape[1], [seg], dtype=mod.weight.dtype)
        _set_module(model, name, packed)
        _set_module(model, head_name, packed.as_linear(cfg.backend))
    else:
        packed = PackedLinear(weight.shape[1], weight.shape[0], [seg], bias=_bias(mod),
                              backend=cfg.backend)
        _set_module(model, name, packed)
    return packed.nbytes


def _capture(adapter, tokens: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states (and layer kwargs) entering layer 0, per calibration batch."""
    if tokens.dim() != 2:
        raise ValidationError("calib_tokens", f"shape {tuple(tokens.shape)}; valid: [n, seqlen]")
    out = []
    for b in range(0, tokens.shape[0], batch_size):
        li = adapter.capture_layer_inputs(tokens[b:b + batch_size])
        out.append((li.hidden, li.kwargs))
    return out


def _stages(adapter, i: int, todo: dict[str, nn.Module], batches, true_sequential: bool
            ) -> list[list[str]]:
    """The layer's linears grouped by the input tensor they read, in call order.

    Linears that read the same tensor (q/k/v; gate/up) form one stage; with
    ``true_sequential`` off everything is one stage.
    """
    if not todo:
        return []
    if not true_sequential:
        return [list(todo)]
    # Keep the input tensors themselves alive: an id() of a freed tensor can be reused by the
    # next one, which would merge two stages.
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [mod.register_forward_pre_hook(
        lambda _m, args, name=name: calls.append((name, args[0])))
        for name, mod in todo.items()]
    try:
        hidden, kwargs = batches[0]
        with torch.no_grad():
            adapter.run_layer(i, hidden[:1], _first(kwargs))
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    last = None
    for name, key in calls:
        if name in {n for s in stages for n in s}:
            continue
        if key is not last or not stages:
            stages.append([])
        stages[-1].append(name)
        last = key
    missing = [n for n in todo if n not in {m for s in stages for m in s}]
    if missing:  # never called on this input (should not happen): quantize them last
        stages.append(missing)
    return stages


def _first(kwargs: dict) -> dict:
    """Layer kwargs for the first sequence of a batch (tensors with a batch dim sliced)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] > 1:
            out[k] = v[:1]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = tuple(t[:1] if t.dim() >= 1 and t.shape[0] > 1 else t for t in v)
        else:
            out[k] = v
    return out


class _Hessian:
    """Running ``H = 2XXᵀ/n`` of one input, summed in float64 from float32 batch products.

    The per-batch product XᵀX runs in float32 (a BLAS GEMM, ~2× faster than float64 here);
    the running sum over batches is float64, so long calibration sets do not lose precision.
    """

    def __init__(self, columns: int):
        self.S = torch.zeros((columns, columns), dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        self.S += (x.T @ x).to(device=self.S.device, dtype=torch.float64)
        self.n += x.shape[0]

    def gptq(self):
        from bitsack.kernels.quantizers import GPTQ

        if self.n == 0:
            raise ValidationError("calib_tokens", "no calibration input reached a layer")
        return GPTQ.from_hessian(2.0 * self.S / self.n, nsamples=self.n)


def _accumulate(adapter, i: int, mods: dict[str, nn.Module], batches) -> dict[str, Any]:
    """GPTQ objects with the Hessians of ``mods`` from running layer ``i`` on ``batches``.

    Modules of one stage read the same input, so they share one Hessian (computed once).
    The forward stops as soon as every module of the stage has seen its input.
    """
    hessians: dict[str, _Hessian] = {}
    # input tensor id -> (the tensor, kept alive so its id cannot be reused; its Hessian)
    this_batch: dict[int, tuple[torch.Tensor, _Hessian]] = {}
    seen: set[str] = set()

    def grab(args, name):
        x = args[0]
        if id(x) not in this_batch:
            # first module to read this tensor in this batch: add it once
            h = hessians.get(name) or _Hessian(x.shape[-1])
            h.add(x)
            this_batch[id(x)] = (x, h)
        hessians.setdefault(name, this_batch[id(x)][1])
        seen.add(name)
        if len(seen) == len(mods):
            raise _Stop  # the rest of the layer is not needed for these Hessians

    handles = [mod.register_forward_pre_hook(lambda _m, a, name=name: grab(a, name))
               for name, mod in mods.items()]
    try:
        with torch.no_grad():
            for hidden, kwargs in batches:
                seen.clear()
                this_batch.clear()
                with contextlib.suppress(_Stop):
                    adapter.run_layer(i, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    gptqs: dict[str, Any] = {}
    made: dict[int, Any] = {}
    for name in mods:
        h = hessians[name]
        if id(h) not in made:
            made[id(h)] = h.gptq()
        # one GPTQ object per Hessian is enough: quantize() does not modify it
        gptqs[name] = made[id(h)]
    return gptqs


# ------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------

def _packed_modules(model: nn.Module) -> dict[str, nn.Module]:
    from bitsack.kernels.packed import PackedEmbedding, PackedLinear

    return {n: m for n, m in model.named_modules()
            if isinstance(m, (PackedLinear, PackedEmbedding))}


def _describe_packed(model: nn.Module) -> dict[str, dict]:
    from bitsack.kernels.packed import PackedEmbedding

    mods = _packed_modules(model)
    # a tied lm_head shares its segment buffers with the embedding: record it as a tie
    owner: dict[int, str] = {}
    out: dict[str, dict] = {}
    for name, mod in mods.items():
        first = next(iter(mod.buffers()), None)
        key = None if first is None else first.data_ptr()
        entry = {
            "type": "embedding" if isinstance(mod, PackedEmbedding) else "linear",
            "rows": mod.num_embeddings if isinstance(mod, PackedEmbedding) else mod.out_features,
            "cols": mod.embedding_dim if isinstance(mod, PackedEmbedding) else mod.in_features,
            "segments": mod.layout(),
            "bias": getattr(mod, "bias", None) is not None,
            "dtype": str(getattr(mod, "dtype", torch.float32)).replace("torch.", ""),
        }
        parent = name.rpartition(".")[0]
        if parent and isinstance(model.get_submodule(parent), PackedWeightModule):
            entry["wrapped"] = True
        if key is not None and key in owner and entry["type"] == "linear":
            entry["tied_to"] = owner[key]
        elif key is not None:
            owner[key] = name
        out[name] = entry
    return out


def cache_dequantized(model: nn.Module, enabled: bool = True) -> int:
    """Let every packed module keep its dequantized weight (CPU inference speed).

    The cached weight is exactly what each forward would dequantize, so outputs are unchanged;
    memory grows by one float copy per packed matrix. Returns the number of modules set.
    """
    n = 0
    for mod in model.modules():
        if hasattr(mod, "cache_weight"):
            mod.cache_weight = enabled
            n += 1
    return n


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a bitsack compressed model (its ``bitsack.json`` says so)."""
    try:
        meta = json.loads((Path(path) / "bitsack.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("schema") == MODEL_SCHEMA


#: ``model_type`` of a compressed folder's config.json. transformers (and any other loader
#: that reads config.json) refuses a model type it does not know, instead of building the base
#: architecture and initialising every packed weight at random; the base type is kept beside it.
HF_MODEL_TYPE = "bitsack"
HF_BASE_TYPE_KEY = "bitsack_base_model_type"


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None,
                    extra: Mapping[str, Any] | None = None, *, force: bool = False) -> Path:
    """Write a compressed model to ``out_dir`` atomically (a finished dir replaces the old).

    Files: ``model.safetensors`` (packed buffers + every other parameter), ``bitsack.json``
    (schema, plan, dims, packed layout, per-tensor shape / dtype / SHA-256), ``config.json``
    (the base architecture, with ``quantization_config.quant_method = "bitsack"``) and the
    tokenizer's files.

    ``out_dir`` may be new, empty, or a previous bitsack model folder; any other existing
    folder is refused (``force`` replaces it). Temporary folders a killed save left beside
    ``out_dir`` are removed first.

    Raises:
        ValidationError: ``out_dir`` is a file or a non-empty folder of something else.
    """
    from bitsack.io import check_output_dir, remove_stale_siblings, replace_dir, temp_sibling
    from bitsack.kernels.io import dtype_name, save_tensors

    out = Path(out_dir)
    check_output_dir(out, what="bitsack model folder", is_ours=is_model_dir, force=force)
    remove_stale_siblings(out)
    adapter = get_adapter(model)
    layout = _describe_packed(model)
    tied = {n for n, e in layout.items() if "tied_to" in e}
    state = {k: v for k, v in model.state_dict(keep_vars=False).items()
             if not any(k.startswith(t + ".") for t in tied)}
    # transformers' own tie (lm_head.weight is embed.weight) when nothing was packed there
    state = _dedupe_ties(model, state)
    tmp = temp_sibling(out, "tmp")
    try:
        hashes = save_tensors(tmp / "model.safetensors", state)
        meta = {
            "schema": MODEL_SCHEMA,
            "model_type": model.config.model_type,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "plan": getattr(model, "bitsack_plan", {}),
            "apply": getattr(model, "bitsack_apply", {}),
            "dims": adapter.dims(),
            "packed": layout,
            "tensors": {k: {"shape": list(v.shape), "dtype": dtype_name(v.dtype),
                            "sha256": hashes[k]} for k, v in state.items()},
            "packed_bytes": sum(m.nbytes for n, m in _packed_modules(model).items()
                                if n not in tied),
            **dict(extra or {}),
        }
        model.config.save_pretrained(tmp)
        _mark_quantized(tmp / "config.json")
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        (tmp / "bitsack.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _mark_quantized(config_file: Path) -> None:
    """Rewrite a saved config.json so that no loader mistakes the folder for its base model.

    ``model_type`` becomes ``bitsack`` (the base type moves to ``bitsack_base_model_type``) and
    ``quantization_config`` says how the weights are stored; ``base_config`` reverses it.
    """
    cfg = json.loads(config_file.read_text())
    cfg[HF_BASE_TYPE_KEY] = cfg["model_type"]
    cfg["model_type"] = HF_MODEL_TYPE
    cfg["quantization_config"] = {"quant_method": HF_MODEL_TYPE, "format": MODEL_SCHEMA,
                                  "metadata": "bitsack.json"}
    config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def base_config(path: str | os.PathLike):
    """The base architecture's transformers config of a compressed folder (see
    ``_mark_quantized``).

    Raises:
        FormatError: config.json is missing, unreadable, or names no known base model type.
    """
    from transformers import CONFIG_MAPPING

    config_file = Path(path) / "config.json"
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{config_file}: cannot be read ({exc})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{config_file}: not a JSON object")
    cfg.pop("quantization_config", None)
    base = cfg.pop(HF_BASE_TYPE_KEY, cfg.get("model_type"))
    cfg["model_type"] = base
    if base not in CONFIG_MAPPING:
        raise FormatError(f"{config_file}: {HF_BASE_TYPE_KEY} {base!r} is not a model type "
                          "this transformers knows")
    return CONFIG_MAPPING[base].from_dict(cfg)


def _dedupe_ties(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen and v.shape == state[seen[ptr]].shape and \
                k.endswith(".weight"):
            continue  # transformers re-ties these on load
        if ptr is not None:
            seen[ptr] = k
        out[k] = v
    return out


def read_meta(path: str | os.PathLike) -> dict:
    """``bitsack.json`` of a compressed model dir, schema-checked."""
    path = Path(path)
    meta_file = path / "bitsack.json"
    if not meta_file.is_file():
        raise FormatError(f"{path}: no bitsack.json (not a compressed bitsack model)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{meta_file}: not valid JSON ({exc})") from None
    if meta.get("schema") != MODEL_SCHEMA:
        raise FormatError(f"{meta_file}: schema {meta.get('schema')!r} is not supported; "
                          f"valid: {MODEL_SCHEMA!r}")
    return meta


def load_compressed(path: str | os.PathLike, device: str = "cpu", backend: str | None = None):
    """Rebuild a compressed model saved by ``save_compressed``.

    Returns:
        ``bitsack.models.LoadedModel`` (``source.kind == "compressed"``).

    Raises:
        FormatError: missing files, unknown schema, truncated file, hash / shape mismatch.
    """
    from transformers import AutoModelForCausalLM

    from bitsack.kernels.io import load_tensors
    from bitsack.kernels.packed import PackedEmbedding, PackedLinear, Segment
    from bitsack.models.loading import LoadedModel

    path = Path(path)
    meta = read_meta(path)
    expected = {k: (tuple(v["shape"]), v["dtype"], v["sha256"])
                for k, v in meta["tensors"].items()}
    tensors, _ = load_tensors(path / "model.safetensors", expected, device=device)
    config = base_config(path)
    try:
        from accelerate import init_empty_weights
        ctx = init_empty_weights()
    except ImportError:  # pragma: no cover
        ctx = contextlib.nullcontext()
    kwargs = {}
    if meta.get("attn_implementation"):
        # same attention kernel as when saved, so reloaded outputs are bit-identical
        kwargs["attn_implementation"] = meta["attn_implementation"]
    with ctx:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    get_adapter(model).apply_dims(meta["dims"])
    layout = meta["packed"]
    built: dict[str, nn.Module] = {}
    for name, entry in layout.items():
        if "tied_to" in entry:
            continue
        segs = []
        for i, spec in enumerate(entry["segments"]):
            t = {f: tensors.pop(f"{name}.seg{i}_{f}", None)
                 for f in ("qdata", "scale", "zero", "weight")}
            try:
                segs.append(Segment(spec["axis"], spec["start"], spec["stop"], spec["bits"],
                                    spec["group_size"], tuple(spec["shape"]), **t))
            except ValidationError as exc:
                raise FormatError(f"{path}: module {name!r} segment {i}: {exc}") from None
        if entry["type"] == "embedding":
            mod = PackedEmbedding(entry["rows"], entry["cols"], segs,
                                  dtype=getattr(torch, entry.get("dtype", "float32")))
        else:
            bias = tensors.pop(f"{name}.bias", None) if entry["bias"] else None
            mod = PackedLinear(entry["cols"], entry["rows"], segs, bias=bias,
                               backend=backend or "torch")
        if entry.get("wrapped"):
            parent = name.rpartition(".")[0]
            _set_module(model, parent, PackedWeightModule(model.get_submodule(parent), mod))
        else:
            _set_module(model, name, mod)
        built[name] = mod
    for name, entry in layout.items():
        if "tied_to" in entry:
            _set_module(model, name, built[entry["tied_to"]].as_linear(backend or "torch"))
    missing, _ = model.load_state_dict(tensors, strict=False, assign=True), None
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
                  if p.device.type == "meta"]
    if still_meta:
        # a tied weight transformers would re-tie (lm_head.weight = embed.weight)
        model.tie_weights()
        still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise FormatError(f"{path}: no saved values for {still_meta[:5]}")
    del missing
    model.to(device).eval()
    model.bitsack_plan = meta.get("plan", {})
    model.bitsack_apply = meta.get("apply", {})
    tokenizer = None
    with contextlib.suppress(Exception):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path)
    source = {"kind": "compressed", "spec": str(path), "path": str(path),
              "model_type": meta.get("model_type"), "packed_bytes": meta.get("packed_bytes")}
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)
