"""What profiling reads from a model: per-sequence gradients, cached layer inputs, input
Hessians, and the time and memory it took.

- ``lm_gradient_rows``: one forward per calibration sequence, then one backward per label
  source (sampled from the model, or the data) and per chunk of positions; each backward is
  one gradient "row" of the Fisher estimators.
- ``LayerCache``: the hidden states entering every decoder layer for a set of sequences, so a
  perturbation of layer i re-runs only layers ≥ i (the ``measured`` estimator).
- ``input_hessians``: every linear's input ``Hessian``, layer by layer (GPTQ's Hessians and
  the ``layerwise`` estimator).

The layer walks are the layer engine's (``bitsack.engine``), shared with compression and the
measured search.
- ``ResourceMeter``: wall time per phase and peak memory (resident set on CPU, allocator
  peak on CUDA).
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bitsack.engine import LayerEngine
from bitsack.errors import ValidationError
from bitsack.kernels.hessian import Hessian
from bitsack.models import get_adapter

LABEL_SOURCES = ("sampled", "data")


# ---- calibration tokens -------------------------------------------------------------------
def check_tokens(tokens: Any, field_name: str = "calib_tokens") -> torch.Tensor:
    """A ``LongTensor[n, seqlen]`` with n ≥ 1 and seqlen ≥ 2, or a ValidationError."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (
            torch.int64, torch.int32):
        desc = (f"{tokens.dtype} of shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor)
                else type(tokens).__name__)
        raise ValidationError(field_name, f"{desc}; valid: an integer tensor [nsamples, seqlen]")
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise ValidationError(field_name, f"shape {tuple(tokens.shape)}; valid: at least one "
                              "sequence of at least 2 tokens")
    return tokens.long()


def seed_for(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (seed, sequence, draw, ...), order-sensitive.

    Randomness is keyed by the *global* sequence index, so a sharded (distributed) run draws
    exactly what a single process draws.
    """
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


# ---- gradients ----------------------------------------------------------------------------
@dataclass(frozen=True)
class GradRow:
    """One gradient of a mean per-token loss.

    Attributes:
        grads: parameter name -> gradient (the parameter's stored orientation).
        tokens: positions in the loss (the gradient is of their mean).
        seq: global index of the calibration sequence.
        source: ``sampled`` (labels drawn from the model) or ``data``.
        draw: index of the source among the sequence's sources.
        chunk: index of the chunk of positions.
    """

    grads: dict[str, torch.Tensor]
    tokens: int
    seq: int
    source: str
    draw: int
    chunk: int


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` contiguous, near-equal position ranges covering ``0..n``."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or not 1 <= chunks <= n:
        raise ValidationError("fisher_chunks", f"{chunks!r}; valid: an integer in 1..{n} "
                              "(positions per sequence)")
    edges = [round(k * n / chunks) for k in range(chunks + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


@contextlib.contextmanager
def grad_only(model: torch.nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Let autograd track only the parameters ``names`` (others frozen), then restore."""
    wanted = set(names)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in wanted)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def sample_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per position drawn from ``softmax(logits)`` (the model's own prediction)."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    if probs.device.type != "cpu":
        probs = probs.cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


def lm_gradient_rows(model: torch.nn.Module, names: Sequence[str], tokens: torch.Tensor, *,
                     sources: Sequence[str] = ("sampled",), chunks: int = 1, seed: int = 0,
                     seq_offset: int = 0) -> Iterator[GradRow]:
    """Gradients of the mean next-token loss, per sequence × label source × chunk.

    One forward per sequence; each (source, chunk) is one backward through the same graph.
    ``sampled`` labels are drawn from the model's own predictive distribution (seeded by
    ``(seed, global sequence index, draw)``): then ``E[(g·δ)²] = δᵀF̄δ / T`` for the Fisher
    (Gauss-Newton) matrix F̄ per token and T positions in the loss, because per-position
    scores have zero mean and are independent given the inputs. ``data`` labels give the
    empirical Fisher, whose non-zero mean gradient and cross-position correlations bias it.

    Args:
        model: a causal LM (``model(input_ids=...).logits``).
        names: parameters to differentiate (others are frozen meanwhile).
        tokens: ``[n, seqlen]`` sequences of this process.
        sources: label sources, in order, e.g. ``("sampled", "sampled", "data")``.
        chunks: gradients per (sequence, source): the positions split into contiguous chunks.
        seed: seed of the sampled labels.
        seq_offset: global index of ``tokens[0]`` (distributed shards).

    Yields:
        ``GradRow``s, sequence by sequence.
    """
    for s in sources:
        if s not in LABEL_SOURCES:
            raise ValidationError("fisher_labels", f"{s!r}; valid: {', '.join(LABEL_SOURCES)}")
    named = dict(model.named_parameters())
    params = [named[n] for n in names]
    device = params[0].device if params else torch.device("cpu")
    n_pos = tokens.shape[1] - 1
    bounds = chunk_bounds(n_pos, chunks)
    with grad_only(model, names):
        for n in range(tokens.shape[0]):
            ids = tokens[n:n + 1].to(device)
            logits = _logits(model, ids)[0, :-1]
            data_labels = ids[0, 1:]
            jobs = [(draw, src, k) for draw, src in enumerate(sources) for k in range(len(bounds))]
            labels = None
            for j, (draw, src, k) in enumerate(jobs):
                if k == 0:
                    if src == "data":
                        labels = data_labels
                    else:
                        gen = torch.Generator().manual_seed(seed_for(seed, seq_offset + n, draw))
                        labels = sample_labels(logits, gen)
                a, b = bounds[k]
                loss = F.cross_entropy(logits[a:b], labels[a:b])
                grads = torch.autograd.grad(loss, params, retain_graph=j < len(jobs) - 1)
                row = GradRow(dict(zip(names, grads, strict=True)), b - a, seq_offset + n, src,
                              draw, k)
                # drop this frame's references so the consumer's release frees the gradients
                # before the next backward allocates new ones (else two sets are alive)
                del grads, loss
                yield row
                del row
            del logits, labels, data_labels


# ---- cached layer inputs ------------------------------------------------------------------
@dataclass
class LayerCache:
    """Hidden states entering each decoder layer for fixed batches of sequences.

    ``hidden[i][b]`` enters layer i for batch b; ``hidden[L][b]`` leaves the last layer.
    Kept in the model's dtype so that re-running layers ≥ i from ``hidden[i]`` with
    unchanged weights reproduces ``hidden[L]`` bit for bit (same ops, same shapes).
    """

    engine: LayerEngine
    hidden: list[list[torch.Tensor]]
    n_tokens: int
    base_nll: float = 0.0

    @property
    def tokens(self) -> list[torch.Tensor]:
        return [b.ids for b in self.engine.batches]

    @property
    def n_layers(self) -> int:
        return len(self.hidden) - 1

    @property
    def base_loss(self) -> float:
        return self.base_nll / self.n_tokens

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for hs in self.hidden for h in hs)


@torch.no_grad()
def build_layer_cache(model: torch.nn.Module, tokens: torch.Tensor,
                      batch_size: int = 8) -> LayerCache:
    """Run ``tokens`` once through the model, keeping every layer's input (see LayerCache)."""
    engine = LayerEngine(model, tokens, batch_size=batch_size)
    hidden = [engine.hidden_states()]
    for _ in range(engine.n_layers):
        engine.advance()
        hidden.append(engine.hidden_states())
    n_tokens = sum(int(ids.shape[0]) * (int(ids.shape[1]) - 1)
                   for ids in (b.ids for b in engine.batches))
    cache = LayerCache(engine, hidden, n_tokens)
    cache.base_nll = cached_nll(model, cache, engine.n_layers)
    return cache


@torch.no_grad()
def cached_nll(model: torch.nn.Module, cache: LayerCache, start: int | None) -> float:
    """Summed next-token NLL (float64) of the cached sequences, re-running layers ≥ ``start``.

    ``start`` None re-runs the embeddings too (an embedding was perturbed); ``start`` equal
    to the number of layers runs only the final norm and head.
    """
    engine = cache.engine
    if start is None:
        fresh = LayerEngine(model, torch.cat([b.ids for b in engine.batches]),
                            batch_size=engine.batches[0].ids.shape[0])
        final = fresh.run_from(0, fresh.hidden_states())
    else:
        final = engine.run_from(start, cache.hidden[start])
    total = 0.0
    for ids, h in zip(cache.tokens, final, strict=True):
        logits = engine.logits(h)[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="none")
        total += float(nll.double().sum())
    return total


# ---- input Hessians -----------------------------------------------------------------------
def param_names_by_id(model: torch.nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` (a tied parameter under its first name)."""
    return {id(p): n for n, p in model.named_parameters()}


def _is_linear_like(mod: torch.nn.Module) -> bool:
    # nn.Linear and transformers' Conv1D (GPT-2: y = x W + b with W stored [in, out])
    return isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"


@torch.no_grad()
def input_hessians(model: torch.nn.Module, tokens: torch.Tensor, names: Iterable[str],
                   batch_size: int = 8, dist: Any = None) -> Iterator[tuple[str, Hessian]]:
    """``(name, Hessian)`` for each linear weight in ``names``, layer by layer.

    The layer engine's walk (``bitsack.engine``): linears reading the same tensor share one
    accumulation, only the current layer's inputs are held, and the Hessians of a layer are
    yielded before the next layer runs, so a consumer that uses and drops them keeps memory at
    one layer's worth. Weights used outside the decoder layers by a linear (an lm_head, tied
    or not) come last, from the final hidden states. Summed over ranks with ``dist``.
    """
    wanted = set(names)
    adapter = get_adapter(model)
    by_id = param_names_by_id(model)
    engine = LayerEngine(model, tokens, batch_size=batch_size, dist=dist)
    per_layer = [{by_id[id(m.weight)]: m for m in adapter.linear_modules(i).values()
                  if by_id.get(id(m.weight)) in wanted} for i in range(engine.n_layers)]
    in_layers = {n for i in range(engine.n_layers)
                 for n in (by_id.get(id(m.weight)) for m in adapter.linear_modules(i).values())}
    outside = {by_id[id(mod.weight)]: mod for _, mod in model.named_modules()
               if _is_linear_like(mod) and by_id.get(id(mod.weight)) in wanted - in_layers}
    for i in range(engine.n_layers):
        if per_layer[i]:
            yield from engine.hessians(per_layer[i], stop_early=False).items()
        if not outside and not any(per_layer[i + 1:]):
            return
        engine.advance()
    for name, mod in outside.items():
        yield name, engine.head_hessian(mod)


# ---- time and memory ----------------------------------------------------------------------
def _read_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class ResourceMeter:
    """Wall time per named phase, and peak memory since ``start()``.

    CPU: the peak resident set (``VmHWM``), reset at ``start()`` through
    ``/proc/self/clear_refs`` where the kernel allows it (otherwise the process's lifetime
    peak, said in ``describe()``). CUDA: ``torch.cuda.max_memory_allocated`` since start.
    """

    timings: dict[str, float] = field(default_factory=dict)
    reset_ok: bool = False
    device: str = "cpu"
    _start_rss: int | None = None

    def start(self, device: torch.device | str = "cpu") -> ResourceMeter:
        self.device = str(device)
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self._start_rss = _read_hwm_kib()
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t

    def peak_bytes(self) -> int:
        if self.device.startswith("cuda") and torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
        hwm = _read_hwm_kib()
        if hwm is None:
            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        return hwm * 1024

    def describe(self) -> dict[str, Any]:
        what = ("cuda max_memory_allocated" if self.device.startswith("cuda")
                else "peak resident set (VmHWM) " + ("since profiling started" if self.reset_ok
                                                     else "of the whole process"))
        return {"timings_s": {k: round(v, 3) for k, v in self.timings.items()},
                "peak_memory_bytes": self.peak_bytes(), "peak_memory_what": what,
                "pid": os.getpid()}
