"""bitsack.profiling.validate: scoring predictions against measured loss changes, on numbers
whose answers are known by hand (no model), and once against a real tiny model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bitsack.errors import ValidationError
from bitsack.models.base import Slice, UnitSpec
from bitsack.profiling.fisher import GradientStats
from bitsack.profiling.layout import OptionLayout
from bitsack.profiling.validate import (
    SUM_OF_SINGLES,
    Prediction,
    interaction_term,
    measure_singles,
    measurement_noise,
    pair_key,
    pair_keys,
    plan_errors,
    predict_plans,
    relative_error,
    sample_plans,
    score,
    spearman,
)

pytest.importorskip("scipy")


def _layout(n: int = 4) -> OptionLayout:
    units = [UnitSpec(f"u{i}", "head_group" if i % 2 == 0 else "mlp_group", i,
                      (Slice(f"W{i}", 1, 0, 4, (4, 4)),), prunable=True) for i in range(n)]
    return OptionLayout.build(units, bits=(2, 4))  # options prune, b2, b4, b16


def test_pair_keys_follow_the_flat_order():
    layout = _layout(2)
    assert pair_keys(layout) == ["u0|prune", "u0|b2", "u0|b4", "u0|b16",
                                 "u1|prune", "u1|b2", "u1|b4", "u1|b16"]
    assert pair_key("L3.attn.g1", "b3") == "L3.attn.g1|b3"


def test_spearman_is_none_where_undefined():
    assert spearman(np.array([1.0, 2.0]), np.array([1.0, 2.0])) is None  # < 3 pairs
    assert spearman(np.ones(5), np.arange(5.0)) is None  # no spread
    assert spearman(np.arange(5.0), np.arange(5.0) ** 3) == pytest.approx(1.0)
    assert spearman(np.arange(5.0), -np.arange(5.0)) == pytest.approx(-1.0)


def test_score_ranks_and_sizes_each_option():
    layout = _layout(4)
    measured = {}
    loss = np.full(layout.n_options, np.nan)
    for j, (ui, oid) in enumerate(layout.flat):
        m = (ui + 1) * {"prune": 1.0, "b2": 0.1, "b4": 0.01, "b16": 0.0}[oid]
        measured[pair_keys(layout)[j]] = m
        # prune: right order, twice the size; b2: reversed order, right size on the median
        loss[j] = {"prune": 2 * m, "b2": 0.1 * (4 - ui), "b4": np.nan, "b16": 0.0}[oid]
    s = score(layout, Prediction("p", loss), measured, ("prune", "b2", "b4"))
    assert s["prune"] == {"rho": pytest.approx(1.0), "n": 4, "median_ratio": pytest.approx(2.0)}
    assert s["b2"]["rho"] == pytest.approx(-1.0) and s["b2"]["n"] == 4
    # median of (4, 3, 2, 1)·0.1 / ((1, 2, 3, 4)·0.1) = median(4, 1.5, 2/3, 1/4)
    assert s["b2"]["median_ratio"] == pytest.approx(np.median([4, 1.5, 2 / 3, 0.25]))
    assert "b4" not in s  # no finite prediction: not scored
    assert s["pooled"]["n"] == 8
    # scored on a subset of the units only
    sub = score(layout, Prediction("p", loss, eval_units=frozenset({"u0", "u1", "u2"})),
                measured, ("prune",))
    assert sub["prune"]["n"] == 3


def test_score_ratio_skips_measurements_at_or_below_zero():
    layout = _layout(3)
    keys = pair_keys(layout)
    measured = dict.fromkeys(keys, -1.0)
    s = score(layout, Prediction("p", np.ones(layout.n_options)), measured, ("b2",))
    assert s["b2"]["median_ratio"] is None and s["b2"]["rho"] is None


class _FakeMeasurer:
    def __init__(self):
        self.calls = []

    def delta_loss(self, assignment):
        self.calls.append([(u.id, o) for u, o in assignment])
        return sum(int(u.id[1:]) + len(o) for u, o in assignment)


def test_measure_singles_measures_each_option_alone_and_resumes():
    layout = _layout(2)
    meas = _FakeMeasurer()
    seen = []
    values = measure_singles(meas, layout, ("prune", "b2"), done={"u0|prune": 9.0},
                             on_value=lambda v: seen.append(len(v)))
    assert values == {"u0|prune": 9.0, "u0|b2": 2.0, "u1|prune": 6.0, "u1|b2": 3.0}
    assert meas.calls == [[("u0", "b2")], [("u1", "prune")], [("u1", "b2")]]
    assert seen == [2, 3, 4]
    assert len(measure_singles(_FakeMeasurer(), layout)) == layout.n_options


def test_sample_plans_are_seeded_distinct_units_with_allowed_options():
    ids = [f"u{i}" for i in range(10)]
    choices = [("prune", "b2")] * 3 + [("b3",)] * 2
    plans = sample_plans(ids, choices, 2, 4, seed=5)
    assert plans == sample_plans(ids, choices, 2, 4, seed=5)
    assert plans != sample_plans(ids, choices, 2, 4, seed=6)
    assert len(plans) == 5
    for plan, allowed in zip(plans, choices, strict=True):
        units = [u for u, _ in plan]
        assert 2 <= len(plan) <= 4 and len(set(units)) == len(units)
        assert units == sorted(units, key=ids.index)
        assert all(o in allowed for _, o in plan)


def test_interaction_term_is_the_sum_over_pairs():
    rng = np.random.default_rng(0)
    U = rng.standard_normal((5, 7))
    cols = [0, 3, 6]
    brute = sum(float(U[:, a] @ U[:, b]) for a, b in itertools.combinations(cols, 2))
    assert interaction_term(U, cols) == pytest.approx(brute)
    assert interaction_term(U, [2]) == pytest.approx(0.0)


def test_predict_plans_and_their_errors():
    layout = _layout(3)
    keys = pair_keys(layout)
    loss = np.arange(layout.n_options, dtype=float)
    U = np.ones((1, layout.n_options))
    measured = {k: 0.5 for k in keys}
    plans = [{"plan": [["u0", "b2"], ["u2", "prune"]], "kind": "mixed", "measured": 10.0},
             {"plan": [["u1", "b4"]], "kind": "quant", "measured": 0.0}]
    rows = predict_plans(layout, [Prediction("a", loss, U), Prediction("d", loss)], plans,
                         measured)
    j = {k: i for i, k in enumerate(keys)}
    add0 = loss[j["u0|b2"]] + loss[j["u2|prune"]]
    assert rows[0]["pred"]["a"] == {"additive": add0, "with_U": add0 + 1.0}
    assert rows[0]["pred"]["d"] == {"additive": add0}  # no U: additive only
    assert rows[0]["sum_measured_singles"] == 1.0 and rows[1]["sum_measured_singles"] == 0.5
    assert predict_plans(layout, [], plans, None)[0].keys() == {"plan", "kind", "measured",
                                                                 "pred"}

    err = plan_errors(rows)
    assert list(err) == [SUM_OF_SINGLES, "a additive", "a with_U", "d additive"]
    # plan 1 measured 0: no relative error, the absolute error still counts
    assert err[SUM_OF_SINGLES]["median_rel"] == pytest.approx(0.9)
    assert err[SUM_OF_SINGLES]["mean_abs"] == pytest.approx((9.0 + 0.5) / 2)
    assert relative_error(12.0, -10.0) == pytest.approx(2.2)
    assert np.isnan(relative_error(1.0, 0.0))


def test_measurement_noise_per_option():
    layout = _layout(2)
    keys = pair_keys(layout)
    V = np.zeros((4, layout.n_options))
    V[:, keys.index("u0|b2")] = [1.0, -1.0, 1.0, -1.0]  # sd 2/√3
    V[:, keys.index("u1|b2")] = [3.0, -3.0, 3.0, -3.0]
    measured = {k: 0.0 for k in keys} | {"u0|b2": 0.1, "u1|b2": -5.0}
    out = measurement_noise(layout, V, 4, measured, ("b2",))["b2"]
    sd = np.array([1.0, 3.0]) * np.sqrt(4 / 3) / 2
    assert out["median_noise_sd"] == pytest.approx(np.median(sd))
    assert out["median_abs_measured"] == pytest.approx(2.55)
    assert out["frac_within_2sd"] == 0.5  # |0.1| < 2·sd, |−5| > 2·sd
    assert out["n_nonpositive"] == 1 and out["n"] == 2


def test_gradient_stats_per_sequence_and_json_round_trip():
    V = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    st = GradientStats(V, None, np.array([1.0, 3.0, 2.0]), np.array(["sampled"] * 3),
                       np.array([0, 0, 1]))
    per = st.per_sequence()
    assert per.V == pytest.approx(np.array([[2.5, 3.5], [5.0, 6.0]]))
    assert per.T.tolist() == [4.0, 2.0] and per.seq.tolist() == [0, 1]
    assert per.source.tolist() == ["sampled", "sampled"]
    back = GradientStats.from_dict(st.to_dict())
    assert np.array_equal(back.V, st.V) and back.D is None and back.seq.dtype == np.int64
    mixed = GradientStats(V, None, st.T, np.array(["sampled", "data", "data"]), st.seq)
    with pytest.raises(ValidationError, match="mixes label sources"):
        mixed.per_sequence()


def test_chunk_rows_collapse_to_sequence_rows_on_a_model():
    """The same labels in 2 position chunks give the per-sequence projections exactly."""
    import torch

    from bitsack.models import model_units
    from bitsack.models.testing import tiny_model
    from bitsack.profiling.context import Context
    from bitsack.profiling.fisher import gradient_stats

    torch.set_num_threads(1)
    model = tiny_model("llama", seed=0).eval()
    layout = OptionLayout.build(model_units(model, mlp_group=32, embeddings=False)[:3], (2,))
    toks = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ctx = Context(model=model, layout=layout, tokens=toks, group_size=16)
    whole = gradient_stats(ctx, sources=("sampled",), chunks=1)
    chunked = gradient_stats(ctx, sources=("sampled",), chunks=2)
    assert chunked.V.shape[0] == 4
    assert chunked.per_sequence().V == pytest.approx(whole.V, rel=1e-4, abs=1e-12)
