"""Compile bitsack's CUDA sources (``kernels/cuda/*.cu``) with NVRTC and load them in CuPy.

Two paths share one source loader:
  - ``compile_ptx`` calls NVRTC directly. It needs no GPU (NVRTC is a compiler library), so
    CI compiles every kernel on a CPU machine.
  - ``get_module`` builds a ``cupy.RawModule`` (which needs a device) once per process and
    source, with every template instantiation requested by name.

Local includes (``#include "common.cuh"``) are inlined by ``load_source`` so neither path
needs an include directory; the sources include no CUDA headers at all.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from bitsack.errors import ValidationError

__all__ = [
    "CUDA_DIR",
    "GEMV_BITS",
    "NVRTC_OPTIONS",
    "compile_ptx",
    "get_function",
    "get_module",
    "kernel_names",
    "load_source",
    "nvrtc_available",
    "sources",
]

CUDA_DIR = Path(__file__).with_name("cuda")
#: Bit-widths with a packed kernel instantiation.
GEMV_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
NVRTC_OPTIONS = ("--std=c++17",)
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.MULTILINE)


def sources() -> list[str]:
    """Names of the compilable sources (``*.cu``) in ``kernels/cuda``."""
    return sorted(p.name for p in CUDA_DIR.glob("*.cu"))


def load_source(name: str) -> str:
    """Text of ``kernels/cuda/<name>`` with local ``#include "x"`` lines inlined (once each)."""
    seen: set[str] = set()

    def expand(fname: str) -> str:
        path = CUDA_DIR / fname
        if not path.is_file():
            raise ValidationError("source", f"{fname!r} is not in {CUDA_DIR}; valid: "
                                  f"{', '.join(sources())}")
        text = path.read_text(encoding="utf-8").replace("#pragma once", "")

        def sub(m: re.Match) -> str:
            inc = m.group(1)
            if inc in seen:
                return ""
            seen.add(inc)
            return expand(inc)

        return _INCLUDE.sub(sub, text)

    return expand(name)


def kernel_names(name: str) -> tuple[str, ...]:
    """The kernel (template instantiation) names a source provides, as NVRTC name expressions."""
    if name == "gemv.cu":
        return tuple(f"bs_gemv<{b}>" for b in GEMV_BITS) + ("bs_gemv_fp16",)
    if name == "dequant.cu":
        return tuple(f"bs_dequant<{b}, {h}>" for b in GEMV_BITS for h in (0, 1)) + (
            "bs_dequant_fp16<0>", "bs_dequant_fp16<1>")
    raise ValidationError("source", f"{name!r} has no kernel list; valid: gemv.cu, dequant.cu")


def nvrtc_available() -> bool:
    """Whether CuPy's NVRTC binding and the NVRTC library can be loaded."""
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return False
    return True


def compile_ptx(name: str, arch: str = "compute_90") -> tuple[str, dict[str, str]]:
    """Compile ``kernels/cuda/<name>`` to PTX with NVRTC (no GPU needed).

    Args:
        name: source file name, e.g. ``gemv.cu``.
        arch: virtual architecture for ``--gpu-architecture``.

    Returns:
        ``(ptx, lowered)``: the PTX text and each kernel name expression's mangled name.

    Raises:
        RuntimeError: compilation failed (the message holds NVRTC's log).
    """
    from cupy.cuda import nvrtc

    src = load_source(name)
    prog = nvrtc.createProgram(src, name, [], [])
    try:
        exprs = kernel_names(name)
        for e in exprs:
            nvrtc.addNameExpression(prog, e)
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", *NVRTC_OPTIONS])
        except nvrtc.NVRTCError as exc:
            raise RuntimeError(f"NVRTC failed on {name}:\n{nvrtc.getProgramLog(prog)}") from exc
        lowered = {e: nvrtc.getLoweredName(prog, e) for e in exprs}
        ptx = nvrtc.getPTX(prog)
        return (ptx.decode() if isinstance(ptx, bytes) else ptx), lowered
    finally:
        nvrtc.destroyProgram(prog)


@functools.cache
def get_module(name: str) -> Any:
    """A ``cupy.RawModule`` of ``kernels/cuda/<name>`` (compiled once per process; needs a GPU)."""
    import cupy

    return cupy.RawModule(code=load_source(name), options=NVRTC_OPTIONS,
                          name_expressions=kernel_names(name))


def get_function(name: str, kernel: str) -> Any:
    """A kernel (by its name expression, e.g. ``bs_gemv<4>``) from source ``name``."""
    return get_module(name).get_function(kernel)
