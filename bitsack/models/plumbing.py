"""Module plumbing shared by compression and checkpoint loading: find, read and replace the
modules of a transformers model, and run a module of its own kind on a packed weight."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``, which stores its weight ``[in, out]``."""
    return type(module).__name__ == "Conv1D"


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight in ``[out, in]`` orientation, float32."""
    w = module.weight.detach()
    return (w.t() if is_conv1d(module) else w).to(torch.float32)


def bias_of(module: nn.Module) -> torch.Tensor | None:
    """A copy of the module's bias, or None."""
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().clone()


def tied_pairs(model: nn.Module) -> dict[str, str]:
    """Embedding module name -> lm_head module name, for embeddings shared with the head."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or getattr(out, "weight", None) is not inp.weight:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(inp)]: names[id(out)]}


def output_name(model: nn.Module) -> str | None:
    """Module name of the output embeddings (the lm_head)."""
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
