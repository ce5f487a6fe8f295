"""Kernel backends that run a ``PackedLinear``: ``reference``, ``torch``, ``cupy``.

Every backend computes ``y = x Ŵᵀ + b`` for the packed weight Ŵ, and declares its
floating-point recipe (``numerics``) so that ``bitsack.kernels.bounds`` can bound its distance
to the reference for each output:

- ``reference`` — the executable spec: NumPy unpack of the words (``formats.unpack_numpy``),
  fp32 dequantization ``s·(q − z)`` as the format defines it, then a float64 matmul. Its
  ``linear`` returns x's dtype; ``reference_output`` returns the float64 values.
- ``torch`` — dequantize every segment with torch ops and run one matmul. On CPU (and for fp32
  activations anywhere) the weight is exact in fp32 and the matmul runs in fp32; on a GPU with
  fp16/bf16 activations the weight is rounded to the activation dtype and the matmul runs in
  it (cuBLAS, fp32 accumulation assumed: keep
  ``torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction`` and ``..._bf16_...``
  False for the bound to hold).
- ``cupy`` — raw CUDA kernels (``kernels/cuda``): for batch ≤ 8 rows the mixed-bit GEMV (one
  launch per segment, fp32 accumulate); for more, a dequantize kernel into a dense fp16 (fp16
  activations) or fp32 weight, then a cuBLAS GEMM through CuPy (fp32 compute). Tensors cross
  between torch and CuPy with DLPack, on torch's current stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from bitsack.errors import ValidationError
from bitsack.kernels.bounds import U_FP32, Numerics, rounding, unit_roundoff
from bitsack.kernels.formats import unpack_numpy

__all__ = [
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

#: Rows of x up to which the cupy backend runs the GEMV kernel (decode); above: dequant + GEMM.
GEMV_MAX_BATCH = 8


class KernelBackend(Protocol):
    """What a kernel backend provides."""

    name: str

    def is_available(self) -> bool:
        """Whether it can run here (libraries and devices present)."""
        ...

    def linear(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        """``x Ŵᵀ + b`` for a ``PackedLinear`` ``layer``, shape ``[..., out]``, x's dtype."""
        ...

    def numerics(self, layer: Any, x: torch.Tensor) -> Numerics:
        """The floating-point recipe ``linear(layer, x)`` follows (for the error bound)."""
        ...


_BACKENDS: dict[str, KernelBackend] = {}


def register_backend(cls: Callable[[], KernelBackend]) -> Callable[[], KernelBackend]:
    """Class decorator: register an instance under its ``name``."""
    obj = cls()
    _BACKENDS[obj.name] = obj
    return cls


def get_backend(name: str) -> KernelBackend:
    """The backend registered as ``name``."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValidationError("backend", f"{name!r} is unknown; valid: "
                              f"{', '.join(sorted(_BACKENDS))}") from None


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    return [n for n, b in sorted(_BACKENDS.items()) if b.is_available()]


def _flat(layer: Any, x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] != layer.in_features:
        raise ValidationError("x", f"last dim {x.shape[-1]}; valid: {layer.in_features}")
    if not x.is_floating_point():
        raise ValidationError("x", f"dtype {x.dtype}; valid: a floating-point tensor")
    return x.reshape(-1, layer.in_features)


def _out_numerics(x_dtype: torch.dtype) -> tuple[float, float]:
    """Rounding of the fp32 result to x's dtype."""
    return rounding(torch.float32, x_dtype) if x_dtype != torch.float64 else (0.0, 0.0)


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
            s = seg.scale.detach().cpu().numpy().astype(np.float32)[:, gidx]
            z = seg.zero.detach().cpu().numpy().astype(np.float32)[:, gidx]
            part = (s * (codes - z)).astype(np.float64)
        if seg.axis == 0:
            w[seg.start:seg.stop] = part
        else:
            w[:, seg.start:seg.stop] = part
    return w


def reference_output(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """``x Ŵᵀ + b`` in float64 on the CPU: the value every backend is checked against."""
    xf = _flat(layer, x).detach().cpu().to(torch.float64).numpy()
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
        xf = _flat(layer, x)
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
        out_u, out_eta = _out_numerics(x.dtype)
        if compute == torch.float32:
            return Numerics(dequant_u=d_u, dequant_eta=d_eta, x_u=x_u, out_u=out_u,
                            out_eta=out_eta)
        s_u, s_eta = unit_roundoff(compute)
        return Numerics(dequant_u=d_u, dequant_eta=d_eta, x_u=x_u,
                        sum_u=s_u, sum_eta=s_eta, out_u=out_u, out_eta=out_eta)


# ------------------------------------------------------------------------------------------
# cupy
# ------------------------------------------------------------------------------------------

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
                               (seg.qdata, seg.scale, seg.zero, x32, y, rows, cols,
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
                               (seg.qdata, seg.scale, seg.zero, dst, rows, cols,
                                seg.group_size, layer.in_features, col_off)))
    return plan


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
        out_u, out_eta = _out_numerics(x.dtype)
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
        xf = _flat(layer, x)
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
