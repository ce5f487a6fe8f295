"""What GPTQ (``bitsack.kernels.gptq``) is asked and answers: the segments of a matrix
(``SegmentSpec``: rows or columns with one bit-width, group size, scale coding and grid) and
the result (``GPTQResult``: one ``QuantizedTensor`` or fp16 weight per segment)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bitsack.errors import ValidationError
from bitsack.kernels.formats import check_bits, check_group_size, check_scale_bits, num_groups
from bitsack.kernels.grid import QuantizedTensor, check_grid

__all__ = ["GPTQResult", "SegmentSpec", "bits_map"]


def bits_map(bits: Any, rows: int, ngroups: int, bits_axis: int | None,
              device: torch.device) -> torch.Tensor:
    """Normalize ``bits`` to an int64 map ``[rows, ngroups]`` (values 1..8 or 16)."""
    if isinstance(bits, (int,)) and not isinstance(bits, bool):
        check_bits(bits, allow_16=True)
        return torch.full((rows, ngroups), bits, dtype=torch.int64, device=device)
    t = torch.as_tensor(bits).to(device=device)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValidationError("bits", f"dtype {t.dtype}; valid: an int or an integer tensor")
    t = t.to(torch.int64)
    bad = t[~(((t >= 1) & (t <= 8)) | (t == 16))]
    if bad.numel():
        raise ValidationError("bits", f"{int(bad[0])} has no packed layout; valid: 1..8 or 16")
    if t.dim() == 2 and tuple(t.shape) == (rows, ngroups):
        return t.clone()
    if t.dim() == 1:
        n = t.shape[0]
        if bits_axis is None:
            if n == rows and n == ngroups:
                raise ValidationError("bits_axis", f"None is ambiguous: {n} bits fit both the "
                                      f"{rows} rows and the {ngroups} column groups; valid: "
                                      "0 (per row) or 1 (per column group)")
            bits_axis = 0 if n == rows else 1 if n == ngroups else None
        if bits_axis == 0 and n == rows:
            return t.unsqueeze(1).expand(rows, ngroups).clone()
        if bits_axis == 1 and n == ngroups:
            return t.unsqueeze(0).expand(rows, ngroups).clone()
    raise ValidationError("bits", f"shape {tuple(t.shape)}; valid: an int, [{rows}] per row, "
                          f"[{ngroups}] per column group, or [{rows}, {ngroups}]")


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of a matrix for ``GPTQ.quantize_segments``: a row or column range, its bits
    and its group size.

    Attributes:
        axis: 0 = rows ``start:stop`` (full width; its rows are grouped along the full row),
            1 = columns ``start:stop`` (full height; grouped inside the range: its groups
            restart at ``start``).
        start: first row/column.
        stop: one past the last.
        bits: 1..8, or 16 = kept in fp16 (it still absorbs the error of the other columns).
        group_size: columns per group, any positive integer (the last group of a row of the
            segment may be shorter); unused for 16 bits.
        scale_bits: None (fp16 scales) or S-bit double-quantized scales: the steps of the
            segment's super-blocks are fixed from the original weights before the pass
            (``grid.dq_steps``), each group's scale is rounded up onto them (``grid.dq_params``).
        grid: ``"minmax"`` (each group's min-max range) or ``"mse"`` (its range shrunk to the
            smallest squared error of the group's weights when its parameters are set:
            ``grid.group_params``) or ``"hmse"`` (the same with each column's error weighted
            as GPTQ's loss weighs it, ``1 / [chol(H⁻¹)]_jj²``).
    """

    axis: int
    start: int
    stop: int
    bits: int
    group_size: int
    scale_bits: int | None = None
    grid: str = "minmax"

    def __post_init__(self) -> None:
        if self.axis not in (0, 1):
            raise ValidationError("segment.axis", f"{self.axis!r}; valid: 0 (rows) or 1 "
                                  "(columns)")
        for name in ("start", "stop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValidationError(f"segment.{name}", f"{v!r}; valid: an integer")
        if not 0 <= self.start < self.stop:
            raise ValidationError("segment.start:stop", f"{self.start}:{self.stop} is not a "
                                  "non-empty range")
        check_bits(self.bits, allow_16=True, field="segment.bits")
        check_group_size(self.group_size, field="segment.group_size")
        check_scale_bits(self.scale_bits, field="segment.scale_bits")
        check_grid(self.grid, field="segment.grid")


@dataclass(frozen=True)
class GPTQResult:
    """GPTQ's answer for one matrix, possibly with several bit-widths and group sizes.

    ``quantize_segments`` fills ``parts`` / ``segments`` / ``losses``; the older ``quantize``
    fills the whole-matrix maps ``codes`` / ``scale`` / ``zero`` / ``bits`` / ``group_size``
    (one group size for the matrix). Both fill ``weight``, ``damp`` and ``loss``.

    Attributes:
        codes: uint8 ``[rows, cols]`` (0 where the map says 16 bits), or None.
        scale: fp16 ``[rows, ceil(cols / group_size)]`` (1 where 16 bits), or None.
        zero: fp16 ``[rows, ceil(cols / group_size)]`` (0 where 16 bits), or None.
        bits: int64 map ``[rows, ngroups]`` of each group's bit-width (1..8, or 16), or None.
        group_size: columns per group, or None.
        weight: float32 ``[rows, cols]``, the weights the compressed layer computes with:
            ``scale·(codes − zero)`` for quantized groups, the fp16 value for 16-bit groups
            (None when not requested).
        damp: the damping λ finally used (after any escalation), absolute.
        loss: Σ of the paper's per-column losses ½·Σ_rows (w − q)²/[U]_qq², U the upper
            Cholesky factor of (H + λI)⁻¹ (``[H⁻¹]_qq`` of the paper's sequential update).
        parts: one ``QuantizedTensor`` (bits ≤ 8) or fp16 ``[rows, cols]`` tensor (bits 16)
            per segment, in order.
        segments: the ``SegmentSpec`` of each part.
        losses: the part of ``loss`` of each segment's rows (axis 0) or columns (axis 1).
    """

    codes: torch.Tensor | None
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    bits: torch.Tensor | None
    group_size: int | None
    weight: torch.Tensor | None
    damp: float
    loss: float
    parts: tuple[QuantizedTensor | torch.Tensor, ...] = ()
    segments: tuple[SegmentSpec, ...] = ()
    losses: tuple[float, ...] = ()

    def segment(self, axis: int, start: int, stop: int) -> QuantizedTensor | torch.Tensor:
        """Rows (``axis=0``) or columns (``axis=1``) ``start:stop`` as one packed segment.

        Returns a ``QuantizedTensor`` when the slice has one bit-width ≤ 8, the fp16 weight
        ``[rows, cols]`` of the slice when it is 16 bits. For a ``quantize_segments`` result
        the range must be one of its segments (columns are grouped inside a segment, so a
        sub-range would be another grouping).

        Raises:
            ValidationError: bad axis or range, column range not on group boundaries, or the
                slice mixes bit-widths.
        """
        if axis not in (0, 1):
            raise ValidationError("axis", f"{axis!r}; valid: 0 (rows) or 1 (columns)")
        if self.codes is None:
            for spec, part in zip(self.segments, self.parts, strict=True):
                if (spec.axis, spec.start, spec.stop) == (axis, start, stop):
                    return part
            valid = ", ".join(f"{s.axis}:{s.start}:{s.stop}" for s in self.segments)
            raise ValidationError("start:stop", f"axis {axis} {start}:{stop} is not a segment "
                                  f"of this result; valid (axis:start:stop): {valid}")
        rows, cols = self.codes.shape
        g = self.group_size
        n = rows if axis == 0 else cols
        if not 0 <= start < stop <= n:
            raise ValidationError("start:stop", f"{start}:{stop} is not a non-empty range "
                                  f"inside 0:{n}")
        if axis == 1 and (start % g or (stop % g and stop != cols)):
            raise ValidationError("start:stop", f"{start}:{stop} is not on group boundaries; "
                                  f"valid: multiples of group_size {g} (or the last column)")
        if axis == 0:
            sl_rows, sl_cols, sl_groups = slice(start, stop), slice(None), slice(None)
        else:
            sl_rows, sl_cols = slice(None), slice(start, stop)
            sl_groups = slice(start // g, num_groups(stop, g))
        bmap = self.bits[sl_rows, sl_groups]
        values = torch.unique(bmap).tolist()
        if len(values) != 1:
            raise ValidationError("bits", f"rows/columns {start}:{stop} mix bit-widths {values};"
                                  " valid: a range with one bit-width")
        b = int(values[0])
        if b == 16:
            return self.weight[sl_rows, sl_cols].to(torch.float16).contiguous()
        return QuantizedTensor(self.codes[sl_rows, sl_cols].contiguous(),
                               self.scale[sl_rows, sl_groups].contiguous(),
                               self.zero[sl_rows, sl_groups].contiguous(), b, g)

    def to_quantized(self) -> QuantizedTensor:
        """The whole matrix as one ``QuantizedTensor`` (one bit-width ≤ 8 only)."""
        if self.codes is None:
            if len(self.parts) == 1 and isinstance(self.parts[0], QuantizedTensor):
                return self.parts[0]
            raise ValidationError("parts", f"{len(self.parts)} segments; valid: one segment "
                                  "of 1..8 bits")
        out = self.segment(0, 0, self.codes.shape[0])
        if not isinstance(out, QuantizedTensor):
            raise ValidationError("bits", "16 (fp16) has no QuantizedTensor; valid: 1..8")
        return out
