"""Fisher, fisher-diag and Hutchinson against closed forms on a linear model, squared loss.

Model: y = W x + V z, loss ½‖y − t‖². Its Hessian (= Gauss-Newton = Fisher of the Gaussian
likelihood) is H = I ⊗ mean_s [x;z][x;z]ᵀ, so for a perturbation (δ_W, δ_V)
    ½ δᵀHδ = ½ mean_s ‖δ_W x_s + δ_V z_s‖².
With "sampled labels" t = y + ε whose 2m draws ε ∈ {±√m e_j} have covariance exactly I, the
per-row gradients g = −ε [x;z]ᵀ make the Fisher estimator's quadratic form equal this value
exactly (not only in expectation).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from bitsack.models.base import Slice, UnitSpec
from bitsack.profiling.capture import GradRow
from bitsack.profiling.estimators import (
    GradientStats,
    diag_from_stats,
    fisher_from_stats,
    hutchinson_loss,
    hutchinson_sums,
    project_rows,
)
from bitsack.profiling.layout import OptionLayout, option_key
from bitsack.profiling.perturb import Perturbations

M, NX, NZ, G = 4, 8, 8, 4


class Linear2(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(M, NX, generator=gen))
        self.V = nn.Parameter(torch.randn(M, NZ, generator=gen))


def _units() -> list[UnitSpec]:
    # W by rows (like q/k/v), V by columns (like o_proj): both axes are exercised
    return [
        UnitSpec("w0", "head_group", 0, (Slice("W", 0, 0, 2, (2, NX)),), prunable=False),
        UnitSpec("w1", "head_group", 0, (Slice("W", 0, 2, 4, (2, NX)),), prunable=False),
        UnitSpec("v0", "mlp_group", 0, (Slice("V", 1, 0, 4, (M, 4)),), prunable=True),
        UnitSpec("v1", "mlp_group", 0, (Slice("V", 1, 4, 8, (M, 4)),), prunable=True),
    ]


def _setup(n_samples: int = 5, seed: int = 0):
    model = Linear2(seed)
    layout = OptionLayout.build(_units(), bits=(2, 3))
    pert = Perturbations(model, layout, G)
    pert.compute()
    gen = torch.Generator().manual_seed(seed + 1)
    xs = torch.randn(n_samples, NX, generator=gen, dtype=torch.float64)
    zs = torch.randn(n_samples, NZ, generator=gen, dtype=torch.float64)
    return model, layout, pert, xs, zs


def _rows(xs, zs):
    """Gradients −ε [x;z]ᵀ for the 2M draws ε = ±√M e_j of every sample."""
    rows = []
    for s in range(xs.shape[0]):
        for j, sign in itertools.product(range(M), (1.0, -1.0)):
            eps = torch.zeros(M, dtype=torch.float64)
            eps[j] = sign * M ** 0.5
            grads = {"W": (-eps[:, None] * xs[s][None, :]).float(),
                     "V": (-eps[:, None] * zs[s][None, :]).float()}
            rows.append(GradRow(grads, 1, s, "sampled", 0, 0))
    return rows


def _stats(pert, xs, zs, diag=False) -> GradientStats:
    vs, ds, meta = project_rows(pert, _rows(xs, zs), diag=diag)
    R = len(meta)
    return GradientStats(torch.stack(vs).numpy(), torch.stack(ds).numpy() if diag else None,
                         np.ones(R), np.array(["sampled"] * R), np.array([m.seq for m in meta]))


def _delta(pert, layout, unit_index, option_id):
    """(δ_W, δ_V) of one option, float64, from the stored perturbations."""
    dW = torch.zeros(M, NX, dtype=torch.float64)
    dV = torch.zeros(M, NZ, dtype=torch.float64)
    unit = layout.units[unit_index]
    key = option_key(option_id)
    for s in unit.slices:
        if key == "prune" and s.dim != 1:
            continue
        full = pert.delta(s.param, key).double()
        target = dW if s.param == "W" else dV
        if s.dim == 0:
            target[s.start:s.stop] = full[s.start:s.stop]
        else:
            target[:, s.start:s.stop] = full[:, s.start:s.stop]
    return dW, dV


def _quad(dW, dV, xs, zs) -> float:
    return 0.5 * float(((xs @ dW.T + zs @ dV.T) ** 2).sum(1).mean())


def test_stored_delta_is_the_quantizer_error_within_fp16_precision():
    from bitsack.kernels.quantizers import fake_quantize

    model, _, pert, _, _ = _setup()
    for bits in (2, 3):
        exact = fake_quantize(model.W.detach(), bits, G) - model.W.detach()
        stored = pert.delta("W", bits)
        assert torch.allclose(stored, exact, rtol=2 ** -10, atol=exact.abs().max() * 2 ** -24)
        assert float(exact.abs().max()) > 0


def test_fisher_standalone_losses_equal_the_closed_form():
    _, layout, pert, xs, zs = _setup()
    est = fisher_from_stats(layout, _stats(pert, xs, zs))
    for j, (ui, oid) in enumerate(layout.flat):
        want = _quad(*_delta(pert, layout, ui, oid), xs, zs)
        assert est.loss[j] == pytest.approx(want, rel=1e-5, abs=1e-9), (ui, oid)
    # prune of a column unit is the loss of zeroing those columns
    j = layout.index("v0", "prune")
    dV = torch.zeros(M, NZ, dtype=torch.float64)
    dV[:, 0:4] = -pert.entries["V"].param.detach().double()[:, 0:4]
    assert est.loss[j] == pytest.approx(_quad(torch.zeros(M, NX, dtype=torch.float64), dV,
                                              xs, zs), rel=1e-5)


def test_fisher_interactions_reproduce_the_quadratic_form_of_whole_plans():
    _, layout, pert, xs, zs = _setup()
    est = fisher_from_stats(layout, _stats(pert, xs, zs))
    assert est.U.shape == (xs.shape[0] * 2 * M, layout.n_options)
    rng = np.random.default_rng(0)
    for _ in range(10):
        plan = [(ui, layout.option_ids[ui][rng.integers(len(layout.option_ids[ui]))])
                for ui in range(len(layout.units))]
        cols = [layout.index(ui, oid) for ui, oid in plan]
        objective = sum(est.loss[j] for j in cols) + sum(
            float(est.U[:, a] @ est.U[:, b]) for a, b in itertools.combinations(cols, 2))
        dW = sum(_delta(pert, layout, ui, oid)[0] for ui, oid in plan)
        dV = sum(_delta(pert, layout, ui, oid)[1] for ui, oid in plan)
        assert objective == pytest.approx(_quad(dW, dV, xs, zs), rel=1e-5)


def test_fisher_diag_is_the_diagonal_of_the_same_form():
    model, layout, pert, xs, zs = _setup()
    est = diag_from_stats(layout, _stats(pert, xs, zs, diag=True))
    # diag(H) for W[r, c] is mean_s x_c², for V[r, c] mean_s z_c²
    fx = (xs ** 2).mean(0)
    fz = (zs ** 2).mean(0)
    for j, (ui, oid) in enumerate(layout.flat):
        dW, dV = _delta(pert, layout, ui, oid)
        want = 0.5 * float((dW ** 2 * fx[None, :]).sum() + (dV ** 2 * fz[None, :]).sum())
        assert est.loss[j] == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_first_order_term_is_mean_gradient_projection_when_on():
    _, layout, pert, xs, zs = _setup()
    stats = _stats(pert, xs, zs)
    off = fisher_from_stats(layout, stats)
    on = fisher_from_stats(layout, stats, first_order="on")
    # the ± draws cancel exactly: the first-order term of exactly-sampled labels is zero
    assert np.allclose(on.loss, off.loss, rtol=1e-6, atol=1e-9)
    sig = fisher_from_stats(layout, stats, first_order="significant")
    assert sig.info["first_order_kept"] == 0


def test_hutchinson_recovers_unit_traces_of_a_diagonal_hessian():
    # x_s = a_s e_(s mod n) on half the samples, z on the other half (never both, so W and
    # V do not couple): mean_s [x;z][x;z]ᵀ is diagonal and z_i (Hz)_i = H_ii for every probe
    model, layout, pert, _, _ = _setup()
    half = 16
    n = 2 * half
    a = torch.linspace(0.5, 2.0, half, dtype=torch.float32)
    X = torch.zeros(n, NX)
    Z = torch.zeros(n, NZ)
    for s in range(half):
        X[s, s % NX] = a[s]
        Z[half + s, (s + 3) % NZ] = a[half - 1 - s]
    target = torch.zeros(M)
    params = [model.W, model.V]

    def losses():
        for s in range(n):
            y = model.W @ X[s] + model.V @ Z[s]
            yield s, 0.5 * ((y - target) ** 2).sum()

    sums = hutchinson_sums(pert, params, losses(), probes=3, seed=0)
    trace = (sums[:-1] / (n * 3)).numpy()
    hx = (X.double() ** 2).mean(0)
    hz = (Z.double() ** 2).mean(0)
    for j, (ui, oid) in enumerate(layout.flat):
        unit = layout.units[ui]
        want = 0.0
        for s in unit.slices:
            if oid == "prune" and s.dim != 1:
                continue
            h = hx if s.param == "W" else hz
            want += float(h.sum() * (s.stop - s.start)) if s.dim == 0 else \
                float(h[s.start:s.stop].sum() * M)
        assert trace[j] == pytest.approx(want, rel=1e-5)
    loss = hutchinson_loss(pert, trace)
    j = layout.index("w0", "b2")
    dW, _ = _delta(pert, layout, 0, "b2")
    assert loss[j] == pytest.approx(0.5 * trace[j] / (2 * NX) * float((dW ** 2).sum()),
                                    rel=1e-5)
