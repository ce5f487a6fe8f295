"""NumPy ports of the CUDA kernels' per-thread logic, for CPU tests of their indexing.

Each function walks the same (block, warp, lane, chunk, value) loops as its kernel in
``kernels/cuda`` and reads words, scales and zeros through the same index expressions, so an
indexing mistake in the kernel (made again here, in the same shape) shows up on a CPU as a
disagreement with the reference backend. Arithmetic is float32 like the kernel's, but NumPy
does not fuse multiply-adds, so results agree with the GPU within the fp32 bound, not bit for
bit. Slow (Python loops): for small shapes only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["emulate_dequant", "emulate_gemv"]

_WARP = 32


def _extract(words: np.ndarray, k: int, bits: int) -> int:
    """``bs_extract<BITS>``: value k of a chunk from its ``bits`` words."""
    bit = k * bits
    wi, sh = bit >> 5, bit & 31
    v = int(words[wi]) >> sh
    if sh + bits > 32:
        v |= (int(words[wi + 1]) << (32 - sh)) & 0xFFFFFFFF
    return v & ((1 << bits) - 1)


def _load_chunk(qflat: np.ndarray, row_base: int, wpr: int, c: int, bits: int) -> np.ndarray:
    """``bs_load_chunk<BITS>``: the chunk's words, 0 past the row's end."""
    words = np.zeros(bits, dtype=np.uint32)
    for i in range(bits):
        idx = c * bits + i
        words[i] = qflat[row_base + idx] if idx < wpr else 0
    return words


def emulate_gemv(qdata: np.ndarray, scale: np.ndarray, zero: np.ndarray, x: np.ndarray,
                 y: np.ndarray, rows: int, cols: int, group_size: int, batch: int,
                 x_stride: int, x_offset: int, y_stride: int, y_offset: int, accumulate: int,
                 bits: int, threads_per_block: int = 128) -> None:
    """Run ``bs_gemv<bits>`` on flat NumPy buffers (``y`` is updated in place)."""
    qflat = np.ascontiguousarray(qdata).reshape(-1).view(np.uint32)
    sflat = np.ascontiguousarray(scale).reshape(-1).astype(np.float32)
    zflat = np.ascontiguousarray(zero).reshape(-1).astype(np.float32)
    xflat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    yflat = y.reshape(-1)
    warps = threads_per_block // _WARP
    grid = -(-rows // warps)
    wpr = (bits * cols + 31) // 32
    ngroups = cols // group_size
    nchunks = (cols + 31) // 32
    chunk_in_group = group_size % 32 == 0
    for block in range(grid):
        for tid_warp in range(warps):
            row = block * warps + tid_warp
            if row >= rows:
                continue
            lane_acc = np.zeros((_WARP, batch), dtype=np.float32)
            for lane in range(_WARP):
                for c in range(lane, nchunks, _WARP):
                    words = _load_chunk(qflat, row * wpr, wpr, c, bits)
                    if chunk_in_group:
                        g = (c * 32) // group_size
                        s, z = sflat[row * ngroups + g], zflat[row * ngroups + g]
                    for k in range(32):
                        j = c * 32 + k
                        if j >= cols:
                            continue
                        if not chunk_in_group:
                            g = j // group_size
                            s, z = sflat[row * ngroups + g], zflat[row * ngroups + g]
                        w = np.float32(s * (np.float32(_extract(words, k, bits)) - z))
                        for b in range(batch):
                            lane_acc[lane, b] += w * xflat[x_offset + j + b * x_stride]
            # __shfl_down_sync tree: after offsets 16, 8, 4, 2, 1 lane 0 holds the sum.
            v = lane_acc.copy()
            off = 16
            while off:
                v[:_WARP - off] = v[:_WARP - off] + v[off:]
                off >>= 1
            for b in range(batch):
                idx = b * y_stride + y_offset + row
                yflat[idx] = (yflat[idx] + v[0, b]) if accumulate else v[0, b]


def emulate_dequant(qdata: np.ndarray, scale: np.ndarray, zero: np.ndarray, out: np.ndarray,
                    rows: int, cols: int, group_size: int, out_stride: int, col_offset: int,
                    bits: int, out_half: int, threads_per_block: int = 256) -> None:
    """Run ``bs_dequant<bits, out_half>`` on flat NumPy buffers (``out`` updated in place)."""
    qflat = np.ascontiguousarray(qdata).reshape(-1).view(np.uint32)
    sflat = np.ascontiguousarray(scale).reshape(-1).astype(np.float32)
    zflat = np.ascontiguousarray(zero).reshape(-1).astype(np.float32)
    oflat = out.reshape(-1)
    nchunks = (cols + 31) // 32
    wpr = (bits * cols + 31) // 32
    ngroups = cols // group_size
    total = rows * nchunks
    grid = -(-total // threads_per_block)
    for t in range(grid * threads_per_block):
        if t >= total:
            break
        row, c = divmod(t, nchunks)
        words = _load_chunk(qflat, row * wpr, wpr, c, bits)
        base = row * out_stride + col_offset
        for k in range(32):
            j = c * 32 + k
            if j >= cols:
                continue
            g = j // group_size
            s, z = sflat[row * ngroups + g], zflat[row * ngroups + g]
            w = np.float32(s * (np.float32(_extract(words, k, bits)) - z))
            oflat[base + j] = np.float16(w) if out_half else w
