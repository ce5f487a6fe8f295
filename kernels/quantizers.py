"""Weight quantizers: min-max round-to-nearest (``rtn``) and GPTQ, behind a small registry.

Both produce the packed format's numbers (``bitsack.kernels.formats.PackFormat``): per group of
``group_size`` consecutive input columns of a row, an fp16 ``scale`` s and fp16 ``zero`` z, and
integer codes q in ``[0, 2**bits − 1]``; the weight the kernels use is ``ŵ = s·(q − z)``
computed in fp32 from the stored fp16 numbers.

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

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", Algorithm 1) quantizes one column at a time and
spreads each column's error over the not yet quantized columns through the inverse Hessian
of the layer-wise objective ‖WX − QX‖², H = 2XXᵀ/n. Paper symbols are used in ``GPTQ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from bitsack.errors import NumericalError, ValidationError
from bitsack.kernels.formats import check_bits, check_group_size, num_groups
from bitsack.kernels.hessian import Hessian

__all__ = [
    "GPTQ",
    "GPTQResult",
    "QuantizedTensor",
    "Quantizer",
    "available_quantizers",
    "dequantize_codes",
    "fake_quantize",
    "get_quantizer",
    "minmax_params",
    "register_quantizer",
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
        _check_group_size(self.group_size, cols)
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


def _check_group_size(group_size: Any, cols: int | None = None) -> int:
    """A positive integer group size (any: a group size need not divide the columns)."""
    return check_group_size(group_size)


def _check_weight(w: Any, name: str = "w") -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        desc = f"{w.dtype} of shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) \
            else type(w).__name__
        raise ValidationError(name, f"{desc}; valid: a 2-D floating-point tensor [rows, cols]")
    if not bool(torch.isfinite(w).all()):
        raise ValidationError(name, "holds NaN or infinite values; valid: finite values")
    return w


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
    w = _check_weight(w)
    rows, cols = w.shape
    g = _check_group_size(group_size, cols)
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


# ------------------------------------------------------------------------------------------
# GPTQ
# ------------------------------------------------------------------------------------------


def _bits_map(bits: Any, rows: int, ngroups: int, bits_axis: int | None,
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
class GPTQResult:
    """GPTQ's answer for one matrix, possibly with several bit-widths.

    Attributes:
        codes: uint8 ``[rows, cols]`` (0 where the map says 16 bits).
        scale: fp16 ``[rows, ngroups]`` (1 where the map says 16 bits).
        zero: fp16 ``[rows, ngroups]`` (0 where the map says 16 bits).
        bits: int64 map ``[rows, ngroups]`` of each group's bit-width (1..8, or 16 = fp16).
        group_size: columns per group.
        weight: float32 ``[rows, cols]``, the weights the compressed layer computes with:
            ``scale·(codes − zero)`` for quantized groups, the fp16 value for 16-bit groups.
        damp: the damping λ finally used (after any escalation), absolute.
        loss: Σ of the paper's per-column losses ½·Σ_rows (w − q)²/[H⁻¹]_qq.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: torch.Tensor
    group_size: int
    weight: torch.Tensor
    damp: float
    loss: float

    def segment(self, axis: int, start: int, stop: int) -> QuantizedTensor | torch.Tensor:
        """Rows (``axis=0``) or columns (``axis=1``) ``start:stop`` as one packed segment.

        Returns a ``QuantizedTensor`` when the slice has one bit-width ≤ 8, the fp16 weight
        ``[rows, cols]`` of the slice when it is 16 bits.

        Raises:
            ValidationError: bad axis or range, column range not on group boundaries, or the
                slice mixes bit-widths.
        """
        rows, cols = self.codes.shape
        g = self.group_size
        if axis not in (0, 1):
            raise ValidationError("axis", f"{axis!r}; valid: 0 (rows) or 1 (columns)")
        n = rows if axis == 0 else cols
        if not 0 <= start < stop <= n:
            raise ValidationError("start:stop", f"{start}:{stop} is not a non-empty range "
                                  f"inside 0:{n}")
        if axis == 1 and (start % g or (stop % g and stop != cols)):
            raise ValidationError("start:stop", f"{start}:{stop} is not on group boundaries; "
                                  f"valid: multiples of group_size {g}")
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
        out = self.segment(0, 0, self.codes.shape[0])
        if not isinstance(out, QuantizedTensor):
            raise ValidationError("bits", "16 (fp16) has no QuantizedTensor; valid: 1..8")
        return out


class GPTQ:
    """GPTQ for one linear layer ``y = W x`` (Frantar et al. 2022, Algorithm 1).

    Feed calibration inputs with ``add_batch``; it accumulates ``H = 2XXᵀ/n`` over the n input
    vectors seen in a ``Hessian`` (``self.hessian``: float64 sum of float32 batch products),
    or give a finished ``Hessian`` / matrix to ``from_hessian``. ``quantize`` then runs the
    column-by-column algorithm with lazy block updates on a copy of the weight, in float64.

    Args:
        columns: the layer's input features (columns of W).
        device: where H lives (default CPU).
    """

    def __init__(self, columns: int, device: torch.device | str | None = None):
        self.hessian = Hessian(columns, device)
        self.columns = columns
        self._H: torch.Tensor | None = None  # a fixed H given to from_hessian
        self._H_cache: tuple[int, torch.Tensor] | None = None

    @property
    def H(self) -> torch.Tensor:
        """``2XXᵀ/n`` (float64): the given matrix, or the accumulator's current ``matrix()``."""
        if self._H is not None:
            return self._H
        n = self.hessian.n
        if n <= 0:
            return torch.zeros_like(self.hessian.S)
        if self._H_cache is None or self._H_cache[0] != n:
            self._H_cache = (n, self.hessian.matrix())
        return self._H_cache[1]

    @property
    def nsamples(self) -> int:
        """Input vectors behind ``H`` (as given to ``from_hessian`` for a fixed matrix)."""
        return self._nsamples if self._H is not None else self.hessian.n

    @classmethod
    def from_hessian(cls, H: torch.Tensor | Hessian, nsamples: int = 1) -> GPTQ:
        """A GPTQ whose Hessian was accumulated elsewhere.

        Args:
            H: a ``Hessian`` accumulator (used as is, not copied: ``quantize`` only reads it),
                or the matrix ``2XXᵀ/n`` itself (copied to float64).
            nsamples: for a matrix, how many input vectors it came from (informational).
        """
        if isinstance(H, Hessian):
            obj = cls(H.columns, device=H.S.device)
            obj.hessian = H
            return obj
        if not isinstance(H, torch.Tensor) or H.dim() != 2 or H.shape[0] != H.shape[1]:
            shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
            raise ValidationError("hessian", f"shape {shape}; valid: square [cols, cols] or a "
                                  "Hessian")
        obj = cls(int(H.shape[0]), device=H.device)
        obj._H = H.detach().to(torch.float64).clone()
        obj._nsamples = int(nsamples)
        return obj

    def add_batch(self, x: torch.Tensor) -> None:
        """Add calibration inputs ``x[..., columns]`` (every leading index is one sample).

        Delegates to ``self.hessian`` (``bitsack.kernels.hessian.Hessian``: float64 running
        sum of float32 batch products).
        """
        if self._H is not None:
            raise ValidationError("add_batch", "this GPTQ holds a fixed Hessian matrix "
                                  "(from_hessian); valid: add to a Hessian accumulator instead")
        self.hessian.add(x)

    def _inverse_cholesky(self, H: torch.Tensor, damp: float, max_escalations: int
                          ) -> tuple[torch.Tensor, float]:
        """Upper Cholesky factor of (H + λI)⁻¹, escalating λ ×10 while Cholesky fails."""
        mean_diag = float(torch.diag(H).mean())
        lam = damp * mean_diag
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        for _ in range(max_escalations + 1):
            L, info = torch.linalg.cholesky_ex(H + lam * eye)
            if int(info) == 0:
                U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
                if int(info) == 0 and bool(torch.isfinite(U).all()):
                    return U, lam
            # Not positive definite at this damping (rank-deficient or ill-conditioned H).
            lam = max(lam * 10.0, 1e-6 * mean_diag)
        raise NumericalError(f"hessian: Cholesky of H + λI failed up to λ = {lam / 10:.3g} "
                             f"({max_escalations} escalations ×10 from damp={damp})")

    def quantize(self, weight: torch.Tensor, bits: Any, group_size: int, *,
                 bits_axis: int | None = None, damp: float = 0.01, act_order: bool = False,
                 block_size: int = 128, max_escalations: int = 6) -> GPTQResult:
        """Quantize ``weight`` [rows, columns] with GPTQ.

        Args:
            weight: the layer's weight ``W`` ``[out_features, in_features]``; not modified.
            bits: an int (1..8, 16), a per-row integer tensor ``[rows]`` (units along rows:
                q/k/v/gate/up), a per-column-group tensor ``[cols // group_size]`` (units along
                columns: o_proj/down_proj), or a full map ``[rows, cols // group_size]``.
                16 keeps a part in fp16 (it still absorbs the error of the other columns).
            group_size: columns per group (a divisor of cols).
            bits_axis: 0 or 1 to say what a 1-D ``bits`` is when rows == cols // group_size.
            damp: λ = damp · mean(diag H) added to the diagonal (escalates ×10 on failure).
            act_order: quantize columns in order of decreasing ``diag H``; group parameters
                are then fixed beforehand per contiguous group ("static groups"), so each group
                still covers contiguous columns of the stored matrix.
            block_size: columns per lazy batch update (B in the paper).
            max_escalations: how many ×10 escalations of λ before giving up.

        Returns:
            A ``GPTQResult`` for the whole matrix.

        Raises:
            ValidationError: bad arguments or no calibration inputs.
            NumericalError: Cholesky fails even at the largest damping.
        """
        W0 = _check_weight(weight, "weight")
        rows, cols = W0.shape
        if cols != self.columns:
            raise ValidationError("weight", f"{cols} columns; valid: {self.columns} (the "
                                  "Hessian's size)")
        g = _check_group_size(group_size, cols)
        if self.nsamples <= 0:
            raise ValidationError("hessian", "no calibration inputs were added; valid: call "
                                  "add_batch(x) at least once")
        if not damp >= 0 or not math.isfinite(damp):
            raise ValidationError("damp", f"{damp!r}; valid: a finite number ≥ 0")
        if block_size <= 0:
            raise ValidationError("block_size", f"{block_size!r}; valid: a positive integer")
        if not bool(torch.isfinite(self.H).all()):
            raise NumericalError("hessian: H holds NaN or infinite values")
        dev = self.H.device
        ngroups = num_groups(cols, g)
        bmap = _bits_map(bits, rows, ngroups, bits_axis, dev)
        is16 = bmap == 16
        maxq = torch.where(is16, torch.zeros_like(bmap), (1 << bmap.clamp(max=8)) - 1)

        W = W0.detach().to(device=dev, dtype=torch.float64).clone()
        H = self.H.clone()
        # A dead input (never nonzero in calibration) carries no information: its weight
        # cannot influence the outputs seen, so zero it and give H a unit diagonal there.
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

        scale = torch.ones((rows, ngroups), dtype=torch.float16, device=dev)
        zero = torch.zeros((rows, ngroups), dtype=torch.float16, device=dev)
        done = torch.zeros(ngroups, dtype=torch.bool, device=dev)

        def set_group(gi: int, values: torch.Tensor) -> None:
            # 16-bit rows get throwaway parameters (maxq 1 keeps the division finite).
            s, z = minmax_params(values, maxq[:, gi].clamp(min=1))
            scale[:, gi] = torch.where(is16[:, gi], scale[:, gi], s)
            zero[:, gi] = torch.where(is16[:, gi], zero[:, gi], z)
            done[gi] = True

        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
            for gi in range(ngroups):  # static groups: parameters from the original W
                set_group(gi, W[:, gi * g:(gi + 1) * g])
            W = W[:, perm]
            H = H[perm][:, perm]
        else:
            perm = torch.arange(cols, device=dev)

        Hinv, lam = self._inverse_cholesky(H, damp, max_escalations)

        Q = torch.zeros_like(W)
        codes = torch.zeros((rows, cols), dtype=torch.uint8, device=dev)
        # Python copies of the per-column bookkeeping: no device sync per column on a GPU.
        perm_list = perm.tolist()
        group_done = done.tolist()
        loss = torch.zeros((), dtype=torch.float64, device=dev)
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = perm_list[i1 + i]
                gi = col // g
                if not group_done[gi]:
                    # The group starts here (no act-order: columns run in order). Its params
                    # come from the *current* weights: the block's updated columns, and beyond
                    # the block the columns with this block's pending (lazy) updates applied.
                    end = i1 + i + g
                    cur = W1[:, i:min(end, i2) - i1]
                    if end > i2:
                        rest = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:end]
                        cur = torch.cat([cur, rest], dim=1)
                    set_group(gi, cur)
                    group_done[gi] = True
                w = W1[:, i]
                d = Hinv1[i, i]
                s = scale[:, gi].to(torch.float64)
                z = zero[:, gi].to(torch.float64)
                qc = _codes(w, s, z, maxq[:, gi])
                # s·(q − z) is exact in fp32 and float64 alike (≤ 19 significant bits).
                q = torch.where(is16[:, gi], w.to(torch.float16).to(torch.float64), s * (qc - z))
                codes[:, col] = torch.where(is16[:, gi], 0.0, qc).to(torch.uint8)
                Q[:, i1 + i] = q
                err = (w - q) / d
                loss += 0.5 * (err * err).sum() * d * d
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        if not bool(torch.isfinite(Q).all()):
            raise NumericalError("gptq: the quantized weight is not finite (fp16 overflow of a "
                                 "16-bit part?)")
        invperm = torch.argsort(perm)
        weight_q = Q[:, invperm].to(torch.float32)
        return GPTQResult(codes=codes, scale=scale, zero=zero, bits=bmap, group_size=g,
                          weight=weight_q, damp=lam, loss=float(loss))


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------


class Quantizer(Protocol):
    """A weight quantizer: ``quantize(w, bits, group_size, hessian=…) -> QuantizedTensor``."""

    name: str
    needs_calibration: bool

    def quantize(self, w: torch.Tensor, bits: int, group_size: int, *,
                 hessian: torch.Tensor | None = None, **options: Any) -> QuantizedTensor: ...


_QUANTIZERS: dict[str, Quantizer] = {}


def register_quantizer(cls: Callable[[], Quantizer]) -> Callable[[], Quantizer]:
    """Class decorator: register an instance under its ``name``."""
    obj = cls()
    _QUANTIZERS[obj.name] = obj
    return cls


def available_quantizers() -> list[str]:
    """Names of the registered quantizers."""
    return sorted(_QUANTIZERS)


def get_quantizer(name: str) -> Quantizer:
    """The quantizer registered as ``name`` (``rtn``, ``gptq``)."""
    try:
        return _QUANTIZERS[name]
    except KeyError:
        raise ValidationError("quantizer", f"{name!r} is unknown; valid: "
                              f"{', '.join(available_quantizers())}") from None


@register_quantizer
class RTNQuantizer:
    """Min-max round-to-nearest (``rtn_quantize``); needs no calibration data."""

    name = "rtn"
    needs_calibration = False

    def quantize(self, w: torch.Tensor, bits: int, group_size: int, *,
                 hessian: torch.Tensor | None = None, **options: Any) -> QuantizedTensor:
        if options:
            raise ValidationError("options", f"{sorted(options)} are not options of rtn; "
                                  "valid: none")
        return rtn_quantize(w, bits, group_size)


@register_quantizer
class GPTQQuantizer:
    """GPTQ from a precomputed Hessian ``2XXᵀ/n`` (``hessian=``); options go to ``GPTQ``."""

    name = "gptq"
    needs_calibration = True

    def quantize(self, w: torch.Tensor, bits: int, group_size: int, *,
                 hessian: torch.Tensor | None = None, **options: Any) -> QuantizedTensor:
        if hessian is None:
            raise ValidationError("hessian", "None; gptq needs the layer's Hessian 2XXᵀ/n from "
                                  "calibration inputs (GPTQ.add_batch)")
        check_bits(bits)
        return GPTQ.from_hessian(hessian).quantize(w, bits, group_size, **options).to_quantized()


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, method: str = "rtn", *,
                  hessian: torch.Tensor | None = None, **options: Any) -> torch.Tensor:
    """``dequantize(quantize(w))`` in ``w``'s dtype and device: the weight apply would store.

    Profiling uses this for each option's perturbation ``δ = Q(W) − W``, so the loss it
    predicts is that of the very numbers apply packs. ``bits == 16`` is the fp16 round trip.
    """
    if bits == 16:
        return _check_weight(w).half().to(w.dtype)
    qt = get_quantizer(method).quantize(w, bits, group_size, hessian=hessian, **options)
    return qt.dequantize(w.dtype).to(w.device)
