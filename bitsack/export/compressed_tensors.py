"""Export to compressed-tensors ``pack-quantized`` (read by vLLM and by transformers).

The format (compressed-tensors 0.20.1, ``compressors/pack_quantized/base.py`` and
``helpers.py``), per quantized linear module ``M`` with ``b`` bits and group size ``G``:

- ``M.weight_packed``: int32 ``[rows, ceil(cols·b/32)]``. Each row is a dense little-endian
  bit stream; value k occupies bits ``[k·b, (k+1)·b)`` and holds ``(q_ct + 2^(b−1))`` where
  ``q_ct`` is the signed code. That is bitsack's ``PackFormat.BITSTREAM_U32`` of the unsigned
  code ``q = q_ct + 2^(b−1)`` word for word (verified: ``pack_to_int32`` equals
  ``bitsack.kernels.formats.pack``), so the words are bitsack's own.
- ``M.weight_scale``: ``[rows, cols/G]`` — bitsack's fp16 scales as they are.
- ``M.weight_zero_point``: int32 ``[ceil(rows·b/32), cols/G]``, the signed zero points
  ``z − 2^(b−1)`` packed the same way *along the rows* (``packed_dim=0``).
- ``M.weight_shape``: int64 ``[rows, cols]``.

compressed-tensors dequantizes ``(q_ct − zp)·scale = (q − z)·s``: bitsack's grid, no
re-quantization. Its arithmetic runs in the scale's dtype, so with the fp16 scales of the file
each weight comes out as ``fp16(s·(q − z))`` (one rounding, ``≤ 2⁻¹¹·|w|``); with the scales
held in float32 (a float32 model in transformers, or vLLM's fp32 path) it is exact.

What is written:

- every packed matrix on one grid (``bitsack.export.common``): a ``config_groups`` entry per
  (bits, group size) whose ``targets`` are the exact module names, ``strategy: group``,
  ``symmetric: false``;
- 16-bit matrices, norms and biases as stored (no config group: unquantized);
- the embedding and an untied ``lm_head`` *dense* in float16 even when bitsack packed them:
  vLLM's compressed-tensors path quantizes linear layers only (each weight rounded once to
  fp16; the largest change is reported in ``notes``);
- config.json of the base architecture + ``quantization_config``, with ``dtype: float16``
  (the scales are fp16, which bfloat16 would round, and vLLM's low-bit kernels run in
  float16 / bfloat16; a changed dtype is reported in ``notes``); the tokenizer's files.

**Pruned models** are written in the DeciLM / Nemotron-NAS layout, the one vLLM serves with
per-layer head and MLP sizes (``bitsack.export.decilm``): ``model_type: nemotron-nas``,
``block_configs`` per layer, pruned query heads and MLP channels zero-padded back where that
layout fixes them (no output changes; the bytes it adds are in ``notes``), and the folder
carries its own configuration and model code (``configuration_decilm.py``,
``modeling_decilm.py``; ``trust_remote_code``), with which transformers runs it. vLLM itself
cannot run here (no GPU, not installed): that it serves the folder is inferred from its
``nemotron_nas.py``, not tested.

Refused (``ExportError``): a matrix that mixes (bits, group size); a group size that does not
divide its rows (compressed-tensors requires it); for pruned models, what the DeciLM layout
cannot hold (a sliding window, groups that the padding would split).

Known loader limits (compressed-tensors 0.20.1 + transformers 5.24, not of this file):
transformers' default path cannot load *any* asymmetric pack-quantized checkpoint (it sizes
``weight_zero_point`` unpacked; vllm-project/llm-compressor#1618), and its
``CompressedTensorsConfig(dequantize=True)`` path applies the *first* config group's scheme to
every layer. A single-scheme export therefore loads with ``dequantize=True``; a multi-scheme
export is read correctly by compressed-tensors itself (``decompress`` per module) and by vLLM.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bitsack.export import decilm
from bitsack.export.common import (
    DenseMatrix,
    ExportedTensor,
    ExportError,
    ExportResult,
    GridMatrix,
    Matrix,
    Source,
    dense_state,
    matrix_of,
    open_source,
    write_folder,
)
from bitsack.kernels.formats import pack_numpy

FORMAT = "compressed-tensors"

#: Files of a compressed folder that the export rewrites (everything else, the tokenizer's
#: files, is copied).
_OWN_FILES = ("model.safetensors", "bitsack.json", "config.json")

_EMBEDDINGS = ("model.embed_tokens", "lm_head")


def pack_zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    """compressed-tensors' packed zero points: int32 ``[ceil(rows·b/32), groups]``.

    ``zero`` holds bitsack's fp16 zero points (integers ``0..2^b−1``). The signed zero point
    ``z − 2^(b−1)`` is stored offset by ``2^(b−1)``, i.e. as ``z``, packed along the rows.
    """
    z = zero.astype(np.float32)
    zi = z.astype(np.int64)
    if not np.array_equal(zi, z) or zi.min(initial=0) < 0 or zi.max(initial=0) >= 1 << bits:
        raise ExportError("zero", f"zero points outside the integers 0..{(1 << bits) - 1}; "
                          "valid: bitsack's min-max grid (integer zero points)")
    packed = pack_numpy(np.ascontiguousarray(zi.astype(np.uint8).T), bits)  # [groups, words]
    return np.ascontiguousarray(packed.T).view(np.int32)


def grid_tensors(m: GridMatrix) -> dict[str, np.ndarray]:
    """The four tensors of one pack-quantized module (names relative to the module)."""
    rows, cols = m.shape
    if cols % m.group_size:
        raise ExportError(m.name, f"group size {m.group_size} does not divide its {cols} "
                          "columns (the last group is shorter); compressed-tensors requires "
                          "whole groups; valid: a group size that divides every row")
    return {
        "weight_packed": pack_numpy(m.codes, m.bits).view(np.int32),
        "weight_scale": m.scale.astype(np.float16),
        "weight_zero_point": pack_zero_points(m.zero, m.bits),
        "weight_shape": np.array([rows, cols], dtype=np.int64),
    }


def st_dtype(dtype: np.dtype) -> str:
    """safetensors' name of a NumPy dtype (``F16``, ``I32``, ...)."""
    return {"float16": "F16", "float32": "F32", "float64": "F64", "int32": "I32",
            "int64": "I64", "int8": "I8", "uint8": "U8"}.get(np.dtype(dtype).name,
                                                            np.dtype(dtype).name)


def scheme(bits: int, group_size: int, targets: list[str]) -> dict[str, Any]:
    """One ``config_groups`` entry: weight-only, asymmetric, grouped integer quantization."""
    return {"targets": targets,
            "weights": {"num_bits": bits, "type": "int", "symmetric": False,
                        "strategy": "group", "group_size": group_size, "dynamic": False,
                        "actorder": None},
            "input_activations": None, "output_activations": None,
            "format": "pack-quantized"}


def export_compressed_tensors(source_dir: str | os.PathLike, out: str | os.PathLike, *,
                              force: bool = False) -> ExportResult:
    """Write the compressed folder ``source_dir`` as a compressed-tensors checkpoint at ``out``.

    Args:
        source_dir: a bitsack compressed-model folder.
        out: output folder: new, empty, or an earlier compressed-tensors export (replaced
            atomically); anything else is refused unless ``force``.
        force: replace ``out`` whatever it holds.

    Returns:
        What was written (files, bytes, per-tensor types, where it is not bit-exact).

    Raises:
        ExportError: the model cannot be stored in this format (see module docstring).
        FormatError: ``source_dir`` is not an intact bitsack folder.
        ValidationError: ``out`` would destroy something that is not an export.
    """
    from bitsack.export.common import is_export_dir
    from bitsack.io import check_output_dir

    # refuse a folder we would destroy before any work
    check_output_dir(out, what=f"bitsack {FORMAT} export", is_ours=is_export_dir(FORMAT),
                     force=force)
    src = open_source(source_dir)
    lay = decilm.layout(src) if src.pruned_layers() else None
    state, tensors, groups, notes = _build(src, lay)
    return write_folder(out, FORMAT, force, lambda tmp: _write(src, lay, tmp, state, tensors,
                                                               groups, notes))


def _modules(src: Source, lay: decilm.DeciLayout | None,
             ) -> tuple[dict[str, Matrix], dict[str, np.ndarray], dict[str, float]]:
    """The matrices to write (``{module: matrix}``, model order), the other tensors, and for
    each padded matrix the fraction of its entries that are padding."""
    tied = bool(src.config.get("tie_word_embeddings", False))
    modules = {n: matrix_of(n, m, FORMAT) for n, m in src.packed_modules().items()
               if not (n == "lm_head" and tied)}  # the embedding's tensor, re-tied by loaders
    dense = {k: v for k, v in dense_state(src).items() if not (tied and k == "lm_head.weight")}
    if lay is None:
        return modules, dense, {}

    def matrix(name: str) -> Matrix:
        if name in modules:
            return modules[name]
        return DenseMatrix(name, dense[f"{name}.weight"])

    hidden = int(src.config["hidden_size"])
    out = {n: m for n, m in modules.items() if not n.startswith("model.layers.")}
    padded: dict[str, float] = {}
    for i in range(src.num_layers):
        for name, m in decilm.layer_matrices(lay, i, matrix, hidden).items():
            before = modules.get(name)
            entries = 0 if before is None else int(np.prod(before.shape))
            if entries != int(np.prod(m.shape)):
                padded[name] = 1 - entries / int(np.prod(m.shape))
            out[name] = m
    vectors = {k: v for k, v in dense.items() if not k.startswith("model.layers.")}
    for i in range(src.num_layers):
        vectors.update(decilm.layer_vectors(lay, i, dense, hidden))
    return out, vectors, padded


def _build(src: Source, lay: decilm.DeciLayout | None,
           ) -> tuple[dict[str, np.ndarray], list[ExportedTensor],
                      dict[tuple[int, int], list[str]], list[str]]:
    state: dict[str, np.ndarray] = {}
    tensors: list[ExportedTensor] = []
    groups: dict[tuple[int, int], list[str]] = {}
    notes: list[str] = []
    modules, dense, padded = _modules(src, lay)
    pad_bytes = 0.0
    written = 0
    for name, m in modules.items():
        if isinstance(m, GridMatrix) and name in _EMBEDDINGS:
            w = m.dequantize()
            m = DenseMatrix(name, w.astype(np.float16), exact=False)
            err = float(np.max(np.abs(m.weight.astype(np.float32) - w), initial=0.0))
            notes.append(f"{name}: {m.weight.shape[0]}x{m.weight.shape[1]} "
                         f"packed weights written dense float16 (vLLM quantizes linear layers "
                         f"only): one fp16 rounding per weight, max |error| {err:.3g}")
        if isinstance(m, DenseMatrix):
            arrays = {"weight": m.weight}
        else:
            arrays = grid_tensors(m)
            groups.setdefault((m.bits, m.group_size), []).append(name)
        size = 0
        for leaf, arr in arrays.items():
            state[f"{name}.{leaf}"] = arr
            kind = f"I32 (int{m.bits} g{m.group_size})" if leaf == "weight_packed" else \
                st_dtype(arr.dtype)
            tensors.append(ExportedTensor(f"{name}.{leaf}", kind, arr.shape, arr.nbytes, name))
            size += arr.nbytes
        if name.startswith("model.layers."):
            written += size
            pad_bytes += size * padded.get(name, 0.0)
    for k, v in dense.items():
        state[k] = v
        tensors.append(ExportedTensor(k, st_dtype(v.dtype), v.shape, v.nbytes))
    if lay is not None:
        notes.append(decilm.padding_note(lay, round(pad_bytes), written))
        if lay.zero_attention:
            notes.append(f"layers {list(lay.zero_attention)}: attention pruned whole, written as "
                         "a zero attention (one KV head, dense fp16 zeros; its output is the "
                         "output bias bitsack keeps, or exactly 0) — where the layer has that "
                         "bias, or where vLLM's DeciLM layer needs an attention before the "
                         "first MLP")
        if lay.zero_ffn:
            notes.append(f"layers {list(lay.zero_ffn)}: MLP pruned whole but its output bias "
                         "kept, written as a zero MLP of 256 channels (dense fp16 zeros) "
                         "adding that bias")
    dtype = str(src.config.get("dtype", src.config.get("torch_dtype")))
    if dtype != "float16":
        notes.append(f"config dtype {dtype} -> float16: the scales are fp16 (bfloat16 would "
                     "round them) and vLLM's low-bit kernels run in float16 / bfloat16; "
                     "pass another dtype to the engine to override")
    return state, tensors, groups, notes


def quantization_config(groups: dict[tuple[int, int], list[str]]) -> dict[str, Any]:
    """The ``quantization_config`` of config.json: one config group per (bits, group size)."""
    config_groups = {f"group_{i}": scheme(b, g, sorted(names))
                     for i, ((b, g), names) in enumerate(sorted(groups.items()))}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed", "config_groups": config_groups,
            "ignore": [], "kv_cache_scheme": None}


def _write(src: Source, lay: decilm.DeciLayout | None, tmp: Path, state: dict[str, np.ndarray],
           tensors: list[ExportedTensor], groups: dict[tuple[int, int], list[str]],
           notes: list[str]) -> ExportResult:
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(src.config)
    cfg.pop("torch_dtype", None)
    if lay is not None:
        cfg = decilm.decilm_config(cfg, lay, state)
        decilm.copy_code(tmp)
    cfg["dtype"] = "float16"
    cfg["quantization_config"] = quantization_config(groups)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for p in sorted(src.path.iterdir()):
        if p.is_file() and p.name not in _OWN_FILES:
            shutil.copyfile(p, tmp / p.name)  # tokenizer, generation config
    layout = {"architecture": src.model_type if lay is None else "DeciLMForCausalLM",
              "kind": "bits-only" if lay is None else "pruned",
              "schemes": {f"int{b}-g{g}": len(n) for (b, g), n in sorted(groups.items())}}
    if lay is not None:
        layout.update(lay.to_dict())
    return ExportResult(format=FORMAT, out=tmp, files={}, tensors=tuple(tensors),
                        source=src.path, source_packed_bytes=src.meta.get("packed_bytes"),
                        layout=layout, notes=tuple(notes))
