"""Weight quantizers behind a small registry: min-max round-to-nearest (``rtn``) and GPTQ.

Both produce the packed format's numbers: codes on the min-max grid with fp16 scale and zero
per group (``bitsack.kernels.grid``, where the grid and its error bound are derived); GPTQ
(``bitsack.kernels.gptq``) chooses the codes to minimize the layer's output error instead of
rounding each weight to the nearest. This module is the registry (``get_quantizer``), the
``fake_quantize`` round trip profiling uses, and the public names of both modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from bitsack.errors import ValidationError
from bitsack.kernels.formats import check_bits
from bitsack.kernels.gptq import GPTQ
from bitsack.kernels.grid import (
    QuantizedTensor,
    check_weight,
    dequantize_codes,
    minmax_params,
    rtn_quantize,
)
from bitsack.kernels.segments import GPTQResult, SegmentSpec

__all__ = [
    "GPTQ",
    "GPTQResult",
    "QuantizedTensor",
    "Quantizer",
    "SegmentSpec",
    "available_quantizers",
    "dequantize_codes",
    "fake_quantize",
    "get_quantizer",
    "minmax_params",
    "register_quantizer",
    "rtn_quantize",
]


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
        return check_weight(w).half().to(w.dtype)
    qt = get_quantizer(method).quantize(w, bits, group_size, hessian=hessian, **options)
    return qt.dequantize(w.dtype).to(w.device)
