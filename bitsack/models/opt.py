"""Adapter for OPT (``model.decoder.layers.{i}``).

One head is one unit: rows ``g·d:(g+1)·d`` of ``q_proj``, ``k_proj``, ``v_proj`` and columns
of ``out_proj``. MLP channels: rows of ``fc1``, columns of ``fc2`` (both direct children of the
decoder layer). OPTAttention views heads with ``self.num_heads``, which surgery updates. The
optional ``project_in`` / ``project_out`` matrices (OPT-350m) are bits-only units of kind
``other``.
"""

from __future__ import annotations

import torch
from torch import nn

from bitsack.models.adapter import Adapter, matrix_unit
from bitsack.models.base import Slice, UnitSpec
from bitsack.models.registry import register_adapter
from bitsack.models.surgery import PrunedBlock, expand_positions, select_linear


class NoFeatures(nn.Module):
    """Stands in for ``fc1`` of a layer whose MLP channels were all pruned: zero features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], 0)


@register_adapter("opt")
class OPTAdapter(Adapter):
    """Units and surgery for ``OPTForCausalLM``."""

    # a layer whose channels were all pruned has NoFeatures and a PrunedBlock for fc1 / fc2
    linear_names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                    "self_attn.out_proj", "fc1", "fc2")

    def layers(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    def layer_prefix(self, i: int) -> str:
        return f"model.decoder.layers.{i}."

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    def full_sizes(self) -> tuple[int, int]:
        return self.config.num_attention_heads, self.config.ffn_dim

    def heads_per_group(self) -> int:
        return 1

    def _group_slices(self, i: int, pos: int, n_groups: int) -> tuple[Slice, ...]:
        d, h = self.head_dim, self.config.hidden_size
        p = self.layer_prefix(i) + "self_attn."
        a, b = pos * d, (pos + 1) * d
        return (
            Slice(p + "q_proj.weight", 0, a, b, (d, h)),
            Slice(p + "k_proj.weight", 0, a, b, (d, h)),
            Slice(p + "v_proj.weight", 0, a, b, (d, h)),
            Slice(p + "out_proj.weight", 1, a, b, (h, d)),
        )

    def _channel_slices(self, i: int, start: int, stop: int, width: int) -> tuple[Slice, ...]:
        h, n = self.config.hidden_size, stop - start
        p = self.layer_prefix(i)
        return (
            Slice(p + "fc1.weight", 0, start, stop, (n, h)),
            Slice(p + "fc2.weight", 1, start, stop, (h, n)),
        )

    def _keep_groups(self, i: int, positions: list[int], n_groups: int) -> None:
        layer = self.layers()[i]
        attn = layer.self_attn
        if not positions:
            layer.self_attn = PrunedBlock(self.config.hidden_size, attn.out_proj.bias,
                                          attention=True, layer_idx=attn.layer_idx)
            return
        idx = expand_positions(positions, self.head_dim)
        attn.q_proj = select_linear(attn.q_proj, idx, 0)
        attn.k_proj = select_linear(attn.k_proj, idx, 0)
        attn.v_proj = select_linear(attn.v_proj, idx, 0)
        attn.out_proj = select_linear(attn.out_proj, idx, 1)
        attn.num_heads = len(positions)

    def _keep_channels(self, i: int, positions: list[int], width: int) -> None:
        layer = self.layers()[i]
        if not positions:
            layer.fc1 = NoFeatures()
            layer.fc2 = PrunedBlock(self.config.hidden_size, layer.fc2.bias, attention=False)
            return
        idx = torch.as_tensor(positions, dtype=torch.long)
        layer.fc1 = select_linear(layer.fc1, idx, 0)
        layer.fc2 = select_linear(layer.fc2, idx, 1)

    def embedding_units(self) -> list[UnitSpec]:
        dec = self.model.model.decoder
        emb, pos, head = dec.embed_tokens.weight, dec.embed_positions.weight, \
            self.model.lm_head.weight
        base = "model.decoder."
        units = [matrix_unit("embed", base + "embed_tokens.weight", emb),
                 matrix_unit("pos_embed", base + "embed_positions.weight", pos)]
        if head is not emb:
            units.append(matrix_unit("lm_head", "lm_head.weight", head))
        for name in ("project_in", "project_out"):
            mod = getattr(dec, name, None)
            if mod is not None:
                units.append(matrix_unit(name, f"{base}{name}.weight", mod.weight, "other"))
        return units

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        dec = self.model.model.decoder
        if dec.final_layer_norm is not None:
            hidden = dec.final_layer_norm(hidden)
        if dec.project_out is not None:
            hidden = dec.project_out(hidden)
        return self.model.lm_head(hidden)
