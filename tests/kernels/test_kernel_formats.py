"""Packed format: golden bit patterns, round trips, sizes, errors."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsack.errors import ValidationError
from bitsack.kernels.formats import (
    PackFormat,
    pack,
    pack_numpy,
    pack_torch,
    pack_zero,
    packed_nbytes,
    unpack,
    unpack_numpy,
    unpack_torch,
    unpack_zero,
    words_per_row,
    zero_words,
)


def _np_words(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int32).numpy().view(np.uint32)


# Worked examples, computed by hand from the rule "value k occupies bits [k·b, (k+1)·b) of the
# little-endian concatenation of the row's words".
GOLDEN = [
    # 1 bit, 40 values: ones at k = 0, 2, 3, 31 (word 0) and 32, 39 (word 1 bits 0, 7).
    (1, [[1 if k in (0, 2, 3, 31, 32, 39) else 0 for k in range(40)]],
     [[0x8000000D, 0x00000081]]),
    # 2 bits, 20 values: v0=3, v1=1 (<<2), v2=2 (<<4), v15=3 (<<30); v16=1, v19=2 (<<6).
    (2, [[3, 1, 2] + [0] * 12 + [3, 1, 0, 0, 2]],
     [[0xC0000027, 0x00000081]]),
    # 3 bits: row 0, 32 values in exactly 3 words: v0=5, v1=2 (<<3) -> 0x15; v10=7 straddles
    # words 0/1 (bits 30..32: low bits 0b11 at bits 30-31, high bit at word 1 bit 0); v21=6
    # straddles words 1/2 (bit 63 = 0, bits 64-65 = 0b11); v31=3 at bits 93..95 (<<29 in word 2).
    # Row 1: 32 values of 7 fill words 0..2, and the 3 padding values (0) of row 0 beside
    # them are packed on the same 4-word rows (35 columns -> ceil(105/32) = 4 words).
    (3, [[5, 2] + [0] * 8 + [7] + [0] * 10 + [6] + [0] * 9 + [3] + [0] * 3,
         [7] * 35],
     [[0xC0000015, 0x00000001, 0x60000003, 0x00000000],
      [0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0x000001FF]]),
    # 4 bits, 9 values 1..9: nibbles from the low end.
    (4, [[1, 2, 3, 4, 5, 6, 7, 8, 9]], [[0x87654321, 0x00000009]]),
    # 8 bits, 5 values: bytes from the low end.
    (8, [[0x01, 0xAB, 0xFF, 0x10, 0x7F]], [[0x10FFAB01, 0x0000007F]]),
]


@pytest.mark.parametrize(("bits", "codes", "words"), GOLDEN)
def test_golden_bit_patterns(bits, codes, words):
    codes_np = np.array(codes, dtype=np.uint8)
    want = np.array(words, dtype=np.uint32)
    got = pack_numpy(codes_np, bits)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(_np_words(pack_torch(torch.from_numpy(codes_np), bits)), want)
    np.testing.assert_array_equal(unpack_numpy(want, bits, codes_np.shape[1]), codes_np)
    tw = torch.from_numpy(want.view(np.int32)).view(torch.uint32)
    np.testing.assert_array_equal(unpack_torch(tw, bits, codes_np.shape[1]).numpy(), codes_np)


def _bitstream_words(row: np.ndarray, bits: int) -> list[int]:
    """An independent packer: one Python big integer per row."""
    acc = 0
    for k, v in enumerate(row.tolist()):
        acc |= int(v) << (k * bits)
    n = words_per_row(len(row), bits)
    return [(acc >> (32 * w)) & 0xFFFFFFFF for w in range(n)]


@settings(max_examples=150, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]), rows=st.integers(1, 5),
       cols=st.integers(1, 200), seed=st.integers(0, 2**32 - 1))
def test_round_trip_and_independent_packer(bits, rows, cols, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, size=(rows, cols), dtype=np.uint8)
    q = pack(codes, bits)
    assert q.shape == (rows, words_per_row(cols, bits))
    for r in range(rows):
        assert q[r].tolist() == _bitstream_words(codes[r], bits)
    np.testing.assert_array_equal(unpack(q, bits, cols), codes)
    qt = pack(torch.from_numpy(codes), bits)
    assert qt.dtype == torch.uint32
    np.testing.assert_array_equal(_np_words(qt), q)
    np.testing.assert_array_equal(unpack(qt, bits, cols).numpy(), codes)


def test_extreme_codes_round_trip():
    for bits in (1, 2, 3, 4, 8):
        for value in (0, 2**bits - 1):
            codes = np.full((2, 97), value, dtype=np.uint8)
            np.testing.assert_array_equal(unpack(pack(codes, bits), bits, 97), codes)


def test_sizes_match_real_bytes():
    from bitsack.kernels.packed import PackedLinear

    rng = np.random.default_rng(0)
    for bits in (1, 2, 3, 4, 8):
        for rows, cols, g in ((3, 96, 32), (5, 40, 8), (1, 35, 5), (7, 128, 128), (2, 576, 128),
                              (3, 35, 8), (1, 5, 64)):
            w = torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32))
            layer = PackedLinear.from_dense(w, bits, g)
            (seg,) = layer.segments
            real = sum(t.numel() * t.element_size() for t in (seg.qdata, seg.scale, seg.zero))
            assert seg.nbytes == real == packed_nbytes(rows, cols, bits, g) == layer.nbytes
    w = torch.zeros(4, 64)
    layer = PackedLinear.from_dense(w, [(0, 2, 16), (2, 4, 3)], 16, axis=0)
    real = sum(b.numel() * b.element_size() for n, b in layer.named_buffers() if n != "bias")
    assert layer.nbytes == real == packed_nbytes(2, 64, 16, 16) + packed_nbytes(2, 64, 3, 16)


def test_ragged_sizes_worked_example():
    # SmolLM2's 576-wide rows at group size 128: groups 128, 128, 128, 128, 64 (5 groups).
    # 3 bits: ceil(3·576/32) = 54 words = 216 bytes, 5 · 2 bytes of fp16 scale, and the 5
    # zero points of 3 bits in one word of the segment's zero stream.
    assert packed_nbytes(1, 576, 3, 128) == 216 + 10 + 4
    # 10 rows: 50 zero points of 4 bits = 200 bits = 7 words (one stream per segment)
    assert packed_nbytes(10, 576, 4, 128) == 10 * (72 * 4 + 5 * 2) + 7 * 4
    # a group larger than the row: one (short) group
    assert packed_nbytes(1, 40, 2, 128) == 3 * 4 + 2 + 4
    # bits/weight of the menu: 3g128 on 4096 columns (a multiple of 32 rows) = 3 + 19/128
    assert packed_nbytes(32, 4096, 3, 128) * 8 / (32 * 4096) == 3 + 19 / 128
    # 3g64: 3 + 16/64 + 3/64 = 3.296875 (fp16 zero points made it 3.5)
    assert packed_nbytes(576, 576, 3, 64) * 8 / 576 ** 2 == 3.296875


def test_zero_points_pack_into_one_stream():
    rng = np.random.default_rng(3)
    for bits in (1, 2, 3, 4, 5, 8):
        z = rng.integers(0, 1 << bits, size=(7, 5))
        stream = pack_zero(z.astype(np.float16), bits)
        assert stream.shape == (zero_words(7, 5, bits),) and stream.dtype == np.uint32
        assert np.array_equal(unpack_zero(stream, bits, 7, 5), z)
        t = pack_zero(torch.from_numpy(z).to(torch.float16), bits)
        assert np.array_equal(t.view(torch.int32).numpy().view(np.uint32), stream)
        assert torch.equal(unpack_zero(t, bits, 7, 5, dtype=torch.int64), torch.from_numpy(z))
    # zero point (r, g) sits at bit (r·groups + g)·bits of the stream: (1, 0) = 6 at bit 15
    s = pack_zero(np.array([[1, 2, 3, 4, 5], [6, 7, 0, 1, 2]]), 3)
    assert (int(s[0]) >> 15) & 7 == 6
    with pytest.raises(ValidationError, match=r"zero: non-integer zero points; valid: "
                       r"integers 0\.\.7"):
        pack_zero(np.array([[0.5]]), 3)
    with pytest.raises(ValidationError, match=r"zero: values span \[8, 8\].*valid: 0\.\.7"):
        pack_zero(np.array([[8]]), 3)
    with pytest.raises(ValidationError, match=r"zero: shape \(3,\); valid: \[1\] words"):
        unpack_zero(np.zeros(3, np.uint32), 3, 2, 5)


def test_errors_name_field_value_and_valid():
    with pytest.raises(ValidationError, match=r"bits: 9 has no packed layout; valid: 1\.\.8"):
        pack(np.zeros((1, 4), np.uint8), 9)
    with pytest.raises(ValidationError, match=r"codes: values span \[0, 4\].*valid: 0\.\.3"):
        pack(np.array([[0, 4]], np.uint8), 2)
    with pytest.raises(ValidationError, match=r"qdata: 2 words per row.*valid: 1 words"):
        unpack(np.zeros((1, 2), np.uint32), 4, 8)
    with pytest.raises(ValidationError, match=r"codes: shape \(4,\) is not 2-D"):
        pack(np.zeros(4, np.uint8), 4)
    with pytest.raises(ValueError, match="group_size: 0; valid: a positive integer"):
        packed_nbytes(2, 64, 4, 0)
    assert PackFormat.for_bits(3) is PackFormat.BITSTREAM_U32
    assert PackFormat.for_bits(16) == "fp16"


def test_formats_imports_without_torch():
    code = ("import sys; import bitsack.kernels.formats as f; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "print(f.packed_nbytes(4, 64, 3, 32))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(4 * 6 * 4 + 4 * 2 * 2 + 4)  # words, scales, zeros


def test_kernel_modules_do_not_import_cupy():
    code = ("import sys; import bitsack.kernels.backends, bitsack.kernels.packed, "
            "bitsack.kernels.quantizers, bitsack.kernels.grid, bitsack.kernels.gptq, "
            "bitsack.kernels.bounds, bitsack.kernels.io, bitsack.kernels.cupy_backend, "
            "bitsack.kernels.cuda_build; "
            "assert 'cupy' not in sys.modules, 'cupy imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("site", [True, False], ids=["site-packages", "no-site-packages"])
def test_top_level_kernels_name_is_not_this_folder(site):
    """From the repository root (cwd on sys.path), ``import kernels`` must not give our folder:
    transformers imports the installed Hugging Face ``kernels`` under that name."""
    code = ("import os, sys\n"
            "try:\n"
            "    import kernels\n"
            "except ModuleNotFoundError as e:\n"
            "    print('missing', e.name)\n"
            "else:\n"
            "    print('found', os.path.dirname(os.path.abspath(kernels.__file__)))\n")
    argv = [sys.executable] + ([] if site else ["-S"]) + ["-c", code]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=_ROOT)
    kind, where = out.stdout.split(maxsplit=1)
    assert where.strip() != str(_ROOT / "kernels")
    try:
        importlib.metadata.distribution("kernels")
        installed = site
    except importlib.metadata.PackageNotFoundError:
        installed = False
    assert kind == ("found" if installed else "missing"), out.stdout
