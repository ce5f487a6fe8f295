"""Packed low-bit formats, their exact sizes, and pack/unpack (NumPy and torch).

The size function is the contract with the solver's memory cost model: a memory budget is
bytes on disk, so ``packed_nbytes`` must equal what packing really writes.

Layout of a packed segment (DESIGN.md): ``bits`` and ``group_size`` (along the input dim);
``qdata`` uint32 words, each row packed on its own (rows are word-aligned); an fp16 ``scale``
per group and an integer ``zero`` per group, ``bits`` bits each, packed as one bit stream for
the whole segment; ``w ≈ scale · (q − zero)``. Value k of a row occupies bits
``[k·b, (k+1)·b)`` of the little-endian concatenation of the row's words (3-bit: 32 values in
3 words). 16 bits means untouched: the weights are stored as fp16, no groups.

This module must stay importable without torch (the solver imports it); torch is imported
lazily, only when a torch tensor is packed or unpacked.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import numpy as np

from bitsack.errors import ValidationError

#: Version of the packed layout: 2 stores the zero points at the segment's bit-width (one
#: stream per segment); 1 stored them as fp16. Stage records of ``bitsack run`` include it, so
#: plans priced with another layout's bytes are not reused.
LAYOUT_VERSION = 2

#: Bit-widths with a packed layout (16 = plain fp16).
PACKABLE_BITS = (1, 2, 3, 4, 8, 16)

#: Bytes of a group's scale (fp16). Its zero point takes ``bits`` bits more (``zero_words``).
SCALE_BYTES = 2

#: Columns of a row that share one fp16 step when the scales are double-quantized
#: (``scale_bits``): a super-block, counted from the segment's first column.
SUPER_COLS = 256

#: Significant bits of a scale: with S-bit scale codes the step keeps ``11 − S`` of them, so a
#: scale ``k·d`` (k < 2**S) has at most 11 and is an fp16 value exactly.
FP16_SIGNIFICANT_BITS = 11

#: Scale-code widths with a layout: the step keeps at least 5 significant bits.
SCALE_BITS = (2, 3, 4, 5, 6)

#: How a group's scale and zero are chosen (``bitsack.kernels.grid.group_params``): its
#: min-max range, or the shrunk range of smallest squared error; ``sym…``: the same with the
#: zero point fixed at ``2**(bits − 1)`` (the symmetric grids ggml's Q4_0/Q5_0 and K-quants
#: store exactly, ``bitsack.export.ggml_blocks``). Not stored: all are the same affine
#: grid ``s·(q − z)``, so a packed file does not depend on it.
GRIDS = ("minmax", "mse", "hmse", "sym", "sym-mse", "sym-hmse")


def symmetric(grid: str) -> bool:
    """Whether ``grid`` fixes every zero point at ``2**(bits − 1)``."""
    return check_grid(grid).startswith("sym")


def clip_search(grid: str) -> str:
    """``grid``'s range choice, ``"minmax"``, ``"mse"`` or ``"hmse"`` (symmetric or not)."""
    g = check_grid(grid)
    return "minmax" if g == "sym" else g.removeprefix("sym-")


def check_grid(grid: Any, field: str = "grid") -> str:
    """``grid`` as one of ``GRIDS``.

    Raises:
        ValidationError: anything else (the message names ``field`` and the valid values).
    """
    if not isinstance(grid, str) or grid not in GRIDS:
        raise ValidationError(field, f"{grid!r}; valid: {', '.join(GRIDS)} (a group's "
                              "min-max range, its range shrunk to the smallest squared "
                              "error, or to the smallest error weighted as GPTQ weighs "
                              "its columns; sym: the same with the zero point fixed at "
                              "2**(bits - 1))")
    return grid


class PackFormat(str, enum.Enum):
    """How one segment of a weight matrix is stored.

    ``BITSTREAM_U32`` (bits 1–8): ``qdata`` is a ``uint32`` array ``[rows, words_per_row]``
    with ``words_per_row = ceil(bits·cols/32)``. Row r is a little-endian bit stream: its
    words concatenated as ``word0 | word1 << 32 | word2 << 64 | …``; value k (column k) of the
    row is the unsigned integer in bits ``[k·bits, (k+1)·bits)`` of that stream, so values may
    straddle two words when ``bits`` does not divide 32 (3-bit: 32 values fill exactly 3
    words). Unused high bits of a row's last word are zero. Every row starts on a new word.
    Beside it, ``scale`` and ``zero`` are fp16 ``[rows, ceil(cols / group_size)]``, group
    ``g`` covering columns ``[g·group_size, min((g+1)·group_size, cols))``: any positive group
    size is valid, and when it does not divide ``cols`` the last group is shorter (576 columns
    at group size 128: groups of 128, 128, 128, 128, 64). The columns are those of the
    segment: a column segment ``[start, stop)`` of a matrix is grouped inside itself (its
    groups restart at ``start``), and each segment of a matrix has its own bits and group
    size. ``zero`` holds the groups' zero points, integers ``0..2**bits − 1``, as one bit
    stream for the whole segment: uint32 ``[zero_words(rows, groups, bits)]`` where value
    ``r·groups + g`` (row r, group g) occupies bits ``[(r·groups + g)·bits, … + bits)`` of the
    little-endian concatenation of the words (the layout of one ``qdata`` row of
    ``rows·groups`` values). The weight is ``float32(scale) · (float32(q) − float32(zero))``
    computed in fp32.

    Double-quantized scales (a segment with ``scale_bits`` S, after llama.cpp's K-quants): in
    place of the fp16 scales the segment stores ``scale_codes``, the groups' integer codes k
    in ``1..2**S − 1`` as one stream (the layout of ``zero``), and ``step``, fp16
    ``[rows, ceil(cols / SUPER_COLS)]``: group g of a row has scale ``k·step[row, g·G // 256]``.
    Each step has at most ``11 − S`` significant bits, so every scale is an fp16 value
    exactly, and a reader expands them into the fp16 ``scale`` above.

    ``FP16`` (bits 16): the weights themselves, fp16 ``[rows, cols]``, no groups.
    """

    BITSTREAM_U32 = "bitstream-u32"
    FP16 = "fp16"

    @classmethod
    def for_bits(cls, bits: int) -> PackFormat:
        """The format that stores ``bits``-bit weights."""
        check_bits(bits, allow_16=True)
        return cls.FP16 if bits == 16 else cls.BITSTREAM_U32


def check_bits(bits: Any, *, allow_16: bool = False, field: str = "bits") -> int:
    """Return ``bits`` as an int if it has a packed layout, else raise ``ValidationError``."""
    valid = "1..8 or 16" if allow_16 else "1..8"
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValidationError(field, f"{bits!r} is not an integer; valid: {valid}")
    bits = int(bits)
    if not (1 <= bits <= 8 or (allow_16 and bits == 16)):
        raise ValidationError(field, f"{bits} has no packed layout; valid: {valid}")
    return bits


def words_per_row(cols: int, bits: int) -> int:
    """uint32 words holding one packed row of ``cols`` values at ``bits`` bits."""
    return -(-bits * cols // 32)


def num_groups(cols: int, group_size: int) -> int:
    """Groups of a row of ``cols`` values: ``ceil(cols / group_size)`` (the last may be short)."""
    return -(-cols // group_size)


def zero_words(rows: int, groups: int, bits: int) -> int:
    """uint32 words of a segment's zero-point stream: ``ceil(rows·groups·bits / 32)``."""
    return -(-rows * groups * bits // 32)


def check_scale_bits(scale_bits: Any, field: str = "scale_bits") -> int | None:
    """``scale_bits`` as an int (S-bit double-quantized scales) or None (fp16 scales).

    Raises:
        ValidationError: anything but None or an integer in ``SCALE_BITS``.
    """
    if scale_bits is None:
        return None
    if isinstance(scale_bits, bool) or not isinstance(scale_bits, (int, np.integer)) \
            or int(scale_bits) not in SCALE_BITS:
        raise ValidationError(field, f"{scale_bits!r}; valid: None (fp16 scales; 'fp16' or "
                              "'auto' where a run config resolves it) or one of "
                              f"{', '.join(map(str, SCALE_BITS))} (bits of a group's scale "
                              f"code, times an fp16 step per {SUPER_COLS} columns)")
    return int(scale_bits)


def check_group_size(group_size: Any, field: str = "group_size") -> int:
    """Return ``group_size`` as an int if it is a positive integer, else raise."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) \
            or group_size <= 0:
        raise ValidationError(field, f"{group_size!r}; valid: a positive integer (columns per "
                              "group; need not divide the columns: the last group may be "
                              "shorter)")
    return int(group_size)


def check_tiling(segments: Sequence[Any], rows: int, cols: int) -> int:
    """The axis along which ``segments`` tile a ``rows × cols`` matrix, after checking it:
    all along one axis (0: row ranges, 1: column ranges), contiguous and in order from 0,
    covering it exactly. Segments are anything with ``axis``, ``start`` and ``stop``.

    Raises:
        ValidationError: naming the first segment that breaks the tiling.
    """
    if not segments:
        raise ValidationError("segments", "empty; valid: at least one segment")
    axis = segments[0].axis
    pos = 0
    for i, seg in enumerate(segments):
        if seg.axis != axis:
            raise ValidationError(f"segments[{i}].axis", f"{seg.axis}; valid: {axis} (all "
                                  "segments of one matrix run along one axis)")
        if seg.start != pos:
            raise ValidationError(f"segments[{i}].start", f"{seg.start}; valid: {pos} "
                                  "(segments are contiguous, in order, from 0)")
        pos = seg.stop
    n = rows if axis == 0 else cols
    if pos != n:
        raise ValidationError("segments", f"cover 0:{pos}; valid: exactly 0:{n} "
                              f"({'rows' if axis == 0 else 'columns'})")
    return axis


def packed_nbytes(rows: int, cols: int, bits: int, group_size: int,
                  scale_bits: int | None = None) -> int:
    """Exact bytes of a ``rows × cols`` segment packed at ``bits`` with ``group_size`` groups.

    ``rows · ceil(bits·cols/32) · 4`` bytes of words, ``2`` bytes of fp16 scale per group
    (``rows · ceil(cols/group_size)`` groups; a short last group costs a full group's
    parameters) and ``4 · zero_words(rows, groups, bits)`` bytes of zero points (``bits`` bits
    each, one stream per segment); 16 bits is fp16, ``2·rows·cols``; 0 bits (pruned) is 0.
    At 3 bits and group size 64: 3 + 16/64 + 3/64 = 3.297 bits per weight.

    With ``scale_bits`` S (double-quantized scales) the fp16 scales are replaced by S-bit
    codes, one stream per segment (``4 · zero_words(rows, groups, S)`` bytes), and an fp16
    step per row and super-block of ``SUPER_COLS`` columns (``2 · rows · ceil(cols/256)``):
    3 bits, group size 32, S = 6: 3 + 6/32 + 3/32 + 16/256 = 3.344 bits per weight.

    Raises:
        ValueError: bits not in 0..16, or ``group_size`` not a positive integer
            (a ``bitsack.errors.ValidationError``, which is a ``ValueError``).
    """
    if bits == 0:
        return 0
    if bits == 16:
        return 2 * rows * cols
    if not 1 <= bits <= 8:
        raise ValidationError("bits", f"{bits} has no packed layout; valid: 1..8 or 16")
    group_size = check_group_size(group_size)
    groups = num_groups(cols, group_size)
    words = rows * words_per_row(cols, bits) * 4 + zero_words(rows, groups, bits) * 4
    if check_scale_bits(scale_bits) is None:
        return words + rows * groups * SCALE_BYTES
    return (words + zero_words(rows, groups, scale_bits) * 4
            + rows * num_groups(cols, SUPER_COLS) * SCALE_BYTES)


# --------------------------------------------------------------------------------------------
# target formats: the files the exports write (``bitsack.export``), sized without writing them
#
# Serving engines store one type per tensor, so these sizes are of whole matrices. Each is the
# size the exporter's arrays have (tests export tiny models and compare); the solver's
# ``memory`` cost model (``format=``) prices options with them, so a budget in a target format
# is that file's tensor bytes.
# --------------------------------------------------------------------------------------------

#: Where a plan can go: bitsack's own folder (any mix inside a matrix), or an export.
TARGET_FORMATS = ("bitsack", "compressed-tensors", "gguf")

#: MLP widths of the DeciLM / Nemotron-NAS layout, in which a pruned model is exported to
#: compressed-tensors (vLLM's ``ffn_mult`` rounds up to a multiple of this; the export pads).
DECILM_FFN_MULTIPLE = 256

#: ggml's block of the legacy types (Q4_0 … Q8_0): 32 weights.
GGUF_BLOCK = 32
#: ggml's K-quant super-block: 256 weights (and ``SUPER_COLS``, bitsack's step width).
GGUF_SUPER = 256

#: The ggml types the GGUF export writes: (weights per block, bytes per block), from
#: ``ggml-common.h``: ``block_q4_0`` d fp16 + 16 nibble bytes; ``q4_1`` d, m + 16; ``q5_0`` d
#: + 4 high-bit bytes + 16; ``q5_1`` d, m + 4 + 16; ``q8_0`` d + 32 int8; ``q2_K`` 16 scale
#: bytes + 64 + d, dmin; ``q3_K`` 32 hmask + 64 + 12 scale bytes + d; ``q6_K`` 128 ql + 64
#: qh + 16 int8 scales + d. Not Q4_K / Q5_K: every bitsack grid they hold exactly (symmetric,
#: ``dmin = z₀·d``) Q4_0 / Q5_0 hold too, at the same 4.5 / 5.5 bits per weight.
GGUF_TYPES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
              "Q8_0": (32, 34), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q6_K": (256, 210)}
#: Bytes per block of each type (``GGUF_TYPES``).
GGUF_BLOCK_BYTES = {k: b for k, (_, b) in GGUF_TYPES.items()}

#: Types with one scale per block and codes centred on a fixed offset h (``x = d·(q' − h)``,
#: Q6_K: ``d·sc·(q' − 32)`` per 16): they hold a grid exactly when every ``q − z`` lies in
#: ``[−h, h − 1]`` — a min-max grid of ``b`` bits when ``2**b ≤ h``, a symmetric one when
#: ``2**(b − 1) ≤ h``.
_CENTRED = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128, "Q6_K": 32, "Q3_K": 4}
#: Types with a scale and an offset per block (``x = d·q − m``): any grid of up to b bits.
_OFFSET = {"Q4_1": 4, "Q5_1": 5}
#: K-quants with mins (``x = d·sc·q − dmin·m`` per sub-block): a symmetric grid of up to b
#: bits, ``dmin = z₀·d`` and ``m = sc`` (``z₀ = 2**(b − 1)``, the fixed zero point).
_K_MINS = {"Q2_K": 2}
#: K-quants: (weights per sub-block scale, largest positive scale code): Q2_K's are 4-bit,
#: Q3_K's 6-bit signed (``sc − 32``), Q6_K's int8.
_K_SCALES = {"Q2_K": (16, 15), "Q3_K": (16, 31), "Q6_K": (16, 127)}


def gguf_holds(kind: str, bits: int, group_size: int, scale_bits: int | None, sym: bool,
               cols: int) -> bool:
    """Whether ggml type ``kind`` stores a ``bits``-bit grid exactly (every weight the same
    fp32 number): groups of ``group_size`` (whole blocks or sub-blocks), scale codes of
    ``scale_bits`` bits (K-quants: a scale is ``code·d`` with one fp16 ``d`` per 256, which
    is what bitsack's double-quantized scales are), zero points fixed at ``2**(bits − 1)``
    (``sym``), rows of ``cols`` columns (whole blocks; K-quants: whole super-blocks)."""
    block = GGUF_TYPES[kind][0]
    if cols % block:
        return False
    if kind in _K_SCALES:
        sub, top = _K_SCALES[kind]
        if scale_bits is None or (1 << scale_bits) - 1 > top or group_size % sub \
                or GGUF_SUPER % group_size:
            return False
    elif group_size % GGUF_BLOCK:
        return False
    if kind in _K_MINS:
        return sym and bits <= _K_MINS[kind]
    if kind in _OFFSET:
        return bits <= _OFFSET[kind]
    return (1 << (bits - 1 if sym else bits)) <= _CENTRED[kind]


def gguf_type(bits: int, group_size: int = GGUF_BLOCK, scale_bits: int | None = None,
              sym: bool = False, cols: int = GGUF_BLOCK) -> str:
    """The ggml type the GGUF export stores a ``bits``-bit grid in: the one of fewest bytes
    per weight that holds it exactly (``gguf_holds``; of equal sizes the legacy type, then
    the order of ``GGUF_TYPES``), ``F16`` for 16 bits. Only an 8-bit min-max grid has none:
    it goes to Q8_0, re-rounded where a block's codes leave ±127 around its zero point.

    With fp16 scales, a min-max grid: 1–3 bits Q4_0, 4 Q4_1, 5 Q5_1, 6–8 Q8_0. Symmetric
    (rows of whole super-blocks, S-bit scale codes): 2 bits Q2_K (S ≤ 4), 3 Q3_K (S ≤ 5),
    4 Q4_0, 5 Q5_0, 6 Q6_K, 8 Q8_0.

    Raises:
        ValidationError: bits outside 1..8 and 16, or a grid no type holds (groups or rows
            that are no whole blocks).
    """
    bits = check_bits(bits, allow_16=True)
    if bits == 16:
        return "F16"
    fits = [k for k in GGUF_TYPES if gguf_holds(k, bits, group_size, scale_bits, sym, cols)]
    if fits:
        return min(fits, key=lambda k: (GGUF_BLOCK_BYTES[k] / GGUF_TYPES[k][0],
                                        k.endswith("_K")))
    if bits == 8 and group_size % GGUF_BLOCK == 0 and cols % GGUF_BLOCK == 0:
        return "Q8_0"  # an 8-bit min-max grid: re-rounded where a block's codes do not fit
    raise ValidationError("grid", f"no ggml type holds {bits}-bit groups of {group_size} on "
                          f"{cols}-wide rows exactly; valid: groups and rows of whole blocks "
                          f"of {GGUF_BLOCK} (K-quants: a symmetric grid with scale codes, "
                          f"groups of whole 16-weight sub-blocks, rows of whole {GGUF_SUPER})")


def gguf_nbytes(rows: int, cols: int, bits: int, group_size: int = GGUF_BLOCK,
                scale_bits: int | None = None, sym: bool = False,
                matrix_cols: int | None = None) -> int:
    """Bytes of a ``rows × cols`` matrix (or of ``rows`` rows / a block-aligned column range of
    one) in the GGUF export: ``rows · cols/block · block bytes`` of its ``gguf_type``, 2 per
    weight at 16 bits, 0 when pruned. ``matrix_cols``: the width of the whole rows the range
    lies in, when it is a column range (its type is the matrix's).

    Raises:
        ValidationError: ``cols`` not whole blocks of the type, or bits outside 0..8 and 16.
    """
    if bits == 0:
        return 0
    kind = gguf_type(bits, group_size, scale_bits, sym, matrix_cols or cols)
    if kind == "F16":
        return 2 * rows * cols
    block = GGUF_TYPES[kind][0]
    if cols % block:
        raise ValidationError("cols", f"{cols} is not a multiple of {block}, {kind}'s block; "
                              f"valid: whole blocks of {block} weights per row")
    return rows * (cols // block) * GGUF_BLOCK_BYTES[kind]


#: The ``weight_shape`` tensor (int64 ``[2]``) of every quantized compressed-tensors module.
CT_SHAPE_BYTES = 16


def compressed_tensors_nbytes(rows: int, cols: int, bits: int, group_size: int, *,
                              shape: bool = True) -> int:
    """Bytes of one ``rows × cols`` linear module in the compressed-tensors export
    (``pack-quantized``, bits 1..8): ``weight_packed`` int32 ``[rows, ceil(cols·b/32)]``,
    ``weight_scale`` fp16 ``[rows, cols/G]``, ``weight_zero_point`` int32
    ``[ceil(rows·b/32), cols/G]`` (packed along the rows), and with ``shape`` the
    ``weight_shape`` int64 ``[2]`` (``CT_SHAPE_BYTES``); 16 bits: the fp16 weights; 0 (pruned):
    0.

    Raises:
        ValidationError: ``group_size`` does not divide ``cols`` (the format needs whole
            groups), or bits outside 0..8 and 16.
    """
    if bits == 0:
        return 0
    bits = check_bits(bits, allow_16=True)
    if bits == 16:
        return 2 * rows * cols
    group_size = check_group_size(group_size)
    if cols % group_size:
        raise ValidationError("group_size", f"{group_size} does not divide {cols} columns; "
                              "valid: a group size that divides every row (compressed-tensors "
                              "stores whole groups)")
    groups = cols // group_size
    return (rows * words_per_row(cols, bits) * 4 + rows * groups * 2
            + words_per_row(rows, bits) * groups * 4 + (CT_SHAPE_BYTES if shape else 0))


# --------------------------------------------------------------------------------------------
# pack / unpack
#
# Both work on chunks of 32 values: 32 values of b bits fill exactly b words, so value k of a
# chunk sits at bit offset k·b of the chunk's b words, i.e. word (k·b)//32, shift (k·b)%32, and
# straddles into the next word when shift + b > 32. Rows are padded with zero values to whole
# chunks and the padding words are cut off afterwards (they hold only zeros).
# --------------------------------------------------------------------------------------------


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _check_codes(shape: tuple[int, ...], bits: int) -> None:
    if len(shape) != 2:
        raise ValidationError("codes", f"shape {tuple(shape)} is not 2-D; valid: [rows, cols]")


def pack(codes: Any, bits: int) -> Any:
    """Pack integer codes ``[rows, cols]`` (values ``< 2**bits``) into uint32 words.

    Accepts a NumPy array (returns ``np.uint32``) or a torch tensor (returns ``torch.uint32``
    on the same device). Layout: see ``PackFormat.BITSTREAM_U32``.

    Raises:
        ValidationError: bits outside 1..8, codes not 2-D, or a code does not fit in ``bits``.
    """
    if _is_torch(codes):
        return pack_torch(codes, bits)
    return pack_numpy(np.asarray(codes), bits)


def unpack(qdata: Any, bits: int, cols: int) -> Any:
    """Inverse of ``pack``: uint32 words ``[rows, words]`` -> uint8 codes ``[rows, cols]``."""
    if _is_torch(qdata):
        return unpack_torch(qdata, bits, cols)
    return unpack_numpy(np.asarray(qdata), bits, cols)


def _check_unpack(shape: tuple[int, ...], bits: int, cols: int) -> None:
    if len(shape) != 2:
        raise ValidationError("qdata", f"shape {tuple(shape)} is not 2-D; valid: [rows, words]")
    if cols < 0:
        raise ValidationError("cols", f"{cols} is negative; valid: >= 0")
    if shape[1] != words_per_row(cols, bits):
        raise ValidationError("qdata", f"{shape[1]} words per row do not hold {cols} values of "
                              f"{bits} bits; valid: {words_per_row(cols, bits)} words")


def pack_numpy(codes: np.ndarray, bits: int) -> np.ndarray:
    """NumPy implementation of ``pack``."""
    bits = check_bits(bits)
    _check_codes(codes.shape, bits)
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValidationError("codes", f"values span [{codes.min()}, {codes.max()}], which does "
                              f"not fit in {bits} bits; valid: 0..{(1 << bits) - 1}")
    rows, cols = codes.shape
    chunks = -(-cols // 32)
    padded = np.zeros((rows, chunks * 32), dtype=np.uint64)
    padded[:, :cols] = codes
    vals = padded.reshape(rows, chunks, 32)
    # uint64 accumulators so a value shifted past bit 31 keeps its high part for the next word.
    words = np.zeros((rows, chunks, bits + 1), dtype=np.uint64)
    for k in range(32):
        word, shift = divmod(k * bits, 32)
        v = vals[:, :, k] << np.uint64(shift)
        words[:, :, word] |= v & np.uint64(0xFFFFFFFF)
        words[:, :, word + 1] |= v >> np.uint64(32)
    out = words[:, :, :bits].reshape(rows, chunks * bits)[:, : words_per_row(cols, bits)]
    return np.ascontiguousarray(out.astype(np.uint32))


def unpack_numpy(qdata: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """NumPy implementation of ``unpack``."""
    bits = check_bits(bits)
    _check_unpack(qdata.shape, bits, cols)
    rows, nwords = qdata.shape
    chunks = -(-cols // 32)
    words = np.zeros((rows, chunks * bits), dtype=np.uint64)
    words[:, :nwords] = qdata
    words = words.reshape(rows, chunks, bits)  # a chunk's words side by side: views, no gather
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((rows, chunks, 32), dtype=np.uint8)
    for k in range(32):
        word, shift = divmod(k * bits, 32)
        v = words[:, :, word] >> np.uint64(shift)
        if shift + bits > 32:  # straddles into the next word of the chunk
            v = v | (words[:, :, word + 1] << np.uint64(32 - shift))
        out[:, :, k] = v & mask
    return out.reshape(rows, chunks * 32)[:, :cols].copy()


def pack_torch(codes: Any, bits: int) -> Any:
    """torch implementation of ``pack`` (int64 arithmetic; result viewed as ``torch.uint32``)."""
    import torch

    bits = check_bits(bits)
    _check_codes(tuple(codes.shape), bits)
    rows, cols = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValidationError("codes", f"values span [{int(c.min())}, {int(c.max())}], which "
                              f"does not fit in {bits} bits; valid: 0..{(1 << bits) - 1}")
    chunks = -(-cols // 32)
    vals = torch.nn.functional.pad(c, (0, chunks * 32 - cols)).reshape(rows, chunks, 32)
    words = torch.zeros((rows, chunks, bits + 1), dtype=torch.int64, device=codes.device)
    for k in range(32):
        word, shift = divmod(k * bits, 32)
        v = vals[:, :, k] << shift  # < 2**40: no int64 overflow
        words[:, :, word] |= v & 0xFFFFFFFF
        words[:, :, word + 1] |= v >> 32
    out = words[:, :, :bits].reshape(rows, chunks * bits)[:, : words_per_row(cols, bits)]
    # int64 -> int32 keeps the low 32 bits (two's complement); the view reinterprets them.
    return out.to(torch.int32).contiguous().view(torch.uint32)


def unpack_torch(qdata: Any, bits: int, cols: int, dtype: Any = None) -> Any:
    """torch implementation of ``unpack``; codes as uint8 (or ``dtype``) on qdata's device.

    Works on the words as int32 (torch has no uint32 shifts): an arithmetic right shift drags
    the sign bit in from the top, so only the value's own low bits are kept before anything
    is combined, and the result is the same as with unsigned words.
    """
    import torch

    bits = check_bits(bits)
    _check_unpack(tuple(qdata.shape), bits, cols)
    rows, nwords = qdata.shape
    w = qdata.view(torch.int32) if qdata.dtype == torch.uint32 else qdata
    if w.dtype != torch.int32:
        raise ValidationError("qdata", f"dtype {qdata.dtype}; valid: torch.uint32 or torch.int32")
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        # Values never straddle words: one shift per position within a word.
        per = 32 // bits
        shifts = torch.arange(per, device=w.device, dtype=torch.int32) * bits
        out = ((w.unsqueeze(-1) >> shifts) & mask).reshape(rows, nwords * per)
    else:
        # 64-bit windows: window i of a chunk = its word i | word i+1 << 32 (non-negative
        # int64), which holds every value starting in word i, straddling or not. One gather
        # picks each position's window, one shift and mask extract all 32 values at once.
        chunks = -(-cols // 32)
        words = torch.nn.functional.pad(w, (0, chunks * bits - nwords)).reshape(rows, chunks,
                                                                               bits)
        u = words.to(torch.int64) & 0xFFFFFFFF
        nxt = torch.nn.functional.pad(u[:, :, 1:], (0, 1))
        windows = u | (nxt << 32)
        k = torch.arange(32, device=w.device, dtype=torch.int64) * bits
        out = (windows[:, :, k // 32] >> (k % 32)) & mask
        out = out.reshape(rows, chunks * 32)
    return out[:, :cols].to(dtype or torch.uint8).contiguous()


def pack_zero(zero: Any, bits: int) -> Any:
    """A segment's zero points ``[rows, groups]`` (integers ``0..2**bits − 1`` in any numeric
    dtype, NumPy or torch) as its zero-point stream, uint32 ``[zero_words(rows, groups, bits)]``
    (layout: ``PackFormat.BITSTREAM_U32``).

    Raises:
        ValidationError: a zero point that is not an integer in ``0..2**bits − 1``.
    """
    if len(tuple(zero.shape)) != 2:
        raise ValidationError("zero", f"shape {tuple(zero.shape)} is not 2-D; valid: "
                              "[rows, groups]")
    if _is_torch(zero):
        import torch

        z = zero.to(torch.float64)
        bad = bool((z != torch.round(z)).any()) if z.numel() else False
        flat = z.reshape(1, -1).to(torch.int64)
    else:
        z = np.asarray(zero, dtype=np.float64)
        bad = bool((z != np.round(z)).any())
        flat = z.reshape(1, -1).astype(np.int64)
    if bad:
        raise ValidationError("zero", f"non-integer zero points; valid: integers "
                              f"0..{(1 << check_bits(bits)) - 1} (the min-max grid's)")
    try:
        return pack(flat, bits).reshape(-1)
    except ValidationError as exc:  # values that do not fit in ``bits`` bits
        raise ValidationError("zero", str(exc).removeprefix("codes: ")) from None


def unpack_zero(stream: Any, bits: int, rows: int, groups: int, dtype: Any = None) -> Any:
    """Inverse of ``pack_zero``: the zero points ``[rows, groups]`` (uint8, or ``dtype`` for
    torch) from a segment's zero-point stream.

    Raises:
        ValidationError: the stream does not hold ``rows·groups`` values of ``bits`` bits.
    """
    want = zero_words(rows, groups, bits)
    if tuple(stream.shape) != (want,):
        raise ValidationError("zero", f"shape {tuple(stream.shape)}; valid: [{want}] words "
                              f"({rows}×{groups} zero points of {bits} bits)")
    flat = stream.reshape(1, -1)
    if _is_torch(stream):
        return unpack_torch(flat, bits, rows * groups, dtype=dtype).reshape(rows, groups)
    return unpack_numpy(flat, bits, rows * groups).reshape(rows, groups)
