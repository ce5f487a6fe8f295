"""The shared Hessian accumulator: numerics against a float64 reference, merge, GPTQ use."""

from __future__ import annotations

import pytest
import torch

from bitsack.errors import ValidationError
from bitsack.kernels.bounds import U_FP32, U_FP64, gamma
from bitsack.kernels.hessian import Hessian
from bitsack.kernels.quantizers import GPTQ


def _batches(seed: int, cols: int, sizes: list[int], scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, cols, generator=g) * scale + 0.3) for m in sizes]


def test_float32_products_within_bound_of_float64_sum():
    cols, sizes = 24, [7, 300, 1, 64]
    batches = _batches(0, cols, sizes, scale=3.0)
    h = Hessian(cols)
    for x in batches:
        h.add(x.reshape(-1, 3, cols) if x.shape[0] % 3 == 0 else x)  # leading dims are samples
    flat = torch.cat(batches).double()  # float32 values, exact in float64
    S_ref = flat.T @ flat
    # each batch product errs by ≤ γ_m |X|ᵀ|X| (float32); the float64 sums add n·2⁻⁵³ more
    bound = sum(gamma(x.shape[0], U_FP32) * (x.double().abs().T @ x.double().abs())
                for x in batches)
    bound = bound + gamma(flat.shape[0] + len(sizes), U_FP64) * (flat.abs().T @ flat.abs())
    err = (h.S - S_ref).abs()
    assert h.n == sum(sizes) and h.S.dtype == torch.float64
    assert bool((err <= bound).all())
    assert float(err.max()) > 0  # the products really are float32 (else the test says nothing)
    torch.testing.assert_close(h.matrix(), 2.0 * h.S / h.n, rtol=0, atol=0)


def test_float64_input_keeps_float64_products():
    x = torch.randn(50, 8, dtype=torch.float64)
    h = Hessian(8)
    h.add(x)
    assert torch.equal(h.S, x.T @ x)


def test_merge_equals_one_accumulator_and_gptq_uses_it():
    cols = 16
    batches = _batches(1, cols, [10, 20, 30])
    one, a, b = Hessian(cols), Hessian(cols), Hessian(cols)
    for x in batches:
        one.add(x)
    a.add(batches[0])
    b.add(batches[1])
    b.add(batches[2])
    assert a.merge(b) is a
    assert a.n == one.n == 60
    assert torch.equal(a.S, one.S)  # same float32 products, float64 sums in the same order
    gp = GPTQ(cols)
    for x in batches:
        gp.add_batch(x)
    assert torch.equal(gp.hessian.S, one.S) and gp.nsamples == 60
    assert torch.equal(gp.H, one.matrix())
    w = torch.randn(6, cols)
    r1 = gp.quantize(w, 3, 8)
    r2 = GPTQ.from_hessian(one).quantize(w, 3, 8)
    r3 = GPTQ.from_hessian(one.matrix(), nsamples=one.n).quantize(w, 3, 8)
    assert torch.equal(r1.weight, r2.weight) and torch.equal(r1.weight, r3.weight)


def test_errors():
    with pytest.raises(ValidationError, match="columns: 0; valid: a positive integer"):
        Hessian(0)
    h = Hessian(4)
    with pytest.raises(ValidationError, match="x: last dim 3; valid: 4"):
        h.add(torch.zeros(2, 3))
    with pytest.raises(ValidationError, match="x: dtype torch.int64"):
        h.add(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValidationError, match="hessian: no calibration inputs"):
        h.matrix()
    with pytest.raises(ValidationError, match="other: 5; valid: a Hessian of 4 columns"):
        h.merge(Hessian(5))
    h.add(torch.zeros(0, 4))
    assert h.n == 0
    with pytest.raises(ValidationError, match="add_batch: this GPTQ holds a fixed Hessian"):
        GPTQ.from_hessian(torch.eye(4, dtype=torch.float64)).add_batch(torch.zeros(1, 4))
