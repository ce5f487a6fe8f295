"""Adapter for GPT-2 (``transformer.h.{i}``; weights in ``Conv1D``, stored ``[in, out]``).

Slices are reported in ``[out, in]`` orientation with ``transposed=True``, so a "row" slice is
a range of columns of the stored tensor. One head is one unit (no GQA): head ``g`` owns rows
``g·d:(g+1)·d`` of each of the q, k and v parts of the fused ``c_attn`` (at offsets 0, E', 2E'
where E' = heads kept × d) and columns ``g·d:(g+1)·d`` of ``attn.c_proj``. MLP channels are
rows of ``c_fc`` and columns of ``mlp.c_proj``.

GPT2Attention splits the fused projection at ``split_size`` and views heads with
``(-1, head_dim)``; surgery updates ``split_size`` and ``num_heads`` per layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from bitsack.models.adapter import Adapter, matrix_unit
from bitsack.models.base import Slice, UnitSpec
from bitsack.models.registry import register_adapter
from bitsack.models.surgery import PrunedBlock, expand_positions


def select_conv1d(conv: Conv1D, index: torch.Tensor, dim: int) -> Conv1D:
    """A new ``Conv1D`` keeping output features (``dim=0``) or input features (``dim=1``).

    ``dim`` is in ``[out, in]`` orientation, i.e. stored dim ``1 - dim``; the bias follows the
    output features.
    """
    w = conv.weight.detach()  # [in, out]
    meta = w.device.type == "meta"
    stored_dim = 1 - dim
    if meta:
        shape = list(w.shape)
        shape[stored_dim] = int(index.numel())
        new_w = torch.empty(shape, dtype=w.dtype, device="meta")
    else:
        new_w = w.index_select(stored_dim, index.to(w.device)).contiguous()
    b = conv.bias.detach()
    if dim == 0:
        b = (torch.empty(int(index.numel()), dtype=b.dtype, device="meta") if meta
             else b.index_select(0, index.to(b.device)))
    with torch.device("meta"):
        new = Conv1D(new_w.shape[1], new_w.shape[0])
    new.weight = nn.Parameter(new_w, requires_grad=conv.weight.requires_grad)
    new.bias = nn.Parameter(b.clone().contiguous(), requires_grad=conv.bias.requires_grad)
    return new


@register_adapter("gpt2")
class GPT2Adapter(Adapter):
    """Units and surgery for ``GPT2LMHeadModel``."""

    linear_names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

    def layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    def layer_prefix(self, i: int) -> str:
        return f"transformer.h.{i}."

    @property
    def head_dim(self) -> int:
        return self.config.n_embd // self.config.n_head

    def full_sizes(self) -> tuple[int, int]:
        inner = self.config.n_inner if self.config.n_inner is not None else 4 * self.config.n_embd
        return self.config.n_head, inner

    def heads_per_group(self) -> int:
        return 1

    def _group_slices(self, i: int, pos: int, n_groups: int) -> tuple[Slice, ...]:
        d, e = self.head_dim, self.config.n_embd
        p = self.layer_prefix(i) + "attn."
        width = n_groups * d  # current E'
        rows = [Slice(p + "c_attn.weight", 0, off + pos * d, off + (pos + 1) * d, (d, e), True)
                for off in (0, width, 2 * width)]
        return (*rows, Slice(p + "c_proj.weight", 1, pos * d, (pos + 1) * d, (e, d), True))

    def _channel_slices(self, i: int, start: int, stop: int, width: int) -> tuple[Slice, ...]:
        e, n = self.config.n_embd, stop - start
        p = self.layer_prefix(i) + "mlp."
        return (
            Slice(p + "c_fc.weight", 0, start, stop, (n, e), True),
            Slice(p + "c_proj.weight", 1, start, stop, (e, n), True),
        )

    def _keep_groups(self, i: int, positions: list[int], n_groups: int) -> None:
        layer = self.layers()[i]
        attn = layer.attn
        if not positions:
            layer.attn = PrunedBlock(self.config.n_embd, attn.c_proj.bias, attention=True,
                                     layer_idx=attn.layer_idx)
            return
        d = self.head_dim
        idx = expand_positions(positions, d)
        width = n_groups * d
        qkv = torch.cat([idx, idx + width, idx + 2 * width])
        attn.c_attn = select_conv1d(attn.c_attn, qkv, 0)
        attn.c_proj = select_conv1d(attn.c_proj, idx, 1)
        attn.num_heads = len(positions)
        attn.split_size = len(positions) * d

    def _keep_channels(self, i: int, positions: list[int], width: int) -> None:
        layer = self.layers()[i]
        mlp = layer.mlp
        if not positions:
            layer.mlp = PrunedBlock(self.config.n_embd, mlp.c_proj.bias, attention=False)
            return
        idx = torch.as_tensor(positions, dtype=torch.long)
        mlp.c_fc = select_conv1d(mlp.c_fc, idx, 0)
        mlp.c_proj = select_conv1d(mlp.c_proj, idx, 1)

    def embedding_units(self) -> list[UnitSpec]:
        t = self.model.transformer
        wte, wpe, head = t.wte.weight, t.wpe.weight, self.model.lm_head.weight
        units = [matrix_unit("embed", "transformer.wte.weight", wte),
                 matrix_unit("pos_embed", "transformer.wpe.weight", wpe)]
        if head is not wte:
            units.append(matrix_unit("lm_head", "lm_head.weight", head))
        return units

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.transformer.ln_f(hidden))
