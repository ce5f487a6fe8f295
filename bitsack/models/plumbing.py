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
    """Runs a module of its own kind (e.g. OPT's learned position embedding or Gemma's scaled
    word embedding, ``nn.Embedding`` subclasses with their own ``forward``) on a packed
    ``weight``.

    The original module is kept as a template outside the module tree, its weight on the meta
    device (so ``state_dict`` holds only the packed buffers). Its buffers (Gemma's
    ``embed_scale``) become non-persistent buffers of this module, so they move with it and
    are passed to the template's ``forward`` with the dequantized weight.
    """

    def __init__(self, template: nn.Module, packed: nn.Module):
        super().__init__()
        self.packed = packed
        self._buffer_names: dict[str, str] = {}
        for i, (name, buf) in enumerate(template.named_buffers()):
            key = f"template_buffer{i}"
            self.register_buffer(key, buf, persistent=False)
            self._buffer_names[name] = key
        object.__setattr__(self, "_template", template.to("meta"))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state = {name: getattr(self, key) for name, key in self._buffer_names.items()}
        state["weight"] = self.packed.dequantize(self.packed.dtype)
        return torch.func.functional_call(self._template, state, args, kwargs)


def settle_packed_ties(model: nn.Module) -> dict[str, str]:
    """Drop transformers' tie declarations that packed modules already satisfy.

    ``tie_weights()`` (which lm-eval's ``HFLM`` and other tools call) makes ``lm_head.weight``
    the embedding's ``weight``. A packed embedding has no ``weight``: its tied lm_head is a
    ``PackedLinear`` on the same buffers (``PackedEmbedding.as_linear``), so the tie already
    holds and there is nothing to do. Pairs whose two ends are real tensors stay declared.

    Returns:
        The dropped ``{target: source}`` pairs (qualified names).
    """
    from transformers import PreTrainedModel

    dropped: dict[str, str] = {}
    for prefix, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        declared = sub.get_expanded_tied_weights_keys(all_submodels=False)
        keep = {t: s for t, s in declared.items() if _has_tensor(sub, t) and _has_tensor(sub, s)}
        if keep != declared:
            sub._tied_weights_keys = keep
            dot = f"{prefix}." if prefix else ""
            dropped.update({dot + t: dot + s for t, s in declared.items() if t not in keep})
    if dropped and isinstance(model, PreTrainedModel):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return dropped


def _has_tensor(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter_or_buffer(name)
    except AttributeError:
        return False
    return True
