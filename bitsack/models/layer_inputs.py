"""What enters a decoder layer: captured once at layer 0, replayed for every layer.

GPTQ's "catcher" (Frantar et al. 2022): a stand-in for decoder layer 0 records the hidden
state and every other argument the model passes to a layer, then stops the forward pass, so a
model is processed layer by layer from there (``bitsack.engine``) without running it whole.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bitsack.errors import ModelError

__all__ = ["LayerInputs", "capture_layer_inputs", "layer_kwargs"]


@dataclass(frozen=True)
class LayerInputs:
    """The inputs of decoder layer 0, captured for layer-by-layer processing.

    ``hidden`` is the hidden state entering layer 0 (``[batch, seq, hidden]``); ``kwargs`` are
    every other argument the model passes to a decoder layer (attention mask, position ids,
    rotary position embeddings, ...), by name, so ``adapter.run_layer(i, hidden,
    inputs.kwargs)`` runs layer ``i`` as the model would.

    Models whose layers are of several attention types (``config.layer_types``: sliding-window
    and full layers of Gemma 2/3, Qwen2/3 with sliding windows) pass each type its own mask
    and, for Gemma 3, its own rotary embeddings. ``kwargs`` then holds layer 0's arguments
    under their names and another type's differing ones as ``"<name>@<type>"`` (e.g.
    ``"attention_mask@full_attention"``): still a flat dict of tensors, which ``run_layer``
    resolves per layer.
    """

    hidden: torch.Tensor
    kwargs: dict[str, Any] = field(default_factory=dict)


class _Caught(Exception):
    """Raised by the layer-0 catcher to stop the forward pass once the inputs are captured."""


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records its inputs by name, then stops the forward
    (``stop``) or passes the hidden state on unchanged (to reach a later layer's inputs)."""

    def __init__(self, layer: nn.Module, stop: bool = True):
        super().__init__()
        self.signature = inspect.signature(layer.forward)
        self.stop = stop
        self.captured: tuple[torch.Tensor, dict[str, Any]] | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # Some models pass layer arguments positionally (GPT-2 passes cache and mask so);
        # binding them to names makes the captured kwargs valid for every layer call.
        bound = self.signature.bind(*args, **kwargs)
        named = dict(bound.arguments)
        hidden_name = next(iter(self.signature.parameters))
        hidden = named.pop(hidden_name)
        for name, param in self.signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in named:
                named.update(named.pop(name))
        self.captured = (hidden, named)
        if self.stop:
            raise _Caught
        return hidden  # transformers 5 decoder layers return the hidden state alone


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, types: list[str] | None,
                     input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                     ) -> LayerInputs:
    """Run the embeddings and capture what enters decoder layer 0 of ``model``.

    No decoder layer runs, so only the embedding modules need to be on a device (the
    layers may stay on the CPU or the meta device) — this is how models larger than memory
    are processed one layer at a time (GPTQ's "catcher", Frantar et al. 2022). For a model
    with several layer types, the first layer of each type is reached by passing the
    hidden state through the layers before it unchanged (see ``LayerInputs``).

    Args:
        model: the model.
        layers: its decoder layers (replaced by catchers during the call, then restored).
        types: each layer's attention type when the model mixes several, else None
            (``Adapter.layer_types``).
        input_ids: ``[batch, seq]`` token ids, on the embedding's device.
        attention_mask: optional padding mask, as for the model's forward.

    Returns:
        The hidden state and the keyword arguments of a layer call.
    """
    first_of = {} if types is None else {t: types.index(t) for t in dict.fromkeys(types)}
    last = max(first_of.values(), default=0)
    originals = [layers[i] for i in range(last + 1)]
    catchers = [_Catcher(layer, stop=i == last) for i, layer in enumerate(originals)]
    for i, catcher in enumerate(catchers):
        layers[i] = catcher
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Caught:
        pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if any(catchers[i].captured is None for i in [0, *first_of.values()]):
        raise ModelError("capture_layer_inputs: the model never called decoder layer 0 (or "
                         "the first layer of each attention type)")
    hidden, kwargs = catchers[0].captured
    kwargs = dict(kwargs)
    for kind, i in first_of.items():
        if i == 0:
            continue
        for name, value in catchers[i].captured[1].items():
            if value is not kwargs.get(name):
                kwargs[f"{name}@{kind}"] = value
    return LayerInputs(hidden=hidden, kwargs=kwargs)


def layer_kwargs(types: list[str] | None, i: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Layer ``i``'s call arguments from captured ``kwargs`` (see ``LayerInputs``), given each
    layer's attention type (None: one type)."""
    suffix = f"@{types[i]}" if types is not None else None
    out = {k: v for k, v in kwargs.items() if "@" not in k}
    if suffix is not None:
        out.update({k[: -len(suffix)]: v for k, v in kwargs.items() if k.endswith(suffix)})
    return out
