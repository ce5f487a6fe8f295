"""Calibration of a cheap estimator to measured loss changes: one scale per (kind, option).

The second-order estimators rank options reasonably but miss magnitudes at low bit-widths
(the loss is far from quadratic at 2-3 bits) and put prune and quantization on different
footings. Given measured singles ``m`` for a subset of units and predictions ``p`` for all,
each group ``(unit kind, option)`` gets

    log s_g = mean over the group's pairs with p > 0 and m > 0 of (log m − log p)

(least squares in log space: the geometric-mean ratio), and the calibrated prediction is
``s_g · p``. A group with fewer than ``min_pairs`` usable pairs borrows the scale of the
nearest fitted bit-width of the same kind, else the same option of another kind, else the
nearest fitted bit-width of any kind (prune: prune of another kind), else the global scale.
``b16`` always borrows (its measured change is rounding noise).

Fit quality, per group: ``n`` pairs used, Spearman ρ of p vs m (ranking is what a scale
cannot fix), and R² in log space on *held-out units* (a seeded third of the measured units
is left out of a first fit and predicted by it); the final scales use every measured unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitsack.errors import ValidationError
from bitsack.profiling.capture import seed_for
from bitsack.profiling.layout import OptionLayout
from bitsack.profiling.validate import spearman


@dataclass(frozen=True)
class GroupFit:
    """The fit of one (kind, option) group."""

    kind: str
    option: str
    scale: float
    n: int
    excluded: int
    spearman: float | None
    r2_heldout: float | None
    n_heldout: int
    source: str  # "fit", "borrowed:<kind>/<option>", "global"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "option": self.option, "scale": _f(self.scale), "n": self.n,
                "excluded": self.excluded, "spearman": _f(self.spearman),
                "r2_heldout": _f(self.r2_heldout), "n_heldout": self.n_heldout,
                "source": self.source}


@dataclass(frozen=True)
class Calibration:
    """Scales per (kind, option), the global fallback scale, and fit statistics."""

    groups: tuple[GroupFit, ...]
    global_scale: float
    r2_heldout: float | None
    units_measured: int
    units_heldout: int

    def scale_for(self, kind: str, option: str) -> float:
        for g in self.groups:
            if g.kind == kind and g.option == option:
                return g.scale
        return self.global_scale

    def scales(self, layout: OptionLayout) -> np.ndarray:
        """The scale of every flat option of ``layout``."""
        return np.array([self.scale_for(layout.units[ui].kind, oid) for ui, oid in layout.flat])

    def apply(self, layout: OptionLayout, loss: np.ndarray, U: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray | None]:
        """``loss`` (flat order of ``layout``) times its scales, and ``U``'s columns times
        their square roots, so the interaction form stays a (rescaled) Fisher form."""
        scale = self.scales(layout)
        return loss * scale, None if U is None else U * np.sqrt(scale)[None, :]

    def to_dict(self) -> dict[str, Any]:
        return {"method": "scale per (unit kind, option), least squares in log space",
                "global_scale": _f(self.global_scale), "r2_heldout_log": _f(self.r2_heldout),
                "units_measured": self.units_measured, "units_heldout": self.units_heldout,
                "groups": [g.to_dict() for g in self.groups]}


def _f(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _bits(option: str) -> int:
    return 0 if option == "prune" else int(option[1:])


def _log_fit(p: np.ndarray, m: np.ndarray) -> tuple[float | None, int, int]:
    ok = (p > 0) & (m > 0) & np.isfinite(p) & np.isfinite(m)
    n = int(ok.sum())
    if n == 0:
        return None, 0, int((~ok).sum())
    return float(np.mean(np.log(m[ok]) - np.log(p[ok]))), n, int((~ok).sum())


def _fit_scales(keys: list[tuple[str, str]], p: np.ndarray, m: np.ndarray, min_pairs: int
                ) -> tuple[dict[tuple[str, str], tuple[float, int, int, str]], float]:
    """Log-scale per group (with borrowing) and the global log-scale."""
    glob, _, _ = _log_fit(np.asarray(p), np.asarray(m))
    glob = 0.0 if glob is None else glob
    fitted: dict[tuple[str, str], tuple[float, int, int]] = {}
    groups = sorted(set(keys))
    karr = np.array([f"{k}\0{o}" for k, o in keys])
    for kind, opt in groups:
        sel = karr == f"{kind}\0{opt}"
        ls, n, excl = _log_fit(p[sel], m[sel])
        if opt != "b16" and ls is not None and n >= min_pairs:
            fitted[(kind, opt)] = (ls, n, excl)
    out: dict[tuple[str, str], tuple[float, int, int, str]] = {}
    for kind, opt in groups:
        sel = karr == f"{kind}\0{opt}"
        _, n, excl = _log_fit(p[sel], m[sel])
        if (kind, opt) in fitted:
            out[(kind, opt)] = (*fitted[(kind, opt)], "fit")
            continue
        ls_b, source = _borrow(kind, opt, fitted, glob)
        out[(kind, opt)] = (ls_b, n, excl, source)
    return out, glob


def _borrow(kind: str, opt: str, fitted: dict, glob: float) -> tuple[float, str]:
    if opt == "prune":
        cands = [(k, o) for (k, o) in fitted if o == "prune"]
        cands.sort(key=lambda ko: (ko[0] != kind, ko[0]))
    else:
        same = [(k, o) for (k, o) in fitted if k == kind and o != "prune"]
        cands = sorted(same, key=lambda ko: (abs(_bits(ko[1]) - _bits(opt)), -_bits(ko[1])))
        if not cands:
            cands = sorted([(k, o) for (k, o) in fitted if o == opt])
        if not cands:  # nearest bit-width of any kind
            cands = sorted([(k, o) for (k, o) in fitted if o != "prune"],
                           key=lambda ko: (abs(_bits(ko[1]) - _bits(opt)), -_bits(ko[1]), ko[0]))
    if cands:
        k, o = cands[0]
        return fitted[(k, o)][0], f"borrowed:{k}/{o}"
    return glob, "global"


def _r2(m: np.ndarray, p: np.ndarray, shift: np.ndarray) -> float | None:
    """R² of ``log m`` predicted by ``log p + shift`` (None below 2 pairs or no spread)."""
    if len(m) < 2:
        return None
    y = np.log(m)
    tot = float(((y - y.mean()) ** 2).sum())
    if tot <= 0:
        return None
    return 1.0 - float(((y - np.log(p) - shift) ** 2).sum()) / tot


def calibration_units(layout: OptionLayout, fraction: float, min_per_kind: int,
                      seed: int) -> list[str]:
    """A seeded subset of units, stratified by kind: ``max(min, ⌈fraction·n_kind⌉)`` each."""
    rng = np.random.default_rng(seed_for(seed, 202))
    by_kind: dict[str, list[int]] = {}
    for i, u in enumerate(layout.units):
        by_kind.setdefault(u.kind, []).append(i)
    pick: list[int] = []
    for kind in sorted(by_kind):
        idx = by_kind[kind]
        k = min(len(idx), max(min_per_kind, math.ceil(fraction * len(idx))))
        pick.extend(rng.choice(idx, size=k, replace=False).tolist())
    return [layout.units[i].id for i in sorted(pick)]


def fit_calibration(layout: OptionLayout, predicted: np.ndarray, measured: np.ndarray,
                    cols: Sequence[int], *, seed: int = 0, min_pairs: int = 3,
                    heldout_fraction: float = 1 / 3) -> Calibration:
    """Fit per-(kind, option) scales of ``predicted`` to ``measured``.

    Args:
        layout: the full layout (``predicted`` is in its flat order).
        predicted: ``[layout.n_options]`` cheap estimates.
        measured: measured loss changes of the options ``cols`` (same order as ``cols``).
        cols: flat indices (into ``layout``) of the measured options.
        seed: seeds the held-out split of the measured units.
        min_pairs: usable pairs a group needs for its own scale.
        heldout_fraction: fraction of measured units left out to compute held-out R².

    Raises:
        ValidationError: shapes disagree.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    cols = np.asarray(cols, dtype=np.int64)
    if predicted.shape != (layout.n_options,):
        raise ValidationError("predicted", f"shape {predicted.shape}; valid: "
                              f"({layout.n_options},)")
    if measured.shape != cols.shape:
        raise ValidationError("measured", f"shape {measured.shape} for {cols.shape[0]} "
                              "measured options; valid: one value per measured option")
    p = predicted[cols]
    unit_of = np.array([layout.flat[j][0] for j in cols], dtype=np.int64)
    keys = [(layout.units[layout.flat[j][0]].kind or "other", layout.flat[j][1]) for j in cols]
    # held-out split by unit
    units = np.unique(unit_of)
    rng = np.random.default_rng(seed_for(seed, 303))
    n_hold = int(math.floor(heldout_fraction * len(units))) if len(units) >= 3 else 0
    held = set(rng.choice(units, size=n_hold, replace=False).tolist()) if n_hold else set()
    is_held = np.array([u in held for u in unit_of], dtype=bool)
    r2_by_group: dict[tuple[str, str], tuple[float | None, int]] = {}
    overall = None
    if held:
        fit_keys = [k for k, h in zip(keys, is_held, strict=True) if not h]
        part, glob_part = _fit_scales(fit_keys, p[~is_held], measured[~is_held], min_pairs)
        shift = np.array([part[k][0] if k in part else glob_part for k in keys])
        usable = is_held & (p > 0) & (measured > 0)
        karr = np.array([f"{k}\0{o}" for k, o in keys])
        for key in sorted(set(keys)):
            ok = usable & (karr == f"{key[0]}\0{key[1]}")
            r2_by_group[key] = (_r2(measured[ok], p[ok], shift[ok]), int(ok.sum()))
        overall = _r2(measured[usable], p[usable], shift[usable])
    fits, glob = _fit_scales(keys, p, measured, min_pairs)
    groups = []
    for key in sorted(fits, key=lambda ko: (ko[0], _bits(ko[1]))):
        ls, n, excl, source = fits[key]
        sel = np.array([k == key for k in keys])
        r2, n_h = r2_by_group.get(key, (None, 0))
        groups.append(GroupFit(key[0], key[1], float(math.exp(ls)), n, excl,
                               spearman(p[sel], measured[sel]), r2, n_h, source))
    return Calibration(tuple(groups), float(math.exp(glob)), overall, int(len(units)),
                       int(len(held)))
