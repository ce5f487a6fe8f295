"""The measured objective: mean per-token KL(base ‖ compressed) on calibration tokens.

The base model's next-token distributions are computed once per token split and kept (as fp16
probabilities p plus the float64 per-position ``Σ p log p``), so a compressed model's KL needs
one forward of its own: ``KL = Σ p log p − Σ p log q``. Keeping p in fp16 costs at most
2⁻¹¹·Σ p|log q₁ − log q₂| in the *difference* of two plans' KL on the same tokens (the p
rounding is common to both), far below the differences the search acts on.

Values are kept per sequence, so any two plans measured on the same split have a paired
difference with a standard error (``paired``): the noise a search must beat to accept a step.

The meter measures the model as its weights are *now* (the search stitches candidate weights
into it) and keeps, per split, the hidden states entering every layer for the *incumbent*
weights (``trace``), so a change whose first changed layer is l re-runs layers l.. only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bitsack.engine import LayerEngine
from bitsack.errors import ValidationError


@dataclass(frozen=True)
class Paired:
    """The mean of a paired difference of per-sequence values and its standard error."""

    mean: float
    se: float
    n: int

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray) -> Paired:
        """``mean(a − b)`` over sequences, with the standard error of that mean."""
        d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        n = d.size
        se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
        return cls(float(d.mean()), se, n)

    def as_dict(self) -> dict[str, float]:
        """The record's form: ``{"delta", "se", "n"}``."""
        return {"delta": self.mean, "se": self.se, "n": self.n}


class _Split:
    """One token split: its engine (cached layer inputs) and the base distributions."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, batch_size: int):
        self.tokens = tokens
        self.engine = LayerEngine(model, tokens, batch_size=batch_size)
        self.p: list[torch.Tensor] = []  # per batch: fp16 [b, seq, vocab]
        self.negent: list[torch.Tensor] = []  # per batch: float64 [b, seq]
        self.trace: list[list[torch.Tensor]] | None = None  # per layer, per batch

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.numel())


class KLMeter:
    """Per-sequence mean KL(base ‖ current model) on named token splits.

    Args:
        model: the model in its *base* state (the reference distributions are taken now).
        splits: name -> ``[n, seqlen]`` token ids (disjoint from evaluation data).
        batch_size: sequences per forward.
        head_layers: the head's cost in decoder-layer equivalents (for the cost counter).
    """

    def __init__(self, model: nn.Module, splits: Mapping[str, torch.Tensor],
                 batch_size: int = 4, head_layers: float = 1.0):
        self.model = model
        self.splits = {name: _Split(model, toks, batch_size) for name, toks in splits.items()}
        self.n_layers = next(iter(self.splits.values())).engine.n_layers
        self.head_layers = float(head_layers)
        self.forwards = 0.0  # sequence-forwards spent (a full forward of one sequence = 1)
        for split in self.splits.values():
            final = self._run(split, 0, split.engine.hidden_states())
            for h in final:
                logp = torch.log_softmax(split.engine.logits(h).float(), dim=-1)
                p = logp.exp()
                split.negent.append((p.double() * logp.double()).sum(-1))
                split.p.append(p.to(torch.float16))
                del logp, p

    # ---- forwards -----------------------------------------------------------------------
    def _run(self, split: _Split, start: int, hidden: list[torch.Tensor],
             batches: Sequence[int] | None = None) -> list[torch.Tensor]:
        n_seq = split.tokens.shape[0] if batches is None else \
            sum(split.engine.batches[i].ids.shape[0] for i in batches)
        self.forwards += n_seq * (self.n_layers - start + self.head_layers) / \
            (self.n_layers + self.head_layers)
        return split.engine.run_from(start, hidden, batches)

    def _entry(self, split: _Split, start: int | None) -> tuple[int, list[torch.Tensor]]:
        if start is None or split.trace is None:
            # the embeddings changed (or no trace yet): capture layer 0's inputs afresh
            fresh = LayerEngine(self.model, split.tokens,
                                batch_size=split.engine.batches[0].ids.shape[0])
            return 0, fresh.hidden_states()
        return start, split.trace[start]

    def n_batches(self, name: str) -> int:
        """How many batches split ``name`` is measured in (``kl``'s ``batches`` index them)."""
        return len(self._split(name).engine.batches)

    def rows(self, name: str, batches: Sequence[int]) -> np.ndarray:
        """The per-sequence positions (in ``kl``'s full output) of the listed batches."""
        sizes = [b.ids.shape[0] for b in self._split(name).engine.batches]
        ends = np.cumsum(sizes)
        return np.concatenate([np.arange(ends[i] - sizes[i], ends[i]) for i in batches])

    @torch.no_grad()
    def kl(self, name: str, start: int | None = 0,
           batches: Sequence[int] | None = None) -> np.ndarray:
        """Per-sequence mean KL(base ‖ current weights) on split ``name``.

        ``start`` is the first layer whose weights differ from the traced incumbent (the
        layers before it are taken from the trace); None when an embedding changed; 0 runs
        every layer. ``batches``: only these batches of the split (their sequences, in
        order; ``rows`` says which); default all.
        """
        split = self._split(name)
        first, hidden = self._entry(split, start)
        pick = range(len(split.p)) if batches is None else list(batches)
        final = self._run(split, first, [hidden[i] for i in pick], batches)
        out = []
        for h, p, negent in zip(final, [split.p[i] for i in pick],
                                [split.negent[i] for i in pick], strict=True):
            logq = torch.log_softmax(split.engine.logits(h).float(), dim=-1)
            cross = (p.float() * logq).sum(-1).double()
            out.append((negent - cross).mean(-1))
            del logq
        return torch.cat(out).numpy()

    @torch.no_grad()
    def trace(self, name: str) -> np.ndarray:
        """Record the current weights as the incumbent of split ``name``: cache the hidden
        state entering every layer; returns the per-sequence KL of these weights."""
        split = self._split(name)
        fresh = LayerEngine(self.model, split.tokens,
                            batch_size=split.engine.batches[0].ids.shape[0])
        hidden = fresh.hidden_states()
        trace = [hidden]
        for i in range(self.n_layers):
            hidden = fresh.run_layers(hidden, i, i + 1)
            trace.append(hidden)
        self.forwards += split.tokens.shape[0] * self.n_layers / (self.n_layers
                                                                  + self.head_layers)
        split.trace = trace
        return self.kl(name, self.n_layers)

    @torch.no_grad()
    def kl_of(self, model: nn.Module, name: str) -> np.ndarray:
        """Per-sequence mean KL(base ‖ ``model``) on split ``name`` — any model of the same
        tokenizer (a packed, pruned one included), run in full."""
        split = self._split(name)
        engine = LayerEngine(model, split.tokens,
                             batch_size=split.engine.batches[0].ids.shape[0])
        final = engine.run_from(0, engine.hidden_states())
        self.forwards += split.tokens.shape[0]
        out = []
        for h, p, negent in zip(final, split.p, split.negent, strict=True):
            logq = torch.log_softmax(engine.logits(h).float(), dim=-1)
            out.append((negent - (p.float() * logq).sum(-1).double()).mean(-1))
        return torch.cat(out).numpy()

    def _split(self, name: str) -> _Split:
        if name not in self.splits:
            raise ValidationError("split", f"{name!r}; valid: {sorted(self.splits)}")
        return self.splits[name]

    def n_sequences(self, name: str) -> int:
        return int(self._split(name).tokens.shape[0])
