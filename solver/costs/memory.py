"""``memory``: exact bytes of a unit, in bitsack's packed format or in a target file format.

``format="bitsack"`` (default): the packed segments bitsack itself writes, from the packed
format's own size function (``bitsack.kernels.formats.packed_nbytes``).

A target format (``compressed-tensors``, ``gguf``; what ``bitsack export`` writes) stores one
type per tensor, so its sizes are sizes of whole matrices (``bitsack.kernels.formats``:
``gguf_nbytes``, ``compressed_tensors_nbytes``, the functions the export tests check against
the written files):

- ``gguf``: every block of a row (32 weights; 256 for a K-quant) carries its own scales, so
  a unit's slice costs its own blocks (``rows · cols/block · block bytes``) and the sum over
  units is the tensor's size whatever the units choose; a pruned unit leaves the tensor (arch
  ``deci``), 0. The type is the one of fewest bytes that holds the option's grid exactly
  (``kernels.formats.gguf_type``: bits, group size, scale codes, symmetric or not, and the
  row width — ``type_cols``).
- ``compressed-tensors``: the zero points are packed along the rows, so a matrix's bytes
  ``X`` do not split by rows exactly. Each slice gets a telescoping share: rows (or columns)
  ``[a, b)`` of an ``n``-long axis cost ``⌊X·b/n⌋ − ⌊X·a/n⌋``, integers that add up to ``X``
  over the slices of the matrix. This is exact when every unit of the matrix takes one
  option, or when the kept ones share one and every unit is a multiple of 256 channels
  (``32 | 256·b``: the packing splits there), which the format's constraints
  (``bitsack.solver.costs.formats``) require. ``X`` leaves out each quantized module's 16-byte
  ``weight_shape`` tensor, which no share of a partly pruned matrix could carry (not counted,
  like norms). Embeddings (and an untied ``lm_head``) are written as fp16 whatever their
  option (vLLM quantizes linear layers only; ``bitsack.export.compressed_tensors``): 2 bytes
  per weight.
"""

from __future__ import annotations

import math

from bitsack.errors import ValidationError
from bitsack.kernels.formats import (
    TARGET_FORMATS,
    check_scale_bits,
    compressed_tensors_nbytes,
    gguf_nbytes,
    packed_nbytes,
)
from bitsack.solver.costs.base import CostModel, SliceShape, UnitShape, register_cost_model


def check_format(fmt: str) -> str:
    """``fmt`` if it is a target format name, else raise ``ValidationError``."""
    if fmt not in TARGET_FORMATS:
        raise ValidationError("format", f"{fmt!r}; valid: {', '.join(TARGET_FORMATS)}")
    return fmt


def _share(total: int, s: SliceShape) -> int:
    """The telescoping share of a whole matrix's ``total`` bytes held by slice ``s``."""
    n = s.width if s.extent is None else s.extent
    return total * s.stop // n - total * s.start // n


def _check_scale_format(fmt: str, scale_bits: int | None) -> None:
    if scale_bits is not None and fmt == "compressed-tensors":
        raise ValidationError("scale_bits", f"{scale_bits} with format {fmt!r}, which stores "
                              "fp16 scales; valid: no scale codes (--scale-bits fp16 or "
                              "auto; None in Python), or format 'bitsack' or 'gguf'")


def type_cols(s: SliceShape) -> int:
    """The row width that decides a slice's ggml type: a block tiles a column slice, and the
    matrix it lies in, only when it divides the slice's start, stop and the matrix's width —
    their greatest common divisor stands for the width (a row slice: the matrix's width)."""
    if s.dim == 0 or s.extent is None:
        return s.cols
    return math.gcd(s.start, s.stop, s.extent)


def unit_nbytes(fmt: str, unit: UnitShape, bits: int, group_size: int,
                scale_bits: int | None = None, symmetric: bool = False) -> int:
    """Bytes of ``unit`` at ``bits`` (0 = pruned, 16 = fp16) and ``group_size`` in format
    ``fmt`` (see the module docstring); ``scale_bits``: bitsack's double-quantized scales;
    ``symmetric``: a grid with zero points fixed at ``2**(bits − 1)`` (GGUF: the types it
    opens, ``kernels.formats.gguf_type``).

    Raises:
        ValidationError: an unknown format, or an option the format cannot store (a group
            size that does not divide the rows, rows of a width GGUF blocks cannot tile).
    """
    if check_format(fmt) == "bitsack":
        return sum(packed_nbytes(s.rows, s.cols, bits, group_size, scale_bits)
                   for s in unit.slices)
    _check_scale_format(fmt, scale_bits)
    if bits == 0:
        return 0
    if fmt == "gguf":
        return sum(gguf_nbytes(s.rows, s.cols, bits, group_size, scale_bits, symmetric,
                               type_cols(s)) for s in unit.slices)
    if unit.kind == "embedding":  # compressed-tensors writes embeddings fp16
        return 2 * unit.params
    return sum(_share(compressed_tensors_nbytes(*s.matrix, bits, group_size, shape=False), s)
               for s in unit.slices)


@register_cost_model
class MemoryModel(CostModel):
    """``memory_bytes`` of a unit in ``format`` (see the module docstring).

    ``bitsack`` (default): Σ over the unit's slices of ``packed_nbytes(rows, cols, bits, G)``.
    Column slices are packed as their own segment columns (groups inside the slice), row
    slices as whole rows; both are what the packer writes, so the sum over units equals the
    bytes of the packed tensors (norms and biases, which stay 16-bit, are outside every unit).
    G is the option's own group size (``b<k>g<G>``, or the problem's default for ``b<k>``); a
    row of ``cols`` values holds ``ceil(cols/G)`` groups, so G need not divide ``cols``.
    """

    name = "memory"
    resources = ("memory_bytes",)

    def __init__(self, format: str = "bitsack",  # noqa: A002 - the user-facing name
                 scale_bits: int | None = None, symmetric: bool = False):
        self.format = check_format(format)
        self.scale_bits = check_scale_bits(scale_bits)
        self.symmetric = bool(symmetric)
        _check_scale_format(self.format, self.scale_bits)

    def cost(self, unit: UnitShape, bits: int, group_size: int) -> dict[str, float]:
        return {"memory_bytes": float(unit_nbytes(self.format, unit, bits, group_size,
                                                  self.scale_bits, self.symmetric))}

    def describe(self) -> dict:
        if self.format == "gguf":
            return {"name": self.name, "resources": list(self.resources),
                    "format": self.format, "scale_bits": self.scale_bits,
                    "symmetric": self.symmetric,
                    "formula": "per slice: rows*cols/block * block bytes of the ggml type of "
                               "fewest bytes that holds the grid (kernels.formats.gguf_type: "
                               "Q4_0 18/32, Q4_1 20/32, Q5_0 22/32, Q5_1 24/32, Q8_0 34/32, "
                               "Q2_K 84/256, Q3_K 110/256, Q6_K 210/256); 16 bits: "
                               "2*rows*cols; pruned: 0"}
        if self.format == "compressed-tensors":
            formula = ("per matrix X = rows*ceil(bits*cols/32)*4 + rows*(cols/g)*2 + "
                       "ceil(rows*bits/32)*(cols/g)*4 (the 16-byte weight_shape not "
                       "counted), slice [a,b) of n: floor(X*b/n) - floor(X*a/n); embeddings "
                       "and 16 bits: 2*rows*cols")
        elif self.scale_bits is not None:
            return {"name": self.name, "resources": list(self.resources),
                    "scale_bits": self.scale_bits,
                    "formula": "rows*ceil(bits*cols/32)*4 + ceil(rows*ceil(cols/g)*S/32)*4 + "
                               "rows*ceil(cols/256)*2 + ceil(rows*ceil(cols/g)*bits/32)*4 "
                               "per slice (S = scale_bits); 16 bits: 2*rows*cols; pruned: 0"}
        else:
            return {"name": self.name, "resources": list(self.resources),
                    "formula": "rows*ceil(bits*cols/32)*4 + rows*ceil(cols/g)*2 + "
                               "ceil(rows*ceil(cols/g)*bits/32)*4 per slice; "
                               "16 bits: 2*rows*cols; pruned: 0"}
        return {"name": self.name, "resources": list(self.resources), "format": self.format,
                "formula": formula}
