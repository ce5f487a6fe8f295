"""The architecture-independent half of a model adapter: unit ids, dims records, surgery plans.

An adapter sees a decoder-only model as a list of layers, each with

  - an attention block made of *head groups* (a KV head with the query heads that share it;
    one head when there is no GQA), and
  - an MLP block made of *channels* (intermediate features), grouped into blocks of
    ``mlp_group`` channels for decisions.

Unit ids name *original* structures and never change: after pruning or permuting, the group
``L3.attn.g2`` is still called g2 wherever it now sits. The model carries a *dims record*
(``model.bitsack_dims``, JSON-able) that maps current positions to original indices:

.. code-block:: python

    {"schema": "bitsack.dims/v1", "model_type": "llama",
     "layers": [{"attn_groups": [0, 2],           # original group index at each position
                 "mlp_channels": [0, 1, ..., 1535],  # original channel at each position
                 "heads": 6, "kv_heads": 2, "mlp_width": 1536}, ...]}

``heads``, ``kv_heads`` and ``mlp_width`` are derived (for readers); the two index lists are
the record. ``apply_dims`` replays a record on a freshly built full-size model, so that a saved
state dict of a pruned or permuted model loads into it.

Subclasses (``llama.py``, ``gpt2.py``, ``opt.py``) supply the geometry (which slices a group or
channel range owns) and the surgery primitives (keep these positions of this block, in this
order, built from ``surgery.py``); this module does the bookkeeping once for all of them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from bitsack.errors import ModelError
from bitsack.models.base import Slice, UnitSpec
from bitsack.models.layer_inputs import LayerInputs, capture_layer_inputs, layer_kwargs
from bitsack.models.surgery import LayerConfig, PrunedBlock, expand_positions, select_linear
from bitsack.plan import check_vocab_groups

__all__ = [
    "DIMS_SCHEMA",
    "Adapter",
    "LayerConfig",
    "LayerInputs",
    "PruneResult",
    "PrunedBlock",
    "expand_positions",
    "matrix_unit",
    "parse_unit_id",
    "vocab_ranges",
    "vocab_units",
    "select_linear",
]

DIMS_SCHEMA = "bitsack.dims/v1"
#: Unit ids of the matrices indexed by token id (their rows can be split: ``vocab_units``).
VOCAB_UNITS = ("embed", "lm_head")
_UNIT_RE = re.compile(r"^L(\d+)\.(attn)\.g(\d+)$|^L(\d+)\.(mlp)\.c(\d+)$")


@dataclass(frozen=True)
class PruneResult:
    """What ``prune`` removed and the dims record of the model after it.

    Attributes:
        pruned: the unit ids removed (sorted as given).
        dims: the model's dims record after surgery (JSON-able; see module docstring).
        params_before: weights in the decoder layers' quantizable matrices before surgery.
        params_after: the same count after surgery.
    """

    pruned: tuple[str, ...]
    dims: dict
    params_before: int
    params_after: int


def parse_unit_id(unit_id: str) -> tuple[int, str, int]:
    """Split ``"L3.attn.g2"`` into ``(3, "attn", 2)`` and ``"L0.mlp.c5"`` into ``(0, "mlp", 5)``.

    Raises:
        ModelError: for any other string (embedding units are not structural units).
    """
    m = _UNIT_RE.match(unit_id)
    if not m:
        raise ModelError(
            f"unit id: {unit_id!r} is not a prunable unit; valid ids look like "
            "'L<layer>.attn.g<group>' or 'L<layer>.mlp.c<block>' (embeddings can only be quantized)"
        )
    if m.group(2):
        return int(m.group(1)), "attn", int(m.group(3))
    return int(m.group(4)), "mlp", int(m.group(6))


def matrix_unit(unit_id: str, param: str, weight: torch.Tensor, kind: str = "embedding"
                ) -> UnitSpec:
    """A bits-only unit that owns the whole matrix ``param`` (embeddings, lm_head)."""
    return UnitSpec(unit_id, kind, None, (Slice(param, 0, 0, weight.shape[0],
                                                tuple(weight.shape)),), prunable=False)


def vocab_ranges(rows: int, groups: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of a matrix indexed by token id, split into ``groups``
    units that halve towards the front: the last range holds the second half of the rows, the
    one before it the quarter before that, …, the first range the leading 1/2^(groups−1).

    Why this shape: BPE vocabularies number tokens roughly in merge order, i.e. by frequency —
    on WikiText-2 the first 1/8 of SmolLM2's 49,152 ids carries 78 % of the tokens and the
    first 1/32 53 % (``bench/results/vocab_ranges.md``) — so a few frequent rows and many
    rare ones can take different options (a row of a rare token is read rarely as an input
    and moves little probability as an output row). ``groups`` 1 is the whole matrix.

    Raises:
        ValidationError: ``groups`` not in 1..MAX_VOCAB_GROUPS.
        ModelError: more ranges than the rows allow.
    """
    check_vocab_groups(groups)
    ends = [rows >> (groups - 1 - i) for i in range(groups)]
    if ends[0] < 1:
        raise ModelError(f"vocab_groups: {groups} ranges halving towards the front need at "
                         f"least {1 << (groups - 1)} rows; the matrix has {rows}")
    starts = [0, *ends[:-1]]
    return list(zip(starts, ends, strict=True))


def vocab_units(unit: UnitSpec, groups: int) -> list[UnitSpec]:
    """``unit`` (a whole vocabulary matrix: ``embed`` / ``lm_head``) as ``groups`` row-range
    units ``<id>.v<i>`` (``vocab_ranges``); itself when ``groups`` is 1."""
    if groups == 1:
        return [unit]
    (s,) = unit.slices
    return [UnitSpec(f"{unit.id}.v{i}", unit.kind, None,
                     (Slice(s.param, 0, a, b, (b - a, s.shape[1])),), prunable=False)
            for i, (a, b) in enumerate(vocab_ranges(s.shape[0], groups))]


class Adapter:
    """Architecture-independent unit bookkeeping and surgery driver.

    Subclasses set ``model_types`` and implement the hooks marked "architecture hook". Get one
    with ``bitsack.models.get_adapter(model)``; it holds no state besides the model, whose
    ``bitsack_dims`` attribute carries the pruning/permutation record.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: Architecture hook: the quantizable linear modules of a layer, by path relative to it.
    linear_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # ---- architecture hooks -------------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""
        raise NotImplementedError

    def layer_prefix(self, i: int) -> str:
        """Qualified name prefix of layer ``i`` in ``model.named_parameters()``."""
        raise NotImplementedError

    def full_sizes(self) -> tuple[int, int]:
        """(head groups, MLP channels) per layer of the unpruned architecture."""
        raise NotImplementedError

    def heads_per_group(self) -> int:
        """Query heads per head group (1 without GQA)."""
        raise NotImplementedError

    def linear_modules(self, i: int) -> dict[str, nn.Module]:
        """Quantizable linear modules of layer ``i`` by name relative to the layer
        (``linear_names``, in that order).

        Pruned-away sub-blocks contribute nothing (a ``PrunedBlock`` has no linears, and a
        stand-in without a weight is none). GPT-2 returns ``Conv1D`` modules, whose weights are
        stored ``[in, out]``.
        """
        layer = self.layers()[i]
        out: dict[str, nn.Module] = {}
        for name in self.linear_names:
            mod: Any = layer
            for part in name.split("."):
                mod = getattr(mod, part, None)
            if mod is not None and not isinstance(mod, PrunedBlock) and hasattr(mod, "weight"):
                out[name] = mod
        return out

    def _group_slices(self, i: int, pos: int, n_groups: int) -> tuple[Slice, ...]:
        """Architecture hook: slices of the head group at current position ``pos``."""
        raise NotImplementedError

    def _channel_slices(self, i: int, start: int, stop: int, width: int) -> tuple[Slice, ...]:
        """Architecture hook: slices of current MLP channels ``start:stop`` (of ``width``)."""
        raise NotImplementedError

    def _keep_groups(self, i: int, positions: list[int], n_groups: int) -> None:
        """Architecture hook: keep head groups at ``positions`` (in that order); [] -> pruned."""
        raise NotImplementedError

    def _keep_channels(self, i: int, positions: list[int], width: int) -> None:
        """Architecture hook: keep MLP channels at ``positions`` (in that order); [] -> pruned."""
        raise NotImplementedError

    def embedding_units(self) -> list[UnitSpec]:
        """Embedding / lm_head / position-embedding units (bits only)."""
        raise NotImplementedError

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the hidden state leaving the last layer (final norm + lm_head)."""
        raise NotImplementedError

    # ---- dims record --------------------------------------------------------------------
    def dims(self) -> dict:
        """The model's dims record (a deep copy); the identity record for an unpruned model."""
        rec = getattr(self.model, "bitsack_dims", None)
        if rec is None:
            rec = self._identity_dims()
        return copy.deepcopy(rec)

    def _identity_dims(self) -> dict:
        n_groups, width = self.full_sizes()
        return self._make_dims(
            [list(range(n_groups)) for _ in self.layers()],
            [list(range(width)) for _ in self.layers()],
        )

    def _make_dims(self, groups: list[list[int]], channels: list[list[int]]) -> dict:
        hpg = self.heads_per_group()
        kv_per_group = 1
        return {
            "schema": DIMS_SCHEMA,
            "model_type": self.config.model_type,
            "layers": [
                {
                    "attn_groups": [int(g) for g in g_list],
                    "mlp_channels": [int(c) for c in c_list],
                    "heads": len(g_list) * hpg,
                    "kv_heads": len(g_list) * kv_per_group,
                    "mlp_width": len(c_list),
                }
                for g_list, c_list in zip(groups, channels, strict=True)
            ],
        }

    # ---- units --------------------------------------------------------------------------
    def units(self, mlp_group: int = 128, embeddings: bool = True,
              vocab_groups: int = 1) -> list[UnitSpec]:
        """Every unit of the model with the weight slices it owns.

        Any quantization group size fits any unit: groups run along a matrix's input
        dimension inside each packed segment, and a segment's last group may be shorter
        (``bitsack.kernels.formats``).

        Args:
            mlp_group: MLP channels per unit; the last block of a layer may be smaller.
            embeddings: include embedding / lm_head units (bits only, not prunable).
            vocab_groups: the token embedding (and an untied lm_head) as this many units of
                row ranges, ``embed.v0`` … (``vocab_ranges``); 1: one unit ``embed``.

        Returns:
            Units in model order: per layer its head groups then its MLP blocks, then the
            embedding units. Ids are stable under pruning and permutation.

        Raises:
            ModelError: when ``mlp_group`` is not a positive integer.
        """
        if isinstance(mlp_group, bool) or not isinstance(mlp_group, int) or mlp_group < 1:
            raise ModelError(f"mlp_group: {mlp_group!r} must be a positive integer")
        rec = self.dims()
        out: list[UnitSpec] = []
        for i, layer_rec in enumerate(rec["layers"]):
            groups = layer_rec["attn_groups"]
            for pos, g in enumerate(groups):
                out.append(UnitSpec(id=f"L{i}.attn.g{g}", kind="head_group", layer=i,
                                    slices=self._group_slices(i, pos, len(groups)),
                                    prunable=True))
            channels = layer_rec["mlp_channels"]
            for block, start, stop in self._blocks(i, channels, mlp_group):
                out.append(UnitSpec(id=f"L{i}.mlp.c{block}", kind="mlp_group", layer=i,
                                    slices=self._channel_slices(i, start, stop, len(channels)),
                                    prunable=True))
        if embeddings:
            check_vocab_groups(vocab_groups)
            for u in self.embedding_units():
                out.extend(vocab_units(u, vocab_groups) if u.id in VOCAB_UNITS else [u])
        return out

    @staticmethod
    def _blocks(i: int, channels: list[int], mlp_group: int) -> list[tuple[int, int, int]]:
        """(block id, start, stop) of current channel positions, one per original block."""
        blocks: list[tuple[int, int, int]] = []
        pos = 0
        seen: set[int] = set()
        while pos < len(channels):
            block = channels[pos] // mlp_group
            start = pos
            while pos < len(channels) and channels[pos] // mlp_group == block:
                pos += 1
            if block in seen:
                raise ModelError(
                    f"mlp_group: {mlp_group} does not match layer {i}'s channel order (block "
                    f"{block} is split in two); use the mlp_group the model was pruned or "
                    "permuted with"
                )
            seen.add(block)
            blocks.append((block, start, pos))
        return blocks

    # ---- surgery ------------------------------------------------------------------------
    def quantizable_params(self) -> int:
        """Weights in the decoder layers' quantizable matrices (for before/after counts)."""
        total = 0
        for i in range(len(self.layers())):
            for mod in self.linear_modules(i).values():
                total += mod.weight.numel()
        return total

    def prune(self, unit_ids: Iterable[str], mlp_group: int = 128) -> PruneResult:
        """Remove head groups and MLP blocks physically (see ``bitsack.models.prune``)."""
        ids = list(dict.fromkeys(unit_ids))
        rec = self.dims()
        n_layers = len(rec["layers"])
        drop_groups: dict[int, set[int]] = {}
        drop_blocks: dict[int, set[int]] = {}
        for uid in ids:
            layer, kind, idx = parse_unit_id(uid)
            if layer >= n_layers:
                raise ModelError(f"unit id: {uid!r} names layer {layer}; the model has layers "
                                 f"0..{n_layers - 1}")
            lr = rec["layers"][layer]
            if kind == "attn":
                if idx not in lr["attn_groups"]:
                    raise ModelError(f"unit id: {uid!r} is not a head group of the model (layer "
                                     f"{layer} has groups {lr['attn_groups']})")
                drop_groups.setdefault(layer, set()).add(idx)
            else:
                blocks = {c // mlp_group for c in lr["mlp_channels"]}
                if idx not in blocks:
                    raise ModelError(f"unit id: {uid!r} is not an MLP block of the model with "
                                     f"mlp_group={mlp_group} (layer {layer} has blocks "
                                     f"{sorted(blocks)})")
                drop_blocks.setdefault(layer, set()).add(idx)
        before = self.quantizable_params()
        for layer in sorted(set(drop_groups) | set(drop_blocks)):
            lr = rec["layers"][layer]
            if layer in drop_groups:
                keep = [p for p, g in enumerate(lr["attn_groups"]) if g not in drop_groups[layer]]
                self._keep_groups(layer, keep, len(lr["attn_groups"]))
                lr["attn_groups"] = [lr["attn_groups"][p] for p in keep]
            if layer in drop_blocks:
                keep = [p for p, c in enumerate(lr["mlp_channels"])
                        if c // mlp_group not in drop_blocks[layer]]
                self._keep_channels(layer, keep, len(lr["mlp_channels"]))
                lr["mlp_channels"] = [lr["mlp_channels"][p] for p in keep]
        self._set_dims(rec)
        return PruneResult(pruned=tuple(ids), dims=self.dims(), params_before=before,
                           params_after=self.quantizable_params())

    def permute_units(self, order: Sequence[str], mlp_group: int = 128) -> dict:
        """Reorder units inside their matrices, preserving the function.

        For every (layer, attn|mlp) that ``order`` mentions, its units must all be listed, once
        each; they are placed in the order given (e.g. sorted by bit-width, so each matrix has
        one contiguous segment per bit-width). A head group moves its q/k/v rows and o_proj
        columns together; an MLP block its gate/up rows and down columns.

        Returns:
            The new dims record.
        """
        rec = self.dims()
        wanted: dict[tuple[int, str], list[int]] = {}
        for uid in order:
            layer, kind, idx = parse_unit_id(uid)
            if layer >= len(rec["layers"]):
                raise ModelError(f"order: {uid!r} names layer {layer}; the model has layers "
                                 f"0..{len(rec['layers']) - 1}")
            wanted.setdefault((layer, kind), []).append(idx)
        for (layer, kind), idxs in sorted(wanted.items()):
            lr = rec["layers"][layer]
            if kind == "attn":
                current = lr["attn_groups"]
            else:
                current = [b for b, _, _ in self._blocks(layer, lr["mlp_channels"], mlp_group)]
            if sorted(idxs) != sorted(current) or len(set(idxs)) != len(idxs):
                raise ModelError(
                    f"order: layer {layer} {kind} units {sorted(idxs)} must list each of the "
                    f"layer's current units exactly once: {sorted(current)}")
            if kind == "attn":
                pos_of = {g: p for p, g in enumerate(current)}
                positions = [pos_of[g] for g in idxs]
                self._keep_groups(layer, positions, len(current))
                lr["attn_groups"] = [current[p] for p in positions]
            else:
                spans = {b: (s, e) for b, s, e in self._blocks(layer, lr["mlp_channels"],
                                                                  mlp_group)}
                positions = [p for b in idxs for p in range(*spans[b])]
                self._keep_channels(layer, positions, len(lr["mlp_channels"]))
                lr["mlp_channels"] = [lr["mlp_channels"][p] for p in positions]
        self._set_dims(rec)
        return self.dims()

    def apply_dims(self, dims: dict) -> None:
        """Reshape a freshly built full-size model to a recorded dims record.

        Sizes and orders only: load the saved state dict afterwards. Works on the meta device.

        Raises:
            ModelError: the record is malformed, of another architecture, or the model was
                already pruned or permuted.
        """
        if not isinstance(dims, dict) or dims.get("schema") != DIMS_SCHEMA:
            got = dims.get("schema") if isinstance(dims, dict) else type(dims).__name__
            raise ModelError(f"dims.schema: {got!r} is not {DIMS_SCHEMA!r}")
        if dims.get("model_type") != self.config.model_type:
            raise ModelError(f"dims.model_type: {dims.get('model_type')!r} does not match the "
                             f"model's {self.config.model_type!r}")
        if getattr(self.model, "bitsack_dims", None) is not None and \
                self.dims() != self._identity_dims():
            raise ModelError("apply_dims: the model is already pruned or permuted; build a fresh "
                             "full-size model from its config first")
        n_groups, width = self.full_sizes()
        layers = dims.get("layers")
        if not isinstance(layers, list) or len(layers) != len(self.layers()):
            raise ModelError(f"dims.layers: {len(layers) if isinstance(layers, list) else layers!r}"
                             f" entries; the model has {len(self.layers())} layers")
        for i, lr in enumerate(layers):
            for key, full in (("attn_groups", n_groups), ("mlp_channels", width)):
                vals = lr.get(key) if isinstance(lr, dict) else None
                if (not isinstance(vals, list) or len(set(vals)) != len(vals)
                        or any(not isinstance(v, int) or not 0 <= v < full for v in vals)):
                    raise ModelError(f"dims.layers[{i}].{key}: must be distinct integers in "
                                     f"0..{full - 1}")
        for i, lr in enumerate(layers):
            if lr["attn_groups"] != list(range(n_groups)):
                self._keep_groups(i, list(lr["attn_groups"]), n_groups)
            if lr["mlp_channels"] != list(range(width)):
                self._keep_channels(i, list(lr["mlp_channels"]), width)
        self._set_dims(self._make_dims([lr["attn_groups"] for lr in layers],
                                       [lr["mlp_channels"] for lr in layers]))

    def _set_dims(self, rec: dict) -> None:
        self.model.bitsack_dims = self._make_dims(
            [lr["attn_groups"] for lr in rec["layers"]],
            [lr["mlp_channels"] for lr in rec["layers"]])

    # ---- layer-by-layer processing ------------------------------------------------------
    def layer_types(self) -> list[str] | None:
        """Each layer's attention type when the model mixes several (transformers'
        ``config.layer_types``, e.g. ``sliding_attention`` / ``full_attention``), else None."""
        types = getattr(self.config, "layer_types", None)
        if not isinstance(types, (list, tuple)) or len(set(types)) < 2:
            return None
        return list(types[: len(self.layers())])

    def capture_layer_inputs(self, input_ids: torch.Tensor,
                             attention_mask: torch.Tensor | None = None) -> LayerInputs:
        """Run the embeddings and capture what enters decoder layer 0: the hidden state and
        the keyword arguments of a layer call (``bitsack.models.layer_inputs``, where the
        catcher is described). Only the embeddings run, so the layers may stay on the CPU or
        the meta device."""
        return capture_layer_inputs(self.model, self.layers(), self.layer_types(), input_ids,
                                    attention_mask)

    def layer_kwargs(self, i: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Layer ``i``'s call arguments from captured ``kwargs`` (see ``LayerInputs``)."""
        if not any("@" in k for k in kwargs):
            return kwargs
        return layer_kwargs(self.layer_types(), i, kwargs)

    def run_layer(self, i: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Run decoder layer ``i`` on ``hidden`` with captured ``kwargs``; returns its output."""
        out = self.layers()[i](hidden, **self.layer_kwargs(i, kwargs))
        return out[0] if isinstance(out, tuple) else out
