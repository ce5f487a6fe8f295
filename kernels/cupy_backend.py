"""The ``cupy`` kernel backend: raw CUDA kernels (``kernels/cuda``) launched through CuPy.

For batch ≤ ``GEMV_MAX_BATCH`` rows the mixed-bit GEMV (one launch per segment, fp32
accumulate); for more, a dequantize kernel into a dense fp16 (fp16 activations) or fp32 weight,
then a cuBLAS GEMM through CuPy (fp32 compute). Tensors cross between torch and CuPy with DLPack,
on torch's current stream.

The launches are plain data (``Launch``: source, kernel, grid, block, arguments) built by
``gemv_plan`` / ``dequant_plan``; ``CupyBackend`` runs them on the GPU and
``bitsack.kernels.emulate`` runs the same plans on CPU tensors, which is how CI tests them
without a GPU. CuPy is imported only when a plan runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bitsack.errors import ValidationError
from bitsack.kernels.backend_base import GEMV_MAX_BATCH, flat_input, output_rounding
from bitsack.kernels.bounds import U_FP32, Numerics, rounding, unit_roundoff
from bitsack.kernels.registry import register_backend

__all__ = ["CupyBackend", "Launch", "dequant_plan", "gemv_plan", "launch_prepared",
           "prepare_plan", "run_plan"]


_GEMV_THREADS = 128  # 4 warps = 4 rows per block
_DEQUANT_THREADS = 256


@dataclass(frozen=True)
class Launch:
    """One kernel launch: source, NVRTC name expression, grid, block, arguments in order.

    Pointer arguments are torch tensors (a view's first element is the pointer), int
    arguments Python ints. ``CupyBackend`` runs a plan on the GPU; ``emulate.emulate_launch``
    runs the same plan on CPU tensors, which is how CI tests the plans without a GPU.
    """

    source: str
    kernel: str
    grid: tuple[int, ...]
    block: tuple[int, ...]
    args: tuple[Any, ...]


def gemv_plan(layer: Any, x32: torch.Tensor, y: torch.Tensor) -> list[Launch]:
    """Launches computing ``y = x32 Ŵᵀ`` (fp32 ``[batch, in]`` -> fp32 ``[batch, out]``).

    One launch per segment: a row segment writes its rows of y; a column segment reads its
    columns of x and adds into y (the first one overwrites), in order on one stream.
    """
    batch = x32.shape[0]
    if batch > GEMV_MAX_BATCH:
        raise ValidationError("x", f"{batch} rows; valid: ≤ {GEMV_MAX_BATCH} for the GEMV")
    plan, first_col_segment = [], True
    for seg in layer.segments:
        rows, cols = seg.shape
        if seg.axis == 0:
            x_off, y_off, acc = 0, seg.start, 0
        else:
            x_off, y_off, acc = seg.start, 0, 0 if first_col_segment else 1
            first_col_segment = False
        grid = (-(-rows // (_GEMV_THREADS // 32)),)
        tail = (batch, layer.in_features, x_off, layer.out_features, y_off, acc)
        if seg.bits == 16:
            plan.append(Launch("gemv.cu", "bs_gemv_fp16", grid, (_GEMV_THREADS,),
                               (seg.weight, x32, y, rows, cols, *tail)))
        else:
            plan.append(Launch("gemv.cu", f"bs_gemv<{seg.bits}>", grid, (_GEMV_THREADS,),
                               (seg.qdata, *_scale_args(seg), seg.zero, x32, y, rows, cols,
                                seg.group_size, *tail)))
    return plan


def dequant_plan(layer: Any, w: torch.Tensor) -> list[Launch]:
    """Launches writing the dense weight into ``w`` (fp16 or fp32 ``[out, in]``)."""
    out_half = int(w.dtype == torch.float16)
    plan = []
    for seg in layer.segments:
        rows, cols = seg.shape
        dst = w[seg.start:] if seg.axis == 0 else w  # row segments: pointer to their first row
        col_off = seg.start if seg.axis == 1 else 0
        if seg.bits == 16:
            n = rows * cols
            plan.append(Launch("dequant.cu", f"bs_dequant_fp16<{out_half}>",
                               (-(-n // _DEQUANT_THREADS),), (_DEQUANT_THREADS,),
                               (seg.weight, dst, rows, cols, layer.in_features, col_off)))
        else:
            n = rows * -(-cols // 32)
            plan.append(Launch("dequant.cu", f"bs_dequant<{seg.bits}, {out_half}>",
                               (-(-n // _DEQUANT_THREADS),), (_DEQUANT_THREADS,),
                               (seg.qdata, *_scale_args(seg), seg.zero, dst, rows, cols,
                                seg.group_size, layer.in_features, col_off)))
    return plan


def _scale_args(seg: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The kernels' scale arguments ``(scale, codes, step, S)``: the fp16 scales and S = 0, or
    the S-bit code stream and the steps, read in the kernel (never expanded to fp16 scales).
    The kernel does not read the pointers its S does not select; they are passed as a valid
    buffer of the segment all the same (no null pointers in a plan)."""
    if seg.scale_bits:
        return seg.scale_codes, seg.scale_codes, seg.step, seg.scale_bits
    return seg.scale, seg.scale, seg.scale, 0


def _to_cupy(t: torch.Tensor) -> Any:
    """Zero-copy torch -> CuPy through DLPack (uint32 crosses as int32: same bits)."""
    import cupy

    if t.dtype == torch.uint32:
        t = t.view(torch.int32)
    if not t.is_contiguous():
        raise ValidationError("tensor", "not contiguous; kernels take contiguous buffers")
    return cupy.from_dlpack(t)


def prepare_plan(plan: list[Launch]) -> list[tuple[Any, tuple, tuple, tuple]]:
    """Resolve a plan's kernels and turn its arguments into CuPy arrays / int32 scalars.

    The result can be launched many times (``launch_prepared``), e.g. inside a CUDA graph
    capture, without touching torch or DLPack again.
    """
    from bitsack.kernels.cuda_build import get_function

    return [(get_function(item.source, item.kernel), item.grid, item.block,
             tuple(_to_cupy(a) if isinstance(a, torch.Tensor) else np.int32(a)
                   for a in item.args)) for item in plan]


def launch_prepared(prepared: list[tuple[Any, tuple, tuple, tuple]]) -> None:
    """Launch a prepared plan on the current CuPy stream."""
    for fn, grid, block, args in prepared:
        fn(grid, block, args)


def run_plan(plan: list[Launch]) -> None:
    """Launch a plan with CuPy on the current CuPy stream (call inside ``CupyBackend``'s
    stream context, or with one of your own)."""
    launch_prepared(prepare_plan(plan))


@contextlib.contextmanager
def _cupy_on_torch_stream(device: torch.device) -> Iterator[None]:
    """Make CuPy launch on torch's current stream of ``device`` (so ordering is torch's)."""
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index), \
            cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
        yield


@register_backend
class CupyBackend:
    """Raw CUDA kernels through ``cupy.RawModule`` (GPU only)."""

    name = "cupy"

    def is_available(self) -> bool:
        try:
            import cupy

            return cupy.cuda.runtime.getDeviceCount() > 0 and torch.cuda.is_available()
        except Exception:  # noqa: BLE001 - no driver, no device, no CuPy: not available
            return False

    def numerics(self, layer: Any, x: torch.Tensor) -> Numerics:
        out_u, out_eta = output_rounding(x.dtype)
        x_u, _ = rounding(x.dtype, torch.float32)  # nonzero only for float64 inputs
        rows = x.numel() // max(layer.in_features, 1)
        if rows <= GEMV_MAX_BATCH or x.dtype != torch.float16:
            # GEMV, or GEMM on an fp32 weight: ŵ exact, x exact in fp32, fp32 sum with bias.
            return Numerics(x_u=x_u, out_u=out_u, out_eta=out_eta)
        s_u, s_eta = unit_roundoff(torch.float16)
        d_u, d_eta = unit_roundoff(torch.float16)
        return Numerics(dequant_u=d_u, dequant_eta=d_eta, sum_u=s_u, sum_eta=s_eta,
                        out_u=out_u, out_eta=out_eta, accum_u=U_FP32)

    def linear(self, layer: Any, x: torch.Tensor) -> torch.Tensor:

        if x.device.type != "cuda":
            raise ValidationError("x", f"on {x.device}; valid: a CUDA tensor for backend cupy")
        xf = flat_input(layer, x)
        with _cupy_on_torch_stream(x.device):
            if xf.shape[0] <= GEMV_MAX_BATCH:
                y = self._gemv(layer, xf)
            else:
                y = self._dequant_gemm(layer, xf)
            if layer.bias is not None:
                y = y.to(torch.float32) + layer.bias.to(device=x.device, dtype=torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)

    def _gemv(self, layer: Any, xf: torch.Tensor) -> torch.Tensor:
        x32 = xf.to(torch.float32).contiguous()
        y = torch.empty((x32.shape[0], layer.out_features), dtype=torch.float32,
                        device=xf.device)
        if x32.shape[0]:
            run_plan(gemv_plan(layer, x32, y))
        return y

    def dequantize(self, layer: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The dense weight ``[out, in]`` in fp16 or fp32, built by the dequantize kernels."""
        w = torch.empty((layer.out_features, layer.in_features), dtype=dtype, device=device)
        with _cupy_on_torch_stream(w.device):
            run_plan(dequant_plan(layer, w))
        return w

    def _dequant_gemm(self, layer: Any, xf: torch.Tensor) -> torch.Tensor:
        import cupy
        from cupy._core import _routines_linalg as linalg

        dtype = torch.float16 if xf.dtype == torch.float16 else torch.float32
        w = self.dequantize(layer, dtype, xf.device)
        # fp16 GEMM with fp32 compute; fp32 GEMM without TF32 (the bound assumes fp32 sums).
        linalg.set_compute_type(np.float16, linalg.COMPUTE_TYPE_FP32)
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_PEDANTIC)
        yc = cupy.matmul(_to_cupy(xf.to(dtype).contiguous()), _to_cupy(w).T)
        return torch.from_dlpack(yc)
