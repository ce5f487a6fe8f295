"""Quantizers: min-max RTN (grid, bound, edge cases, errors) and GPTQ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsack.errors import NumericalError, ValidationError
from bitsack.kernels.bounds import RTN_SLACK, rtn_error_bound
from bitsack.kernels.quantizers import (
    GPTQ,
    GPTQResult,
    QuantizedTensor,
    SegmentSpec,
    available_quantizers,
    dequantize_codes,
    fake_quantize,
    get_quantizer,
    rtn_quantize,
)

BITS = [1, 2, 3, 4, 8]


def _weights(seed: int, rows: int, cols: int, log_mag: float, offset: float = 0.0,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) + offset) * 10.0**log_mag
    return torch.from_numpy(w).to(dtype)


@settings(max_examples=120, deadline=None)
@given(bits=st.sampled_from(BITS), rows=st.integers(1, 6), cols=st.integers(1, 170),
       group_size=st.sampled_from([1, 3, 8, 32, 40, 64, 128]), log_mag=st.floats(-6, 3),
       offset=st.sampled_from([0.0, 3.0, -50.0]), xlog=st.floats(-4, 4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 2**32 - 1))
def test_rtn_within_bound_of_unquantized(bits, rows, cols, group_size, log_mag, offset,
                                         xlog, dtype, seed):
    # any width: the last group is short when group_size does not divide cols
    w = _weights(seed, rows, cols, log_mag, offset, dtype)
    qt = rtn_quantize(w, bits, group_size)
    assert qt.scale.shape == (rows, -(-cols // group_size))
    w64 = w.to(torch.float64)
    what = qt.dequantize(torch.float64)
    # each group's parameters are the min-max of its own columns (the short one's too)
    for gi in range(qt.scale.shape[1]):
        ref = rtn_quantize(w[:, gi * group_size:(gi + 1) * group_size].contiguous(), bits,
                           group_size)
        assert torch.equal(ref.scale[:, 0], qt.scale[:, gi])
        assert torch.equal(ref.codes, qt.codes[:, gi * group_size:(gi + 1) * group_size])
    # per element: |ŵ − w| ≤ s/2 (stored scale) up to RTN_SLACK
    s = qt.scale.to(torch.float64).repeat_interleave(group_size, dim=1)[:, :cols]
    assert bool(((what - w64).abs() <= s / 2 * RTN_SLACK).all())
    # per output, against any input: the documented bound
    rng = np.random.default_rng(seed + 1)
    x = torch.from_numpy(rng.standard_normal((3, cols)) * 10.0**xlog)
    err = (x @ (what - w64).T).abs()
    assert bool((err <= rtn_error_bound(qt.scale, x, group_size)).all())
    # the codes and zero lie on the grid, the zero is an integer, dequantize is fp32 exact
    maxq = 2**bits - 1
    assert int(qt.codes.max()) <= maxq
    z = qt.zero.to(torch.float64)
    assert bool((z == z.round()).all()) and float(z.min()) >= 0 and float(z.max()) <= maxq
    assert torch.equal(qt.dequantize(torch.float32).to(torch.float64), what)


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 300), group_size=st.integers(1, 160),
       bits=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]), seed=st.integers(0, 2**32 - 1))
def test_dequantize_and_pack_any_group_size(rows, cols, group_size, bits, seed):
    # dequantize_codes against the definition, column by column: column j uses group j // G
    from bitsack.kernels.formats import pack, unpack

    g = torch.Generator().manual_seed(seed)
    ngroups = -(-cols // group_size)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.int64)
    codes = codes.to(torch.uint8)
    scale = (torch.rand(rows, ngroups, generator=g) + 0.01).half()
    zero = torch.randint(0, 2**bits, (rows, ngroups), generator=g).half()
    got = dequantize_codes(codes, scale, zero, group_size)
    for j in range(cols):
        gi = j // group_size
        want = scale[:, gi].float() * (codes[:, j].float() - zero[:, gi].float())
        assert torch.equal(got[:, j], want)
    qt = QuantizedTensor(codes, scale, zero, bits, group_size)
    assert torch.equal(unpack(pack(qt.codes, bits), bits, cols), codes)
    assert torch.equal(qt.dequantize(), got)


def test_rtn_worked_example():
    # One group [-1, 0, 0.5, 2] at 2 bits: range [-1, 2], s = 3/3 = 1 (exact in fp16),
    # z = round(1/1) = 1, q = round(x/s + z) = [0, 1, 2 (1.5 rounds to even), 3].
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    qt = rtn_quantize(w, 2, 4)
    assert qt.codes.tolist() == [[0, 1, 2, 3]]
    assert qt.scale.tolist() == [[1.0]] and qt.zero.tolist() == [[1.0]]
    assert qt.dequantize().tolist() == [[-1.0, 0.0, 1.0, 2.0]]


def test_rtn_worked_example_ragged_last_group():
    # 6 columns at group size 4: groups [0, 4) and the short [4, 6), each with its own
    # parameters. Group 0 = [-1, 0, 0.5, 2] as above. Group 1 = [0.25, 1.0] at 2 bits: range
    # [0, 1] (0 is always in range), s = 1/3 rounded up to fp16 = 0.333496…(0x3556),
    # z = round(0/s) = 0, q = round([0.25, 1.0]/s) = [round(0.7496), round(2.9985)] = [1, 3].
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0, 0.25, 1.0]])
    qt = rtn_quantize(w, 2, 4)
    s1 = torch.tensor([0x3556], dtype=torch.int16).view(torch.float16)
    assert qt.scale.shape == (1, 2) and qt.zero.tolist() == [[1.0, 0.0]]
    assert torch.equal(qt.scale[0, 1:], s1)
    assert qt.codes.tolist() == [[0, 1, 2, 3, 1, 3]]
    s = float(s1)
    assert qt.dequantize().tolist() == [[-1.0, 0.0, 1.0, 2.0, s, 3 * s]]
    # the same numbers through the packed layer and the reference backend
    from bitsack.kernels.backends import reference_weight
    from bitsack.kernels.packed import PackedLinear

    layer = PackedLinear.from_quantized([qt], 0)
    assert layer.segments[0].scale.shape == (1, 2)
    # packed bits (independent of the grouping): 0 | 1<<2 | 2<<4 | 3<<6 | 1<<8 | 3<<10
    assert layer.segments[0].qdata.view(torch.int32).tolist() == [[0xDE4]]
    assert torch.equal(torch.from_numpy(reference_weight(layer)).float(), qt.dequantize())


def test_scale_rounded_up_to_fp16():
    # range 1.0 over maxq 3 -> s = 1/3; fp16 nearest is below 1/3, so the stored one is above.
    qt = rtn_quantize(torch.tensor([[0.0, 1.0]]), 2, 2)
    s = float(qt.scale[0, 0])
    assert s >= 1.0 / 3.0
    assert float(torch.tensor(1.0 / 3.0).half()) < 1.0 / 3.0  # the case really needs it
    # the top of the range is still reachable within s/2
    assert abs(float(qt.dequantize()[0, 1]) - 1.0) <= s / 2


def test_degenerate_groups():
    w = torch.zeros(2, 8)
    w[1, 4:] = 0.75  # group of equal nonzero values; first row all zero
    qt = rtn_quantize(w, 3, 4)
    d = qt.dequantize()
    assert torch.equal(d[0], torch.zeros(8))  # all-zero groups dequantize to exact zeros
    assert float(qt.scale[0, 0]) > 0
    assert torch.allclose(d[1, 4:], torch.full((4,), 0.75), atol=float(qt.scale[1, 1]) / 2)
    assert torch.equal(d[1, :4], torch.zeros(4))


def test_rtn_errors():
    w = torch.randn(4, 12)
    with pytest.raises(ValidationError, match=r"group_size: 0; valid: a positive integer"):
        rtn_quantize(w, 4, 0)
    with pytest.raises(ValidationError, match=r"bits: 0 has no packed layout; valid: 1\.\.8"):
        rtn_quantize(w, 0, 4)
    with pytest.raises(ValidationError, match=r"bits: 16 has no packed layout; valid: 1\.\.8"):
        rtn_quantize(w, 16, 4)
    with pytest.raises(ValidationError, match="w: holds NaN"):
        rtn_quantize(torch.full((2, 4), float("nan")), 4, 4)
    with pytest.raises(ValidationError, match="w: .*valid: a 2-D floating-point"):
        rtn_quantize(torch.zeros(4, dtype=torch.int64), 4, 4)
    with pytest.raises(ValidationError, match="exceeds the fp16 maximum"):
        rtn_quantize(torch.tensor([[-1e5, 1e5]]), 1, 2)
    with pytest.raises(ValidationError, match=r"scale: torch.float32 of shape"):
        QuantizedTensor(torch.zeros(2, 4, dtype=torch.uint8), torch.zeros(2, 1),
                        torch.zeros(2, 1, dtype=torch.float16), 4, 4)


def test_fake_quantize_and_registry():
    w = torch.randn(8, 32, dtype=torch.bfloat16)
    fq = fake_quantize(w, 4, 16)
    assert fq.dtype == w.dtype and fq.shape == w.shape
    assert torch.equal(fq, rtn_quantize(w, 4, 16).dequantize(w.dtype))
    assert torch.equal(fake_quantize(w, 16, 16), w.half().to(w.dtype))
    assert available_quantizers() == ["gptq", "rtn"]
    with pytest.raises(ValidationError, match="quantizer: 'awq' is unknown; valid: gptq, rtn"):
        get_quantizer("awq")
    with pytest.raises(ValidationError, match="hessian: None; gptq needs"):
        fake_quantize(w.float(), 4, 16, method="gptq")
    gp = GPTQ(32)
    gp.add_batch(torch.randn(64, 32))
    fq = fake_quantize(w.float(), 4, 16, method="gptq", hessian=gp.H)
    assert fq.shape == w.shape


def _correlated(seed: int, n: int, cols: int, rank: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    return base + 0.05 * torch.randn(n, cols, generator=g)


def _out_err(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w.double() - q.double()) @ x.double().T).norm())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order):
    torch.manual_seed(0)
    rows, cols, g = 48, 128, 32
    w = torch.randn(rows, cols)
    x = _correlated(1, 1024, cols)
    gp = GPTQ(cols)
    for chunk in x.split(256):
        gp.add_batch(chunk)
    res = gp.quantize(w, bits, g, act_order=act_order, block_size=48)
    rtn = rtn_quantize(w, bits, g).dequantize()
    assert _out_err(w, res.weight, x) < 0.7 * _out_err(w, rtn, x)
    # what GPTQ reports is what the packed kernels compute from its codes
    qt = res.to_quantized()
    assert torch.equal(qt.dequantize(), res.weight)
    assert int(qt.codes.max()) <= 2**bits - 1


def test_gptq_hessian_is_2xxt_over_n():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    gp = GPTQ(16)
    gp.add_batch(x[0])
    gp.add_batch(x[1:])
    flat = x.reshape(-1, 16)
    assert gp.nsamples == 15
    assert torch.allclose(gp.H, 2 * flat.T @ flat / 15, rtol=1e-12, atol=1e-12)


def test_gptq_group_params_see_pending_block_updates():
    # With block_size not a multiple of group_size, groups straddle blocks; the group's
    # scale must come from the weights *with* the pending lazy updates. Check against an
    # unblocked run (block_size >= cols applies every update immediately).
    torch.manual_seed(3)
    w = torch.randn(16, 96)
    x = _correlated(4, 512, 96)
    gp = GPTQ(96)
    gp.add_batch(x)
    a = gp.quantize(w, 3, 32, block_size=20)
    b = gp.quantize(w, 3, 32, block_size=96)
    assert torch.equal(a.scale, b.scale) or torch.allclose(
        a.scale.float(), b.scale.float(), rtol=2e-3)
    assert torch.allclose(a.weight, b.weight, atol=1e-5 + 0.01 * float(b.weight.abs().max()))


def test_gptq_singular_hessian_dead_columns_does_not_crash():
    torch.manual_seed(5)
    x = torch.randn(256, 64)
    x[:, ::3] = 0.0  # dead inputs: zero rows/cols in H
    x[:, 1] = x[:, 2]  # duplicated input: rank deficiency beyond the dead ones
    w = torch.randn(8, 64)
    gp = GPTQ(64)
    gp.add_batch(x)
    for damp in (0.0, 0.01):
        res = gp.quantize(w, 3, 16, damp=damp)
        assert torch.isfinite(res.weight).all()
        assert torch.equal(res.weight[:, ::3], torch.zeros(8, 22))  # dead columns -> 0
        assert _out_err(w, res.weight, x) <= _out_err(w, rtn_quantize(w, 3, 16).dequantize(), x)


def test_gptq_damping_escalates_when_cholesky_fails():
    # An indefinite H (as accumulated rounding can make one): smallest eigenvalue about
    # −0.05·mean diag (trace = sum of eigenvalues). λ = 0.01·mean fails, ×10 succeeds.
    torch.manual_seed(6)
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    eig = torch.linspace(1.0, 2.0, 32, dtype=torch.float64)
    eig[0] = -0.05 * float(eig[1:].mean())
    H = q @ torch.diag(eig) @ q.T
    mean_diag = float(torch.diag(H).mean())
    assert float(torch.linalg.eigvalsh(H + 0.01 * mean_diag * torch.eye(32)).min()) < 0
    res = GPTQ.from_hessian(H).quantize(torch.randn(4, 32), 4, 8, damp=0.01)
    assert res.damp == pytest.approx(0.1 * mean_diag)
    assert torch.isfinite(res.weight).all()
    with pytest.raises(NumericalError, match="Cholesky of H"):
        GPTQ.from_hessian(-torch.eye(8, dtype=torch.float64) * 1e6 + torch.ones(8, 8)
                          ).quantize(torch.randn(2, 8), 4, 8, max_escalations=1)


def test_gptq_mixed_bits_per_row_and_per_group():
    torch.manual_seed(7)
    rows, cols, g = 12, 64, 16
    w = torch.randn(rows, cols)
    x = _correlated(8, 512, cols)
    gp = GPTQ(cols)
    gp.add_batch(x)
    per_row = torch.tensor([2] * 4 + [4] * 4 + [16] * 4)
    res = gp.quantize(w, per_row, g, bits_axis=0)
    assert res.bits.shape == (rows, cols // g)
    lo, mid, hi = res.segment(0, 0, 4), res.segment(0, 4, 8), res.segment(0, 8, 12)
    assert lo.bits == 2 and mid.bits == 4 and hi.dtype == torch.float16
    assert int(lo.codes.max()) <= 3
    assert torch.equal(lo.dequantize(), res.weight[:4])
    assert torch.equal(hi.float(), res.weight[8:])
    # more bits, smaller output error, row by row
    e = ((w - res.weight).double() @ x.double().T).norm(dim=1)
    assert e[:4].min() > e[4:8].max() > e[8:].max()
    per_group = torch.tensor([8, 3, 3, 2])
    res2 = gp.quantize(w, per_group, g, act_order=True)
    seg = res2.segment(1, 16, 48)
    assert seg.bits == 3 and seg.codes.shape == (rows, 32)
    assert torch.equal(seg.dequantize(), res2.weight[:, 16:48])
    with pytest.raises(ValidationError, match="mix bit-widths"):
        res2.segment(1, 0, 32)
    with pytest.raises(ValidationError, match="not on group boundaries"):
        res2.segment(1, 8, 32)


def test_gptq_errors():
    gp = GPTQ(16)
    w = torch.randn(4, 16)
    with pytest.raises(ValidationError, match="hessian: no calibration inputs"):
        gp.quantize(w, 4, 8)
    gp.add_batch(torch.randn(10, 16))
    with pytest.raises(ValidationError, match="weight: 12 columns; valid: 16"):
        gp.quantize(torch.randn(4, 12), 4, 4)
    with pytest.raises(ValidationError, match="x: last dim 8; valid: 16"):
        gp.add_batch(torch.randn(3, 8))
    with pytest.raises(ValidationError, match=r"bits: shape \(3,\); valid"):
        gp.quantize(w, torch.tensor([2, 3, 4]), 8)
    with pytest.raises(ValidationError, match="bits: 9 has no packed layout"):
        gp.quantize(w, torch.tensor([2, 3, 9, 4]), 8)
    sq = GPTQ(16)
    sq.add_batch(torch.randn(10, 16))
    with pytest.raises(ValidationError, match="bits_axis: None is ambiguous"):
        sq.quantize(torch.randn(2, 16), torch.tensor([2, 3]), 8)


# ------------------------------------------------------------------------------------------
# GPTQ over segments
# ------------------------------------------------------------------------------------------


def _gptq(cols: int, seed: int = 11) -> GPTQ:
    gp = GPTQ(cols)
    gp.add_batch(_correlated(seed, 4 * cols + 64, cols))
    return gp


def _same(a: GPTQResult, b: GPTQResult) -> bool:
    """Parts, weight and per-part losses equal bit for bit."""
    if len(a.parts) != len(b.parts) or a.losses != b.losses or a.damp != b.damp:
        return False
    for p, q in zip(a.parts, b.parts, strict=True):
        if isinstance(p, QuantizedTensor):
            if not (isinstance(q, QuantizedTensor) and p.bits == q.bits
                    and p.group_size == q.group_size and torch.equal(p.codes, q.codes)
                    and torch.equal(p.scale, q.scale) and torch.equal(p.zero, q.zero)):
                return False
        elif not torch.equal(p, q):
            return False
    return torch.equal(a.weight, b.weight)


OPTIONS = [(2, 32), (3, 64), (3, 128), (4, 48), (16, 128), (8, 7)]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("row_chunk", [None, 5])
def test_stacked_copies_equal_separate_runs_bit_for_bit(act_order, row_chunk):
    # K copies of W stacked as one [K·rows, cols] matrix, one row segment (option) per copy:
    # every part must be exactly the result of quantizing W alone at that option.
    rows, cols = 13, 150  # 150 = ragged at every group size here
    torch.manual_seed(9)
    w = torch.randn(rows, cols)
    gp = _gptq(cols)
    kw = dict(act_order=act_order, block_size=64, row_chunk=row_chunk)
    stacked = w.repeat(len(OPTIONS), 1)
    specs = [SegmentSpec(0, k * rows, (k + 1) * rows, b, g) for k, (b, g) in enumerate(OPTIONS)]
    res = gp.quantize_segments(stacked, specs, **kw)
    assert res.segments == tuple(specs) and len(res.parts) == len(OPTIONS)
    for k, (b, g) in enumerate(OPTIONS):
        alone = gp.quantize_segments(w, [SegmentSpec(0, 0, rows, b, g)], **kw)
        one = GPTQResult(None, None, None, None, None, res.weight[k * rows:(k + 1) * rows],
                         res.damp, res.losses[k], (res.parts[k],), (), (res.losses[k],))
        assert _same(one, alone), (b, g)
    assert res.loss == pytest.approx(sum(res.losses), rel=1e-12)


def test_segments_match_the_whole_matrix_interface():
    rows, cols, g = 12, 64, 16
    torch.manual_seed(7)
    w = torch.randn(rows, cols)
    gp = _gptq(cols)
    for act_order in (False, True):
        old = gp.quantize(w, torch.tensor([2] * 4 + [4] * 4 + [16] * 4), g, bits_axis=0,
                          act_order=act_order)
        new = gp.quantize_segments(w, [SegmentSpec(0, 0, 4, 2, g), SegmentSpec(0, 4, 8, 4, g),
                                       SegmentSpec(0, 8, 12, 16, g)], act_order=act_order)
        torch.testing.assert_close(new.weight, old.weight, rtol=0, atol=1e-6)
        assert new.loss == pytest.approx(old.loss, rel=1e-9)
        assert torch.equal(new.parts[2], old.segment(0, 8, 12))
        old_c = gp.quantize(w, torch.tensor([8, 3, 3, 2]), g, bits_axis=1, act_order=act_order)
        new_c = gp.quantize_segments(w, [SegmentSpec(1, 0, 16, 8, g), SegmentSpec(1, 16, 48, 3, g),
                                         SegmentSpec(1, 48, 64, 2, g)], act_order=act_order)
        assert torch.equal(new_c.weight, old_c.weight)  # one piece of rows: same products
        assert torch.equal(new_c.parts[1].codes, old_c.segment(1, 16, 48).codes)
        assert new_c.loss == pytest.approx(old_c.loss, rel=1e-12)


@pytest.mark.parametrize("act_order", [False, True])
def test_segment_groupings_per_row_and_per_column_range(act_order):
    rows, cols = 10, 150
    torch.manual_seed(3)
    w = torch.randn(rows, cols)
    gp = _gptq(cols)
    # rows: three options with different group sizes (ragged last groups)
    specs = [SegmentSpec(0, 0, 3, 3, 64), SegmentSpec(0, 3, 7, 4, 32),
             SegmentSpec(0, 7, 10, 2, 128)]
    res = gp.quantize_segments(w, specs, act_order=act_order)
    for sp, part in zip(specs, res.parts, strict=True):
        rtn = rtn_quantize(w[sp.start:sp.stop], sp.bits, sp.group_size)
        ngroups = -(-cols // sp.group_size)
        assert part.scale.shape == rtn.scale.shape == (sp.stop - sp.start, ngroups)
        assert torch.equal(part.dequantize(), res.weight[sp.start:sp.stop])
        assert int(part.codes.max()) <= 2**sp.bits - 1
        if act_order:  # static groups: min-max of each row's own groups of the original W
            assert torch.equal(part.scale, rtn.scale) and torch.equal(part.zero, rtn.zero)
        else:  # dynamic: the first group is met before any update
            assert torch.equal(part.scale[:, 0], rtn.scale[:, 0])
    # columns: each range grouped from its own first column
    cspecs = [SegmentSpec(1, 0, 50, 3, 32), SegmentSpec(1, 50, 51, 16, 64),
              SegmentSpec(1, 51, 150, 4, 64)]
    cres = gp.quantize_segments(w, cspecs, act_order=act_order)
    assert cres.parts[0].scale.shape == (rows, 2) and cres.parts[2].scale.shape == (rows, 2)
    assert cres.parts[1].dtype == torch.float16 and cres.parts[1].shape == (rows, 1)
    for sp, part in zip(cspecs, cres.parts, strict=True):
        got = part.float() if sp.bits == 16 else part.dequantize()
        assert torch.equal(got, cres.weight[:, sp.start:sp.stop])
    if act_order:
        rtn = rtn_quantize(w[:, 51:150].contiguous(), 4, 64)
        assert torch.equal(cres.parts[2].scale, rtn.scale)
    assert cres.loss == pytest.approx(sum(cres.losses), rel=1e-12)
    # GPTQ beats RTN on correlated inputs with these groupings too
    x = _correlated(11, 4 * cols + 64, cols)
    rtn_w = torch.cat([rtn_quantize(w[:, s.start:s.stop].contiguous(), s.bits, s.group_size)
                       .dequantize() if s.bits != 16 else w[:, s.start:s.stop].half().float()
                       for s in cspecs], dim=1)
    assert _out_err(w, cres.weight, x) < _out_err(w, rtn_w, x)
    # no weight requested: same parts
    lean = gp.quantize_segments(w, cspecs, act_order=act_order, return_weight=False)
    assert lean.weight is None and torch.equal(lean.parts[1], cres.parts[1])
    assert torch.equal(lean.parts[2].codes, cres.parts[2].codes)
    assert cres.segment(1, 51, 150) is cres.parts[2]
    with pytest.raises(ValidationError, match="start:stop: axis 1 0:51 is not a segment"):
        cres.segment(1, 0, 51)


def test_segments_errors():
    gp = _gptq(16)
    w = torch.randn(4, 16)
    with pytest.raises(ValidationError, match=r"segments\[1\].start: 3; valid: 2"):
        gp.quantize_segments(w, [SegmentSpec(0, 0, 2, 4, 8), SegmentSpec(0, 3, 4, 4, 8)])
    with pytest.raises(ValidationError, match=r"segments: cover 0:2; valid: exactly 0:4 \(rows\)"):
        gp.quantize_segments(w, [SegmentSpec(0, 0, 2, 4, 8)])
    with pytest.raises(ValidationError, match=r"segments\[1\].axis: 1; valid: 0"):
        gp.quantize_segments(w, [SegmentSpec(0, 0, 2, 4, 8), SegmentSpec(1, 2, 16, 4, 8)])
    with pytest.raises(ValidationError, match="segment.bits: 9 has no packed layout"):
        SegmentSpec(0, 0, 2, 9, 8)
    with pytest.raises(ValidationError, match="segment.group_size: 0; valid: a positive"):
        SegmentSpec(0, 0, 2, 4, 0)
    with pytest.raises(ValidationError, match="row_chunk: 0; valid: a positive integer"):
        gp.quantize_segments(w, [SegmentSpec(0, 0, 4, 4, 8)], row_chunk=0)
    with pytest.raises(ValidationError, match="segments: empty"):
        gp.quantize_segments(w, [])


def test_finiteness_check_by_blocks_sees_every_row():
    from bitsack.kernels.grid import _all_finite

    t = torch.zeros(50, 7, dtype=torch.float16)
    assert _all_finite(t, block=16)
    t[49, 6] = float("inf")
    assert not _all_finite(t, block=16) and not _all_finite(t)
    gp = _gptq(7)
    with pytest.raises(ValidationError, match="weight: holds NaN or infinite"):
        gp.quantize_segments(t, [SegmentSpec(0, 0, 50, 4, 4)])


# ---- the MSE grid (``grid="mse"``) ----------------------------------------------------------
def _group_sq_error(q: QuantizedTensor, w: torch.Tensor) -> torch.Tensor:
    """Squared error of each group ``[rows, groups]`` (the last group may be short)."""
    err = (q.dequantize(torch.float64) - w.to(torch.float64)).square()
    g = q.group_size
    pad = -w.shape[1] % g
    return torch.nn.functional.pad(err, (0, pad)).reshape(w.shape[0], -1, g).sum(-1)


@pytest.mark.parametrize("scale_bits", [None, 6])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_grid_never_worse_than_minmax_per_group(bits, scale_bits):
    """Each group's squared error on the MSE grid is at most its min-max error (p = 1 is a
    candidate), strictly smaller somewhere, with codes and scale codes in range; outliers
    make clipping pay."""
    torch.manual_seed(3)
    w = torch.randn(24, 300) * torch.rand(24, 1)
    w[::5, ::37] *= 6.0  # outliers
    mm = rtn_quantize(w, bits, 32, scale_bits, "minmax")
    mse = rtn_quantize(w, bits, 32, scale_bits, "mse")
    e_mm, e_mse = _group_sq_error(mm, w), _group_sq_error(mse, w)
    assert bool((e_mse <= e_mm * (1 + 1e-12)).all())
    assert float(e_mse.sum()) < 0.9 * float(e_mm.sum()) if bits == 2 else \
        float(e_mse.sum()) < float(e_mm.sum())
    assert int(mse.codes.max()) <= (1 << bits) - 1
    if scale_bits is not None:
        assert int(mse.scale_codes().max()) <= (1 << scale_bits) - 1
        assert torch.equal(mse.step, mm.step)  # steps from the weights' ranges, as before
    again = rtn_quantize(w, bits, 32, scale_bits, "mse")  # deterministic
    assert torch.equal(again.codes, mse.codes) and torch.equal(again.scale, mse.scale)


def test_mse_grid_keeps_minmax_where_it_is_best():
    """Two-level groups sit exactly on the min-max grid: nothing to gain by shrinking."""
    w = torch.tensor([[0.0, 1.0] * 16, [-2.0, 0.0] * 16])
    assert torch.equal(rtn_quantize(w, 1, 32, grid="mse").scale,
                       rtn_quantize(w, 1, 32, grid="minmax").scale)


@pytest.mark.parametrize("grid", ["minmax", "mse"])
def test_gptq_with_a_diagonal_hessian_is_rtn_on_its_grid(grid):
    """With a diagonal H no column's error moves another, so GPTQ (dynamic groups) is RTN —
    on the same grid, min-max or MSE, bit for bit."""
    torch.manual_seed(5)
    rows, cols, g = 8, 96, 32
    w = torch.randn(rows, cols)
    gp = GPTQ.from_hessian(torch.diag(torch.rand(cols, dtype=torch.float64) + 0.5))
    for sb in (None, 6):
        res = gp.quantize_segments(w, [SegmentSpec(0, 0, rows, 2, g, sb, grid)])
        ref = rtn_quantize(w, 2, g, sb, grid)
        assert torch.equal(res.parts[0].codes, ref.codes)
        assert torch.equal(res.parts[0].scale, ref.scale)
        assert torch.equal(res.parts[0].zero, ref.zero)


def test_column_weights_of_one_change_nothing():
    """``col_weight`` of ones is the unweighted MSE grid, bit for bit."""
    from bitsack.kernels.grid import group_params

    torch.manual_seed(4)
    x = torch.randn(6, 5, 32)
    plain = group_params(x, 3, "mse")
    ones = group_params(x, 3, "hmse", col_weight=torch.ones(32))
    assert all(torch.equal(a, b) for a, b in zip(plain, ones, strict=True))
    # RTN has no Hessian: "hmse" is "mse" there
    w = torch.randn(8, 80)
    a, b = rtn_quantize(w, 3, 32, 6, "hmse"), rtn_quantize(w, 3, 32, 6, "mse")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


def test_hmse_with_a_diagonal_hessian_minimises_the_weighted_error():
    """With a diagonal H GPTQ is RTN and its loss is Σ H_jj·e_j²: ``"hmse"`` picks, per
    group, a grid whose H-weighted error is at most the min-max and the MSE grid's (both are
    among its candidates), strictly smaller in total when the columns' weights differ."""
    torch.manual_seed(6)
    rows, cols, g = 16, 128, 32
    w = torch.randn(rows, cols)
    h = torch.exp(2 * torch.randn(cols, dtype=torch.float64))
    gp = GPTQ.from_hessian(torch.diag(h))
    lam = 0.01 * float(h.mean())  # GPTQ's default damping

    def weighted(grid):
        q = gp.quantize_segments(w, [SegmentSpec(0, 0, rows, 2, g, 6, grid)]).parts[0]
        e2 = (q.dequantize(torch.float64) - w.to(torch.float64)).square() * (h + lam)
        return e2.reshape(rows, -1, g).sum(-1)

    e_h, e_mse, e_mm = weighted("hmse"), weighted("mse"), weighted("minmax")
    assert bool((e_h <= e_mse * (1 + 1e-9)).all()) and bool((e_h <= e_mm * (1 + 1e-9)).all())
    assert float(e_h.sum()) < 0.95 * float(e_mse.sum())


@pytest.mark.parametrize("act_order", [False, True])
def test_hmse_lowers_gptq_output_error(act_order):
    """On inputs whose columns carry uneven energy (as real activations do), weighting the
    clip search as GPTQ's loss weighs the columns lowers the output error ‖(W − Ŵ)Xᵀ‖² against
    the unweighted MSE grid (measured here: about 0.6–0.8×)."""
    torch.manual_seed(0)
    rows, cols, n = 64, 192, 1024
    x = (torch.randn(n, cols) @ (torch.randn(cols, cols) / cols**0.5)) \
        * torch.exp(torch.randn(cols))
    w = torch.randn(rows, cols) * 0.05
    gp = GPTQ(cols)
    gp.add_batch(x)

    def out_err(grid):
        q = gp.quantize_segments(w, [SegmentSpec(0, 0, rows, 3, 32, 6, grid)],
                                 act_order=act_order).parts[0]
        return float(((w.double() - q.dequantize(torch.float64)) @ x.double().t()).square()
                     .sum())

    assert out_err("hmse") < 0.9 * out_err("mse")


@pytest.mark.parametrize("scale_bits", [None, 4, 6])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_a_symmetric_grid_keeps_every_zero_point_fixed(scale_bits, act_order):
    """``sym-hmse``: GPTQ's groups keep ``z = 2**(bits − 1)`` (what ggml's Q4_0 / K-quants
    store), mixed bit-widths per row included; scale codes stay ``k·step``; the weighted clip
    search is no worse on GPTQ's own loss than the plain symmetric grid."""
    torch.manual_seed(1)
    rows, cols = 24, 256
    x = torch.randn(512, cols) * torch.exp(torch.randn(cols))
    w = torch.randn(rows, cols) * 0.05
    gp = GPTQ(cols)
    gp.add_batch(x)
    specs = [SegmentSpec(0, 0, 8, 2, 32, scale_bits, "sym-hmse"),
             SegmentSpec(0, 8, 16, 3, 16, scale_bits, "sym-hmse"),
             SegmentSpec(0, 16, 24, 6, 64, scale_bits, "sym")]
    res = gp.quantize_segments(w, specs, act_order=act_order)
    for spec, q in zip(specs, res.parts, strict=True):
        assert bool((q.zero == 2 ** (spec.bits - 1)).all())
        if scale_bits is not None:
            q.scale_codes()  # raises unless every scale is k·step, 1 ≤ k < 2**S

    def loss(grid):
        q = gp.quantize_segments(w[:8], [SegmentSpec(0, 0, 8, 3, 32, scale_bits, grid)],
                                 act_order=act_order)
        return float(q.loss)

    assert loss("sym-hmse") <= loss("sym") * 1.02


def test_grid_errors():
    w = torch.randn(4, 32)
    with pytest.raises(ValidationError, match="grid: 'mean'; valid: minmax, mse, hmse"):
        rtn_quantize(w, 2, 32, grid="mean")
    with pytest.raises(ValidationError, match="segment.grid: 'x'"):
        SegmentSpec(0, 0, 4, 2, 32, None, "x")
