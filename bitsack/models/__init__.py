"""Model adapters: loading, unit enumeration, structural surgery, layer-by-layer processing.

Public API (torch and transformers load on first use of a function, so
``import bitsack.models`` and ``bitsack.models.base`` stay light)::

    lm = load_model("default")                     # LoadedModel(model, tokenizer, source)
    units = model_units(lm.model, mlp_group=128)   # list[UnitSpec]
    adapter = get_adapter(lm.model)                # layers(), linear_modules(i), ...
    result = prune(lm.model, ["L3.attn.g1", "L7.mlp.c4"])         # PruneResult (dims record)
    permute_units(lm.model, order)                 # function-preserving reorder
    apply_dims(fresh_model, result.dims)           # rebuild a pruned model's shapes

Unit ids are stable: pruning and permuting never rename a unit (see ``adapter.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from bitsack.models.base import Slice, UnitSpec
from bitsack.models.registry import get_adapter, register_adapter, supported_model_types

if TYPE_CHECKING:  # pragma: no cover
    from bitsack.models.adapter import PruneResult

__all__ = [
    "Slice",
    "UnitSpec",
    "LoadedModel",
    "PruneResult",
    "LayerInputs",
    "Adapter",
    "load_model",
    "get_adapter",
    "register_adapter",
    "supported_model_types",
    "model_units",
    "prune",
    "apply_dims",
    "permute_units",
    "model_dims",
]

_LAZY = {
    "LoadedModel": "bitsack.models.loading",
    "load_model": "bitsack.models.loading",
    "PruneResult": "bitsack.models.adapter",
    "LayerInputs": "bitsack.models.layer_inputs",
    "Adapter": "bitsack.models.adapter",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bitsack.models' has no attribute {name!r}")


def model_units(model, mlp_group: int = 128, embeddings: bool = True,
                vocab_groups: int = 1) -> list[UnitSpec]:
    """Every unit of ``model`` with its weight slices (see ``Adapter.units``)."""
    return get_adapter(model).units(mlp_group=mlp_group, embeddings=embeddings,
                                    vocab_groups=vocab_groups)


def prune(model, unit_ids: Iterable[str], mlp_group: int = 128) -> PruneResult:
    """Physically remove head groups and MLP blocks from ``model`` (in place).

    Kept matrices become smaller ``nn.Linear`` (or ``Conv1D``) modules, biases are sliced, and
    per-layer attributes are updated so the layers run with their own head counts. A GQA group
    leaves with its query heads. A layer whose attention (or MLP) units are all gone gets a
    ``PrunedBlock`` that returns the output projection's bias (zeros without one), so the
    residual passes through — the same function as zeroing the pruned units' output columns.

    Args:
        model: a transformers causal LM of a supported architecture.
        unit_ids: ids of head groups (``L{i}.attn.g{k}``) and MLP blocks (``L{i}.mlp.c{k}``).
        mlp_group: channels per MLP block, as used to enumerate the units.

    Returns:
        The pruned ids and the model's dims record (JSON-able) for ``apply_dims``.
    """
    return get_adapter(model).prune(unit_ids, mlp_group=mlp_group)


def permute_units(model, order: Sequence[str], mlp_group: int = 128) -> dict:
    """Reorder units inside their matrices without changing the function (see ``Adapter``)."""
    return get_adapter(model).permute_units(order, mlp_group=mlp_group)


def apply_dims(model, dims: dict) -> None:
    """Reshape a fresh full-size ``model`` (random or meta) to the recorded ``dims``."""
    get_adapter(model).apply_dims(dims)


def model_dims(model) -> dict:
    """The dims record of ``model`` (identity for an unpruned model)."""
    return get_adapter(model).dims()
