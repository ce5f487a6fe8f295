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

MSE grid (``grid="mse"``, ``group_params``): the same grid family, each group's range shrunk
by the factor p of ``CLIP_SHRINKS`` (1, 0.975, …, 0.5) that gives the smallest squared error
``Σ (ŵ − x)²`` over the group's own values (p = 1 is min-max; ties keep the wider range). The
values beyond the shrunk range are clamped: the bound ``|ŵ − x| ≤ s/2`` (and
``bitsack.kernels.bounds.rtn_error_bound``) holds for min-max groups only. Measured on
SmolLM2-135M (uniform GPTQ, 6-bit scale codes, WikiText-2, 16 windows): 2-bit g32 4,456 →
718, 3-bit g64 59.6 → 55.3 (the idea is the reference GPTQ quantizer's optional MSE search
and AWQ's clip search; written here from the description).

Weighted MSE grid (``grid="hmse"``, the default of ``bitsack run``): the same search with
column j's squared error weighted by ``col_weight[j]``. GPTQ (``bitsack.kernels.gptq``)
passes the weight its own loss gives column j, ``1 / [chol(H⁻¹)]_jj²`` (the error of a
column, once the later columns have absorbed what they can, costs ``e²/[chol(H⁻¹)]_jj²``):
a column whose inputs carry much energy gets its range kept, a quiet one gets clipped.
Without a Hessian (RTN) it is ``"mse"``. Measured as above: 2-bit g32 718 → 366, 3-bit g64
55.3 → 46.2 (``bench/results/e2e.md``, ``-hmse`` cells).

Symmetric grids (``"sym"``, ``"sym-mse"``, ``"sym-hmse"``): the same three with every zero
point fixed at ``z₀ = 2**(bits − 1)`` (codes ``−z₀ … z₀ − 1`` times s) and s the smallest
that holds the group, ``max(−lo/z₀, hi/(z₀ − 1))`` rounded up (``_needed``; 1 bit: ``−lo``,
and positive values clamp to 0). They cost the same bytes in bitsack's format and fit worse
(a zero point is free there); they are the grids ggml's Q4_0 and K-quants store exactly
(``bitsack.export.ggml_blocks``), so GGUF prices them lower. ``"sym"`` keeps the half-step
bound for ≥ 2 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bitsack.errors import ValidationError
from bitsack.kernels.formats import (
    FP16_SIGNIFICANT_BITS,
    GRIDS,
    SUPER_COLS,
    check_bits,
    check_grid,
    check_group_size,
    check_scale_bits,
    clip_search,
    num_groups,
    symmetric,
    unpack_zero,
)

__all__ = [
    "CLIP_SHRINKS",
    "GRIDS",
    "QuantizedTensor",
    "check_grid",
    "check_weight",
    "dequantize_codes",
    "expand_scales",
    "group_params",
    "minmax_params",
    "rtn_quantize",
]

#: Scale given to an all-zero group: the smallest positive fp16 (subnormal 2⁻²⁴).
_ZERO_GROUP_SCALE = 2.0**-24

#: Range factors the MSE grid tries, widest first.
CLIP_SHRINKS = tuple(1.0 - 0.025 * i for i in range(21))
#: Largest (values × factors) the MSE search evaluates in one batch (float64: 64 MiB);
#: larger inputs loop over the factors.
_MSE_BATCH = 1 << 23


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
        scale_bits: None (fp16 scales), or S: every scale is ``k·step`` with an integer k in
            ``1..2**S − 1`` (double-quantized; ``dq_params``).
        step: with ``scale_bits``, fp16 ``[rows, ceil(cols / SUPER_COLS)]``, the step of each
            row's super-block of ``SUPER_COLS`` columns.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    scale_bits: int | None = None
    step: torch.Tensor | None = None

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
        if check_scale_bits(self.scale_bits) is not None:
            want = (rows, num_groups(cols, SUPER_COLS))
            t = self.step
            if t is None or tuple(t.shape) != want or t.dtype != torch.float16:
                got = "None" if t is None else f"{t.dtype} of shape {tuple(t.shape)}"
                raise ValidationError("step", f"{got}; valid: float16 {list(want)} with "
                                      "scale_bits")

    def scale_codes(self) -> torch.Tensor:
        """With ``scale_bits``: the integer codes k ``[rows, groups]`` (int64) of the scales,
        ``scale = k·step`` exactly.

        Raises:
            ValidationError: no ``scale_bits``, or a scale that is not ``k·step``.
        """
        if self.scale_bits is None:
            raise ValidationError("scale_bits", "None has no scale codes; valid: a "
                                  "double-quantized tensor")
        d = super_steps(self.step, self.shape[1], self.group_size).to(torch.float64)
        s = self.scale.to(torch.float64)
        k = torch.round(s / d)
        if not bool((k * d == s).all()) or bool((k < 1).any()) \
                or bool((k > (1 << self.scale_bits) - 1).any()):
            raise ValidationError("scale", "not k·step for an integer k in "
                                  f"1..{(1 << self.scale_bits) - 1}; valid: dq_params' scales")
        return k.to(torch.int64)

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


def _needed(x: torch.Tensor, maxq_t: torch.Tensor, sym: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The smallest scale whose grid holds groups ``x`` (float64) whole, their ``lo`` (≤ 0)
    and, symmetric, the fixed zero ``z₀ = (maxq + 1) // 2``: min-max ``(hi − lo)/maxq``;
    symmetric ``max(−lo/z₀, hi/(maxq − z₀))`` (1 bit: no code above z₀, so ``−lo/z₀``)."""
    lo = x.amin(-1).clamp(max=0.0)
    hi = x.amax(-1).clamp(min=0.0)
    if not sym:
        return (hi - lo) / maxq_t, lo, None
    z0 = torch.div(maxq_t + 1, 2, rounding_mode="floor")
    up = maxq_t - z0
    s = torch.maximum(-lo / z0, torch.where(up > 0, hi / up.clamp(min=1.0), 0.0))
    return s, lo, z0


def _zero(lo: torch.Tensor, s64: torch.Tensor, maxq_t: torch.Tensor,
          z0: torch.Tensor | None) -> torch.Tensor:
    if z0 is not None:
        return z0.expand_as(s64).to(torch.float16)
    return torch.minimum(torch.round(-lo / s64), maxq_t.expand_as(s64)).clamp(min=0.0) \
        .to(torch.float16)


def minmax_params(x: torch.Tensor, maxq: torch.Tensor | int,
                  sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored fp16 scale and zero of min-max groups (see the module docstring).

    Args:
        x: groups ``[..., group_size]`` (any float dtype; computed in float64).
        maxq: ``2**bits − 1``, an int or an integer tensor broadcastable to ``x.shape[:-1]``.
        sym: zero fixed at ``2**(bits − 1)`` and the scale the smallest that holds the
            group (``_needed``), rounded up to fp16.

    Returns:
        ``(scale, zero)``, fp16 of shape ``x.shape[:-1]``.

    Raises:
        ValidationError: a group's range needs a scale beyond the fp16 range.
    """
    x = x.to(torch.float64)
    maxq_t = torch.as_tensor(maxq, dtype=torch.float64, device=x.device)
    s, lo, z0 = _needed(x, maxq_t, sym)
    s = torch.where(s > 0, s, torch.full_like(s, _ZERO_GROUP_SCALE))
    scale = _fp16_round_up(s)
    if not bool(torch.isfinite(scale).all()):
        worst = float((x.amax(-1).clamp(min=0.0) - lo).max())
        raise ValidationError("w", f"a group spans {worst:.6g}, whose scale exceeds the fp16 "
                              "maximum 65504; valid: (max − min)/(2**bits − 1) ≤ 65504")
    return scale, _zero(lo, scale.to(torch.float64), maxq_t, z0)


def super_steps(step: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """Each group's step ``[rows, groups]``: group g starts at column g·G, in super-block
    ``g·G // SUPER_COLS``."""
    g = torch.arange(num_groups(cols, group_size), device=step.device) * group_size
    return step[:, g // SUPER_COLS]


def super_ranges(x: torch.Tensor, group_size: int,
                 super_cols: int = SUPER_COLS, sym_maxq: int | None = None) -> torch.Tensor:
    """Per row and super-block of ``super_cols`` columns of ``x`` ``[rows, cols]``: the
    largest min-max range (max − min with 0 in the range, as the grid takes it) of the groups
    starting in it, float64 ``[rows, ceil(cols / super_cols)]``. ``sym_maxq``: of a
    symmetric grid with that ``maxq``, the range ``maxq·`` (the scale that holds the group)."""
    x = x.detach().to(torch.float64)
    rows, cols = x.shape
    ng = num_groups(cols, group_size)
    pad = ng * group_size - cols
    xp = torch.nn.functional.pad(x, (0, pad)).reshape(rows, ng, group_size)
    if sym_maxq is None:
        rng = xp.amax(-1).clamp(min=0.0) - xp.amin(-1).clamp(max=0.0)  # padding zeros are in
    else:
        mq = torch.tensor(float(sym_maxq), dtype=torch.float64, device=x.device)
        rng = _needed(xp, mq, True)[0] * sym_maxq
    sb = (torch.arange(ng, device=x.device) * group_size) // super_cols
    out = torch.zeros((rows, num_groups(cols, super_cols)), dtype=torch.float64,
                      device=x.device)
    return out.scatter_reduce(1, sb.expand(rows, ng), rng, reduce="amax")


def dq_steps(ranges: torch.Tensor, maxq: int, scale_bits: int) -> torch.Tensor:
    """fp16 steps ``d`` of super-blocks whose largest group range is ``ranges``: the smallest
    value ≥ range / maxq / (2**S − 1) with ``11 − S`` significant bits (at least 2⁻²⁰, so
    every ``k·d`` is a multiple of 2⁻²⁴ and has ≤ 11 significant bits: an fp16 value).

    Raises:
        ValidationError: a range whose step would exceed the fp16 range.
    """
    levels = (1 << check_scale_bits(scale_bits)) - 1
    x = (ranges.to(torch.float64) / maxq / levels).clamp(min=2.0**-20)
    unit = torch.exp2(torch.floor(torch.log2(x)) - (FP16_SIGNIFICANT_BITS - scale_bits - 1))
    d = torch.ceil(x / unit) * unit
    if not bool((d * levels <= 65504).all()):
        raise ValidationError("w", f"a group spans {float(ranges.max()):.6g}, whose scale "
                              "exceeds the fp16 maximum 65504")
    return d.to(torch.float16)


def dq_params(x: torch.Tensor, maxq: torch.Tensor | int, step: torch.Tensor,
              scale_bits: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of min-max groups ``x`` ``[..., group_size]`` on a double-quantized
    grid: the min-max scale rounded up to the next multiple ``k·step`` (k ≤ 2**S − 1; a group
    wider than ``(2**S − 1)·step`` gets that and clamps its outliers), zero as ``minmax_params``
    (``sym`` likewise). ``step`` (fp16, shape ``x.shape[:-1]``) comes from ``dq_steps``; the
    scale is an exact fp16.
    """
    x = x.to(torch.float64)
    levels = float((1 << scale_bits) - 1)
    maxq_t = torch.as_tensor(maxq, dtype=torch.float64, device=x.device)
    s, lo, z0 = _needed(x, maxq_t, sym)
    d = step.to(torch.float64)
    k = torch.ceil(s / d * (1 - 2.0**-40)).clamp(min=1.0, max=levels)
    s64 = k * d
    return s64.to(torch.float16), _zero(lo, s64, maxq_t, z0)


def group_params(x: torch.Tensor, maxq: torch.Tensor | int, grid: str = "minmax",
                 step: torch.Tensor | None = None, scale_bits: int | None = None,
                 col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of groups ``x`` ``[..., group_size]`` on the ``grid`` (``GRIDS``):
    ``minmax_params`` (``step`` None) or ``dq_params`` (a double-quantized segment), of the
    groups' own range or (``"mse"``, ``"hmse"``) of the shrunk range of smallest squared
    error, each column's error weighted by ``col_weight`` (``[group_size]``, positive) when
    given: ``"hmse"`` in GPTQ passes the weights its loss gives the columns; without weights
    (RTN) ``"hmse"`` is ``"mse"``.

    ``maxq`` may be a tensor broadcastable to ``x.shape[:-1]`` (GPTQ's per-row bit-widths).
    """
    sym = symmetric(grid)

    def params(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if step is None:
            return minmax_params(v, maxq, sym)
        return dq_params(v, maxq, step, scale_bits, sym)

    if clip_search(grid) == "minmax":
        return params(x)
    x = x.to(torch.float64)
    mq = torch.as_tensor(maxq, dtype=torch.float64, device=x.device)
    mq = mq.unsqueeze(-1) if mq.dim() else mq
    if col_weight is not None:
        col_weight = col_weight.to(dtype=torch.float64, device=x.device)

    def sq_error(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # (s·(codes − z) − x)² in the codes' own buffer
        s64, z64 = s.to(torch.float64).unsqueeze(-1), z.to(torch.float64).unsqueeze(-1)
        e = _codes(x, s64, z64, mq).sub_(z64).mul_(s64).sub_(x).square_()
        return (e if col_weight is None else e.mul_(col_weight)).sum(-1)

    if x.numel() * len(CLIP_SHRINKS) <= _MSE_BATCH:  # every factor at once (small groups)
        shrinks = torch.tensor(CLIP_SHRINKS, dtype=torch.float64, device=x.device)
        xs = x.unsqueeze(0) * shrinks.reshape(-1, *([1] * x.dim()))
        if step is None:
            s_all, z_all = minmax_params(xs, maxq, sym)
        else:
            s_all, z_all = dq_params(xs, maxq, step.expand(xs.shape[:-1]), scale_bits, sym)
        err = sq_error(s_all, z_all)  # [factors, ...]
        # the first (widest) of the smallest errors: argmin returns the first minimum
        pick = err.argmin(0, keepdim=True)
        return s_all.gather(0, pick)[0], z_all.gather(0, pick)[0]
    best_s, best_z = params(x)
    best = sq_error(best_s, best_z)
    for p in CLIP_SHRINKS[1:]:
        s, z = params(x * p)  # the shrunk range's grid; codes still of the values themselves
        err = sq_error(s, z)
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
           maxq: torch.Tensor | int) -> torch.Tensor:
    """Nearest codes of x (float64) on the stored grid, a new tensor of the broadcast shape
    (computed in place in it)."""
    maxq_t = torch.as_tensor(maxq, dtype=torch.float64, device=x.device)
    q = torch.div(x, scale.to(torch.float64)).add_(zero.to(torch.float64)).round_()
    return torch.minimum(q.clamp_(min=0.0), maxq_t, out=q)


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int,
                 scale_bits: int | None = None, grid: str = "minmax") -> QuantizedTensor:
    """Affine round-to-nearest quantization per group of columns (min-max or MSE grid).

    Args:
        w: ``[rows, cols]`` weight (``[out_features, in_features]``), any float dtype, finite.
        bits: 1..8.
        group_size: columns per group, any positive integer; when it does not divide
            ``cols`` the last group is shorter and has its own min-max parameters.
        scale_bits: None (fp16 scales) or S-bit double-quantized scales (``dq_params``; the
            steps from the weight's own ranges, so no min-max group is clipped:
            ``|ŵ − x| ≤ s/2`` still holds).
        grid: one of ``GRIDS`` (``group_params``; the MSE grids clamp, so the s/2 bound does
            not hold for them; without a Hessian ``"hmse"`` is ``"mse"``).

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
    scale_bits = check_scale_bits(scale_bits)
    check_grid(grid)
    step = None
    if scale_bits is not None:
        step = dq_steps(super_ranges(x, g, sym_maxq=maxq if symmetric(grid) else None), maxq,
                        scale_bits)
        group_step = super_steps(step, cols, g)

    def params(groups: torch.Tensor, gs: slice):
        return group_params(groups, maxq, grid, None if step is None else group_step[:, gs],
                            scale_bits)

    full = cols // g
    scales, zeros, codes = [], [], []
    if full:
        body = x[:, :full * g].reshape(rows, full, g)
        s, z = params(body, slice(0, full))
        scales.append(s)
        zeros.append(z)
        codes.append(_codes(body, s.unsqueeze(-1), z.unsqueeze(-1), maxq).reshape(rows, -1))
    if full * g < cols:  # the short last group
        tail = x[:, full * g:].unsqueeze(1)
        s, z = params(tail, slice(full, full + 1))
        scales.append(s)
        zeros.append(z)
        codes.append(_codes(tail, s.unsqueeze(-1), z.unsqueeze(-1), maxq).reshape(rows, -1))
    q = torch.cat(codes, dim=1) if len(codes) > 1 else codes[0]
    scale = torch.cat(scales, dim=1) if len(scales) > 1 else scales[0]
    zero = torch.cat(zeros, dim=1) if len(zeros) > 1 else zeros[0]
    return QuantizedTensor(q.to(torch.uint8), scale, zero, bits, g, scale_bits, step)


def expand_scales(scale_codes: torch.Tensor, step: torch.Tensor, scale_bits: int, rows: int,
                  cols: int, group_size: int,
                  which: torch.Tensor | None = None) -> torch.Tensor:
    """fp16 scales ``[rows, groups]`` of a double-quantized segment: ``k·step`` of each group
    (exact: the steps keep ``11 − S`` significant bits); of the rows ``which`` only, if given
    (their codes read straight from the stream)."""
    groups = num_groups(cols, group_size)
    if which is None:
        k = unpack_zero(scale_codes, scale_bits, rows, groups, dtype=torch.float64)
    else:
        which = torch.as_tensor(which, device=scale_codes.device).to(torch.int64).reshape(-1)
        idx = which[:, None] * groups + torch.arange(groups, device=scale_codes.device)
        k = stream_values(scale_codes, scale_bits, idx).to(torch.float64)
        step = step[which]
    return (k * super_steps(step, cols, group_size).to(torch.float64)).to(torch.float16)


def stream_values(words: torch.Tensor, bits: int, idx: torch.Tensor) -> torch.Tensor:
    """Values ``idx`` (any shape, int64) of a ``bits``-bit stream (``formats.pack_zero``), as
    int64: value i sits at bit i·bits of the little-endian concatenation of the words."""
    w = words.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, w.new_zeros(1)])  # a value may straddle into the (absent) next word
    bit = idx * bits
    lo = bit >> 5
    sh = bit & 31
    v = (w[lo] >> sh) | (w[lo + 1] << (32 - sh))
    return v & ((1 << bits) - 1)
