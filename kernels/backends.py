"""Kernel backends that run a ``PackedLinear``: ``reference``, ``torch``, ``cpu``, ``cupy``.

Every backend computes ``y = x Ŵᵀ + b`` for the packed weight Ŵ, and declares its
floating-point recipe (``numerics``) so that ``bitsack.kernels.bounds`` can bound its distance
to the reference for each output:

- ``reference`` — the executable spec: NumPy unpack of the words (``formats.unpack_numpy``),
  fp32 dequantization ``s·(q − z)`` as the format defines it, then a float64 matmul. Its
  ``linear`` returns x's dtype; ``reference_output`` returns the float64 values.
- ``torch`` — dequantize every segment with torch ops and run one matmul (on CPU a debug
  mode now: it materializes the whole fp32 weight per call, unless ``cache_weight`` keeps
  it). On CPU (and for fp32 activations anywhere) the weight is exact in fp32 and the matmul
  runs in fp32; on a GPU with fp16/bf16 activations the weight is rounded to the activation
  dtype and the matmul runs in it (cuBLAS, fp32 accumulation assumed: keep
  ``torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction`` and ``..._bf16_...``
  False for the bound to hold).
- ``cpu`` — the CPU path (the default of packed modules): batch ≤ ``GEMV_MAX_BATCH`` rows
  (decode) runs a fused unpack + dequantize + GEMV per segment over the packed words (C++,
  ``kernels/cpu/packed_cpu.cpp``, built and cached by ``bitsack.kernels.cpu_build``), never
  materializing the weight; more rows (prefill) dequantize a tile of rows at a time into a
  reused fp32 buffer and run the BLAS matmul on it. Where the C++ library cannot be built, the
  same tiles are dequantized with torch ops. ŵ is exact in fp32, x is converted to fp32, every
  sum is fp32: the bound of an fp32 GEMV. Tensors not on the CPU go to ``torch``.
- ``cupy`` — raw CUDA kernels (``kernels/cuda``): for batch ≤ 8 rows the mixed-bit GEMV (one
  launch per segment, fp32 accumulate); for more, a dequantize kernel into a dense fp16 (fp16
  activations) or fp32 weight, then a cuBLAS GEMM through CuPy (fp32 compute). Tensors cross
  between torch and CuPy with DLPack, on torch's current stream. It lives in
  ``bitsack.kernels.cupy_backend`` (its names are re-exported here); the protocol and the
  checks every backend shares are in ``bitsack.kernels.backend_base``.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import numpy as np
import torch

from bitsack.errors import ValidationError
from bitsack.kernels.backend_base import (
    GEMV_MAX_BATCH,
    KernelBackend,
    flat_input,
    output_rounding,
)
from bitsack.kernels.bounds import Numerics, rounding, unit_roundoff
from bitsack.kernels.cupy_backend import (
    CupyBackend,
    Launch,
    dequant_plan,
    gemv_plan,
    launch_prepared,
    prepare_plan,
    run_plan,
)
from bitsack.kernels.formats import num_groups, unpack_numpy, unpack_zero
from bitsack.kernels.grid import expand_scales
from bitsack.kernels.registry import (  # noqa: F401 - re-exported
    _BACKENDS,
    available_backends,
    get_backend,
    register_backend,
)

__all__ = [
    "CPU_TILE_ELEMENTS",
    "CupyBackend",
    "GEMV_MAX_BATCH",
    "KernelBackend",
    "Launch",
    "dequant_plan",
    "gemv_plan",
    "launch_prepared",
    "prepare_plan",
    "run_plan",
    "available_backends",
    "get_backend",
    "reference_output",
    "reference_weight",
    "register_backend",
]

#: Weights per dequantized tile of the cpu backend's prefill path (4 MiB of fp32).
CPU_TILE_ELEMENTS = 1 << 20


# ------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------


def reference_weight(layer: Any) -> np.ndarray:
    """Ŵ ``[out, in]`` as float64, by the spec: NumPy unpack, fp32 ``s·(q − z)``."""
    w = np.empty((layer.out_features, layer.in_features), dtype=np.float64)
    for seg in layer.segments:
        rows, cols = seg.shape
        if seg.bits == 16:
            part = seg.weight.detach().cpu().numpy().astype(np.float64)
        else:
            q = seg.qdata.detach().cpu().view(torch.int32).numpy().view(np.uint32)
            codes = unpack_numpy(q, seg.bits, cols).astype(np.float32)
            # group of column j: j // G (the last group of a row may be shorter)
            gidx = np.arange(cols) // seg.group_size
            s = seg.scales().detach().cpu().numpy().astype(np.float32)[:, gidx]
            zs = seg.zero.detach().cpu().view(torch.int32).numpy().view(np.uint32)
            z = unpack_zero(zs, seg.bits, rows, num_groups(cols, seg.group_size))
            z = z.astype(np.float32)[:, gidx]
            part = (s * (codes - z)).astype(np.float64)
        if seg.axis == 0:
            w[seg.start:seg.stop] = part
        else:
            w[:, seg.start:seg.stop] = part
    return w


def reference_output(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """``x Ŵᵀ + b`` in float64 on the CPU: the value every backend is checked against."""
    xf = flat_input(layer, x).detach().cpu().to(torch.float64).numpy()
    y = xf @ reference_weight(layer).T
    if layer.bias is not None:
        y = y + layer.bias.detach().cpu().to(torch.float64).numpy()
    return torch.from_numpy(y).reshape(*x.shape[:-1], layer.out_features)


@register_backend
class ReferenceBackend:
    """The executable spec (float64, CPU, slow)."""

    name = "reference"

    def is_available(self) -> bool:
        return True

    def linear(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        return reference_output(layer, x).to(device=x.device, dtype=x.dtype)

    def numerics(self, layer: Any, x: torch.Tensor) -> Numerics:
        out_u, out_eta = rounding(torch.float64, x.dtype)
        # float64 throughout: its own error is the reference term γ^(64) the bound adds anyway;
        # accum_u = 2⁻⁵³ accounts for it a second time, harmlessly.
        return Numerics(accum_u=2.0**-53, out_u=out_u, out_eta=out_eta)


# ------------------------------------------------------------------------------------------
# torch
# ------------------------------------------------------------------------------------------


def _torch_compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.device.type == "cpu" or x.dtype in (torch.float32, torch.float64):
        return torch.float32
    return x.dtype


@register_backend
class TorchBackend:
    """Dequantize per segment (torch ops), one matmul. CPU and GPU."""

    name = "torch"

    def is_available(self) -> bool:
        return True

    def linear(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        xf = flat_input(layer, x)
        compute = _torch_compute_dtype(x)
        w = layer.dense_weight(torch.float32).to(device=x.device, dtype=compute)
        y = xf.to(compute) @ w.T
        if layer.bias is not None:
            # fp32 bias add (for fp16/bf16 compute this is the two-stage recipe of numerics()).
            y = y.to(torch.float32) + layer.bias.to(device=x.device, dtype=torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)

    def numerics(self, layer: Any, x: torch.Tensor) -> Numerics:
        compute = _torch_compute_dtype(x)
        d_u, d_eta = rounding(torch.float32, compute)
        x_u, _ = rounding(x.dtype, compute)
        out_u, out_eta = output_rounding(x.dtype)
        if compute == torch.float32:
            return Numerics(dequant_u=d_u, dequant_eta=d_eta, x_u=x_u, out_u=out_u,
                            out_eta=out_eta)
        s_u, s_eta = unit_roundoff(compute)
        return Numerics(dequant_u=d_u, dequant_eta=d_eta, x_u=x_u,
                        sum_u=s_u, sum_eta=s_eta, out_u=out_u, out_eta=out_eta)


# ------------------------------------------------------------------------------------------
# cpu
# ------------------------------------------------------------------------------------------


class _SegView(NamedTuple):
    """A segment's kernel arguments, straight from the module's buffers (no ``Segment``
    validation on the hot path): ``q`` is qdata (or the fp16 weight for 16 bits); ``scale``
    the fp16 scales, or None with ``codes`` / ``step`` / ``scale_bits`` (double-quantized)."""

    axis: int
    start: int
    stop: int
    bits: int
    group_size: int
    rows: int
    cols: int
    q: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    step: torch.Tensor | None = None
    scale_bits: int = 0

    def scales(self) -> torch.Tensor:
        """The fp16 scales ``[rows, groups]`` (expanded from the codes when double-quantized)."""
        if self.scale is not None:
            return self.scale
        return expand_scales(self.codes, self.step, self.scale_bits, self.rows, self.cols,
                             self.group_size)


def _seg_views(layer: Any) -> list[_SegView]:
    out = []
    for i, (axis, start, stop, bits, g, (rows, cols)) in enumerate(layer._meta):
        head = (axis, start, stop, bits, g, rows, cols)
        if bits == 16:
            out.append(_SegView(*head, getattr(layer, f"seg{i}_weight")))
        elif layer._scale_bits[i] is not None:
            out.append(_SegView(*head, getattr(layer, f"seg{i}_qdata"), None,
                                getattr(layer, f"seg{i}_zero"),
                                getattr(layer, f"seg{i}_scale_codes"),
                                getattr(layer, f"seg{i}_step"), layer._scale_bits[i]))
        else:
            out.append(_SegView(*head, getattr(layer, f"seg{i}_qdata"),
                                getattr(layer, f"seg{i}_scale"), getattr(layer, f"seg{i}_zero")))
    return out


def _pad32(x: torch.Tensor) -> torch.Tensor:
    """x [batch, n] as fp32 rows whose length is a multiple of 32 (the kernels read whole
    32-value chunks; padded columns must be 0): x itself when it already is, else a copy."""
    n = x.shape[1]
    if n % 32 == 0 and x.dtype == torch.float32 and x.is_contiguous():
        return x
    out = torch.zeros((x.shape[0], -(-n // 32) * 32), dtype=torch.float32)
    out[:, :n] = x
    return out


_NATIVE: list = []  # [library or None], filled on first use


def _native() -> Any:
    if not _NATIVE:
        from bitsack.kernels.cpu_build import load

        _NATIVE.append(load())
    return _NATIVE[0]


def _reset_native() -> None:
    """Forget the loaded library (tests switch between the C++ and torch paths)."""
    from bitsack.kernels.cpu_build import reset

    _NATIVE.clear()
    reset()


def _scale_ptrs(seg: _SegView) -> tuple[int, int, int, int]:
    """The kernels' scale arguments: (fp16 scales, codes, steps, S), absent ones 0."""
    if seg.scale is not None:
        return seg.scale.data_ptr(), 0, 0, 0
    return 0, seg.codes.data_ptr(), seg.step.data_ptr(), seg.scale_bits


def _dequant_tile(lib: Any, seg: _SegView, r0: int, r1: int, buf: torch.Tensor,
                  threads: int, params: tuple | None = None) -> torch.Tensor:
    """Rows r0:r1 of a segment's weight in fp32, written into ``buf`` (a reused buffer);
    without the library, ``params`` are the segment's fp16 scales and unpacked zero points
    ``[rows, groups]``."""
    out = buf[:(r1 - r0) * seg.cols].view(r1 - r0, seg.cols)
    if seg.bits == 16:
        out.copy_(seg.q[r0:r1])
    elif lib is not None:
        lib.bs_dequant(seg.bits, seg.q.data_ptr(), *_scale_ptrs(seg), seg.zero.data_ptr(),
                       seg.rows, seg.cols, seg.group_size, r0, r1, out.data_ptr(), seg.cols,
                       threads)
    else:
        from bitsack.kernels.formats import unpack_torch
        from bitsack.kernels.grid import dequantize_codes

        scale, zeros = params
        codes = unpack_torch(seg.q[r0:r1], seg.bits, seg.cols, dtype=torch.float32)
        out.copy_(dequantize_codes(codes, scale[r0:r1], zeros[r0:r1], seg.group_size))
    return out


@register_backend
class CpuBackend:
    """Fused packed GEMV for decode, tiled dequantize + BLAS for prefill (CPU)."""

    name = "cpu"

    def __init__(self) -> None:
        self._local = threading.local()  # one reused tile buffer per calling thread

    def is_available(self) -> bool:
        return True  # the torch path runs wherever the C++ library cannot

    @staticmethod
    def native() -> Any:
        """The C++ library (``cpu_build.load()``), or None: the pure-torch path is used."""
        return _native()

    def numerics(self, layer: Any, x: torch.Tensor) -> Numerics:
        if x.device.type != "cpu":
            return get_backend("torch").numerics(layer, x)
        out_u, out_eta = output_rounding(x.dtype)
        x_u, _ = rounding(x.dtype, torch.float32)  # nonzero only for float64 inputs
        # ŵ exact in fp32, fp32 products and sums in any order, the bias one more fp32 term
        return Numerics(x_u=x_u, out_u=out_u, out_eta=out_eta)

    def _buffer(self, n: int) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < n:
            buf = self._local.buf = torch.empty(n, dtype=torch.float32)
        return buf

    def linear(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        # (decode calls this for every matrix of every token: the common case is kept lean)
        if not x.is_cpu or getattr(layer, "cache_weight", False):
            # GPU tensors, or a layer that keeps its dense weight: one matmul
            return get_backend("torch").linear(layer, x)
        xf = x if x.dim() == 2 else flat_input(layer, x)
        if not xf.is_floating_point():
            raise ValidationError("x", f"dtype {x.dtype}; valid: a floating-point tensor")
        x32 = xf if xf.dtype == torch.float32 else xf.to(torch.float32)
        batch = x32.shape[0]
        y = torch.empty((batch, layer.out_features), dtype=torch.float32)
        if batch:
            lib = _native()
            if batch <= GEMV_MAX_BATCH and lib is not None:
                self._gemv(lib, layer, x32, y)
            else:
                self._tiled(lib, layer, x32, y)
        bias = layer._buffers.get("bias")
        if bias is not None:
            y += bias.to(torch.float32)
        if x.dtype != torch.float32:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], layer.out_features)

    @staticmethod
    def _plan(layer: Any) -> list[tuple]:
        """Per segment, the kernel's constant arguments (pointers as ints), cached on the
        module. ``PackedLinear`` drops it when its buffers move or are reloaded; a buffer
        replaced by assignment is caught here (the plan keeps the tensors it points into and
        is rebuilt when any of them is no longer the module's buffer)."""
        cached = layer.__dict__.get("_cpu_plan")
        if cached is not None:
            bufs = layer._buffers
            # same tensor objects at the same addresses (a deep copy of the module copies the
            # plan too, with new tensors at new addresses: rebuilt)
            if all(bufs.get(name) is t and t.data_ptr() == ptr for name, t, ptr in cached[0]):
                return cached[1]
        plan, held = [], []
        for i, seg in enumerate(_seg_views(layer)):
            if seg.bits == 16:
                ptrs = (seg.q.data_ptr(), 0, 0, 0, 0, 0)
                held.append((f"seg{i}_weight", seg.q, ptrs[0]))
            else:
                ptrs = (seg.q.data_ptr(), *_scale_ptrs(seg), seg.zero.data_ptr())
                named = {"qdata": seg.q, "scale": seg.scale, "zero": seg.zero,
                         "scale_codes": seg.codes, "step": seg.step}
                held += [(f"seg{i}_{f}", t, t.data_ptr()) for f, t in named.items()
                         if t is not None]
            plan.append((*seg[:7], *ptrs))
        layer.__dict__["_cpu_plan"] = (held, plan)
        return plan

    def _gemv(self, lib: Any, layer: Any, x32: torch.Tensor, y: torch.Tensor) -> None:
        threads = torch.get_num_threads()
        batch = x32.shape[0]
        plan = self._plan(layer)
        xfull = _pad32(x32.contiguous()) if plan[0][0] == 0 else None
        yp, ys = y.data_ptr(), y.shape[1]
        first_col = True
        for axis, start, stop, bits, g, rows, cols, qp, sp, cp, stp, sb, zp in plan:
            if axis == 0:
                xs, y_off, acc = xfull, start, 0
            else:  # the segment's own columns, padded with zeros
                xs, y_off, acc = _pad32(x32[:, start:stop]), 0, 0 if first_col else 1
                first_col = False
            if bits == 16:
                lib.bs_gemv_fp16(qp, rows, cols, xs.data_ptr(), batch, xs.shape[1], yp, ys,
                                 y_off, acc, threads)
            else:
                lib.bs_gemv(bits, qp, sp, cp, stp, sb, zp, rows, cols, g, xs.data_ptr(), batch,
                            xs.shape[1], yp, ys, y_off, acc, threads)

    def _tiled(self, lib: Any, layer: Any, x32: torch.Tensor, y: torch.Tensor) -> None:
        threads = torch.get_num_threads()
        first_col = True
        for seg in _seg_views(layer):
            axis, start, stop, bits, g, rows, cols, *_ = seg
            tile = max(1, CPU_TILE_ELEMENTS // cols)
            buf = self._buffer(min(tile, rows) * cols)
            xs = x32 if axis == 0 else x32[:, start:stop]
            # the torch fallback unpacks the zero points (and expands scale codes) once per
            # segment, not per tile
            params = None if lib is not None or bits == 16 else (
                seg.scales(), unpack_zero(seg.zero, bits, rows, num_groups(cols, g),
                                          dtype=torch.float32))
            for r0 in range(0, rows, tile):
                r1 = min(r0 + tile, rows)
                w = _dequant_tile(lib, seg, r0, r1, buf, threads, params)
                if axis == 0:
                    y[:, start + r0:start + r1] = xs @ w.T
                elif first_col:
                    y[:, r0:r1] = xs @ w.T
                else:
                    y[:, r0:r1] += xs @ w.T
            if axis == 1:
                first_col = False
