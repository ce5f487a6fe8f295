"""How well an estimator predicts the measured loss: ranking, magnitude, plans, noise.

Profiling reports how well its prediction ranks the measured truth and how well it matches its
magnitude (DESIGN.md, "Where the numbers come from"). The truth is ``measured`` (each option
applied alone, ``ℓ(W + δ) − ℓ(W)`` on held-out tokens: ``Measurer``); this module scores any
prediction against it:

- per option (``score``): Spearman ρ of predicted vs measured ΔL over the units, and the median
  ratio predicted / measured over the units whose measured ΔL is positive (magnitude; 1 = right
  size), and the pooled ρ over every option;
- per multi-unit plan (``predict_plans``, ``plan_errors``): the measured joint ΔL of a few units
  with options applied together against the sum of predictions, with and without the
  interaction term ``Σ_{i<j} U_i·U_j``, and against the sum of measured singles;
- the noise of the truth itself (``measurement_noise``): on n held-out sequences the first-order
  term ``ḡ·δ`` of the sample does not vanish (it has zero mean only over data), so a measured ΔL
  carries noise of standard deviation about ``sd_r(g_r·δ)/√n``; and test–retest: measure again
  on other sequences and ``score`` one measurement against the other (the ceiling any estimator
  can reach on that truth).

Measured values travel as ``{"<unit id>|<option id>": ΔL}`` (``pair_key``), so a partial set can
be saved, resumed and merged. ``bench/profiling_bench.py`` is the benchmark built on this
module (results in ``bench/results/profiling.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitsack.profiling.layout import OptionLayout

__all__ = [
    "Prediction",
    "interaction_term",
    "measure_singles",
    "measurement_noise",
    "pair_key",
    "pair_keys",
    "plan_errors",
    "predict_plans",
    "relative_error",
    "sample_plans",
    "score",
    "spearman",
]

#: The name ``plan_errors`` gives the sum of measured singles.
SUM_OF_SINGLES = "Σ measured singles"


@dataclass(frozen=True, eq=False)
class Prediction:
    """One estimator's predictions to validate.

    Attributes:
        name: how reports call it.
        loss: ``[n_options]`` predicted ΔL in the layout's flat order (NaN: not predicted).
        U: ``[N, n_options]`` interaction factor, or None (additive).
        eval_units: unit ids it is scored on (None: all), e.g. those a calibration was not
            fitted on.
        note: a remark for reports.
    """

    name: str
    loss: np.ndarray
    U: np.ndarray | None = None
    eval_units: frozenset[str] | None = None
    note: str = ""


def pair_key(unit_id: str, option_id: str) -> str:
    """``"<unit id>|<option id>"``: the key of a measured value."""
    return f"{unit_id}|{option_id}"


def pair_keys(layout: OptionLayout) -> list[str]:
    """``pair_key`` of every option of ``layout``, in flat order."""
    return [pair_key(layout.units[ui].id, oid) for ui, oid in layout.flat]


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman ρ of ``a`` and ``b``; None below 3 pairs, without spread, or not finite."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    from scipy.stats import spearmanr

    r = float(spearmanr(a, b).statistic)
    return r if math.isfinite(r) else None


def score(layout: OptionLayout, pred: Prediction, measured: Mapping[str, float],
          options: Sequence[str]) -> dict[str, Any]:
    """Ranking and magnitude of ``pred`` against measured singles, per option and pooled.

    Args:
        layout: the layout ``pred.loss`` is in.
        pred: the prediction (scored on ``pred.eval_units`` only, when given).
        measured: measured ΔL per ``pair_key``; every scored option must have one.
        options: option ids to score, each over the units (NaN predictions left out; an
            option without any finite prediction is left out).

    Returns:
        ``{option: {"rho", "n", "median_ratio"}, ..., "pooled": {"rho", "n"}}``; ``rho`` None
        where undefined, ``median_ratio`` None when no measured value is positive.
    """
    out: dict[str, Any] = {}
    allp: list[float] = []
    allm: list[float] = []
    for opt in options:
        p, m = [], []
        for j, (ui, oid) in enumerate(layout.flat):
            uid = layout.units[ui].id
            if oid != opt or (pred.eval_units is not None and uid not in pred.eval_units):
                continue
            p.append(pred.loss[j])
            m.append(measured[pair_key(uid, oid)])
        p, m = np.array(p), np.array(m)
        fin = np.isfinite(p)
        if not fin.any():
            continue
        p, m = p[fin], m[fin]
        allp.extend(p)
        allm.extend(m)
        pos = m > 0
        ratio = float(np.median(p[pos] / m[pos])) if pos.any() else None
        out[opt] = {"rho": spearman(p, m), "n": int(len(p)), "median_ratio": ratio}
    out["pooled"] = {"rho": spearman(np.array(allp), np.array(allm)), "n": len(allp)}
    return out


def measure_singles(measurer: Any, layout: OptionLayout, options: Sequence[str] | None = None,
                    done: Mapping[str, float] | None = None,
                    on_value: Callable[[dict[str, float]], None] | None = None
                    ) -> dict[str, float]:
    """ΔL of each (unit, option) of ``layout`` applied alone (``Measurer.delta_loss``).

    Args:
        measurer: a ``bitsack.profiling.measure.Measurer`` (or anything with ``delta_loss``).
        layout: the units and options.
        options: the option ids to measure (None: all).
        done: values measured before (kept, not measured again): resumes a partial run.
        on_value: called with the values so far after each new one (to save or report).

    Returns:
        ``{pair_key: ΔL}``, ``done``'s values included.
    """
    values = dict(done or {})
    for ui, oid in layout.flat:
        key = pair_key(layout.units[ui].id, oid)
        if (options is not None and oid not in options) or key in values:
            continue
        values[key] = float(measurer.delta_loss([(layout.units[ui], oid)]))
        if on_value is not None:
            on_value(values)
    return values


def sample_plans(unit_ids: Sequence[str], choices: Sequence[Sequence[str]], min_units: int,
                 max_units: int, seed: int) -> list[list[list[str]]]:
    """Random multi-unit plans: for each entry of ``choices``, between ``min_units`` and
    ``max_units`` distinct units (in ``unit_ids`` order), each with an option drawn from it.

    Returns:
        One plan per entry, ``[[unit id, option id], ...]`` (JSON-able).
    """
    rng = np.random.default_rng(seed)
    plans = []
    for opts in choices:
        k = int(rng.integers(min_units, max_units + 1))
        idx = sorted(rng.choice(len(unit_ids), size=min(k, len(unit_ids)),
                                replace=False).tolist())
        plans.append([[unit_ids[i], str(rng.choice(opts))] for i in idx])
    return plans


def interaction_term(U: np.ndarray, cols: Sequence[int]) -> float:
    """``Σ_{i<j} U_i·U_j`` over the columns ``cols`` (one option per unit of a plan)."""
    Ut = U[:, list(cols)]
    tot = Ut.sum(1)
    # Σ_{i<j} U_i·U_j = ½ (‖Σ U_i‖² − Σ ‖U_i‖²)
    return 0.5 * float(tot @ tot - (Ut * Ut).sum())


def predict_plans(layout: OptionLayout, preds: Sequence[Prediction], plans: Sequence[Mapping],
                  measured: Mapping[str, float] | None) -> list[dict[str, Any]]:
    """Each plan's measured joint ΔL next to what the predictions and the singles say.

    Args:
        layout: the layout of the predictions.
        preds: predictions (each summed over the plan's options; ``with_U`` adds the
            interaction term where it has a ``U``).
        plans: ``{"plan": [[unit id, option id], ...], "kind": str, "measured": joint ΔL}``.
        measured: measured singles per ``pair_key`` (their sum is reported), or None.

    Returns:
        Per plan ``{"plan", "kind", "measured", "sum_measured_singles" (with ``measured``),
        "pred": {name: {"additive", "with_U" (with U)}}}``.
    """
    index = {k: j for j, k in enumerate(pair_keys(layout))}
    rows = []
    for p in plans:
        cols = [index[pair_key(uid, oid)] for uid, oid in p["plan"]]
        row: dict[str, Any] = {"plan": p["plan"], "kind": p["kind"], "measured": p["measured"],
                               "pred": {}}
        if measured is not None:
            row["sum_measured_singles"] = float(sum(measured[pair_key(u, o)]
                                                    for u, o in p["plan"]))
        for e in preds:
            add = float(e.loss[cols].sum())
            pr = {"additive": add}
            if e.U is not None:
                pr["with_U"] = add + interaction_term(e.U, cols)
            row["pred"][e.name] = pr
        rows.append(row)
    return rows


def relative_error(pred: float, meas: float) -> float:
    """``(pred − meas) / |meas|`` (NaN when ``meas`` is 0)."""
    return (pred - meas) / abs(meas) if meas != 0 else float("nan")


def plan_errors(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Errors over the plans of ``predict_plans``, per prediction (``"<name> additive"``,
    ``"<name> with_U"``, and ``SUM_OF_SINGLES``): median and mean absolute relative error
    (NaN-skipping: a plan measured at 0 has none) and mean absolute error in nats/token."""
    rel: dict[str, list[float]] = {}
    absolute: dict[str, list[float]] = {}

    def add(name: str, pred: float, meas: float) -> None:
        rel.setdefault(name, []).append(abs(relative_error(pred, meas)))
        absolute.setdefault(name, []).append(abs(pred - meas))

    for p in rows:
        if p.get("sum_measured_singles") is not None:
            add(SUM_OF_SINGLES, p["sum_measured_singles"], p["measured"])
        for name, pr in p["pred"].items():
            for k in ("additive", "with_U"):
                if k in pr:
                    add(f"{name} {k}", pr[k], p["measured"])
    return {k: {"median_rel": float(np.nanmedian(v)), "mean_rel": float(np.nanmean(v)),
                "mean_abs": float(np.mean(absolute[k]))} for k, v in rel.items()}


def measurement_noise(layout: OptionLayout, V: np.ndarray, n_holdout: int,
                      measured: Mapping[str, float], options: Sequence[str]
                      ) -> dict[str, dict[str, Any]]:
    """How big the sampling noise of measured singles is, per option.

    Args:
        layout: the layout of ``V``'s columns.
        V: ``[R, n_options]`` per-sequence projections ``g_r·δ`` with data-label gradients
            (``GradientStats.V`` of a ``data`` pass): their spread over sequences is the spread
            of the first-order term.
        n_holdout: held-out sequences behind each measured value.
        measured: measured singles per ``pair_key``.
        options: option ids to report.

    Returns:
        Per option: ``median_noise_sd`` (median over units of ``sd_r(v_r)/√n_holdout``),
        ``median_abs_measured``, ``frac_within_2sd`` (units with |measured| < 2 sd),
        ``n_nonpositive`` (measured ≤ 0) and ``n`` (units).
    """
    sd = np.asarray(V, dtype=np.float64).std(0, ddof=1) / math.sqrt(n_holdout)
    keys = pair_keys(layout)
    out = {}
    for opt in options:
        js = [j for j, (_, oid) in enumerate(layout.flat) if oid == opt]
        m = np.array([measured[keys[j]] for j in js])
        noise = sd[js]
        out[opt] = {"median_noise_sd": float(np.median(noise)),
                    "median_abs_measured": float(np.median(np.abs(m))),
                    "frac_within_2sd": float(np.mean(np.abs(m) < 2 * noise)),
                    "n_nonpositive": int((m <= 0).sum()), "n": len(js)}
    return out
