"""Adapter registry: ``config.model_type`` -> adapter class (a dict plus a decorator)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from bitsack.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from bitsack.models.adapter import Adapter

_ADAPTERS: dict[str, type[Adapter]] = {}

# The built-in adapters register themselves on import; listed here (no package walking) and
# imported on first use so that importing the registry stays free of torch.
_BUILTIN_MODULES = ("bitsack.models.llama", "bitsack.models.gemma", "bitsack.models.phi3",
                    "bitsack.models.gpt2", "bitsack.models.opt")

# Families that look supported but are not, with what to use instead.
_HINTS = {
    "gemma3": "this is Gemma 3's multimodal model; load its text model (model_type "
              "'gemma3_text', Gemma3ForCausalLM)",
    "phi3small": "Phi-3-small's blocksparse attention has no bitsack adapter",
}


def register_adapter(*model_types: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: make ``cls`` the adapter for each of ``model_types``.

    Example:
        >>> @register_adapter("my_arch")            # doctest: +SKIP
        ... class MyAdapter(Adapter): ...
    """

    def deco(cls: type[Adapter]) -> type[Adapter]:
        for mt in model_types:
            _ADAPTERS[mt] = cls
        cls.model_types = tuple(model_types)
        return cls

    return deco


def _load_builtins() -> None:
    for name in _BUILTIN_MODULES:
        importlib.import_module(name)


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values an adapter is registered for, sorted."""
    _load_builtins()
    return sorted(_ADAPTERS)


def get_adapter(model) -> Adapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``.

    Raises:
        ModelError: the architecture is not supported (the message names it and the supported
            ones) — bitsack never profiles a model it cannot enumerate completely.
    """
    _load_builtins()
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if mt not in _ADAPTERS:
        hint = f" ({_HINTS[mt]})" if mt in _HINTS else ""
        raise ModelError(
            f"model.config.model_type: {mt!r} is not supported{hint}; supported architectures: "
            f"{', '.join(sorted(_ADAPTERS))}"
        )
    return _ADAPTERS[mt](model)
