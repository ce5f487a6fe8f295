"""One layer-by-layer engine: cached calibration inputs, input Hessians, partial forwards.

Profiling (input Hessians, measured loss changes), compression (sequential GPTQ) and the
measured search (partial forwards from the first changed layer) all walk a decoder-only model
the same way (GPTQ's layer-by-layer calibration walk, Frantar et al. 2022):

1. capture what enters decoder layer 0 for every calibration batch (only the embeddings run);
2. at layer i, run the layer on the cached inputs — with forward pre-hooks on its linears to
   accumulate their input Hessians ``Σ_t x_t x_tᵀ`` (linears that read the same tensor share
   one accumulation, and the forward stops as soon as every hooked linear has been reached),
   or plainly, to produce the inputs of layer i + 1;
3. after the last layer, the final hidden states feed the head (the lm_head's Hessian, logits).

Sequential onloading: the engine holds one layer on the compute ``device`` at a time and moves
it back to ``offload`` (CPU) afterwards, so a model larger than the device's memory can be
walked; the cached hidden states live on ``cache_device``. ``peak_device_bytes`` is the
engine's own accounting of what it placed on the device (``memory_plan`` computes it from a
config alone, for models too large to build here).

With several processes (``torchrun``, or ``bitsack.profiling.distributed.spawn``) each rank
walks its own shard of the calibration sequences and the Hessians are all-reduced (``dist``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitsack.errors import ValidationError
from bitsack.kernels.hessian import Hessian
from bitsack.models import get_adapter


class _Stop(Exception):
    """Raised by a hook once every hooked module has seen its input (skips the rest)."""


def _tensor_bytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (tuple, list)):
        return sum(_tensor_bytes(x) for x in t)
    if isinstance(t, dict):
        return sum(_tensor_bytes(x) for x in t.values())
    return 0


def _module_bytes(mod: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(mod.parameters()) + list(mod.buffers()):
        if t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(t, device) for t in x)
    if isinstance(x, list):
        return [_to(t, device) for t in x]
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def first_of_batch(kwargs: dict) -> dict:
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


@dataclass
class Batch:
    """One calibration batch at the engine's current layer: token ids, the hidden state
    entering the layer, and the layer call's other arguments (masks, positions, rotary
    embeddings — the same for every layer)."""

    ids: torch.Tensor
    hidden: torch.Tensor
    kwargs: dict[str, Any]


class LayerEngine:
    """Walks a model layer by layer over cached calibration inputs (see module docstring).

    Args:
        model: a transformers causal LM of a supported architecture.
        tokens: ``[n, seqlen]`` token ids of this process (its shard under ``dist``).
        batch_size: sequences per forward through a layer.
        device: compute device (default: where the embeddings are).
        offload: where a layer goes after its turn (default: where it was).
        cache_device: where cached hidden states live (default: ``device``).
        dist: an object with ``all_reduce(tensor)`` and ``sum_float(x)`` (a
            ``bitsack.profiling.distributed.Dist``); Hessians are summed over ranks.
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 8,
                 device: torch.device | str | None = None,
                 offload: torch.device | str | None = None,
                 cache_device: torch.device | str | None = None, dist: Any = None):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] < 1:
            raise ValidationError("calib_tokens", f"{getattr(tokens, 'shape', tokens)!r}; "
                                  "valid: an integer tensor [nsamples, seqlen]")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValidationError("batch_size", f"{batch_size!r}; valid: a positive integer")
        self.model = model
        self.adapter = get_adapter(model)
        emb = model.get_input_embeddings()
        here = next(iter(list(emb.parameters()) + list(emb.buffers())), None)
        self.device = torch.device(device) if device is not None else \
            (here.device if here is not None else torch.device("cpu"))
        self.offload = torch.device(offload) if offload is not None else None
        self.cache_device = torch.device(cache_device) if cache_device is not None \
            else self.device
        self.dist = dist
        self.n_layers = len(self.adapter.layers())
        self.layer = 0
        self.peak_device_bytes = 0
        self._resident = 0
        self.batches: list[Batch] = []
        with torch.no_grad(), self._onload(emb):
            for b in range(0, tokens.shape[0], batch_size):
                ids = tokens[b:b + batch_size].to(self.device)
                li = self.adapter.capture_layer_inputs(ids)
                self.batches.append(Batch(ids.to(self.cache_device),
                                          li.hidden.to(self.cache_device),
                                          _to(li.kwargs, self.cache_device)))
        self._account()

    # ---- bookkeeping --------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Sequences × positions in the calibration batches of this process."""
        return sum(int(b.ids.numel()) for b in self.batches)

    def _account(self, extra: int = 0) -> None:
        cached = sum(_tensor_bytes(b.hidden) + _tensor_bytes(b.kwargs) for b in self.batches) \
            if self.cache_device == self.device else 0
        self.peak_device_bytes = max(self.peak_device_bytes, self._resident + cached + extra)

    @contextlib.contextmanager
    def _onload(self, module: nn.Module) -> Iterator[None]:
        """Put ``module`` on the compute device for the duration (sequential onloading)."""
        home = next((t.device for t in list(module.parameters()) + list(module.buffers())),
                    self.device)
        moved = home != self.device
        if moved:
            module.to(self.device)
        size = _module_bytes(module)
        self._resident += size
        self._account()
        try:
            yield
        finally:
            self._resident -= size
            if moved or (self.offload is not None and self.offload != self.device):
                module.to(self.offload or home)

    def layer_module(self, i: int | None = None) -> nn.Module:
        return self.adapter.layers()[self.layer if i is None else i]

    @contextlib.contextmanager
    def onload_layer(self, i: int | None = None) -> Iterator[nn.Module]:
        """Layer ``i`` (default: the current one) on the compute device, for the duration."""
        mod = self.layer_module(i)
        with self._onload(mod):
            yield mod

    def _run(self, i: int, batch: Batch) -> torch.Tensor:
        return self.adapter.run_layer(i, batch.hidden.to(self.device),
                                      _to(batch.kwargs, self.device))

    # ---- the walk -----------------------------------------------------------------------
    @torch.no_grad()
    def hessians(self, modules: Mapping[str, nn.Module], *, stop_early: bool = True
                 ) -> dict[str, Hessian]:
        """Input Hessians of ``modules`` (linears of the current layer) over every batch.

        Modules that read the same input tensor share one ``Hessian`` (computed once). With
        ``stop_early`` the forward stops as soon as every module has seen its input. Summed
        over ranks when the engine has a ``dist``.
        """
        if not modules:
            return {}
        hessians: dict[str, Hessian] = {}
        # input tensor id -> (the tensor, kept alive so its id cannot be reused; its Hessian)
        this_batch: dict[int, tuple[torch.Tensor, Hessian]] = {}
        seen: set[str] = set()

        def grab(name: str, x: torch.Tensor) -> None:
            if id(x) not in this_batch:
                h = hessians.get(name) or Hessian(x.shape[-1], device=x.device)
                h.add(x)
                this_batch[id(x)] = (x, h)
            hessians.setdefault(name, this_batch[id(x)][1])
            seen.add(name)
            if stop_early and len(seen) == len(modules):
                raise _Stop

        handles = [mod.register_forward_pre_hook(lambda _m, a, name=name: grab(name, a[0]))
                   for name, mod in modules.items()]
        try:
            with self.onload_layer():
                for batch in self.batches:
                    seen.clear()
                    this_batch.clear()
                    with contextlib.suppress(_Stop):
                        self._run(self.layer, batch)
                # the layer stays resident while its Hessians are used (GPTQ)
                self._account(sum(_tensor_bytes(h.S) for h in {id(h): h for h in
                                                                hessians.values()}.values()))
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in modules if n not in hessians]
        if missing:
            raise ValidationError("modules", f"{missing[:3]} never ran in layer {self.layer}")
        return self._reduce(hessians)

    def _reduce(self, hessians: dict[str, Hessian]) -> dict[str, Hessian]:
        if self.dist is None or not getattr(self.dist, "active", False):
            return hessians
        done: dict[int, Hessian] = {}
        for h in hessians.values():
            if id(h) not in done:
                h.S = self.dist.all_reduce(h.S)
                h.n = int(self.dist.sum_float(float(h.n)))
                done[id(h)] = h
        return hessians

    @torch.no_grad()
    def stages(self, modules: Mapping[str, nn.Module]) -> list[list[str]]:
        """The current layer's ``modules`` grouped by the input tensor they read, in call
        order ("true sequential" GPTQ: q/k/v, then o, then gate/up, then down)."""
        if not modules:
            return []
        # Keep the input tensors alive: an id() of a freed tensor can be reused by the next
        # one, which would merge two stages.
        calls: list[tuple[str, torch.Tensor]] = []
        handles = [mod.register_forward_pre_hook(
            lambda _m, args, name=name: calls.append((name, args[0])))
            for name, mod in modules.items()]
        b = self.batches[0]
        try:
            with self.onload_layer():
                self.adapter.run_layer(self.layer, b.hidden[:1].to(self.device),
                                       _to(first_of_batch(b.kwargs), self.device))
        finally:
            for h in handles:
                h.remove()
        stages: list[list[str]] = []
        placed: set[str] = set()
        last = None
        for name, key in calls:
            if name in placed:
                continue
            if key is not last or not stages:
                stages.append([])
            stages[-1].append(name)
            placed.add(name)
            last = key
        missing = [n for n in modules if n not in placed]
        if missing:  # never called on this input: quantize them last
            stages.append(missing)
        return stages

    @torch.no_grad()
    def advance(self) -> None:
        """Run the current layer on every batch; its outputs become the next layer's inputs."""
        if self.layer >= self.n_layers:
            raise ValidationError("layer", f"{self.layer}: the walk is past the last layer")
        with self.onload_layer():
            for batch in self.batches:
                out = self._run(self.layer, batch)
                self._account(_tensor_bytes(out))  # one batch's output beside the cache
                batch.hidden = out.to(self.cache_device)
        self.layer += 1

    @torch.no_grad()
    def run_layers(self, hidden: list[torch.Tensor], start: int, stop: int | None = None,
                   batches: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Partial forwards: run layers ``start..stop-1`` (default: to the last) on ``hidden``
        (one tensor per batch, entering layer ``start``; with ``batches``, one per listed
        batch index) and return what leaves layer ``stop-1``. The engine's own position does
        not move."""
        own = self.batches if batches is None else [self.batches[i] for i in batches]
        out = list(hidden)
        for i in range(start, self.n_layers if stop is None else stop):
            with self.onload_layer(i):
                out = [self.adapter.run_layer(i, h.to(self.device), _to(b.kwargs, self.device))
                       .to(self.cache_device) for h, b in zip(out, own, strict=True)]
        return out

    def run_from(self, start: int, hidden: list[torch.Tensor],
                 batches: Sequence[int] | None = None) -> list[torch.Tensor]:
        """``run_layers(hidden, start)``: the final hidden states from layer ``start`` on."""
        return self.run_layers(hidden, start, batches=batches)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states (final norm + head)."""
        return self.adapter.final_logits(hidden.to(self.device))

    @torch.no_grad()
    def head_hessian(self, head: nn.Module) -> Hessian:
        """The input Hessian of ``head`` (the lm_head, tied or not) from the final hidden
        states; the walk must be past the last layer."""
        if self.layer != self.n_layers:
            raise ValidationError("layer", f"{self.layer}; the head's inputs exist after the "
                                  f"last layer ({self.n_layers})")
        acc: list[Hessian] = []

        def grab(_m, args):
            if not acc:
                acc.append(Hessian(args[0].shape[-1], device=args[0].device))
            acc[0].add(args[0])
            raise _Stop

        handle = head.register_forward_pre_hook(grab)
        try:
            for batch in self.batches:
                with contextlib.suppress(_Stop):
                    self.adapter.final_logits(batch.hidden.to(self.device))
        finally:
            handle.remove()
        return self._reduce({"head": acc[0]})["head"]

    def hidden_states(self) -> list[torch.Tensor]:
        """The cached hidden states entering the current layer, one tensor per batch."""
        return [b.hidden for b in self.batches]


@dataclass(frozen=True)
class MemoryPlan:
    """Peak device bytes of a layer-by-layer walk, from a model config alone.

    Attributes:
        layer_bytes: the largest decoder layer's weights (the one resident layer).
        cache_bytes: cached hidden states of every calibration sequence (on the device), plus
            one batch's output.
        hessian_bytes: the float64 Hessians of one GPTQ stage (the widest input, once).
        gptq_bytes: GPTQ's float64 working copies of the largest matrix (W, Q, H⁻¹).
        activation_bytes: one batch through one layer (attention scores and MLP activations).
        total: the sum, the engine's peak.
    """

    layer_bytes: int
    cache_bytes: int
    hessian_bytes: int
    gptq_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return (self.layer_bytes + self.cache_bytes + self.hessian_bytes + self.gptq_bytes
                + self.activation_bytes)


def memory_plan(config: Any, *, nsamples: int, seqlen: int, batch_size: int = 8,
                weight_bytes: int = 2, cache_bytes: int = 2) -> MemoryPlan:
    """What the engine holds on the device at its peak, for a Llama-shaped ``config``.

    Counts the same items the engine accounts for at run time (one resident layer, the cached
    hidden states, a stage's Hessians, GPTQ's working copies, one batch's activations); used
    to state the peak for models that cannot be built here (7B, 70B). Accurate to the items
    listed — allocator fragmentation and framework workspaces come on top.
    """
    h = int(config.hidden_size)
    inter = int(config.intermediate_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", heads) or heads)
    hd = int(getattr(config, "head_dim", None) or h // heads)
    layer_params = h * heads * hd * 2 + 2 * h * kv * hd + 3 * h * inter
    widest = max(h, inter, heads * hd)
    largest = max(h * inter, h * heads * hd)
    tok = nsamples * seqlen
    b = min(batch_size, nsamples)
    return MemoryPlan(
        layer_bytes=layer_params * weight_bytes,
        cache_bytes=(tok + b * seqlen) * h * cache_bytes,
        hessian_bytes=widest * widest * 8,
        gptq_bytes=3 * largest * 8 if largest else 0,
        activation_bytes=b * seqlen * (2 * inter + 3 * heads * hd) * 4
        + b * heads * seqlen * seqlen * 4,
    )
