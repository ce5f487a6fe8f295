"""What every kernel backend shares: the protocol, the decode/prefill split, input checks.

The backends themselves are in ``bitsack.kernels.backends`` (``reference``, ``torch``, ``cpu``)
and ``bitsack.kernels.cupy_backend`` (``cupy``); they register in ``bitsack.kernels.registry``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from bitsack.errors import ValidationError
from bitsack.kernels.bounds import Numerics, rounding

__all__ = ["GEMV_MAX_BATCH", "KernelBackend", "flat_input", "output_rounding"]

#: Rows of x up to which the cupy and cpu backends run the GEMV kernel (decode); above:
#: dequant + GEMM.
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


def flat_input(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, in_features]`` after checking its last dim and dtype."""
    if x.shape[-1] != layer.in_features:
        raise ValidationError("x", f"last dim {x.shape[-1]}; valid: {layer.in_features}")
    if not x.is_floating_point():
        raise ValidationError("x", f"dtype {x.dtype}; valid: a floating-point tensor")
    return x.reshape(-1, layer.in_features)


def output_rounding(x_dtype: torch.dtype) -> tuple[float, float]:
    """Rounding of the fp32 result to x's dtype."""
    return rounding(torch.float32, x_dtype) if x_dtype != torch.float64 else (0.0, 0.0)
