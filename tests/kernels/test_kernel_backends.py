"""Backends against the float64 reference, within the computed bound; packed modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bitsack.errors import ValidationError
from bitsack.kernels.backends import (
    GEMV_MAX_BATCH,
    available_backends,
    dequant_plan,
    gemv_plan,
    get_backend,
    reference_output,
    reference_weight,
)
from bitsack.kernels.bounds import Numerics, gamma, layer_error_bound, output_error_bound
from bitsack.kernels.emulate import emulate_launch
from bitsack.kernels.packed import PackedEmbedding, PackedLinear, Segment
from bitsack.kernels.quantizers import rtn_quantize

BITS = [1, 2, 3, 4, 8]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP16_MAX = 65504.0


def _layer(seed: int, rows: int, cols: int, g: int | list[int], pieces: list[int], axis: int,
           log_mag: float, bias: bool) -> PackedLinear:
    """A layer of len(pieces) segments along ``axis`` with the given bit-widths.

    ``g`` is one group size or one per piece; cuts fall anywhere (a column segment is grouped
    inside itself, so its groups need not align with the matrix's, and may be ragged).
    """
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.standard_normal((rows, cols)) * 10.0**log_mag).float()
    n = rows if axis == 0 else cols
    k = min(len(pieces), n)
    cuts = sorted(rng.choice(np.arange(1, n), size=k - 1, replace=False)) if k > 1 else []
    bounds = [0, *[int(c) for c in cuts], n]
    gs = g if isinstance(g, list) else [g] * len(pieces)
    ranges = [(bounds[i], bounds[i + 1], pieces[i], gs[i]) for i in range(k)]
    b = torch.from_numpy(rng.standard_normal(rows) * 10.0**log_mag).float() if bias else None
    return PackedLinear.from_dense(w, ranges, 1, axis=axis, bias=b)


def _input(seed: int, batch: int, cols: int, xlog: float, dtype: torch.dtype) -> torch.Tensor:
    rng = np.random.default_rng(seed + 7)
    return torch.from_numpy(rng.standard_normal((batch, cols)) * 10.0**xlog).to(dtype)


layer_args = dict(
    seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 20), cols=st.integers(1, 200),
    g=st.lists(st.sampled_from([1, 7, 8, 16, 32, 48, 64, 128]), min_size=3, max_size=3),
    pieces=st.lists(st.sampled_from([*BITS, 16]), min_size=1, max_size=3),
    axis=st.sampled_from([0, 1]), log_mag=st.floats(-5, 2), xlog=st.floats(-4, 3),
    bias=st.booleans(), batch=st.integers(1, 12), dtype=st.sampled_from(DTYPES),
)


def _fits_fp16(layer: PackedLinear, x: torch.Tensor) -> bool:
    y = reference_output(layer, x).abs().max()
    return float(y) < FP16_MAX / 2 and float(layer.dequantize().abs().max()) < FP16_MAX / 2


@settings(max_examples=120, deadline=None)
@given(**layer_args)
def test_torch_backend_within_bound(seed, rows, cols, g, pieces, axis, log_mag, xlog, bias,
                                    batch, dtype):
    layer = _layer(seed, rows, cols, g, pieces, axis, log_mag, bias)
    layer.backend = "torch"
    x = _input(seed, batch, cols, xlog, dtype)
    assume(_fits_fp16(layer, x))
    y_ref = reference_output(layer, x)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (batch, rows)
    bound = layer_error_bound(layer, x, "torch", y_ref=y_ref)
    assert bool(((y.double() - y_ref).abs() <= bound).all())


@settings(max_examples=150, deadline=None)
@given(**{**layer_args,
          "pieces": st.lists(st.sampled_from([*BITS, 5, 6, 7, 16]), min_size=1, max_size=3),
          "dtype": st.sampled_from([*DTYPES, torch.float64])})
def test_cpu_backend_within_bound(seed, rows, cols, g, pieces, axis, log_mag, xlog, bias, batch,
                                  dtype):
    # the default backend: fused GEMV for batch ≤ GEMV_MAX_BATCH, tiles + BLAS above; every
    # width 1..8 (word-straddling ones included), ragged groups, a group size per segment
    layer = _layer(seed, rows, cols, g, pieces, axis, log_mag, bias)
    assert layer.backend == "cpu"
    x = _input(seed, batch, cols, xlog, dtype)
    assume(_fits_fp16(layer, x))
    y_ref = reference_output(layer, x)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (batch, rows)
    bound = layer_error_bound(layer, x, "cpu", y_ref=y_ref)
    assert bool(((y.double() - y_ref).abs() <= bound).all())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("g", [16, 32, 48, 128])
def test_cpu_gemv_larger_shapes(bits, g):
    # rows not a multiple of the kernel's 4-row blocks, the last rows' 16-word loads near the
    # end of the buffer, widths not a multiple of 32, a column split into two segments
    for rows, cols, axis, pieces in ((67, 1000, 0, [bits]), (9, 577, 1, [bits, 16, bits])):
        layer = _layer(bits * 100 + g, rows, cols, g, pieces, axis, 0.0, True)
        for batch in (1, 5, GEMV_MAX_BATCH + 1):
            x = _input(g, batch, cols, 0.0, torch.float32)
            y_ref = reference_output(layer, x)
            bound = layer_error_bound(layer, x, "cpu", y_ref=y_ref)
            assert bool(((layer(x).double() - y_ref).abs() <= bound).all()), (rows, batch)


def test_cpu_plan_follows_the_buffers():
    torch.manual_seed(2)
    layer = PackedLinear.from_dense(torch.randn(16, 64), 3, 32)
    other = PackedLinear.from_dense(torch.randn(16, 64), 4, 32)
    x = torch.randn(1, 64)
    y = layer(x)
    layer.load_state_dict(PackedLinear.from_dense(torch.randn(16, 64), 3, 32).state_dict())
    assert not torch.equal(layer(x), y)  # reloaded in place: new values, same plan is fine
    # buffers replaced by assignment: the plan is rebuilt, never reads freed memory
    for name in ("seg0_qdata", "seg0_scale", "seg0_zero"):
        setattr(layer, name, getattr(other, name).clone())
    layer._meta = other._meta
    assert torch.equal(layer(x), other(x))
    # a deep copy holds new buffers: its plan must point at them, not at the original's
    import copy

    clone = copy.deepcopy(layer)
    want = layer(x)
    del layer, other
    assert torch.equal(clone(x), want)
    plan = clone.__dict__["_cpu_plan"][1][0]
    assert plan[7] == clone.seg0_qdata.data_ptr()


def test_cpu_backend_torch_fallback(monkeypatch, tmp_path):
    # Where the C++ library cannot be built, the cpu backend runs its torch path (same
    # tiles, torch unpack) within the same bound.
    from bitsack.kernels import cpu_build
    from bitsack.kernels.backends import _reset_native

    monkeypatch.setenv("BITSACK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    _reset_native()
    try:
        assert get_backend("cpu").native() is None
        assert "no C++ compiler" in cpu_build.load_error()
        assert not list(tmp_path.rglob("*.so"))
        for pieces, axis in (([3, 16, 5], 0), ([2, 7], 1)):
            layer = _layer(5, 37, 150, [64, 7, 32], pieces, axis, 0.0, True)
            for batch in (1, 40):
                x = _input(5, batch, 150, 0.0, torch.float32)
                y_ref = reference_output(layer, x)
                bound = layer_error_bound(layer, x, "cpu", y_ref=y_ref)
                assert bool(((layer(x).double() - y_ref).abs() <= bound).all())
        # a compiler that fails: also a clean fallback, with its message
        bad = tmp_path / "bad-cxx"
        bad.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 3\n")
        bad.chmod(0o755)
        monkeypatch.setenv("CXX", str(bad))
        _reset_native()
        assert get_backend("cpu").native() is None
        assert "broken compiler" in cpu_build.load_error()
        monkeypatch.setenv("BITSACK_CPU_KERNELS", "0")
        _reset_native()
        assert get_backend("cpu").native() is None
        assert "disabled" in cpu_build.load_error()
    finally:
        monkeypatch.undo()
        _reset_native()


def test_cpu_build_is_cached(monkeypatch, tmp_path):
    from bitsack.kernels import cpu_build

    if cpu_build._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    monkeypatch.setenv("BITSACK_CACHE_DIR", str(tmp_path))
    lib = cpu_build.build()
    assert lib.is_file() and lib.parent.parent == tmp_path / "cpu-kernels"
    stamp = lib.stat().st_mtime_ns
    assert cpu_build.build() == lib and lib.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in lib.parent.iterdir()] == ["bitsack_cpu.so"]  # no temporaries


def test_bound_is_not_vacuous():
    # for fp32 the bound is γ_n·Σ|ŵx| (plus float64 crumbs), and the error really is nonzero
    layer = _layer(0, 64, 512, 32, [4], 0, 0.0, False)
    layer.backend = "torch"
    x = _input(0, 4, 512, 0.0, torch.float32)
    y_ref = reference_output(layer, x)
    bound = layer_error_bound(layer, x, "torch", y_ref=y_ref)
    sum_abs = x.double().abs() @ layer.dequantize(torch.float64).abs().T
    assert float((bound / sum_abs).max()) < 1.001 * gamma(513)
    err = (layer(x).double() - y_ref).abs()
    assert float(err.max()) > 0
    assert float((err / bound).max()) <= 1.0
    # the bound grows with n as γ_n does
    assert gamma(1024) > 2 * gamma(512) * 0.999


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 9), cols=st.integers(1, 150),
       g=st.lists(st.sampled_from([7, 8, 16, 32, 48, 64, 128]), min_size=3, max_size=3),
       pieces=st.lists(st.sampled_from([*BITS, 5, 6, 7, 16]), min_size=1, max_size=3),
       axis=st.sampled_from([0, 1]), batch=st.integers(1, GEMV_MAX_BATCH),
       log_mag=st.floats(-4, 2))
def test_cupy_gemv_plan_emulated_matches_reference(seed, rows, cols, g, pieces, axis, batch,
                                                   log_mag):
    # The cupy backend's own launch plan (segments, offsets, accumulate flags, grid), run
    # through the NumPy port of the kernels, against the float64 reference; ragged groups
    # and a group size per segment included.
    layer = _layer(seed, rows, cols, g, pieces, axis, log_mag, False)
    x = _input(seed, batch, cols, 0.0, torch.float32)
    y = torch.full((batch, rows), float("nan"), dtype=torch.float32)  # unwritten stays NaN
    for launch in gemv_plan(layer, x, y):
        emulate_launch(launch.kernel, launch.grid, launch.block, launch.args)
    y_ref = reference_output(layer, x)
    bound = output_error_bound(layer.dequantize(), x, None, Numerics(), y_ref=y_ref)
    assert bool(((y.double() - y_ref).abs() <= bound).all())


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("g", [8, 32, 40, [64, 7, 32, 128]])
def test_cupy_dequant_plan_emulated_is_exact(axis, g):
    cols = 150  # ragged last groups at every group size here
    layer = _layer(7 * len(str(g)) + axis, 6, cols, g, [3, 16, 8, 1], axis, 0.0, False)
    want = reference_weight(layer)
    for dt in (torch.float32, torch.float16):
        w = torch.full((6, cols), float("nan"), dtype=dt)
        for launch in dequant_plan(layer, w):
            emulate_launch(launch.kernel, launch.grid, launch.block, launch.args)
        np.testing.assert_array_equal(w.numpy(), want.astype(w.numpy().dtype))


def test_gemv_plan_refuses_large_batch():
    layer = _layer(0, 4, 32, 32, [4], 0, 0.0, False)
    x = torch.zeros(GEMV_MAX_BATCH + 1, 32)
    with pytest.raises(ValidationError, match=f"x: {GEMV_MAX_BATCH + 1} rows; valid"):
        gemv_plan(layer, x, torch.zeros(GEMV_MAX_BATCH + 1, 4))


def test_emulation_detects_a_short_grid():
    layer = _layer(0, 9, 32, 32, [4], 0, 0.0, False)
    x = _input(0, 1, 32, 0.0, torch.float32)
    y = torch.full((1, 9), float("nan"))
    (launch,) = gemv_plan(layer, x, y)
    emulate_launch(launch.kernel, (launch.grid[0] - 1,), launch.block, launch.args)
    assert torch.isnan(y[0, -1]) and not torch.isnan(y[0, 0])


def test_reference_backend_spec():
    layer = _layer(11, 6, 64, 16, [2, 16, 4], 0, 0.0, True)
    x = _input(11, 3, 64, 0.0, torch.float32)
    w = torch.from_numpy(reference_weight(layer))
    assert torch.equal(w, layer.dequantize(torch.float64))
    y = reference_output(layer, x)
    assert torch.allclose(y, x.double() @ w.T + layer.bias.double(), rtol=0, atol=1e-12)
    layer.backend = "reference"
    assert torch.equal(layer(x), y.float())


def test_backend_registry():
    assert {"reference", "torch"} <= set(available_backends())
    with pytest.raises(ValidationError, match="backend: 'triton' is unknown; valid: cpu, "
                                              "cupy, reference, torch"):
        get_backend("triton")
    layer = _layer(0, 4, 32, 16, [4], 0, 0.0, False)
    with pytest.raises(ValidationError, match="backend: 'nope' is unknown"):
        layer.backend = "nope"


def test_packed_linear_module():
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    layer = PackedLinear.from_dense(w, [(0, 8, 3), (8, 16, 16), (16, 24, 2)], 32, axis=0,
                                    bias=torch.randn(24))
    x = torch.randn(2, 5, 64)
    assert layer(x).shape == (2, 5, 24)
    sd = layer.state_dict()
    assert {"seg0_qdata", "seg0_scale", "seg0_zero", "seg1_weight", "seg2_qdata",
            "bias"} <= set(sd)
    assert sd["seg0_qdata"].dtype == torch.uint32
    clone = PackedLinear.from_dense(torch.zeros(24, 64), [(0, 8, 3), (8, 16, 16), (16, 24, 2)],
                                    32, axis=0, bias=torch.zeros(24))
    clone.load_state_dict(sd)
    assert torch.equal(clone(x), layer(x))
    assert torch.equal(clone.dequantize(), layer.dequantize())
    with pytest.raises(ValidationError, match=r"segments\[1\].start: 9; valid: 8"):
        segs = list(layer.segments)
        bad = Segment.from_fp16(torch.zeros(8, 64), 0, 9)
        PackedLinear(64, 25, [segs[0], bad, segs[2]])
    with pytest.raises(ValidationError, match="segments: cover 0:16; valid: exactly 0:24"):
        PackedLinear(64, 24, layer.segments[:2])
    with pytest.raises(ValidationError, match=r"segments\[1\].axis: 1"):
        PackedLinear(64, 24, [layer.segments[0], Segment.from_fp16(torch.zeros(24, 64), 1, 8)])
    with pytest.raises(ValidationError, match="x: last dim 63; valid: 64"):
        layer(torch.randn(63))
    with pytest.raises(ValidationError, match="segment.group_size: 0; valid: a positive"):
        Segment(0, 0, 2, 4, 0, (2, 64), qdata=torch.zeros(2, 8, dtype=torch.uint32),
                scale=torch.zeros(2, 2, dtype=torch.float16),
                zero=torch.zeros(2, 2, dtype=torch.float16))
    # group size 24 of 64 columns: 3 groups (24, 24, 16), so scale [2, 3]
    with pytest.raises(ValidationError, match=r"segment.scale: torch.float16 \[2, 2\]; valid: "
                                              r"float16 \[2, 3\]"):
        Segment(0, 0, 2, 4, 24, (2, 64), qdata=torch.zeros(2, 8, dtype=torch.uint32),
                scale=torch.zeros(2, 2, dtype=torch.float16),
                zero=torch.zeros(2, 2, dtype=torch.float16))


def test_weight_cache_is_exact_and_invalidated():
    torch.manual_seed(4)
    layer = PackedLinear.from_dense(torch.randn(16, 64), 3, 32, backend="torch")
    x = torch.randn(2, 64)
    y = layer(x)
    layer.cache_weight = True
    assert torch.equal(layer(x), y) and layer._weight_cache is not None
    other = PackedLinear.from_dense(torch.randn(16, 64), 3, 32, backend="torch")
    layer.load_state_dict(other.state_dict())
    assert layer._weight_cache is None
    assert torch.equal(layer(x), other(x))
    layer.to(torch.device("cpu"))
    assert layer._weight_cache is None


def test_packed_embedding_and_tied_lm_head():
    torch.manual_seed(1)
    table = torch.randn(50, 32)
    emb = PackedEmbedding.from_dense(table, 4, 16)
    ids = torch.tensor([[0, 49, 7], [7, 7, 3]])
    out = emb(ids)
    dense = rtn_quantize(table, 4, 16).dequantize()
    assert out.shape == (2, 3, 32)
    assert torch.equal(out, dense[ids])
    head = emb.as_linear()
    assert head.seg0_qdata.data_ptr() == emb.seg0_qdata.data_ptr()  # shared, not copied
    h = torch.randn(3, 32)
    y_ref = reference_output(head, h)
    assert bool(((head(h).double() - y_ref).abs()
                 <= layer_error_bound(head, h, y_ref=y_ref)).all())
    # segments along the vocabulary with different bits
    segs = [Segment.from_quantized(rtn_quantize(table[:20], 2, 16), 0, 0),
            Segment.from_fp16(table[20:], 0, 20)]
    emb2 = PackedEmbedding(50, 32, segs)
    got = emb2(torch.tensor([1, 25, 19, 20]))
    assert torch.equal(got[1], table[25].half().float())
    assert torch.equal(got[0], rtn_quantize(table[:20], 2, 16).dequantize()[1])
    with pytest.raises(ValidationError, match=r"ids: values span \[0, 50\]; valid: 0..49"):
        emb(torch.tensor([0, 50]))


# ------------------------------------------------------------------------------------------
# GPU: the cupy backend (skipped without a device)
# ------------------------------------------------------------------------------------------


def _cupy_ready() -> bool:
    return get_backend("cupy").is_available()




@pytest.mark.gpu
@pytest.mark.skipif(not _cupy_ready(), reason="no CUDA device / CuPy")
@settings(max_examples=60, deadline=None)
@given(**layer_args)
def test_cupy_backend_within_bound(seed, rows, cols, g, pieces, axis, log_mag, xlog, bias,
                                   batch, dtype):
    layer = _layer(seed, rows, cols, g, pieces, axis, log_mag, bias)
    x = _input(seed, batch, cols, xlog, dtype)
    assume(_fits_fp16(layer, x))
    y_ref = reference_output(layer, x)
    bound = layer_error_bound(layer, x, "cupy", y_ref=y_ref)
    layer = layer.cuda()
    layer.backend = "cupy"
    y = layer(x.cuda()).cpu()
    assert y.dtype == dtype and y.shape == (batch, rows)
    assert bool(((y.double() - y_ref).abs() <= bound).all())


@pytest.mark.gpu
@pytest.mark.skipif(not _cupy_ready(), reason="no CUDA device / CuPy")
@pytest.mark.parametrize("batch", [1, GEMV_MAX_BATCH, GEMV_MAX_BATCH + 1, 64])
def test_cupy_large_matrix_and_dequant(batch):
    layer = _layer(1, 1024, 2048, 128, [3, 4, 2], 0, 0.0, True).cuda()
    x = _input(1, batch, 2048, 0.0, torch.float16)
    y_ref = reference_output(layer.cpu(), x)
    bound = layer_error_bound(layer.cpu(), x, "cupy", y_ref=y_ref)
    layer = layer.cuda()
    layer.backend = "cupy"
    y = layer(x.cuda()).cpu()
    assert bool(((y.double() - y_ref).abs() <= bound).all())
    w = get_backend("cupy").dequantize(layer, torch.float32, torch.device("cuda"))
    assert torch.equal(w.cpu(), layer.cpu().dequantize())
