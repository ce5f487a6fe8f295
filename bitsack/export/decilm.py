"""The DeciLM / Nemotron-NAS layout of a pruned model, as the compressed-tensors export writes it.

vLLM serves per-layer head and MLP sizes only through its ``DeciLMForCausalLM``
(``vllm/model_executor/models/nemotron_nas.py``), configured by ``block_configs``: per layer,
``attention.no_op`` or ``attention.n_heads_in_group`` (that layer's KV heads are
``num_attention_heads // n_heads_in_group``), and ``ffn.no_op`` or ``ffn.ffn_mult`` (MLP width
``int(2·ffn_mult·hidden/3)`` rounded up to a multiple of 256). Two things there are fixed that
bitsack's pruning is not, so the export zero-pads, which changes no output:

- **Query heads.** Every attention layer has ``num_attention_heads`` query heads. bitsack prunes
  a KV head with its ``r`` query heads, so a layer keeping ``k`` KV heads has ``k·r``. The export
  sets ``num_attention_heads = H' = r·max_i k_i`` and gives layer ``i`` the fewest KV heads
  ``k'_i ≥ k_i`` that divide ``H'`` into groups of at least ``r`` query heads; KV head ``g < k_i``
  serves query slots ``g·n … g·n + r − 1`` (``n = H'/k'_i``) with bitsack's heads of group ``g``,
  in order. The other slots have zero q rows and zero o_proj columns (their attention output is
  multiplied by zero), the KV heads ``≥ k_i`` zero k / v rows.
- **MLP widths** are multiples of 256: a kept width ``w`` gets zero gate / up rows and zero down
  columns up to ``⌈w/256⌉·256`` (``silu(0)·0 = 0``). ``ffn_mult`` is written so that the
  formula gives that width exactly.

A zero row or column of a quantized matrix has codes, scale and zero point 0 (it dequantizes to
exactly 0); o_proj / down_proj columns move in whole groups, so the group size must divide the
columns of each head and the MLP padding (refused otherwise, naming the module). The padding
costs file bytes (reported in the export's notes and layout), not quality.

**Zero parts.** A part pruned whole is a no-op, except in two cases, where it is written as
zeros (dense fp16; attention: one KV head; MLP: 256 channels) and reported in the notes:

- it has an output bias: bitsack's pruned block still adds it (``PrunedBlock``), and the zero
  part's o_proj / down_proj bias is that bias;
- a vLLM quirk: its DeciLM layer feeds the MLP through
  ``post_attention_layernorm(hidden, residual)``, which returns one tensor, not two, while no
  attention has yet set ``residual``; so the first layer that computes anything gets a zero
  attention (output exactly 0) if it has none.

Layers that are no-ops in a part carry neither that part's tensors nor its norm, as vLLM's
loader expects. Biases follow their rows (zero where padded); config.json says which exist as
vLLM reads them (``qkv_bias``, ``attention_bias`` for o_proj, ``mlp_bias``), so Qwen2's q/k/v
biases go through. Refused: an active sliding window, and anything ``bitsack.export.common``
refuses.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitsack.export.common import DenseMatrix, ExportError, Matrix, Source, spread

#: The remote code a pruned export carries, and the ``auto_map`` naming it.
CODE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def ffn_mult_for(width: int, hidden: int) -> float:
    """The ``ffn_mult`` (rounded to 6 decimals, as Nemotron-NAS configs are) whose MLP width is
    ``width``, a positive multiple of 256: aimed at ``width − 128``, the middle of the interval
    that rounds up to ``width``."""
    from bitsack.export.decilm_code.configuration_decilm import (
        FFN_MULTIPLE,
        intermediate_size_of,
    )

    mult = round((width - FFN_MULTIPLE / 2) * 3 / (2 * hidden), 6)
    assert intermediate_size_of(mult, hidden) == width, (width, hidden, mult)
    return mult


@dataclass(frozen=True)
class DeciLayout:
    """Per-layer sizes of the export (see module docstring).

    Attributes:
        heads: ``num_attention_heads`` of every attention layer, padding included (``H'``).
        head_dim: size of a head.
        ratio: query heads per KV head in the base model (``r``).
        kv_kept: bitsack's KV heads per layer.
        kv_slots: KV heads written per layer (0: attention is a no-op).
        ffn_kept: bitsack's MLP width per layer.
        ffn_width: MLP width written per layer (0: the MLP is a no-op).
        zero_attention: layers whose attention is written as zeros (one KV head): pruned
            whole but carrying an output bias, or the vLLM quirk.
        zero_ffn: layers whose MLP is written as zeros (256 channels): pruned whole but
            carrying an output bias.
    """

    heads: int
    head_dim: int
    ratio: int
    kv_kept: tuple[int, ...]
    kv_slots: tuple[int, ...]
    ffn_kept: tuple[int, ...]
    ffn_width: tuple[int, ...]
    zero_attention: tuple[int, ...] = ()
    zero_ffn: tuple[int, ...] = ()

    def zero(self, i: int, part: str) -> bool:
        """Whether ``part`` of layer ``i`` is written as zeros."""
        return i in (self.zero_attention if part in _ATTN else self.zero_ffn)

    def query_rows(self, i: int) -> np.ndarray:
        """Row of the written q_proj (column of o_proj) of each of bitsack's rows of layer
        ``i``, in bitsack's order (KV group by KV group, ``ratio`` heads each)."""
        n = self.heads // self.kv_slots[i]
        slots = [g * n + j for g in range(self.kv_kept[i]) for j in range(self.ratio)]
        return _head_rows(slots, self.head_dim)

    def block_configs(self, hidden: int) -> list[dict[str, Any]]:
        """``block_configs`` of config.json, in the Nemotron-NAS schema."""
        out = []
        for kv, width in zip(self.kv_slots, self.ffn_width, strict=True):
            attn = {"no_op": kv == 0, "replace_with_linear": False}
            if kv:
                attn["n_heads_in_group"] = self.heads // kv
            ffn = {"no_op": width == 0, "replace_with_linear": False}
            if width:
                ffn["ffn_mult"] = ffn_mult_for(width, hidden)
            out.append({"attention": attn, "ffn": ffn})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"num_attention_heads": self.heads, "kv_heads": list(self.kv_slots),
                "kv_heads_kept": list(self.kv_kept), "ffn_width": list(self.ffn_width),
                "ffn_width_kept": list(self.ffn_kept),
                "zero_attention_layers": list(self.zero_attention),
                "zero_ffn_layers": list(self.zero_ffn)}


def _head_rows(slots: list[int], head_dim: int) -> np.ndarray:
    """Rows of heads ``slots`` (``head_dim`` rows each), in that order."""
    from bitsack.models.surgery import expand_positions

    return expand_positions(slots, head_dim).numpy()


def layout(src: Source) -> DeciLayout:
    """The DeciLM layout of the pruned folder ``src``.

    Raises:
        ExportError: an active sliding window.
    """
    from bitsack.export.decilm_code.configuration_decilm import FFN_MULTIPLE

    c = src.config
    if c.get("sliding_window") and c.get("use_sliding_window", True):
        raise ExportError("sliding_window", f"{c['sliding_window']}: vLLM's DeciLM attends "
                          "to the whole context; valid: a model without a sliding window")
    heads, kv = int(c["num_attention_heads"]), int(c["num_key_value_heads"])
    head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    r = heads // kv
    dims = src.layer_dims()
    kv_kept = tuple(int(d["kv_heads"]) for d in dims)
    ffn_kept = tuple(int(d["mlp_width"]) for d in dims)
    h = r * max(max(kv_kept), 1)
    slots = [0 if k == 0 else min(s for s in range(k, h // r + 1) if h % s == 0)
             for k in kv_kept]
    width = [-(-w // FFN_MULTIPLE) * FFN_MULTIPLE for w in ffn_kept]
    # a part pruned whole still adds its output bias (bitsack's PrunedBlock): a zero part
    state = src.model.state_dict()
    zero_attn = {i for i in range(len(dims))
                 if kv_kept[i] == 0 and f"model.layers.{i}.self_attn.bias" in state}
    zero_ffn = {i for i in range(len(dims))
                if ffn_kept[i] == 0 and f"model.layers.{i}.mlp.bias" in state}
    first = next((i for i in range(len(dims)) if kv_kept[i] or ffn_kept[i] or i in zero_ffn),
                 None)
    if first is not None and kv_kept[first] == 0:
        zero_attn.add(first)  # the vLLM quirk
    for i in zero_attn:
        slots[i] = 1
    for i in zero_ffn:
        width[i] = FFN_MULTIPLE
    return DeciLayout(heads=h, head_dim=head_dim, ratio=r, kv_kept=kv_kept,
                      kv_slots=tuple(slots), ffn_kept=ffn_kept, ffn_width=tuple(width),
                      zero_attention=tuple(sorted(zero_attn)), zero_ffn=tuple(sorted(zero_ffn)))


def placement(lay: DeciLayout, i: int, part: str) -> tuple[int, np.ndarray, int]:
    """Where bitsack's rows or columns of ``part`` (``q_proj`` … ``down_proj``) of layer ``i``
    go in the written matrix: (axis, index of each, written size along that axis). The
    other axis and the parts not padded along it keep their size."""
    d, h = lay.head_dim, lay.heads
    if part in ("q_proj", "o_proj"):
        return (0 if part == "q_proj" else 1), lay.query_rows(i), h * d
    if part in ("k_proj", "v_proj"):
        return 0, _head_rows(list(range(lay.kv_kept[i])), d), lay.kv_slots[i] * d
    return (1 if part == "down_proj" else 0), np.arange(lay.ffn_kept[i]), lay.ffn_width[i]


def _parts(lay: DeciLayout, i: int) -> list[str]:
    """The module names layer ``i`` writes, under transformers' naming."""
    pre = f"model.layers.{i}."
    attn = [pre + "self_attn." + p for p in _ATTN] if lay.kv_slots[i] else []
    return attn + ([pre + "mlp." + p for p in _MLP] if lay.ffn_width[i] else [])


def layer_matrices(lay: DeciLayout, i: int, matrix: Any, hidden: int) -> dict[str, Matrix]:
    """The matrices written for layer ``i`` (``{module name: matrix}``), padded to the
    layout; ``matrix(name)`` gives bitsack's matrix of a module."""
    out: dict[str, Matrix] = {}
    for name in _parts(lay, i):
        part = name.rpartition(".")[2]
        axis, index, size = placement(lay, i, part)
        if lay.zero(i, part):
            shape = (size, hidden) if axis == 0 else (hidden, size)
            out[name] = DenseMatrix(name, np.zeros(shape, dtype=np.float16))
        else:
            m = matrix(name)
            out[name] = m.spread_rows(index, size) if axis == 0 else \
                m.spread_columns(index, size)
    return out


def layer_vectors(lay: DeciLayout, i: int, dense: dict[str, np.ndarray], hidden: int,
                  ) -> dict[str, np.ndarray]:
    """The norms and biases written for layer ``i``: a no-op part has neither, biases of
    padded rows are zero, and a zero attention's biases (where the model has them) too."""
    pre = f"model.layers.{i}."
    out = {pre + n: dense[pre + n] for n, on in (("input_layernorm.weight", lay.kv_slots[i]),
                                                 ("post_attention_layernorm.weight",
                                                  lay.ffn_width[i])) if on}
    biases = {k.rsplit(".", 2)[-2]: v.dtype for k, v in dense.items() if k.endswith(".bias")}
    for name in _parts(lay, i):
        part = name.rpartition(".")[2]
        block_bias = name.rpartition(".")[0] + ".bias"  # a PrunedBlock's output bias
        if part not in biases and block_bias not in dense:
            continue
        axis, index, size = placement(lay, i, part)
        if lay.zero(i, part):
            out[name + ".bias"] = dense[block_bias] if axis == 1 and block_bias in dense \
                else np.zeros(size if axis == 0 else hidden, biases.get(part, np.float32))
        elif axis == 0:
            out[name + ".bias"] = spread(dense[name + ".bias"], index, size, 0)
        else:
            out[name + ".bias"] = dense[name + ".bias"]
    return out


def bias_config(dense: dict[str, np.ndarray]) -> dict[str, bool]:
    """The bias flags of the export's config as vLLM's DeciLM reads them: ``qkv_bias`` (q/k/v),
    ``attention_bias`` (o_proj; q/k/v too unless ``qkv_bias`` says otherwise), ``mlp_bias``."""
    parts = {k.rsplit(".", 2)[-2] for k in dense if k.endswith(".bias")}
    return {"qkv_bias": bool(parts & {"q_proj", "k_proj", "v_proj"}),
            "attention_bias": "o_proj" in parts,
            "mlp_bias": bool(parts & set(_MLP))}


def decilm_config(base: dict[str, Any], lay: DeciLayout,
                  dense: dict[str, np.ndarray]) -> dict[str, Any]:
    """config.json of the export (before its ``quantization_config``): the base Llama config
    with DeciLM's model type, architecture, code, head count, bias flags and
    ``block_configs``; ``dense`` is the model's unpacked tensors (for its biases)."""
    cfg = {**base, **bias_config(dense)}
    first_kv = next(k for k in lay.kv_slots if k) if any(lay.kv_slots) else 1
    cfg.update({
        "model_type": "nemotron-nas", "architectures": ["DeciLMForCausalLM"],
        "auto_map": dict(AUTO_MAP), "num_attention_heads": lay.heads,
        "num_key_value_heads": first_kv, "head_dim": lay.head_dim,
        "intermediate_size": max(lay.ffn_width),
        "block_configs": lay.block_configs(int(base["hidden_size"]))})
    return cfg


def padding_note(lay: DeciLayout, pad_bytes: int, layer_bytes: int) -> str:
    """What the zero-padding adds: ``pad_bytes`` of the ``layer_bytes`` written for the
    layers' matrices."""
    return (f"DeciLM layout: {lay.heads} query heads in every attention layer, MLP widths "
            "multiples of 256; bitsack's pruned heads and channels are zero-padded back where "
            f"that needs it (no output changes): about {pad_bytes:,} bytes of zero rows / "
            f"columns ({100 * pad_bytes / max(layer_bytes, 1):.1f} % of the layers' "
            f"{layer_bytes:,} bytes)")


def copy_code(out: Path) -> None:
    """Copy the DeciLM configuration and model code into the export folder ``out``."""
    here = Path(__file__).resolve().parent / "decilm_code"
    for name in CODE_FILES:
        shutil.copyfile(here / name, out / name)
