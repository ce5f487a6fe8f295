"""ggml block encodings of bitsack's grids: Q4_1, Q5_1, Q8_0 (and F16 / F32 for dense weights).

Every packed matrix is first one grid (``bitsack.export.common``), then written block by
block in the ggml type that holds it best. Block layouts are ggml's
(``ggml/src/ggml-common.h``: ``block_q4_1``, ``block_q5_1``, ``block_q8_0``; dequantization in
``ggml-quants.c``), all blocks of 32 consecutive weights of a row, little-endian:

=========  ==============================  =====================================  =========
bits       ggml type (bytes / 32 weights)  mapping of bitsack's ``s·(q − z)``     exact?
=========  ==============================  =====================================  =========
1–4        Q4_1 (20: d, m fp16; 16 nibble  ``d = s``, ``m = fp16(−s·z)``,          up to m
           bytes, ``x = d·q + m``)          the codes as they are                  (below)
5          Q5_1 (24: d, m, 4 high-bit      same as Q4_1                           up to m
           bytes, 16 nibble bytes)
6, 7       Q8_0 (34: d fp16, 32 int8,      ``d = s``, ``q8 = q − z`` (fits int8)   yes
           ``x = d·q8``)
8          Q8_0                            per block: ``d = s, q8 = q − z`` when   where it
                                           all ``|q − z| ≤ 127``; else re-rounded  fits
                                           (``d = fp16↑(max|w|/127)``)
16         F16                             the fp16 weights                        yes
=========  ==============================  =====================================  =========

Every block has one scale (and offset), so the group size must be a multiple of 32 (and rows a
multiple of 32, ggml's block; a short last group then is too). ``m = −s·z`` is rounded to fp16
once: each weight moves by ``|fp16(m) − m| ≤ 2⁻¹¹·|m| ≤ 2⁻¹¹·(2^b − 1)·s`` — under 1/136 of a
quantization step at 4 bits (0 where ``s·z`` is an fp16 number, e.g. z = 0). The 8-bit
re-rounding moves a weight by at most ``d/2``; the number of re-rounded blocks and the largest
change are reported in ``notes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bitsack.export.common import DenseMatrix, ExportError, GridMatrix
from bitsack.kernels.formats import GGUF_BLOCK, GGUF_BLOCK_BYTES, gguf_type

__all__ = ["BLOCK_BYTES", "QK", "Encoded", "encode", "encode_q4_1", "encode_q5_1",
           "encode_q8_0"]

#: ggml block: weights per block of every quantized type written here.
QK = GGUF_BLOCK

_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])
_Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", (16,))])
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])

#: Bytes per block, as the solver prices them (``kernels.formats.GGUF_BLOCK_BYTES``; a test
#: checks the block dtypes above against it).
BLOCK_BYTES = GGUF_BLOCK_BYTES




@dataclass(frozen=True)
class Encoded:
    """One tensor in a ggml type: ``data`` as the writer takes it, and its deviation.

    Attributes:
        type: ggml type name (``Q4_1``, ``Q8_0``, ``F16``, ``F32``).
        data: uint8 ``[rows, bytes_per_row]`` for block types, else the float array.
        max_error: largest |exported − bitsack| weight (0.0 when exact).
        rerounded_blocks: blocks that had to be re-rounded (Q8_0 of 8-bit codes).
        blocks: blocks in the tensor (0 for float types).
    """

    type: str
    data: np.ndarray
    max_error: float = 0.0
    rerounded_blocks: int = 0
    blocks: int = 0


def _blocks(m: GridMatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes ``[rows, nb, 32]`` and the fp16 (scale, zero) of each block ``[rows, nb]``."""
    rows, cols = m.shape
    if cols % QK:
        raise ExportError(m.name, f"{cols} columns are not a multiple of {QK}, ggml's block; "
                          "valid: rows of a multiple of 32 weights")
    nb = cols // QK
    g_of_block = (np.arange(nb) * QK) // m.group_size
    return (m.codes.reshape(rows, nb, QK), m.scale[:, g_of_block], m.zero[:, g_of_block])


def _min_offsets(m: GridMatrix, s: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, float]:
    """``fp16(−s·z)`` per block and the largest |fp16(m) − m| (s·z is exact in float64)."""
    exact = -(s.astype(np.float64) * z.astype(np.float64))
    if np.abs(exact).max(initial=0.0) > np.finfo(np.float16).max:
        raise ExportError(m.name, f"a group's offset s·z = {np.abs(exact).max():.6g} exceeds "
                          "fp16; valid: |scale·zero| ≤ 65504")
    m16 = exact.astype(np.float16)
    return m16, float(np.abs(m16.astype(np.float64) - exact).max(initial=0.0))


def _check_blocks_in_groups(m: GridMatrix, type_name: str) -> None:
    if m.group_size % QK:
        raise ExportError(m.name, f"{m.bits}-bit group size {m.group_size} is not a multiple of "
                          f"{QK}; {type_name} holds one scale per block of {QK} weights; "
                          "valid: group size 32, 64, 128, ...")


def _offset_blocks(m: GridMatrix, type_name: str, dtype: np.dtype
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """Codes ``[rows, nb, 32]`` and blocks of ``dtype`` with ``d = s``, ``m = fp16(−s·z)``
    filled (the ``x = d·q + m`` types), and the largest change of ``m``."""
    _check_blocks_in_groups(m, type_name)
    q, s, z = _blocks(m)
    out = np.zeros(q.shape[:2], dtype=dtype)
    out["d"] = s
    # a weight is d·q + m with d·q exact in fp32: the change of m is the change of the weight
    out["m"], err = _min_offsets(m, s, z)
    return q, out, err


def _encoded(type_name: str, out: np.ndarray, **facts: Any) -> Encoded:
    rows, nb = out.shape
    return Encoded(type_name, out.view(np.uint8).reshape(rows, -1), blocks=rows * nb, **facts)


def encode_q4_1(m: GridMatrix) -> Encoded:
    """Q4_1 blocks of a 1..4-bit grid: ``d = s``, ``m = fp16(−s·z)``, nibbles ``q``."""
    if not 1 <= m.bits <= 4:
        raise ExportError(m.name, f"{m.bits} bits do not fit Q4_1; valid: 1..4")
    q, out, err = _offset_blocks(m, "Q4_1", _Q4_1)
    out["qs"] = q[:, :, :16] | (q[:, :, 16:] << 4)
    return _encoded("Q4_1", out, max_error=err)


def encode_q5_1(m: GridMatrix) -> Encoded:
    """Q5_1 blocks of a 5-bit grid: as Q4_1, the fifth bit of value j in bit j of ``qh``."""
    if m.bits != 5:
        raise ExportError(m.name, f"{m.bits} bits are not Q5_1's; valid: 5")
    q, out, err = _offset_blocks(m, "Q5_1", _Q5_1)
    low = q & 0x0F
    out["qs"] = low[:, :, :16] | (low[:, :, 16:] << 4)
    high = ((q >> 4) & 1).astype(np.uint32)
    out["qh"] = (high << np.arange(QK, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
    return _encoded("Q5_1", out, max_error=err)


def encode_q8_0(m: GridMatrix) -> Encoded:
    """Q8_0 blocks: exact (``d = s``, ``q8 = q − z``) for every block whose ``|q − z| ≤ 127``
    (always for ≤ 7 bits); other blocks are re-rounded to their own symmetric grid."""
    _check_blocks_in_groups(m, "Q8_0")
    q, s, z = _blocks(m)
    rows, nb, _ = q.shape
    centred = q.astype(np.int16) - z.astype(np.int16)[:, :, None]
    fits = np.abs(centred).max(axis=-1) <= 127
    out = np.zeros((rows, nb), dtype=_Q8_0)
    d = s.copy()
    q8 = np.where(fits[:, :, None], centred, 0).astype(np.int8)
    max_err = 0.0
    n_re = int((~fits).sum())
    if n_re:
        w = s.astype(np.float32)[:, :, None] * centred.astype(np.float32)  # bitsack's weights
        bad = ~fits
        wb = w[bad]  # [n_re, 32]
        amax = np.abs(wb).max(axis=-1).astype(np.float64)
        db = _fp16_round_up(amax / 127.0)
        qb = np.clip(np.rint(wb / db[:, None].astype(np.float32)), -127, 127)
        d[bad] = db.astype(np.float16)
        q8[bad] = qb.astype(np.int8)
        back = db[:, None].astype(np.float32) * qb.astype(np.float32)
        max_err = float(np.abs(back - wb).max())
    out["d"] = d
    out["qs"] = q8
    return _encoded("Q8_0", out, max_error=max_err, rerounded_blocks=n_re)


def _fp16_round_up(x: np.ndarray) -> np.ndarray:
    """The smallest fp16 ≥ x (as float64), so ``|w|/d ≤ 127`` and nothing is clamped."""
    h = x.astype(np.float16)
    low = h.astype(np.float64) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h.astype(np.float64)


def encode(m: GridMatrix | DenseMatrix) -> Encoded:
    """The ggml tensor for one matrix (see the module docstring's table)."""
    if isinstance(m, DenseMatrix):
        w = m.weight
        return Encoded("F16" if w.dtype == np.float16 else "F32",
                       w if w.dtype == np.float16 else w.astype(np.float32))
    # the type table is shared with the solver's GGUF pricing (kernels.formats.gguf_type)
    return _ENCODERS[gguf_type(m.bits)](m)


_ENCODERS = {"Q4_1": encode_q4_1, "Q5_1": encode_q5_1, "Q8_0": encode_q8_0}
