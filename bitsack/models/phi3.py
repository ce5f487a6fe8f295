"""Adapter for Phi-3 (``phi3``): the Llama geometry with fused matrices.

Layer ``i`` (``model.layers.{i}``) has one ``qkv_proj`` (rows: the queries of every head, then
the keys, then the values) and one ``gate_up_proj`` (rows: every gate channel, then every up
channel). A unit therefore owns several row ranges of one matrix:

  - head group ``g`` (KV head ``g`` with its ``r`` query heads, ``d`` = head_dim, ``n`` groups
    in the layer now): rows ``[g·r·d, (g+1)·r·d)``, ``[n·r·d + g·d, n·r·d + (g+1)·d)`` and
    ``[n·r·d + n·d + g·d, ...)`` of ``qkv_proj``; columns ``[g·r·d, (g+1)·r·d)`` of
    ``o_proj``;
  - MLP channels ``a:b`` of ``w`` now: rows ``a:b`` and ``w+a:w+b`` of ``gate_up_proj``;
    columns ``a:b`` of ``down_proj``.

Surgery keeps the three (two) parts of a fused matrix in step, so the splits Phi-3 makes at
run time stay right: ``gate_up_proj``'s output is cut in two halves, and ``qkv_proj``'s at
``config.num_attention_heads · d`` — read from the layer's own config, which a pruned layer
gets (``LayerConfig``) with its own head counts.
"""

from __future__ import annotations

import torch

from bitsack.models.base import Slice
from bitsack.models.llama import LlamaAdapter
from bitsack.models.registry import register_adapter
from bitsack.models.surgery import LayerConfig, PrunedBlock, expand_positions, select_linear


@register_adapter("phi3")
class Phi3Adapter(LlamaAdapter):
    """Units and surgery for ``Phi3ForCausalLM``."""

    linear_names = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                    "mlp.down_proj")

    def _group_slices(self, i: int, pos: int, n_groups: int) -> tuple[Slice, ...]:
        d, r, h = self.head_dim, self.heads_per_group(), self.config.hidden_size
        p = self.layer_prefix(i) + "self_attn."
        qw, q_rows, kv_rows = r * d, n_groups * r * d, n_groups * d
        qkv = p + "qkv_proj.weight"
        return (
            Slice(qkv, 0, pos * qw, (pos + 1) * qw, (qw, h)),
            Slice(qkv, 0, q_rows + pos * d, q_rows + (pos + 1) * d, (d, h)),
            Slice(qkv, 0, q_rows + kv_rows + pos * d, q_rows + kv_rows + (pos + 1) * d, (d, h)),
            Slice(p + "o_proj.weight", 1, pos * qw, (pos + 1) * qw, (h, qw)),
        )

    def _channel_slices(self, i: int, start: int, stop: int, width: int) -> tuple[Slice, ...]:
        h, n = self.config.hidden_size, stop - start
        p = self.layer_prefix(i) + "mlp."
        return (
            Slice(p + "gate_up_proj.weight", 0, start, stop, (n, h)),
            Slice(p + "gate_up_proj.weight", 0, width + start, width + stop, (n, h)),
            Slice(p + "down_proj.weight", 1, start, stop, (h, n)),
        )

    def _keep_groups(self, i: int, positions: list[int], n_groups: int) -> None:
        layer = self.layers()[i]
        attn = layer.self_attn
        if not positions:
            layer.self_attn = PrunedBlock(self.config.hidden_size, None, attention=True,
                                          layer_idx=attn.layer_idx)
            return
        d, r = self.head_dim, self.heads_per_group()
        q_idx = expand_positions(positions, r * d)
        kv_idx = expand_positions(positions, d)
        q_rows, kv_rows = n_groups * r * d, n_groups * d
        qkv = torch.cat([q_idx, q_rows + kv_idx, q_rows + kv_rows + kv_idx])
        attn.qkv_proj = select_linear(attn.qkv_proj, qkv, 0)
        attn.o_proj = select_linear(attn.o_proj, q_idx, 1)
        attn.num_key_value_heads = len(positions)
        attn.config = LayerConfig(self.config, num_attention_heads=len(positions) * r,
                                  num_key_value_heads=len(positions))

    def _keep_channels(self, i: int, positions: list[int], width: int) -> None:
        layer = self.layers()[i]
        mlp = layer.mlp
        if not positions:
            layer.mlp = PrunedBlock(self.config.hidden_size, None, attention=False)
            return
        idx = torch.as_tensor(positions, dtype=torch.long)
        mlp.gate_up_proj = select_linear(mlp.gate_up_proj, torch.cat([idx, width + idx]), 0)
        mlp.down_proj = select_linear(mlp.down_proj, idx, 1)
