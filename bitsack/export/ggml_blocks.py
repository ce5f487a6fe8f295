"""ggml block encodings of bitsack's grids: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants Q2_K,
Q3_K, Q6_K (and F16 / F32 for dense weights).

Every packed matrix is first one grid (``bitsack.export.common``), then written block by
block in the ggml type of fewest bytes that holds it exactly (``kernels.formats.gguf_type``,
the table the solver prices with). Block layouts are ggml's (``ggml/src/ggml-common.h``;
dequantization in ``ggml-quants.c``), little-endian; ``s·(q − z)`` is bitsack's weight, ``c =
q − z`` its centred code, ``z₀ = 2**(bits − 1)`` a symmetric grid's fixed zero point:

=======  ===================================  ============================================
type     block (bytes / weights)              mapping                          exact?
=======  ===================================  ============================================
Q4_0     d; 16 nibbles (18 / 32)              ``d = s``, ``q' = c + 8``         yes
Q5_0     d; 4 high-bit bytes; 16 (22 / 32)    ``d = s``, ``q' = c + 16``        yes
Q4_1     d, m; 16 nibbles (20 / 32)           ``d = s``, ``m = fp16(−s·z)``,    up to m
                                              ``q' = q``                        (below)
Q5_1     d, m; 4; 16 (24 / 32)                as Q4_1                          up to m
Q8_0     d; 32 int8 (34 / 32)                 ``d = s``, ``q' = c``             where
                                              (else re-rounded, 8-bit min-max)  |c| fits
Q2_K     16 scale/min nibbles; 64; d, dmin    ``d = step``, ``sc = m = k``,     yes
         (84 / 256)                           ``dmin = z₀·d``, ``q' = q``
Q3_K     32 hmask; 64; 12 scale bytes; d      ``d = step``, ``sc = k + 32``,    yes
         (110 / 256)                          ``q' = c + 4``
Q6_K     128 ql; 64 qh; 16 int8 sc; d         ``d = step``, ``sc = k``,         yes
         (210 / 256)                          ``q' = c + 32``
=======  ===================================  ============================================

(k: the scale code of a double-quantized group, ``s = k·step``, with one fp16 step per row
and 256 columns: exactly a K-quant's super-block scale times its sub-block scales.) Which
grids each type holds is ``kernels.formats.gguf_holds``: a centred type holds every grid
whose ``c`` stays in its range (Q4_0: any grid of 1–3 bits, a symmetric one of 4), the
K-quants need symmetric grids (Q2_K 2 bits, Q3_K 3) with scale codes of at most 4 / 5 bits,
groups of whole 16-weight sub-blocks and rows of whole 256-weight super-blocks. Every product
ggml forms (``d·sc``, then ``·q'``, and Q2_K's ``− dmin·m``) is exact in fp32, so a weight
read back is bitsack's to the bit.

``m = −s·z`` of Q4_1 / Q5_1 is rounded to fp16 once: each weight moves by ``|fp16(m) − m| ≤
2⁻¹¹·|m| ≤ 2⁻¹¹·(2^b − 1)·s`` — under 1/136 of a quantization step at 4 bits (0 where ``s·z``
is an fp16 number, e.g. z = 0). The 8-bit re-rounding moves a weight by at most ``d/2``; the
number of re-rounded blocks and the largest change are reported in ``notes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bitsack.errors import ValidationError
from bitsack.export.common import DenseMatrix, ExportError, GridMatrix
from bitsack.kernels.formats import (
    GGUF_BLOCK,
    GGUF_BLOCK_BYTES,
    GGUF_SUPER,
    gguf_type,
)

__all__ = ["BLOCK_BYTES", "QK", "Encoded", "encode", "encode_q2_k", "encode_q3_k",
           "encode_q4_0", "encode_q4_1", "encode_q5_0", "encode_q5_1", "encode_q6_k",
           "encode_q8_0"]

#: ggml block: weights per block of every quantized type written here.
QK = GGUF_BLOCK

_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_Q5_0 = np.dtype([("d", "<f2"), ("qh", "<u4"), ("qs", "u1", (16,))])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])
_Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", (16,))])
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])
_Q2_K = np.dtype([("scales", "u1", (16,)), ("qs", "u1", (64,)), ("d", "<f2"),
                  ("dmin", "<f2")])
_Q3_K = np.dtype([("hmask", "u1", (32,)), ("qs", "u1", (64,)), ("scales", "u1", (12,)),
                  ("d", "<f2")])
_Q6_K = np.dtype([("ql", "u1", (128,)), ("qh", "u1", (64,)), ("scales", "i1", (16,)),
                  ("d", "<f2")])

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


def _centred(m: GridMatrix, type_name: str, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred codes ``c = q − z`` ``[rows, nb, 32]`` (int16) and the fp16 scale of each block
    ``[rows, nb]``, checked to lie in ``[−half, half − 1]``."""
    _check_blocks_in_groups(m, type_name)
    q, s, z = _blocks(m)
    c = q.astype(np.int16) - z.astype(np.int16)[:, :, None]
    _check_range(m, type_name, c, half)
    return c, s


def _check_range(m: GridMatrix, type_name: str, c: np.ndarray, half: int) -> None:
    if c.size and (int(c.min()) < -half or int(c.max()) > half - 1):
        raise ExportError(m.name, f"codes minus zero points span {int(c.min())}..{int(c.max())}"
                          f"; {type_name} holds {-half}..{half - 1}; valid: a grid "
                          "kernels.formats.gguf_holds admits")


def _nibbles(v: np.ndarray) -> np.ndarray:
    """ggml's nibble order of 32 values: byte j holds value j (low) and j + 16 (high)."""
    return v[..., :16] | (v[..., 16:] << 4)


def _high_bits(v: np.ndarray) -> np.ndarray:
    """Bit 4 of value j of 32 values in bit j of a uint32 (Q5_0 / Q5_1's ``qh``)."""
    high = ((v >> 4) & 1).astype(np.uint32)
    return (high << np.arange(QK, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)


def encode_q4_0(m: GridMatrix) -> Encoded:
    """Q4_0 blocks of a grid whose ``c = q − z`` lies in −8..7: ``d = s``, ``q' = c + 8``."""
    c, s = _centred(m, "Q4_0", 8)
    out = np.zeros(c.shape[:2], dtype=_Q4_0)
    out["d"] = s
    out["qs"] = _nibbles((c + 8).astype(np.uint8))
    return _encoded("Q4_0", out)


def encode_q5_0(m: GridMatrix) -> Encoded:
    """Q5_0 blocks of a grid whose ``c`` lies in −16..15: ``d = s``, ``q' = c + 16``."""
    c, s = _centred(m, "Q5_0", 16)
    v = (c + 16).astype(np.uint8)
    out = np.zeros(c.shape[:2], dtype=_Q5_0)
    out["d"] = s
    out["qs"] = _nibbles(v & 0x0F)
    out["qh"] = _high_bits(v)
    return _encoded("Q5_0", out)


def _super_blocks(m: GridMatrix, type_name: str, top: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Codes and centred codes ``[rows, nsb, 256]``, the super-block scales ``d`` (the
    steps, fp16 ``[rows, nsb]``) and the scale code of each 16-weight sub-block ``[rows, nsb,
    16]`` (int64, checked: ``k·d`` is the group's scale exactly, ``1 ≤ k ≤ top``)."""
    rows, cols = m.shape
    if cols % GGUF_SUPER or m.step is None or m.group_size % 16:
        raise ExportError(m.name, f"{type_name} needs rows of whole super-blocks of "
                          f"{GGUF_SUPER}, groups of whole 16-weight sub-blocks and scale codes "
                          f"on steps per {GGUF_SUPER} columns; valid: a grid "
                          "kernels.formats.gguf_holds admits")
    nsb = cols // GGUF_SUPER
    g = (np.arange(nsb * 16) * 16) // m.group_size  # the group of each sub-block
    s = m.scale[:, g].astype(np.float64).reshape(rows, nsb, 16)
    d = m.step[:, :nsb]
    k = np.rint(s / d.astype(np.float64)[:, :, None])
    if not (k * d.astype(np.float64)[:, :, None] == s).all() or k.min(initial=1) < 1 \
            or k.max(initial=1) > top:
        raise ExportError(m.name, f"a scale is not k·step for an integer k in 1..{top}; "
                          f"{type_name} stores sub-block scales so; valid: scale codes of at "
                          f"most {top.bit_length()} bits")
    q = m.codes.reshape(rows, nsb, GGUF_SUPER)
    z = m.zero[:, m.group_index()].astype(np.int16).reshape(rows, nsb, GGUF_SUPER)
    return q, q.astype(np.int16) - z, d, k.astype(np.int64)


def _two_bit_planes(v: np.ndarray) -> np.ndarray:
    """Q2_K / Q3_K's low bits: of each half of 128 values, byte l (0..31) holds bits 2j..2j+1
    = the two low bits of value 32j + l, j = 0..3 → ``[..., 64]``."""
    v = (v & 3).astype(np.uint8).reshape(*v.shape[:-1], 2, 4, 32)
    out = v[..., 0, :] | (v[..., 1, :] << 2) | (v[..., 2, :] << 4) | (v[..., 3, :] << 6)
    return out.reshape(*v.shape[:-3], 64)


def encode_q2_k(m: GridMatrix) -> Encoded:
    """Q2_K super-blocks of a symmetric grid of ≤ 2 bits, scale codes ≤ 15: ``d = step``, a
    sub-block's scale and min nibbles both ``k``, ``dmin = z₀·d``, ``q' = q``."""
    q, _, d, k = _super_blocks(m, "Q2_K", 15)
    z0 = 1 << (m.bits - 1)
    if (m.zero != z0).any():
        raise ExportError(m.name, f"zero points other than {z0}; Q2_K stores a symmetric "
                          "grid; valid: grid sym, sym-mse or sym-hmse")
    dmin = d.astype(np.float64) * z0
    if not np.isfinite(dmin.astype(np.float16)).all():
        raise ExportError(m.name, f"a step times {z0} exceeds fp16; Q2_K's dmin holds it")
    out = np.zeros(d.shape, dtype=_Q2_K)
    out["scales"] = (k | (k << 4)).astype(np.uint8)
    out["qs"] = _two_bit_planes(q)
    out["d"] = d
    out["dmin"] = dmin.astype(np.float16)
    return _encoded("Q2_K", out)


def encode_q3_k(m: GridMatrix) -> Encoded:
    """Q3_K super-blocks of a grid whose ``c`` lies in −4..3, scale codes ≤ 31: ``d = step``,
    6-bit sub-block scales ``k + 32`` (ggml subtracts 32), ``q' = c + 4`` (two low bits in
    ``qs``, the third in ``hmask``)."""
    _, c, d, k = _super_blocks(m, "Q3_K", 31)
    _check_range(m, "Q3_K", c, 4)
    v = (c + 4).astype(np.uint8)
    out = np.zeros(d.shape, dtype=_Q3_K)
    hb = (v >> 2).reshape(*v.shape[:-1], 8, 32)  # bit n·4 + j of hmask[l]: value 32(4n+j) + l
    out["hmask"] = (hb << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=-2, dtype=np.uint8)
    out["qs"] = _two_bit_planes(v)
    sc = (k + 32).astype(np.uint8)  # 16 six-bit scales: low nibbles, then the high pairs
    out["scales"][..., :8] = (sc[..., :8] & 0x0F) | ((sc[..., 8:] & 0x0F) << 4)
    hi = sc >> 4
    out["scales"][..., 8:] = hi[..., 0:4] | (hi[..., 4:8] << 2) | (hi[..., 8:12] << 4) \
        | (hi[..., 12:16] << 6)
    out["d"] = d
    return _encoded("Q3_K", out)


def encode_q6_k(m: GridMatrix) -> Encoded:
    """Q6_K super-blocks of a grid whose ``c`` lies in −32..31, scale codes ≤ 127: ``d =
    step``, int8 sub-block scales ``k``, ``q' = c + 32`` (low nibbles in ``ql``, two high
    bits in ``qh``; each half of 128 values in ggml's order: l, l+32, l+64, l+96)."""
    _, c, d, k = _super_blocks(m, "Q6_K", 127)
    _check_range(m, "Q6_K", c, 32)
    v = (c + 32).astype(np.uint8).reshape(*c.shape[:-1], 2, 4, 32)
    low, high = v & 0x0F, v >> 4
    out = np.zeros(d.shape, dtype=_Q6_K)
    ql = np.concatenate([low[..., 0, :] | (low[..., 2, :] << 4),
                         low[..., 1, :] | (low[..., 3, :] << 4)], axis=-1)
    out["ql"] = ql.reshape(*d.shape, 128)
    qh = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) \
        | (high[..., 3, :] << 6)
    out["qh"] = qh.reshape(*d.shape, 64)
    out["scales"] = k.astype(np.int8)
    out["d"] = d
    return _encoded("Q6_K", out)


def encode_q4_1(m: GridMatrix) -> Encoded:
    """Q4_1 blocks of a 1..4-bit grid: ``d = s``, ``m = fp16(−s·z)``, nibbles ``q``."""
    if not 1 <= m.bits <= 4:
        raise ExportError(m.name, f"{m.bits} bits do not fit Q4_1; valid: 1..4")
    q, out, err = _offset_blocks(m, "Q4_1", _Q4_1)
    out["qs"] = _nibbles(q)
    return _encoded("Q4_1", out, max_error=err)


def encode_q5_1(m: GridMatrix) -> Encoded:
    """Q5_1 blocks of a 5-bit grid: as Q4_1, the fifth bit of value j in bit j of ``qh``."""
    if m.bits != 5:
        raise ExportError(m.name, f"{m.bits} bits are not Q5_1's; valid: 5")
    q, out, err = _offset_blocks(m, "Q5_1", _Q5_1)
    out["qs"] = _nibbles(q & 0x0F)
    out["qh"] = _high_bits(q)
    return _encoded("Q5_1", out, max_error=err)


def encode_q8_0(m: GridMatrix) -> Encoded:
    """Q8_0 blocks: exact (``d = s``, ``q8 = q − z``) for every block whose ``q − z`` lies in
    −128..127 (always for ≤ 7 bits and symmetric 8 bits); other blocks are re-rounded to
    their own symmetric grid."""
    _check_blocks_in_groups(m, "Q8_0")
    q, s, z = _blocks(m)
    rows, nb, _ = q.shape
    centred = q.astype(np.int16) - z.astype(np.int16)[:, :, None]
    fits = (centred.min(axis=-1) >= -128) & (centred.max(axis=-1) <= 127)
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


def encode(m: GridMatrix | DenseMatrix, sym: bool = False) -> Encoded:
    """The ggml tensor for one matrix: the type of fewest bytes that holds its grid exactly
    (``gguf_type``, the table the solver prices with; see the module docstring). ``sym``: the
    folder was quantized on a symmetric grid (its zero points are checked)."""
    if isinstance(m, DenseMatrix):
        w = m.weight
        return Encoded("F16" if w.dtype == np.float16 else "F32",
                       w if w.dtype == np.float16 else w.astype(np.float32))
    if sym and (m.zero != (1 << (m.bits - 1))).any():
        raise ExportError(m.name, f"the folder records a symmetric grid, yet a zero point is "
                          f"not {1 << (m.bits - 1)}; valid: an intact bitsack folder")
    try:
        kind = gguf_type(m.bits, m.group_size, m.scale_bits if m.step is not None else None,
                         sym, m.shape[1])
    except ValidationError as exc:
        raise ExportError(m.name, str(exc).removeprefix("grid: ")) from None
    return _ENCODERS[kind](m)


_ENCODERS = {"Q4_0": encode_q4_0, "Q4_1": encode_q4_1, "Q5_0": encode_q5_0,
             "Q5_1": encode_q5_1, "Q8_0": encode_q8_0, "Q2_K": encode_q2_k,
             "Q3_K": encode_q3_k, "Q6_K": encode_q6_k}
