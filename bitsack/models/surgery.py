"""Surgery primitives the architecture adapters build pruned and permuted blocks from.

``select_linear`` keeps rows or columns of a linear layer (on the meta device too, which is how
``apply_dims`` reshapes a model before its weights are loaded); ``expand_positions`` turns
kept head groups or channel blocks into row indices; ``PrunedBlock`` stands in for a sub-block
whose units were all pruned; ``LayerConfig`` gives a pruned layer its own head counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["LayerConfig", "PrunedBlock", "expand_positions", "select_linear"]


class PrunedBlock(nn.Module):
    """Replaces a sub-block (attention or MLP) whose units were all pruned.

    It returns what the masked original would return: the output projection's bias broadcast
    over the tokens (zeros when there is no bias), so the residual stream passes through. As an
    attention stand-in (``attention=True``) it returns ``(output, None)`` like the attention
    modules, and it keeps a one-number-per-token placeholder in a KV cache: transformers reads
    the cached sequence length from layer 0 to place new tokens, which would be wrong if a fully
    pruned layer cached nothing.
    """

    def __init__(self, hidden_size: int, bias: torch.Tensor | None, *, attention: bool,
                 layer_idx: int | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.attention = attention
        self.layer_idx = layer_idx
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        shape = (*hidden_states.shape[:-1], self.hidden_size)
        if self.bias is None:
            out = hidden_states.new_zeros(shape)
        else:
            out = self.bias.to(hidden_states.dtype).expand(shape).clone()
        if not self.attention:
            return out
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None and args and hasattr(args[0], "update"):
            cache = args[0]
        if cache is not None and self.layer_idx is not None:
            b, s = hidden_states.shape[0], hidden_states.shape[1]
            placeholder = hidden_states.new_zeros(b, 1, s, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return out, None

    def extra_repr(self) -> str:
        kind = "attention" if self.attention else "mlp"
        return f"{kind} pruned, hidden={self.hidden_size}, bias={self.bias is not None}"


def select_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new ``nn.Linear`` keeping rows (``dim=0``, bias too) or columns (``dim=1``) ``index``.

    The weights are copied (contiguous), on the original device and dtype; meta tensors stay
    meta, which is how ``apply_dims`` reshapes a model before its weights are loaded.
    """
    w = linear.weight.detach()
    index = index.to(w.device) if w.device.type != "meta" else index
    new_w = w.index_select(dim, index) if w.device.type != "meta" else _meta_select(w, index, dim)
    out_f, in_f = new_w.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(new_w.contiguous(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        b = linear.bias.detach()
        if dim == 0:
            b = b.index_select(0, index) if b.device.type != "meta" else _meta_select(b, index, 0)
        new.bias = nn.Parameter(b.clone().contiguous(), requires_grad=linear.bias.requires_grad)
    return new


def _meta_select(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = int(index.numel())
    return torch.empty(shape, dtype=t.dtype, device="meta")


def expand_positions(positions: Sequence[int], width: int) -> torch.Tensor:
    """Row indices of blocks ``positions`` of ``width`` rows each, in the given order."""
    if not positions:
        return torch.empty(0, dtype=torch.long)
    base = torch.as_tensor(list(positions), dtype=torch.long) * width
    return (base[:, None] + torch.arange(width)[None, :]).reshape(-1)


class LayerConfig:
    """One layer's view of the model config: a few fields of its own (a pruned layer's head
    counts, for modules that read them from their config at run time, like Phi-3's fused
    q/k/v split), every other field read from — and written to — the model's config, so
    later changes (e.g. ``set_attn_implementation``) still reach the layer."""

    def __init__(self, base: Any, **fields: Any):
        base = base.base if isinstance(base, LayerConfig) else base
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "fields", dict(fields))

    def __getattr__(self, name: str) -> Any:  # called only for names not set on self
        state = self.__dict__
        if "fields" not in state:  # during copy / unpickling
            raise AttributeError(name)
        if name in state["fields"]:
            return state["fields"][name]
        return getattr(state["base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.fields:
            self.fields[name] = value
        else:
            setattr(self.base, name, value)

    def __repr__(self) -> str:
        return f"LayerConfig({type(self.base).__name__}, {self.fields})"
