"""NumPy ports of the CUDA kernels' per-thread logic, for CPU tests of their indexing.

Each function takes a launch exactly as the GPU gets it — ``grid``, ``block`` and the kernel's
argument list in order (tensors or arrays for pointers, ints for ints) — and walks the same
(block, thread) loops, computing each thread's row / lane / chunk and reading words, scales and
zeros through the same index expressions as its kernel in ``kernels/cuda``. An indexing
mistake in the kernel or in the launch plan (``bitsack.kernels.backends.CupyBackend``), made
again here in the same shape, shows up on a CPU as a disagreement with the reference backend;
a grid too small leaves outputs unwritten.

Arithmetic is float32 like the kernel's, but NumPy does not fuse multiply-adds, so results
agree with the GPU within the fp32 bound, not bit for bit. Slow (Python loops): small shapes.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

__all__ = ["emulate_launch"]

_WARP = 32


def _np(a: Any) -> np.ndarray:
    """A NumPy view of a CPU tensor or array (uint32 tensors via int32: same bits)."""
    if type(a).__module__.startswith("torch"):
        import torch

        if a.dtype == torch.uint32:
            a = a.view(torch.int32)
        return a.numpy()
    return np.asarray(a)


def _flat(a: Any) -> np.ndarray:
    arr = _np(a)
    if not arr.flags["C_CONTIGUOUS"]:
        raise ValueError("emulated kernels take contiguous buffers (as pointers)")
    return arr.reshape(-1)


def _extract(words: np.ndarray, k: int, bits: int) -> int:
    """``bs_extract<BITS>``: value k of a chunk from its ``bits`` words."""
    bit = k * bits
    wi, sh = bit >> 5, bit & 31
    v = int(words[wi]) >> sh
    if sh + bits > 32:
        v |= (int(words[wi + 1]) << (32 - sh)) & 0xFFFFFFFF
    return v & ((1 << bits) - 1)


def _zero_at(zflat: np.ndarray, i: int, bits: int) -> np.float32:
    """``bs_zero_at<BITS>``: zero point i (row·ngroups + group) of a zero-point stream (the
    stream is one long bit stream: value i is extracted as value k of a chunk is)."""
    return np.float32(_extract(zflat, i, bits))


class _Scales:
    """``BsScales``: a group's scale from the fp16 scales (S = 0) or as the S-bit code of
    group i = row·ngroups + g times the row's fp16 step of the super-block holding the
    group's first column; only the buffers S selects are read."""

    def __init__(self, scale: Any, codes: Any, step: Any, S: int, cols: int,
                 group_size: int) -> None:
        self.S, self.group_size = S, group_size
        self.ngroups = (cols + group_size - 1) // group_size
        self.nsuper = (cols + 255) // 256
        if S == 0:
            self.fp16 = _flat(scale).view(np.float16)
        else:
            self.codes = _flat(codes).view(np.uint32)
            self.step = _flat(step).view(np.float16)

    def at(self, row: int, g: int) -> np.float32:
        if self.S == 0:
            return np.float32(self.fp16[row * self.ngroups + g])
        k = np.float32(_extract(self.codes, row * self.ngroups + g, self.S))
        return np.float32(k * np.float32(
            self.step[row * self.nsuper + (g * self.group_size) // 256]))


def _load_chunk(qflat: np.ndarray, row_base: int, wpr: int, c: int, bits: int) -> np.ndarray:
    """``bs_load_chunk<BITS>``: the chunk's words, 0 past the row's end."""
    words = np.zeros(bits, dtype=np.uint32)
    for i in range(bits):
        idx = c * bits + i
        words[i] = qflat[row_base + idx] if idx < wpr else 0
    return words


def _warp_sum(lane_acc: np.ndarray) -> np.ndarray:
    """``__shfl_down_sync`` tree over offsets 16, 8, 4, 2, 1: what lane 0 ends with."""
    v = lane_acc.copy()
    off = 16
    while off:
        v[: _WARP - off] = v[: _WARP - off] + v[off:]
        off >>= 1
    return v[0]


def _store(yflat: np.ndarray, idx: int, v: np.float32, accumulate: int) -> None:
    yflat[idx] = (yflat[idx] + v) if accumulate else v


def _gemv(grid, block, args, bits: int) -> None:
    (qdata, scale, codes, step, S, zero, x, y, rows, cols, group_size, batch, x_stride,
     x_offset, y_stride, y_offset, accumulate) = args
    qflat = _flat(qdata).view(np.uint32)
    sc, zflat = _Scales(scale, codes, step, S, cols, group_size), _flat(zero).view(np.uint32)
    xflat, yflat = _flat(x), _flat(y)
    assert xflat.dtype == np.float32 and yflat.dtype == np.float32
    wpr = (bits * cols + 31) // 32
    nchunks = (cols + 31) // 32
    chunk_in_group = group_size % 32 == 0
    warps = block[0] // _WARP
    for bx in range(grid[0]):
        for w in range(warps):
            row = bx * warps + w
            if row >= rows:
                continue
            zrow = row * sc.ngroups
            lane_acc = np.zeros((_WARP, batch), dtype=np.float32)
            for lane in range(_WARP):
                for c in range(lane, nchunks, _WARP):
                    words = _load_chunk(qflat, row * wpr, wpr, c, bits)
                    if chunk_in_group:
                        g = (c * 32) // group_size
                        s, z = sc.at(row, g), _zero_at(zflat, zrow + g, bits)
                    for k in range(32):
                        j = c * 32 + k
                        if j >= cols:
                            continue
                        if not chunk_in_group:
                            g = j // group_size
                            s, z = sc.at(row, g), _zero_at(zflat, zrow + g, bits)
                        wv = np.float32(s * (np.float32(_extract(words, k, bits)) - z))
                        for b in range(batch):
                            lane_acc[lane, b] += wv * xflat[x_offset + j + b * x_stride]
            total = _warp_sum(lane_acc)
            for b in range(batch):
                _store(yflat, b * y_stride + y_offset + row, total[b], accumulate)


def _gemv_fp16(grid, block, args) -> None:
    (weight, x, y, rows, cols, batch, x_stride, x_offset, y_stride, y_offset, accumulate) = args
    wflat = _flat(weight).view(np.float16)
    xflat, yflat = _flat(x), _flat(y)
    warps = block[0] // _WARP
    for bx in range(grid[0]):
        for w in range(warps):
            row = bx * warps + w
            if row >= rows:
                continue
            lane_acc = np.zeros((_WARP, batch), dtype=np.float32)
            for lane in range(_WARP):
                for j in range(lane, cols, _WARP):
                    wv = np.float32(wflat[row * cols + j])
                    for b in range(batch):
                        lane_acc[lane, b] += wv * xflat[b * x_stride + x_offset + j]
            total = _warp_sum(lane_acc)
            for b in range(batch):
                _store(yflat, b * y_stride + y_offset + row, total[b], accumulate)


def _dequant(grid, block, args, bits: int, out_half: int) -> None:
    qdata, scale, codes, step, S, zero, out, rows, cols, group_size, out_stride, col_offset = args
    qflat = _flat(qdata).view(np.uint32)
    sc, zflat = _Scales(scale, codes, step, S, cols, group_size), _flat(zero).view(np.uint32)
    oflat = _flat(out)
    assert oflat.dtype == (np.float16 if out_half else np.float32)
    nchunks = (cols + 31) // 32
    wpr = (bits * cols + 31) // 32
    for t in range(grid[0] * block[0]):
        if t >= rows * nchunks:
            continue
        row, c = divmod(t, nchunks)
        words = _load_chunk(qflat, row * wpr, wpr, c, bits)
        base = row * out_stride + col_offset
        for k in range(32):
            j = c * 32 + k
            if j >= cols:
                continue
            g = j // group_size
            s = sc.at(row, g)
            z = _zero_at(zflat, row * sc.ngroups + g, bits)
            oflat[base + j] = np.float32(s * (np.float32(_extract(words, k, bits)) - z))


def _dequant_fp16(grid, block, args, out_half: int) -> None:
    weight, out, rows, cols, out_stride, col_offset = args
    wflat = _flat(weight).view(np.float16)
    oflat = _flat(out)
    assert oflat.dtype == (np.float16 if out_half else np.float32)
    for t in range(grid[0] * block[0]):
        if t >= rows * cols:
            continue
        row, j = divmod(t, cols)
        oflat[row * out_stride + col_offset + j] = wflat[t]


_EXPR = re.compile(r"^(\w+)(?:<([\d, ]+)>)?$")


def emulate_launch(kernel: str, grid: tuple[int, ...], block: tuple[int, ...],
                   args: tuple[Any, ...]) -> None:
    """Run the kernel named by its NVRTC name expression (``bs_gemv<3>``) on CPU buffers."""
    m = _EXPR.match(kernel)
    if not m:
        raise ValueError(f"kernel: {kernel!r} is not a name expression")
    name = m.group(1)
    tpl = [int(v) for v in m.group(2).split(",")] if m.group(2) else []
    if name == "bs_gemv":
        _gemv(grid, block, args, *tpl)
    elif name == "bs_gemv_fp16":
        _gemv_fp16(grid, block, args)
    elif name == "bs_dequant":
        _dequant(grid, block, args, *tpl)
    elif name == "bs_dequant_fp16":
        _dequant_fp16(grid, block, args, *tpl)
    else:
        raise ValueError(f"kernel: {kernel!r} has no emulation")
