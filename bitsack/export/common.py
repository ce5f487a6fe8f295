"""What every export reads from a compressed folder, and what it reports back.

A bitsack folder stores each weight matrix as packed *segments* (row or column ranges, each
with its own bits and group size; ``bitsack.kernels.packed``). Serving engines store one
format per tensor, so an export first turns every matrix into a ``GridMatrix``: the whole
matrix on one grid — one bit-width, one group size, codes ``[rows, cols]``, fp16 ``scale``
and ``zero`` ``[rows, groups]``, ``w = scale·(q − zero)`` computed in fp32 — by concatenating
its segments' codes and group parameters. Nothing is re-quantized: the codes and the fp16
numbers are bitsack's own. A matrix whose segments differ in (bits, group size) cannot be one
grid and is refused (``ExportError``, naming the module and the mix).

Group sizes: every group of a grid has ``group_size`` columns except possibly the last of a
row, which may be shorter (when ``group_size`` does not divide the row). Column segments group
their own columns from their first one, so their groups laid end to end must have one width
(three 32-column segments at group size 64 are one grid of group size 32); a short group
inside a row has no single-grid form and is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bitsack.errors import ValidationError
from bitsack.kernels.formats import SUPER_COLS

#: Base model types whose modules the exports know (Llama family, transformers names).
LLAMA_FAMILY = ("llama", "qwen2", "mistral")

#: The manifest an export writes beside its files; ``check_output_dir`` recognises it.
MANIFEST = "bitsack_export.json"
EXPORT_SCHEMA = "bitsack.export/v1"


class ExportError(ValidationError):
    """The compressed model cannot be stored in the target format (the message says what,
    why, and what would be valid)."""


@dataclass(frozen=True)
class GridMatrix:
    """A weight matrix on a single quantization grid (see module docstring).

    Attributes:
        name: module name in the model (transformers naming, e.g.
            ``model.layers.0.self_attn.q_proj``).
        bits: 1..8.
        group_size: columns per group (the last group of a row may be shorter).
        codes: uint8 ``[rows, cols]``, values ``< 2**bits``.
        scale: float16 ``[rows, groups]``.
        zero: float16 ``[rows, groups]`` (integers ``0..2**bits − 1``).
        scale_bits: with double-quantized scales, S: every scale is ``k·step`` (k < 2**S).
        step: float16 ``[rows, ceil(cols / 256)]``, the step of each row's super-block of 256
            columns counted from column 0 (None without scale codes, or when the segments'
            super-blocks do not line up with the matrix's).
    """

    name: str
    bits: int
    group_size: int
    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    scale_bits: int | None = None
    step: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def groups(self) -> int:
        return int(self.scale.shape[1])

    def group_index(self) -> np.ndarray:
        """The group of every column, ``[cols]``."""
        return np.arange(self.shape[1]) // self.group_size

    def dequantize(self) -> np.ndarray:
        """float32 ``[rows, cols]``: ``float32(scale)·(float32(q) − float32(zero))``, the
        kernels' formula (``bitsack.kernels.grid.dequantize_codes``)."""
        g = self.group_index()
        s = self.scale.astype(np.float32)[:, g]
        z = self.zero.astype(np.float32)[:, g]
        return s * (self.codes.astype(np.float32) - z)

    def take_rows(self, index: np.ndarray) -> GridMatrix:
        """The grid of rows ``index`` (in that order): rows carry their own groups."""
        return GridMatrix(self.name, self.bits, self.group_size, self.codes[index],
                          self.scale[index], self.zero[index], self.scale_bits,
                          None if self.step is None else self.step[index])

    def spread_rows(self, index: np.ndarray, rows: int) -> GridMatrix:
        """The grid of ``rows`` rows whose row ``index[i]`` is row ``i`` and every other row
        zero (codes, scale and zero point 0: it dequantizes to exactly 0)."""
        return GridMatrix(self.name, self.bits, self.group_size,
                          spread(self.codes, index, rows, 0), spread(self.scale, index, rows, 0),
                          spread(self.zero, index, rows, 0), self.scale_bits,
                          None if self.step is None else spread(self.step, index, rows, 0))

    def spread_columns(self, index: np.ndarray, cols: int) -> GridMatrix:
        """The grid of ``cols`` columns whose column ``index[j]`` is column ``j`` and every
        other column zero. Groups move whole: each must land on consecutive columns that start
        a group of the new grid (the scale codes' super-blocks are dropped: they no longer line
        up).

        Raises:
            ExportError: a group would be split or land off the group boundaries.
        """
        g = self.group_size
        dest = np.asarray(index).reshape(-1, g) if self.shape[1] % g == 0 else None
        if dest is None or cols % g or bool((dest[:, 0] % g).any()) or \
                not np.array_equal(dest, dest[:, :1] + np.arange(g)):
            raise ExportError(self.name, f"its groups of {g} columns cannot move whole into "
                              f"the {cols}-column layout (they would be split or land off "
                              "the group boundaries); valid: a group size that divides the "
                              "columns of every head (head_dim) and every padding")
        starts = dest[:, 0] // g
        return GridMatrix(self.name, self.bits, g, spread(self.codes, index, cols, 1),
                          spread(self.scale, starts, cols // g, 1),
                          spread(self.zero, starts, cols // g, 1))


def spread(a: np.ndarray, index: np.ndarray, size: int, axis: int) -> np.ndarray:
    """``a`` placed at positions ``index`` of a zero array of ``size`` along ``axis``."""
    shape = list(a.shape)
    shape[axis] = size
    out = np.zeros(shape, dtype=a.dtype)
    if axis == 0:
        out[index] = a
    else:
        out[:, index] = a
    return out


@dataclass(frozen=True)
class DenseMatrix:
    """A matrix stored as plain floats (a 16-bit unit, or a dense export of a packed one).

    Attributes:
        name: module name.
        weight: the values, ``[rows, cols]`` (float16 for 16-bit units, float32 otherwise).
        exact: whether ``weight`` holds bitsack's values exactly.
    """

    name: str
    weight: np.ndarray
    exact: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.weight.shape[0]), int(self.weight.shape[1]))

    def spread_rows(self, index: np.ndarray, rows: int) -> DenseMatrix:
        """``rows`` rows: row ``index[i]`` is row ``i``, the others zero."""
        return DenseMatrix(self.name, spread(self.weight, index, rows, 0), self.exact)

    def spread_columns(self, index: np.ndarray, cols: int) -> DenseMatrix:
        """``cols`` columns: column ``index[j]`` is column ``j``, the others zero."""
        return DenseMatrix(self.name, spread(self.weight, index, cols, 1), self.exact)


#: A matrix as an export writes it.
Matrix = GridMatrix | DenseMatrix


@dataclass(frozen=True)
class ExportedTensor:
    """One tensor of an export: its name in the file, format-level type, shape and bytes."""

    name: str
    type: str
    shape: tuple[int, ...]
    nbytes: int
    source: str | None = None  # the bitsack module it came from

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "type": self.type, "shape": list(self.shape),
             "bytes": self.nbytes}
        if self.source is not None:
            d["source"] = self.source
        return d


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        format: ``compressed-tensors`` or ``gguf``.
        out: the output folder.
        files: ``{file name: bytes}`` of every file written.
        tensors: every tensor written, in file order.
        source: the compressed folder exported.
        source_packed_bytes: bitsack's packed bytes of the source (``bitsack.json``).
        layout: what the export represents (``bits-only`` or ``pruned``; the architecture).
        notes: every place where the export is not bit-exact, with its bound or measure.
    """

    format: str
    out: Path
    files: dict[str, int]
    tensors: tuple[ExportedTensor, ...]
    source: Path
    source_packed_bytes: int | None
    layout: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def type_counts(self) -> dict[str, int]:
        """Tensors per type (``Q4_1``: 120, ...)."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type] = out.get(t.type, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"schema": EXPORT_SCHEMA, "format": self.format, "out": str(self.out),
                "source": str(self.source), "source_packed_bytes": self.source_packed_bytes,
                "files": self.files, "total_bytes": self.total_bytes,
                "layout": self.layout, "type_counts": self.type_counts(),
                "notes": list(self.notes),
                "tensors": [t.to_dict() for t in self.tensors]}


# ------------------------------------------------------------------------------------------
# reading a compressed folder
# ------------------------------------------------------------------------------------------


@dataclass
class Source:
    """A compressed folder, loaded and checked (``bitsack.checkpoint.load_compressed``).

    Attributes:
        path: the folder.
        meta: its ``bitsack.json``.
        config: the base architecture's config.json as a dict (bitsack's markers removed).
        model: the packed model.
        tokenizer: the tokenizer saved with it, or None.
    """

    path: Path
    meta: dict
    config: dict
    model: Any
    tokenizer: Any = None

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    def symmetric_grid(self) -> bool:
        """Whether the folder records that it was quantized on a symmetric grid (zero points
        fixed at ``2**(bits − 1)``; older folders record no grid: False)."""
        from bitsack.kernels.formats import GRIDS, symmetric

        grid = (self.meta.get("apply") or {}).get("grid")
        return grid in GRIDS and symmetric(grid)

    def layer_dims(self) -> list[dict]:
        return list(self.meta["dims"]["layers"])

    def pruned_layers(self) -> dict[int, str]:
        """``{layer: description}`` of every layer whose heads or MLP width were pruned."""
        c = self.config
        kv_full, ff_full = int(c["num_key_value_heads"]), int(c["intermediate_size"])
        out = {}
        for i, d in enumerate(self.layer_dims()):
            parts = []
            if int(d["kv_heads"]) != kv_full:
                parts.append(f"{d['kv_heads']} of {kv_full} KV head groups kept")
            if int(d["mlp_width"]) != ff_full:
                parts.append(f"{d['mlp_width']} of {ff_full} MLP channels kept")
            if parts:
                out[i] = ", ".join(parts)
        return out

    def packed_modules(self) -> dict[str, Any]:
        """Packed modules by name (``PackedLinear`` / ``PackedEmbedding``), in model order."""
        from bitsack.kernels.packed import PackedEmbedding, PackedLinear

        return {n: m for n, m in self.model.named_modules()
                if isinstance(m, (PackedLinear, PackedEmbedding))}


def open_source(path: str | os.PathLike) -> Source:
    """Load a compressed folder for export (hashes and shapes checked on the way).

    Raises:
        FormatError: not a bitsack folder, or a damaged one.
        ExportError: its base architecture is not one the exports know.
    """
    from bitsack.checkpoint import HF_BASE_TYPE_KEY, load_compressed, read_meta

    path = Path(path)
    meta = read_meta(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["model_type"] = cfg.pop(HF_BASE_TYPE_KEY, cfg.get("model_type"))
    if cfg["model_type"] not in LLAMA_FAMILY:
        raise ExportError("model_type", f"{cfg['model_type']!r} cannot be exported; valid: "
                          f"{', '.join(LLAMA_FAMILY)} (the Llama family)")
    loaded = _quietly(load_compressed, path)
    return Source(path=path, meta=meta, config=cfg, model=loaded.model,
                  tokenizer=loaded.tokenizer)


def _quietly(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn`` with transformers' warnings off: loading a folder whose config.json says
    ``model_type: bitsack`` makes transformers warn about the type on every load."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return fn(*args)
    finally:
        hf_logging.set_verbosity(before)


def matrix_of(name: str, module: Any, fmt: str) -> GridMatrix | DenseMatrix:
    """The packed ``module`` as one grid, or dense fp16 when it is a 16-bit unit.

    Row segments (``axis`` 0) form one grid when they share bits and group size. Column
    segments (``axis`` 1) restart their groups at their first column, so their groups laid end
    to end must have one width ``W`` (the last may be shorter); the grid's group size is ``W``
    (three 32-column segments at group size 64 are one grid of group size 32).

    Raises:
        ExportError: the segments mix bit-widths (or row segments group sizes), or column
            groups of unequal widths.
    """
    segs = module.segments
    kinds = {(s.bits, s.group_size if s.bits != 16 else None) for s in segs}
    bits_set = {b for b, _ in kinds}
    if len(bits_set) > 1 or (module.axis == 0 and len(kinds) > 1):
        raise ExportError(name, f"mixes {_describe(module)}; {fmt} stores one type per tensor; "
                          "valid: a plan whose units share one bit-width and group size within "
                          "each matrix (solve it with per-matrix constraints: same_bits over "
                          "the head groups and over the MLP blocks of every layer)")
    bits = bits_set.pop()
    if bits == 16:
        return DenseMatrix(name, module.dequantize().numpy().astype(np.float16))
    group = segs[0].group_size
    if module.axis == 1:
        widths = []
        for s in segs:
            n, g = s.shape[1], s.group_size
            widths += [g] * (n // g) + ([n % g] if n % g else [])
        group = widths[0]
        if any(w != group for w in widths[:-1]) or widths[-1] > group:
            raise ExportError(name, f"column segments {_describe(module)} give groups of "
                              f"{_runs(widths)} columns; one grid needs groups of one width "
                              "(the last may be shorter); valid: column segments that hold "
                              "whole groups of one size")
    axis = module.axis
    return GridMatrix(
        name, bits, group,
        np.ascontiguousarray(np.concatenate([s.codes().numpy() for s in segs], axis=axis)),
        np.ascontiguousarray(np.concatenate([s.scales().numpy() for s in segs], axis=axis)),
        np.ascontiguousarray(np.concatenate([s.zeros().numpy() for s in segs], axis=axis)),
        *_steps(segs, axis))


def _steps(segs: list, axis: int) -> tuple[int | None, np.ndarray | None]:
    """The segments' scale-code width and their steps as the matrix's super-blocks of 256
    columns (column segments restart theirs at their first column: they line up only when
    every segment but the last is whole super-blocks wide); (None, None) otherwise."""
    sb = {s.scale_bits for s in segs}
    if len(sb) != 1 or None in sb:
        return None, None
    if axis == 1 and any(s.shape[1] % SUPER_COLS for s in segs[:-1]):
        return None, None
    return sb.pop(), np.ascontiguousarray(np.concatenate([s.step.numpy() for s in segs],
                                                         axis=axis))


def _describe(module: Any) -> str:
    return ", ".join(f"{_kind(s.bits, s.group_size)} ({'rows' if s.axis == 0 else 'columns'} "
                     f"{s.start}:{s.stop})" for s in module.segments)


def _runs(widths: list[int]) -> str:
    out: list[list[int]] = []
    for w in widths:
        if out and out[-1][0] == w:
            out[-1][1] += 1
        else:
            out.append([w, 1])
    return ", ".join(f"{w} x{n}" if n > 1 else str(w) for w, n in out)


def _kind(bits: int, group_size: int) -> str:
    return "16-bit" if bits == 16 else f"{bits}-bit g{group_size}"


def dense_state(source: Source) -> dict[str, np.ndarray]:
    """Every parameter that is not a packed buffer (norms, biases, untouched weights), as
    NumPy arrays in their saved dtype, under transformers' names."""
    import torch

    packed = source.packed_modules()
    out = {}
    for k, v in source.model.state_dict().items():
        owner, _, leaf = k.rpartition(".")
        if owner in packed and leaf.startswith("seg"):
            continue
        t = v.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()  # NumPy has no bfloat16; float32 holds it exactly
        out[k] = t.numpy()
    return out


# ------------------------------------------------------------------------------------------
# writing an output folder
# ------------------------------------------------------------------------------------------


def is_export_dir(fmt: str) -> Callable[[Path], bool]:
    """``is_ours`` for ``bitsack.io.check_output_dir``: a folder an earlier export of ``fmt``
    wrote (its manifest says so)."""

    def check(path: Path) -> bool:
        try:
            m = json.loads((Path(path) / MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(m, dict) and m.get("schema") == EXPORT_SCHEMA and \
            m.get("format") == fmt

    return check


def write_folder(out: str | os.PathLike, fmt: str, force: bool,
                 fill: Callable[[Path], ExportResult]) -> ExportResult:
    """Write an export atomically: ``fill(tmp)`` writes the files into a temporary folder
    beside ``out`` and returns the result; the manifest is added and the folder then replaces
    ``out``. ``out`` may be new, empty or an earlier export of ``fmt`` (``force``: anything).

    Raises:
        ValidationError: ``out`` is a file or a non-empty folder of something else.
    """
    from bitsack.io import check_output_dir, remove_stale_siblings, replace_dir, temp_sibling

    out = Path(out)
    check_output_dir(out, what=f"bitsack {fmt} export", is_ours=is_export_dir(fmt),
                     force=force)
    remove_stale_siblings(out)
    tmp = temp_sibling(out, "tmp")
    try:
        result = fill(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {k: v for k, v in replace(result, files=files).to_dict().items()
                    if k not in ("tensors", "out")}  # the folder may move: no path to itself
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        files[MANIFEST] = (tmp / MANIFEST).stat().st_size
        result = replace(result, out=out, files=files)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
