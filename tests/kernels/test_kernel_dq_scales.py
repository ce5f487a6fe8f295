"""Double-quantized scales (``scale_bits``): S-bit codes × an fp16 step per 256 columns."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bitsack.errors import ValidationError
from bitsack.kernels.formats import SUPER_COLS, check_scale_bits, packed_nbytes
from bitsack.kernels.gptq import GPTQ
from bitsack.kernels.grid import dq_params, dq_steps, rtn_quantize, super_ranges, super_steps
from bitsack.kernels.packed import PackedLinear, Segment
from bitsack.kernels.segments import SegmentSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _w(rows=48, cols=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3, 17] = 0.4  # an outlier: its super-block's step is coarser
    return w


def test_bytes_worked_example():
    # 3 bits, g32, S = 6 on 576 columns: 54 words of codes, 18 scale codes of 6 bits and 18
    # zero points of 3 bits per row (whole streams over 32 rows), 3 fp16 steps per row
    rows, cols = 32, 576
    want = rows * 54 * 4 + rows * 18 * 6 // 8 + rows * 18 * 3 // 8 + rows * 3 * 2
    assert packed_nbytes(rows, cols, 3, 32, 6) == want
    assert want * 8 / (rows * cols) == pytest.approx(3 + 9 / 32 + 48 / 576)
    # 3-bit g32 with 6-bit scales costs 0.25 bit/weight less than with fp16 scales, about
    # what 3-bit g64 does (3.297)
    assert packed_nbytes(rows, cols, 3, 32) - want == rows * 18 * 10 // 8 - rows * 3 * 2
    assert abs(want - packed_nbytes(rows, cols, 3, 64)) * 8 / (rows * cols) < 0.07
    for bad in (1, 7, 8, True, "6"):
        with pytest.raises(ValidationError, match=r"scale_bits: .*valid: None \(fp16 scales; "
                           r"'fp16' or 'auto' where a run config resolves it\) or one of 2, 3, "
                           r"4, 5, 6"):
            check_scale_bits(bad)


@pytest.mark.parametrize("scale_bits", [2, 4, 6])
def test_every_scale_is_an_exact_fp16_multiple_of_its_step(scale_bits):
    w = _w()
    q = rtn_quantize(w, 3, 32, scale_bits)
    k = q.scale_codes()
    assert int(k.min()) >= 1 and int(k.max()) <= (1 << scale_bits) - 1
    d = super_steps(q.step, w.shape[1], 32).double()
    assert torch.equal(k.double() * d, q.scale.double())
    # steps keep 11 − S significant bits
    m, _ = np.frexp(q.step.double().numpy())
    assert np.all((m * 2 ** (11 - scale_bits)) % 1 == 0)
    # round to nearest never clips: every weight within half its (stored) step
    s = q.scale.float().repeat_interleave(32, 1)[:, :w.shape[1]]
    assert bool(((q.dequantize() - w).abs() <= s / 2 * (1 + 1e-6)).all())
    # an outlier's super-block has a coarser step than its row's other super-blocks
    assert float(q.step[3, 0]) > float(q.step[3, 1])


def test_scales_round_up_onto_the_step_and_wide_groups_clamp():
    x = torch.tensor([[[0.0, 1.0]], [[0.0, 7.0]]], dtype=torch.float64)  # ranges 1 and 7
    step = dq_steps(torch.tensor([[1.0]]), 1, 2)  # 2-bit codes: 3 levels, so d ≥ 1/3
    assert float(step) == 171 / 512  # 1/3 rounded up to 11 − 2 = 9 significant bits
    s, z = dq_params(x, 1, step.expand(2, 1), 2)
    # range 1 needs k = 3; range 7 would need 21 > 3 levels: it gets the top step and clamps
    assert s.flatten().tolist() == [3 * 171 / 512, 3 * 171 / 512]
    assert z.abs().sum() == 0


def test_super_ranges_take_the_largest_group_starting_in_each_block():
    x = torch.zeros(1, SUPER_COLS + 40, dtype=torch.float64)
    x[0, 5], x[0, 70], x[0, SUPER_COLS + 3] = 2.0, -3.0, 1.0
    r = super_ranges(x, 64)
    assert r.tolist() == [[3.0, 1.0]]


def test_gptq_with_double_quantized_scales_packs_saves_and_loads_exactly(tmp_path):
    w = _w(64, 576, seed=1)
    X = torch.randn(256, 576, generator=torch.Generator().manual_seed(2))
    for act_order in (True, False):
        gq = GPTQ(576)
        gq.add_batch(X)
        res = gq.quantize_segments(w, [SegmentSpec(0, 0, 32, 3, 32, 6),
                                       SegmentSpec(0, 32, 64, 4, 64, 4)], act_order=act_order)
        plain = gq.quantize_segments(w, [SegmentSpec(0, 0, 32, 3, 32),
                                         SegmentSpec(0, 32, 64, 4, 64)], act_order=act_order)
        loss = float(((X @ (res.weight - w).T) ** 2).mean())
        ref = float(((X @ (plain.weight - w).T) ** 2).mean())
        assert 0.9 * ref < loss < 1.1 * ref  # a coarser grid, not a broken one
        segs = [Segment.from_quantized(p, 0, s) for p, s in zip(res.parts, (0, 32), strict=True)]
        layer = PackedLinear(576, 64, segs)
        assert torch.equal(layer.dequantize(), res.weight)
        state = layer.state_dict()
        assert not any(k.endswith("_scale") for k in state)  # codes and steps, not fp16
        assert sum(t.numel() * t.element_size() for t in state.values()) == layer.nbytes \
            == packed_nbytes(32, 576, 3, 32, 6) + packed_nbytes(32, 576, 4, 64, 4)
        again = PackedLinear.from_layout(576, 64, layer.layout())
        again.load_state_dict(state)
        x = torch.randn(3, 576)
        assert torch.equal(again(x), layer(x))
        assert torch.allclose(layer(x), x @ res.weight.T, atol=1e-5)


def test_segments_validate_codes_and_steps():
    q = rtn_quantize(_w(4, 64), 3, 32, 6)
    seg = Segment.from_quantized(q, 0, 0)
    with pytest.raises(ValidationError, match=r"segment.step: None; valid: float16 \[4, 1\]"):
        Segment(0, 0, 4, 3, 32, (4, 64), qdata=seg.qdata, zero=seg.zero, scale_bits=6,
                scale_codes=seg.scale_codes)
    built = Segment(0, 0, 4, 3, 32, (4, 64), qdata=seg.qdata, zero=seg.zero, scale_bits=6,
                    scale_codes=seg.scale_codes, step=seg.step)
    assert built.scale is None and torch.equal(built.scales(), q.scale)
    assert built.spec()["scale_bits"] == 6
    rows = torch.tensor([3, 0, 3])  # rows only, read straight from the code stream
    assert torch.equal(built.scales(rows), q.scale[rows])


@pytest.mark.parametrize("shape, bits, g, sb", [((40, 600), 3, 32, 6), ((33, 256), 4, 64, 4),
                                                ((7, 100), 2, 16, 2), ((64, 576), 5, 48, 5)])
def test_kernels_read_the_codes_and_a_layer_holds_what_its_file_holds(shape, bits, g, sb):
    from bitsack.kernels.backends import CpuBackend, reference_output
    from bitsack.kernels.packed import PackedEmbedding

    rows, cols = shape
    w = _w(rows, cols, seed=rows)
    q = rtn_quantize(w, bits, g, sb)
    layer = PackedLinear(cols, rows, [Segment.from_quantized(q, 0, 0)], backend="cpu")
    # no fp16 scales held: the buffers are the packed bytes
    held = sum(t.numel() * t.element_size() for t in layer.buffers())
    assert held == layer.nbytes == packed_nbytes(rows, cols, bits, g, sb)
    assert CpuBackend.native() is not None  # the C++ kernels, not the torch fallback
    # the same codes with the expanded fp16 scales: the kernels compute the same ŵ, in the
    # same order, so the outputs are equal bit for bit
    seg = layer.segments[0]
    plain = PackedLinear(cols, rows, [Segment(0, 0, rows, bits, g, shape, qdata=seg.qdata,
                                              scale=q.scale, zero=seg.zero)], backend="cpu")
    for batch in (1, 3, 11):  # the decode GEMV (≤ 8) and the dequantize + BLAS path
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
        assert torch.equal(layer(x), plain(x)), batch
        want = reference_output(plain, x)
        assert torch.allclose(layer(x).double(), want.double(), rtol=1e-5, atol=1e-5), batch
    assert torch.equal(layer.dequantize(), q.dequantize())
    emb = PackedEmbedding(rows, cols, [Segment.from_quantized(q, 0, 0)])
    ids = torch.tensor([[rows - 1, 0], [2, 2]])
    assert torch.equal(emb(ids), q.dequantize()[ids])


def test_the_torch_fallback_expands_the_codes(monkeypatch, tmp_path):
    from bitsack.kernels.backends import CpuBackend, _reset_native

    q = rtn_quantize(_w(40, 600, seed=5), 3, 32, 6)
    layer = PackedLinear(600, 40, [Segment.from_quantized(q, 0, 0)], backend="cpu")
    x = torch.randn(2, 600)
    fast = layer(x)
    monkeypatch.setenv("BITSACK_CPU_KERNELS", "0")
    _reset_native()
    try:
        assert CpuBackend.native() is None
        for batch in (1, 2, 12):
            xb = torch.randn(batch, 600, generator=torch.Generator().manual_seed(batch))
            want = xb.double() @ q.dequantize(torch.float64).T
            assert torch.allclose(layer(xb).double(), want, rtol=1e-5, atol=1e-5)
        assert torch.allclose(layer(x), fast, rtol=1e-5, atol=1e-6)
    finally:
        monkeypatch.undo()
        _reset_native()


DQ_PIECES = [[(3, 32, 6), (16, 0, 0), (5, 48, 5)], [(2, 16, 2), (4, 64, None), (8, 7, 4)]]


def _dq_layer(axis: int, pieces: list[tuple]) -> PackedLinear:
    """Three segments along ``axis`` (bits, group size, scale bits; 16: fp16), each spanning
    more than one 256-column super-block of steps."""
    rows, cols = (30, 600) if axis == 0 else (12, 1400)
    w = _w(rows, cols, seed=axis + len(pieces[0]))
    n = rows if axis == 0 else cols
    cuts = [0, n // 3, n // 3 + n // 4, n]
    parts = []
    for (b, g, sb), lo, hi in zip(pieces, cuts[:-1], cuts[1:], strict=True):
        piece = w[lo:hi] if axis == 0 else w[:, lo:hi]
        parts.append(piece.half() if b == 16 else rtn_quantize(piece, b, g, sb))
    return PackedLinear.from_quantized(parts, axis)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("pieces", DQ_PIECES)
def test_cuda_plans_read_the_codes(axis, pieces):
    # The cupy backend's launch plans pass the code stream and the steps, not expanded fp16
    # scales; run through the NumPy port of the kernels (BsScales), each output equals the
    # same layer's with its scales expanded, bit for bit (ŵ is the same fp32 value), and the
    # dequantized weight equals the reference exactly.
    from bitsack.kernels.backends import dequant_plan, gemv_plan, reference_weight
    from bitsack.kernels.emulate import emulate_launch

    layer = _dq_layer(axis, pieces)
    rows, cols = layer.out_features, layer.in_features
    plain = PackedLinear(cols, rows, [
        Segment(s.axis, s.start, s.stop, s.bits, s.group_size, s.shape, qdata=s.qdata,
                scale=s.scales(), zero=s.zero) if s.scale_bits else s
        for s in layer.segments])
    assert any(s.scale is None and s.bits < 16 for s in layer.segments)
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(1))
    outs = []
    for lay in (layer, plain):
        y = torch.full((3, rows), float("nan"))
        for launch in gemv_plan(lay, x, y):
            emulate_launch(launch.kernel, launch.grid, launch.block, launch.args)
        outs.append(y)
        dense = torch.full((rows, cols), float("nan"))
        for launch in dequant_plan(lay, dense):
            emulate_launch(launch.kernel, launch.grid, launch.block, launch.args)
        np.testing.assert_array_equal(dense.numpy(), reference_weight(layer).astype(np.float32))
    # the plan of the double-quantized layer holds its code streams (nothing expanded)
    coded = [s for s in layer.segments if s.scale_bits]
    args = [a for launch in gemv_plan(layer, x, torch.empty(3, rows)) for a in launch.args]
    assert all(any(a is s.scale_codes for a in args) for s in coded)
    assert torch.equal(outs[0], outs[1]) and not torch.isnan(outs[0]).any()


def _cupy_ready() -> bool:
    from bitsack.kernels.backends import get_backend

    return get_backend("cupy").is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cupy_ready(), reason="no CUDA device / CuPy")
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("pieces", DQ_PIECES)
def test_cupy_reads_the_codes_within_bound(axis, pieces):
    from bitsack.kernels.backends import get_backend, reference_output
    from bitsack.kernels.bounds import layer_error_bound

    layer = _dq_layer(axis, pieces)
    gpu = copy.deepcopy(layer).cuda()
    gpu.backend = "cupy"
    for batch in (1, 3, 12):  # the GEMV and the dequantize + cuBLAS path
        x = torch.randn(batch, layer.in_features,
                        generator=torch.Generator().manual_seed(batch)).half()
        y_ref = reference_output(layer, x)
        bound = layer_error_bound(layer, x, "cupy", y_ref=y_ref)
        y = gpu(x.cuda()).cpu()
        assert bool(((y.double() - y_ref).abs() <= bound).all()), batch
    w = get_backend("cupy").dequantize(gpu, torch.float32, torch.device("cuda"))
    assert torch.equal(w.cpu(), layer.dequantize())
