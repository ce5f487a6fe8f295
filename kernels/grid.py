"""The min-max affine grid every quantizer writes: its parameters, codes, the quantized tensor,
and round-to-nearest (``rtn``).

The numbers are the packed format's (``bitsack.kernels.formats.PackFormat``): per group of
``group_size`` consecutive input columns of a row, an fp16 ``scale`` s and fp16 ``zero`` z, and
integer codes q in ``[0, 2**bits − 1]``; the weight the kernels use is ``ŵ = s·(q − z)``
computed in fp32 from the stored fp16 numbers. GPTQ (``bitsack.kernels.gptq``) chooses other
codes on the same grid.

Min-max grid (the GPTQ reference quantizer's asymmetric grid, with the fp16 storage made
explicit). For a group with values x, maxq = 2**bits − 1:

    lo = min(min x, 0),  hi = max(max x, 0)       # the range always holds 0, as in GPTQ
    s  = fp16_round_up((hi − lo) / maxq)          # rounded UP to fp16, never down
    z  = round(−lo / s)                           # an integer in [0, maxq]: exact in fp16
    q  = clamp(round(x / s + z), 0, maxq)

Why this is exactly what is stored: s and z are fp16 *before* any code is computed, so the
codes are chosen on the grid the kernels really use. Why rounding s up: with s ≥ (hi−lo)/maxq
the stored grid ``[−s·z, s·(maxq − z)]`` reaches within s/2 of both lo and hi, so no value is
clamped by more than half a step and every element obeys ``|ŵ − x| ≤ s/2`` (s the *stored*
scale; up to the float64 rounding of ``x/s + z``, ≤ 2⁻⁴⁰·s — see ``RTN_SLACK`` in
``bitsack.kernels.bounds``). Since z is an integer ≤ 255 and s has 11 significant bits,
``s·(q − z)`` has at most 19 significant bits, so the kernels' fp32 product is exact.
Holding 0 in the range keeps z a small integer (exact in fp16) whatever the offset of the
group, and represents exact zeros exactly. An all-zero group gets s = 2⁻²⁴ (the smallest fp16)
and z = 0, so it dequantizes to exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bitsack.errors import ValidationError
from bitsack.kernels.formats import check_bits, check_group_size, num_groups

__all__ = [
    "QuantizedTensor",
    "check_weight",
    "dequantize_codes",
    "minmax_params",
    "rtn_quantize",
]

#: Scale given to an all-zero group: the smallest positive fp16 (subnormal 2⁻²⁴).
_ZERO_GROUP_SCALE = 2.0**-24


# ------------------------------------------------------------------------------------------
# The quantized tensor and its dequantization (shared with the packed kernels' reference)
# ------------------------------------------------------------------------------------------


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``ŵ = float32(scale)·(float32(q) − float32(zero))`` per group, as the kernels compute it.

    Args:
        codes: integer codes ``[rows, cols]`` (any integer dtype).
        scale: fp16 ``[rows, ceil(cols / group_size)]``.
        zero: fp16 ``[rows, ceil(cols / group_size)]``.
        group_size: columns per group (the last group may be shorter).
        dtype: dtype of the result; the arithmetic is fp32 whatever ``dtype`` is.

    Returns:
        The dequantized weight ``[rows, cols]`` in ``dtype``.
    """
    rows, cols = codes.shape
    full = cols // group_size  # whole groups; a ragged tail group follows when cols % G
    q = codes.to(torch.float32)
    if q.data_ptr() == codes.data_ptr():
        q = q.clone()  # codes were fp32 already: never modify the caller's tensor
    s32, z32 = scale.to(torch.float32), zero.to(torch.float32)
    # In place (one fp32 buffer instead of three); (q − z)·s is the same fp32 value as s·(q − z).
    if full:
        body = q[:, :full * group_size].view(rows, full, group_size)
        body.sub_(z32[:, :full].unsqueeze(-1)).mul_(s32[:, :full].unsqueeze(-1))
    if full * group_size < cols:
        tail = q[:, full * group_size:]
        tail.sub_(z32[:, full:full + 1]).mul_(s32[:, full:full + 1])
    return q.to(dtype)


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight matrix quantized at one bit-width with groups along its columns.

    Attributes:
        codes: uint8 ``[rows, cols]``, values in ``[0, 2**bits − 1]``.
        scale: fp16 ``[rows, ceil(cols / group_size)]``.
        zero: fp16 ``[rows, ceil(cols / group_size)]``.
        bits: 1..8.
        group_size: columns per group; group g covers columns
            ``[g·group_size, min((g+1)·group_size, cols))`` (the last may be shorter).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise ValidationError("codes", f"{self.codes.dtype} of shape "
                                  f"{tuple(self.codes.shape)}; valid: uint8 [rows, cols]")
        rows, cols = self.codes.shape
        check_group_size(self.group_size)  # any: it need not divide cols
        want = (rows, num_groups(cols, self.group_size))
        for name in ("scale", "zero"):
            t = getattr(self, name)
            if tuple(t.shape) != want or t.dtype != torch.float16:
                raise ValidationError(name, f"{t.dtype} of shape {tuple(t.shape)}; "
                                      f"valid: float16 {list(want)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the kernels compute, ``scale·(codes − zero)`` in fp32, cast to ``dtype``."""
        return dequantize_codes(self.codes, self.scale, self.zero, self.group_size, dtype)


# ------------------------------------------------------------------------------------------
# Min-max parameters and codes
# ------------------------------------------------------------------------------------------


def check_weight(w: Any, name: str = "w") -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        desc = f"{w.dtype} of shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) \
            else type(w).__name__
        raise ValidationError(name, f"{desc}; valid: a 2-D floating-point tensor [rows, cols]")
    if not _all_finite(w):
        raise ValidationError(name, "holds NaN or infinite values; valid: finite values")
    return w


def _all_finite(t: torch.Tensor, block: int = 1 << 22) -> bool:
    """``isfinite(t).all()`` a block of rows at a time (isfinite of a half tensor makes
    float32 temporaries: on a stacked embedding that would be gigabytes)."""
    if t.numel() <= block:
        return bool(torch.isfinite(t).all())
    step = max(1, block // max(1, t.shape[-1]))
    return all(bool(torch.isfinite(t[i:i + step]).all()) for i in range(0, t.shape[0], step))


def _fp16_round_up(s: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 ≥ s for finite s ≥ 0 (inf where s exceeds the fp16 range)."""
    h = s.to(torch.float16)
    low = h.to(torch.float64) < s
    if bool(low.any()):
        # Positive finite fp16 values are ordered like their bit patterns: +1 is the next one up.
        h = torch.where(low, (h.view(torch.int16) + 1).view(torch.float16), h)
    return h


def minmax_params(x: torch.Tensor, maxq: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored fp16 scale and zero of min-max groups (see the module docstring).

    Args:
        x: groups ``[..., group_size]`` (any float dtype; computed in float64).
        maxq: ``2**bits − 1``, an int or an integer tensor broadcastable to ``x.shape[:-1]``.

    Returns:
        ``(scale, zero)``, fp16 of shape ``x.shape[:-1]``.

    Raises:
        ValidationError: a group's range needs a scale beyond the fp16 range.
    """
    x = x.to(torch.float64)
    maxq_t = torch.as_tensor(maxq, dtype=torch.float64, device=x.device)
    lo = x.amin(-1).clamp(max=0.0)
    hi = x.amax(-1).clamp(min=0.0)
    s = (hi - lo) / maxq_t
    s = torch.where(s > 0, s, torch.full_like(s, _ZERO_GROUP_SCALE))
    scale = _fp16_round_up(s)
    if not bool(torch.isfinite(scale).all()):
        worst = float((hi - lo).max())
        raise ValidationError("w", f"a group spans {worst:.6g}, whose scale exceeds the fp16 "
                              "maximum 65504; valid: (max − min)/(2**bits − 1) ≤ 65504")
    s64 = scale.to(torch.float64)
    zero = torch.minimum(torch.round(-lo / s64), maxq_t.expand_as(s64)).clamp(min=0.0)
    return scale, zero.to(torch.float16)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
           maxq: torch.Tensor | int) -> torch.Tensor:
    """Nearest codes of x (float64) on the stored grid; shapes broadcast like ``x``."""
    maxq_t = torch.as_tensor(maxq, dtype=torch.float64, device=x.device)
    q = torch.round(x / scale.to(torch.float64) + zero.to(torch.float64))
    return torch.minimum(q.clamp(min=0.0), maxq_t)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """Min-max affine round-to-nearest quantization per group of columns.

    Args:
        w: ``[rows, cols]`` weight (``[out_features, in_features]``), any float dtype, finite.
        bits: 1..8.
        group_size: columns per group, any positive integer; when it does not divide
            ``cols`` the last group is shorter and has its own min-max parameters.

    Returns:
        The ``QuantizedTensor`` on ``w``'s device.

    Raises:
        ValidationError: bits out of range, group_size not a positive integer, w not a finite
            2-D float tensor, or a group too wide for an fp16 scale.
    """
    bits = check_bits(bits)
    w = check_weight(w)
    rows, cols = w.shape
    g = check_group_size(group_size)
    maxq = (1 << bits) - 1
    x = w.detach().to(torch.float64)
    full = cols // g
    scales, zeros, codes = [], [], []
    if full:
        body = x[:, :full * g].reshape(rows, full, g)
        s, z = minmax_params(body, maxq)
        scales.append(s)
        zeros.append(z)
        codes.append(_codes(body, s.unsqueeze(-1), z.unsqueeze(-1), maxq).reshape(rows, -1))
    if full * g < cols:  # the short last group
        tail = x[:, full * g:].unsqueeze(1)
        s, z = minmax_params(tail, maxq)
        scales.append(s)
        zeros.append(z)
        codes.append(_codes(tail, s.unsqueeze(-1), z.unsqueeze(-1), maxq).reshape(rows, -1))
    q = torch.cat(codes, dim=1) if len(codes) > 1 else codes[0]
    scale = torch.cat(scales, dim=1) if len(scales) > 1 else scales[0]
    zero = torch.cat(zeros, dim=1) if len(zeros) > 1 else zeros[0]
    return QuantizedTensor(q.to(torch.uint8), scale, zero, bits, g)
