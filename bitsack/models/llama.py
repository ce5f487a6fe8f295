"""Adapter for the Llama family (llama, qwen2, qwen3, mistral; SmolLM2 is llama). Gemma
(``gemma.py``) and Phi-3 (``phi3.py``) build on it.

Layer ``i`` (``model.layers.{i}``):

  - head group ``g`` = KV head ``g`` with its ``r = heads / kv_heads`` query heads: rows
    ``[g·r·d, (g+1)·r·d)`` of ``q_proj``, rows ``[g·d, (g+1)·d)`` of ``k_proj`` and ``v_proj``,
    columns ``[g·r·d, (g+1)·r·d)`` of ``o_proj`` (``d`` = head_dim). GQA stays consistent
    because a group always leaves with its query heads, so ``r`` never changes.
  - MLP channels: rows of ``gate_proj`` and ``up_proj``, columns of ``down_proj``.

transformers 5.x computes attention shapes from ``view(..., -1, head_dim)`` and the per-module
``num_key_value_groups`` (= ``r``), never from ``config.num_attention_heads``, so smaller
projections are all a layer needs to run with its own head count. Qwen2's q/k/v biases are
sliced with their rows. Qwen3's q/k norms act per head (on ``head_dim``) and need no surgery.
Mistral's sliding window and Qwen2/3's sliding layers change masks only (see
``LayerInputs`` for models that mix layer types).
"""

from __future__ import annotations

import torch
from torch import nn

from bitsack.models.adapter import Adapter, matrix_unit
from bitsack.models.base import Slice, UnitSpec
from bitsack.models.registry import register_adapter
from bitsack.models.surgery import PrunedBlock, expand_positions, select_linear


@register_adapter("llama", "qwen2", "qwen3", "mistral")
class LlamaAdapter(Adapter):
    """Units and surgery for ``LlamaForCausalLM`` and its look-alikes."""

    linear_names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def full_sizes(self) -> tuple[int, int]:
        return self.config.num_key_value_heads, self.config.intermediate_size

    def heads_per_group(self) -> int:
        return self.config.num_attention_heads // self.config.num_key_value_heads

    def _group_slices(self, i: int, pos: int, n_groups: int) -> tuple[Slice, ...]:
        d, r, h = self.head_dim, self.heads_per_group(), self.config.hidden_size
        p = self.layer_prefix(i) + "self_attn."
        qw = r * d
        return (
            Slice(p + "q_proj.weight", 0, pos * qw, (pos + 1) * qw, (qw, h)),
            Slice(p + "k_proj.weight", 0, pos * d, (pos + 1) * d, (d, h)),
            Slice(p + "v_proj.weight", 0, pos * d, (pos + 1) * d, (d, h)),
            Slice(p + "o_proj.weight", 1, pos * qw, (pos + 1) * qw, (h, qw)),
        )

    def _channel_slices(self, i: int, start: int, stop: int, width: int) -> tuple[Slice, ...]:
        h, n = self.config.hidden_size, stop - start
        p = self.layer_prefix(i) + "mlp."
        return (
            Slice(p + "gate_proj.weight", 0, start, stop, (n, h)),
            Slice(p + "up_proj.weight", 0, start, stop, (n, h)),
            Slice(p + "down_proj.weight", 1, start, stop, (h, n)),
        )

    def _keep_groups(self, i: int, positions: list[int], n_groups: int) -> None:
        layer = self.layers()[i]
        attn = layer.self_attn
        if not positions:
            o = attn.o_proj
            layer.self_attn = PrunedBlock(self.config.hidden_size, o.bias, attention=True,
                                          layer_idx=attn.layer_idx)
            return
        d, r = self.head_dim, self.heads_per_group()
        q_idx = expand_positions(positions, r * d)
        kv_idx = expand_positions(positions, d)
        attn.q_proj = select_linear(attn.q_proj, q_idx, 0)
        attn.k_proj = select_linear(attn.k_proj, kv_idx, 0)
        attn.v_proj = select_linear(attn.v_proj, kv_idx, 0)
        attn.o_proj = select_linear(attn.o_proj, q_idx, 1)
        # Not read by transformers 5.x (shapes come from the projections), but kept truthful
        # for anyone who inspects a layer.
        attn.num_heads = len(positions) * r
        attn.num_key_value_heads = len(positions)

    def _keep_channels(self, i: int, positions: list[int], width: int) -> None:
        layer = self.layers()[i]
        mlp = layer.mlp
        if not positions:
            layer.mlp = PrunedBlock(self.config.hidden_size, mlp.down_proj.bias, attention=False)
            return
        idx = torch.as_tensor(positions, dtype=torch.long)
        mlp.gate_proj = select_linear(mlp.gate_proj, idx, 0)
        mlp.up_proj = select_linear(mlp.up_proj, idx, 0)
        mlp.down_proj = select_linear(mlp.down_proj, idx, 1)
        mlp.intermediate_size = len(positions)

    def embedding_units(self) -> list[UnitSpec]:
        emb = self.model.model.embed_tokens.weight
        head = self.model.lm_head.weight
        units = [matrix_unit("embed", "model.embed_tokens.weight", emb)]
        # Tied embeddings are one tensor: one unit, counted once.
        if head is not emb:
            units.append(matrix_unit("lm_head", "lm_head.weight", head))
        return units

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden))
