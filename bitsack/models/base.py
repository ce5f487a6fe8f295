"""What a model adapter reports: the units of a model and the weight slices each one owns.

This is the contract between ``bitsack.models`` (which enumerates and cuts models),
``bitsack.profiling`` (which perturbs each unit's slices to measure sensitivity) and apply
(which prunes, quantizes and packs them).

A *unit* is one decision of the problem (DESIGN.md): a KV head group with its query heads
(rows of q/k/v, columns of o_proj), a block of MLP channels (rows of gate/up, columns of
down), or an embedding / lm_head (bits only, never pruned). Every quantizable weight belongs to
exactly one unit; norms and biases stay in 16 bits and belong to none.

Quantization groups always run along a matrix's *input* dimension (its columns), so
  - a row slice (``dim=0``) is quantized with groups of ``group_size`` along its full width;
  - a column slice (``dim=1``) is quantized with groups inside its own columns, so its width
    must be a multiple of the group size (the adapter checks this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Slice:
    """Rows (``dim=0``) or columns (``dim=1``) ``start:stop`` of one weight matrix.

    ``param`` is the fully qualified parameter name in ``model.named_parameters()``, e.g.
    ``model.layers.0.self_attn.q_proj.weight`` (always a 2-D ``[out_features, in_features]``
    view; GPT-2's Conv1D weights are reported transposed by its adapter: ``transposed=True``).
    """

    param: str
    dim: int
    start: int
    stop: int
    shape: tuple[int, int]  # (rows, cols) of the slice, in [out, in] orientation
    transposed: bool = False

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class UnitSpec:
    """One unit of a model and the slices it owns."""

    id: str  # "L0.attn.g0", "L0.mlp.c3", "embed", "lm_head"
    kind: str  # head_group | mlp_group | embedding
    layer: int | None
    slices: tuple[Slice, ...]
    prunable: bool

    @property
    def params(self) -> int:
        return sum(s.numel for s in self.slices)


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model, its tokenizer, and what was loaded.

    ``source`` keys: ``kind`` (local | hub | gguf | default | compressed), ``spec`` (as given),
    ``path``, ``gguf_file``, ``sha256`` (of a GGUF file, or None), ``dtype``, ``model_type``,
    ``transformers_version``.
    """

    model: Any
    tokenizer: Any
    source: dict = field(default_factory=dict)
