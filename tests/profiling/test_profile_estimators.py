"""Estimators on tiny random models: shapes, determinism, and each against a direct
computation (layerwise vs ‖ΔW X‖², measured vs a loss difference, projections vs g·δ)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from bitsack.errors import NumericalError, ValidationError
from bitsack.kernels.quantizers import fake_quantize
from bitsack.models import model_units
from bitsack.models.testing import tiny_model
from bitsack.profiling import EstimatorOptions, profile
from bitsack.profiling.calibrate import fit_calibration
from bitsack.profiling.layout import OptionLayout
from bitsack.profiling.perturb import output_slices

G = 16
BITS = (2, 3, 4)


def _tokens(n=6, seqlen=24, seed=0, vocab=128):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _setup(arch="llama", seed=0):
    model = tiny_model(arch, seed=seed)
    units = model_units(model, mlp_group=32)
    return model, units


def _exact_weights(model, unit, oid):
    """Copy of the model with the option applied by hand (quantizing each slice alone)."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for s in unit.slices:
            w = params[s.param].T if s.transposed else params[s.param]
            view = w[s.start:s.stop] if s.dim == 0 else w[:, s.start:s.stop]
            if oid == "prune":
                if s in output_slices(unit):
                    view.zero_()
            else:
                view.copy_(fake_quantize(view.detach().clone(), int(oid[1:]), G))
    return m


def _loss(model, tokens):
    with torch.no_grad():
        return float(model(input_ids=tokens, labels=tokens).loss)


def test_fisher_problem_shapes_b16_and_costs():
    model, units = _setup()
    toks = _tokens()
    res = profile(model, units, toks, bits=BITS, group_size=G, progress=False)
    p = res.problem
    assert [u.id for u in p.units] == [u.id for u in units]
    for u, spec in zip(p.units, units, strict=True):
        ids = [o.id for o in u.options]
        assert ids == (["prune"] if spec.prunable else []) + ["b2", "b3", "b4", "b16"]
        b4, b16 = u.option("b4"), u.option("b16")
        assert 0 <= b16.loss < 1e-4 * b4.loss
        assert b16.cost["memory_bytes"] == 2 * spec.params
        assert u.option("b2").loss > b4.loss > 0
        if spec.prunable:
            assert u.option("prune").cost["memory_bytes"] == 0
            assert u.option("prune").loss > 0
        assert u.params == spec.params
    assert p.interactions.U.shape == (toks.shape[0], p.n_options)
    assert p.interactions.file == "interactions.npz"
    meta = p.metadata
    assert meta["estimator"] == "fisher" and meta["group_size"] == G and meta["mlp_group"] == 32
    assert meta["adapter"] == "LlamaAdapter" and meta["bits"] == [2, 3, 4, 16]
    rep = res.report
    assert rep["interaction_rows"] == toks.shape[0]
    assert rep["resources"]["peak_memory_bytes"] > 0
    assert {"quantize", "gradients"} <= set(rep["resources"]["timings_s"])


def test_fisher_is_deterministic_and_seed_dependent():
    model, units = _setup()
    toks = _tokens()
    a = profile(model, units, toks, bits=BITS, group_size=G, progress=False, seed=3)
    b = profile(model, units, toks, bits=BITS, group_size=G, progress=False, seed=3)
    c = profile(model, units, toks, bits=BITS, group_size=G, progress=False, seed=4)
    assert a.problem == b.problem
    assert not np.array_equal(a.problem.interactions.U, c.problem.interactions.U)


def test_projection_equals_gradient_dot_delta():
    """v(u, o) of one data-label row equals Σ g ⊙ δ over the unit's slices, by hand."""
    from bitsack.profiling.capture import lm_gradient_rows
    from bitsack.profiling.perturb import Perturbations

    model, units = _setup()
    layout = OptionLayout.build(units, BITS)
    pert = Perturbations(model, layout, G)
    pert.compute()
    toks = _tokens(1)
    row = next(lm_gradient_rows(model, list(pert.entries), toks, sources=("data",)))
    v = pert.project(row.grads)[:-1].numpy()
    # the same gradient by hand
    model.zero_grad()
    model(input_ids=toks, labels=toks).loss.backward()
    params = dict(model.named_parameters())
    for ui in (0, 3, len(units) - 1):
        unit = units[ui]
        for oid in layout.option_ids[ui]:
            want = 0.0
            slices = output_slices(unit) if oid == "prune" else unit.slices
            for s in slices:
                g = params[s.param].grad
                w = params[s.param].detach()
                g, w = (g.T, w.T) if s.transposed else (g, w)
                sl = (slice(s.start, s.stop), slice(None)) if s.dim == 0 else \
                    (slice(None), slice(s.start, s.stop))
                d = -w[sl] if oid == "prune" else fake_quantize(w[sl], int(oid[1:]), G) - w[sl]
                want += float((g[sl].double() * d.double()).sum())
            got = v[layout.index(ui, oid)]
            assert got == pytest.approx(want, rel=2e-3, abs=1e-7), (unit.id, oid)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_measured_equals_a_direct_loss_difference(arch):
    model, units = _setup(arch)
    toks = _tokens(4, 20, seed=1)
    pick = [units[0], units[2], units[-1]]
    res = profile(model, pick, toks, estimator="measured", bits=(2, 4), group_size=G,
                  progress=False, options=EstimatorOptions(batch_size=3))
    base = _loss(model, toks)
    for unit in res.problem.units:
        spec = next(u for u in pick if u.id == unit.id)
        for opt in unit.options:
            want = _loss(_exact_weights(model, spec, opt.id), toks) - base
            assert opt.loss == pytest.approx(want, rel=1e-4, abs=2e-6), (arch, unit.id, opt.id)
    # the model is left exactly as it was
    assert _loss(model, toks) == base


def test_measured_subset_is_seeded():
    model, units = _setup()
    toks = _tokens(2, 16)
    opts = EstimatorOptions(measure_fraction=0.3)
    a = profile(model, units, toks, estimator="measured", bits=(2,), group_size=G,
                progress=False, options=opts, seed=1)
    b = profile(model, units, toks, estimator="measured", bits=(2,), group_size=G,
                progress=False, options=opts, seed=1)
    assert [u.id for u in a.problem.units] == [u.id for u in b.problem.units]
    assert len(a.problem.units) == round(0.3 * len(units))
    assert a.problem.metadata["units_subset"] == len(a.problem.units)


def test_layerwise_equals_direct_output_error():
    model, units = _setup()
    toks = _tokens(3, 16)
    res = profile(model, units, toks, estimator="layerwise", bits=(2, 4), group_size=G,
                  progress=False, options=EstimatorOptions(batch_size=2))
    inputs: dict[str, list[torch.Tensor]] = {}
    names = {id(m): n for n, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(
        lambda mod, a: inputs.setdefault(names[id(mod)] + ".weight", []).append(a[0].detach()))
        for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(input_ids=toks)
    for h in hooks:
        h.remove()
    X = {k: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]).double() for k, v in inputs.items()}
    params = dict(model.named_parameters())
    n_tok = toks.numel()
    for unit, spec in zip(res.problem.units, units, strict=True):
        for opt in unit.options:
            want = 0.0
            slices = output_slices(spec) if opt.id == "prune" else spec.slices
            for s in slices:
                w = params[s.param].detach()
                sl = (slice(s.start, s.stop), slice(None)) if s.dim == 0 else \
                    (slice(None), slice(s.start, s.stop))
                d = (-w if opt.id == "prune" else
                     fake_quantize(w, int(opt.id[1:]), G) - w)[sl].double()
                if s.param == "model.embed_tokens.weight":
                    want += float((d[toks.reshape(-1)] ** 2).sum())
                else:
                    x = X[s.param] if s.dim == 0 else X[s.param][:, s.start:s.stop]
                    want += float(((x @ d.T) ** 2).sum())
            assert opt.loss == pytest.approx(want / n_tok, rel=3e-3, abs=1e-10), \
                (unit.id, opt.id)


def test_gptq_perturbations_lower_the_layerwise_error():
    model, units = _setup()
    toks = _tokens(4, 32)
    kw = dict(estimator="layerwise", bits=(2,), group_size=G, progress=False)
    rtn = profile(model, units, toks, quantizer="rtn", **kw).problem
    gptq = profile(model, units, toks, quantizer="gptq", **kw).problem
    total = {q: sum(u.option("b2").loss for u in p.units if u.kind != "embedding")
             for q, p in (("rtn", rtn), ("gptq", gptq))}
    assert total["gptq"] < total["rtn"]
    # the input embedding is a lookup: no Hessian, RTN (recorded)
    assert gptq.metadata["rtn_fallback"] == ["model.embed_tokens.weight"]


@pytest.mark.parametrize("estimator", ["fisher-diag", "hutchinson", "calibrated"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_every_estimator_runs_on_every_architecture(arch, estimator):
    model, units = _setup(arch)
    toks = _tokens(4, 16)
    opts = EstimatorOptions(hutchinson_samples=2, hutchinson_probes=2, calibrate_min_units=2,
                            holdout=1)
    res = profile(model, units, toks, estimator=estimator, bits=(2, 4), group_size=G,
                  progress=False, options=opts)
    losses = [o.loss for u in res.problem.units for o in u.options]
    assert len(losses) == res.problem.n_options and all(np.isfinite(losses))
    if estimator == "calibrated":
        cal = res.problem.metadata["calibration"]
        assert cal["units_measured"] >= 2 and cal["groups"]
        assert res.problem.interactions.U.shape[0] == 3  # 4 sequences, 1 held out


def test_calibration_recovers_known_scales():
    model = tiny_model("llama", num_hidden_layers=6)  # 12 head groups, 18 MLP blocks
    units = model_units(model, mlp_group=32)
    layout = OptionLayout.build(units, (2, 3, 4))
    rng = np.random.default_rng(0)
    pred = np.exp(rng.normal(-6, 2, layout.n_options))
    truth = {("head_group", "prune"): 7.0, ("head_group", "b2"): 3.0, ("mlp_group", "b2"): 0.5,
             ("mlp_group", "prune"): 11.0}
    scale = np.array([truth.get((layout.units[ui].kind, oid), 2.0) for ui, oid in layout.flat])
    cols = list(range(layout.n_options))
    cal = fit_calibration(layout, pred, pred * scale, cols, seed=0)
    fitted = []
    for g in cal.groups:
        if g.option == "b16" or g.n < 3:  # too few pairs (2 embedding units): borrowed
            assert g.source.startswith("borrowed")
            continue
        fitted.append((g.kind, g.option))
        assert g.source == "fit"
        assert g.scale == pytest.approx(truth.get((g.kind, g.option), 2.0), rel=1e-9)
        assert g.spearman == pytest.approx(1.0)
        if g.r2_heldout is not None:
            assert g.r2_heldout == pytest.approx(1.0)
    assert len(fitted) == 8  # prune, b2, b3, b4 of head groups and MLP blocks
    assert cal.r2_heldout > 0.99  # embedding pairs use a borrowed scale
    # the embedding borrows the same option of another kind
    assert cal.scale_for("embedding", "b2") == pytest.approx(3.0)  # head_group/b2 (sorted)
    # b16 borrows the nearest fitted bit-width of its kind: b4 (scale 2)
    assert cal.scale_for("head_group", "b16") == pytest.approx(2.0)


def test_non_finite_gradient_names_the_unit():
    model, units = _setup()
    p = dict(model.named_parameters())["model.layers.1.mlp.down_proj.weight"]
    handle = p.register_hook(lambda g: g * float("nan"))
    try:
        with pytest.raises(NumericalError, match=r"unit 'L1\.mlp\.c0' option 'prune'"):
            profile(model, units, _tokens(2, 12), bits=(2,), group_size=G, progress=False)
    finally:
        handle.remove()


def test_bad_arguments_are_named():
    model, units = _setup()
    toks = _tokens(2, 12)
    with pytest.raises(ValidationError, match="estimator: 'magic' is unknown; valid: "):
        profile(model, units, toks, estimator="magic", progress=False)
    with pytest.raises(ValidationError, match=r"bits\[1\]: 9 is not a bit-width"):
        profile(model, units, toks, bits=(2, 9), group_size=G, progress=False)
    with pytest.raises(ValidationError, match="calib_tokens: "):
        profile(model, units, toks[0], group_size=G, progress=False)
    with pytest.raises(ValidationError, match="fisher_labels: 'model'"):
        EstimatorOptions(fisher_labels="model")
    with pytest.raises(ValidationError, match="quantizer: 'awq'"):
        profile(model, units, toks, quantizer="awq", group_size=G, progress=False)


def test_hutchinson_runs_under_sdpa_attention():
    """transformers' default sdpa attention: the fused CPU kernel has no double backward, so
    the Hessian-vector products must run under the math kernel."""
    m = tiny_model("llama", seed=1)
    m.config._attn_implementation = "sdpa"
    units = model_units(m, mlp_group=32)
    toks = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    r = profile(m, units, toks, estimator="hutchinson", bits=(2, 3), group_size=16,
                progress=False)
    assert all(math.isfinite(o.loss) for u in r.problem.units for o in u.options)
