"""Packed low-bit formats and their exact sizes.

The size function is the contract with the solver's memory cost model: a memory budget is
bytes on disk, so ``packed_nbytes`` must equal what packing really writes.

Layout of a packed segment (DESIGN.md): ``bits`` and ``group_size`` (along the input dim);
``qdata`` uint32 words, each row packed on its own (rows are word-aligned); fp16 ``scale`` and
fp16 ``zero`` per group; ``w ≈ scale · (q − zero)``. Value k of a row occupies bits
``[k·b, (k+1)·b)`` of the little-endian concatenation of the row's words (3-bit: 32 values in
3 words). 16 bits means untouched: the weights are stored as fp16, no groups.
"""

from __future__ import annotations

#: Bit-widths with a packed layout (16 = plain fp16).
PACKABLE_BITS = (1, 2, 3, 4, 8, 16)

#: Bytes of per-group metadata: fp16 scale + fp16 zero.
GROUP_META_BYTES = 4


def words_per_row(cols: int, bits: int) -> int:
    """uint32 words holding one packed row of ``cols`` values at ``bits`` bits."""
    return -(-bits * cols // 32)


def packed_nbytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Exact bytes of a ``rows × cols`` segment packed at ``bits`` with ``group_size`` groups.

    ``rows · ceil(bits·cols/32) · 4`` bytes of words plus ``4`` bytes (fp16 scale + zero) per
    group; 16 bits is fp16, ``2·rows·cols``; 0 bits (pruned) is 0.

    Raises:
        ValueError: bits not in 0..16, or ``group_size`` does not divide ``cols``.
    """
    if bits == 0:
        return 0
    if bits == 16:
        return 2 * rows * cols
    if not 1 <= bits <= 8:
        raise ValueError(f"bits: {bits} has no packed layout; valid: 1..8 or 16")
    if group_size <= 0 or cols % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the {cols} columns; "
                         f"valid: a positive divisor of {cols}")
    return rows * words_per_row(cols, bits) * 4 + rows * (cols // group_size) * GROUP_META_BYTES
