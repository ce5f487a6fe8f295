"""Fisher estimates from one gradient pass: per-row projections ``v_r = g_r·δ`` of every option.

``gradient_stats`` runs the pass (``GradientStats``: the rows, gathered over ranks);
``fisher_from_stats`` and ``diag_from_stats`` turn them into the ``fisher`` and ``fisher-diag``
estimates (formulas in ``bitsack.profiling.estimators``). Keeping the rows lets several
variants (label sources, first-order term, a subset of sequences) come from one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bitsack.errors import ValidationError
from bitsack.profiling.capture import LABEL_SOURCES, GradRow, lm_gradient_rows
from bitsack.profiling.context import Context, Estimate
from bitsack.profiling.layout import OptionLayout
from bitsack.profiling.perturb import Perturbations, check_finite

__all__ = ["GradientStats", "diag_from_stats", "fisher_from_stats", "gradient_stats",
           "project_rows"]


@dataclass(frozen=True, eq=False)
class GradientStats:
    """Per-row projections of one gradient pass, gathered over ranks in sequence order.

    Attributes:
        V: ``[R, n_options]`` ``v_r(u,o) = g_r·δ(u,o)``.
        D: ``[R, n_options]`` ``Σ_{i∈(u,o)} g_{r,i}² δ_i²`` (only with ``diag``), else None.
        T: ``[R]`` positions behind each row's mean loss.
        source: ``[R]`` label source of each row.
        seq: ``[R]`` global sequence index of each row.
    """

    V: np.ndarray
    D: np.ndarray | None
    T: np.ndarray
    source: np.ndarray
    seq: np.ndarray

    def select(self, mask: np.ndarray) -> GradientStats:
        return GradientStats(self.V[mask], None if self.D is None else self.D[mask],
                             self.T[mask], self.source[mask], self.seq[mask])

    def per_sequence(self) -> GradientStats:
        """One row per sequence from finer rows (chunks of a sequence, one label source):
        ``v_seq = Σ_c T_c v_c / Σ_c T_c``, exact since the gradient of a mean is linear."""
        seqs = sorted(set(self.seq.tolist()))
        V, T = [], []
        for q in seqs:
            m = self.seq == q
            T.append(self.T[m].sum())
            V.append((self.T[m][:, None] * self.V[m]).sum(0) / T[-1])
        source = sorted(set(self.source.tolist()))
        if len(source) > 1:
            raise ValidationError("source", f"{source} mixes label sources; valid: the rows "
                                  "of one source (select them first)")
        return GradientStats(np.array(V), None, np.array(T), np.array(source * len(seqs)),
                             np.array(seqs))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able lists (``from_dict`` reverses it)."""
        return {"V": self.V.tolist(), "D": None if self.D is None else self.D.tolist(),
                "T": self.T.tolist(), "source": self.source.tolist(), "seq": self.seq.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GradientStats:
        return cls(np.asarray(d["V"], dtype=np.float64),
                   None if d["D"] is None else np.asarray(d["D"], dtype=np.float64),
                   np.asarray(d["T"], dtype=np.float64), np.asarray(d["source"]),
                   np.asarray(d["seq"], dtype=np.int64))


def project_rows(pert: Perturbations, rows, diag: bool = False,
                 on_row: Callable[[], None] | None = None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[GradRow]]:
    """Project each gradient row on every option (and its squared diagonal form)."""
    vs: list[torch.Tensor] = []
    ds: list[torch.Tensor] = []
    meta: list[GradRow] = []
    for row in rows:
        vs.append(pert.project(row.grads)[:-1])
        if diag:
            ds.append(_diag_row(pert, row.grads)[:-1])
        meta.append(GradRow({}, row.tokens, row.seq, row.source, row.draw, row.chunk))
        if on_row:
            on_row()
    return vs, ds, meta


def _diag_row(pert: Perturbations, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    acc = pert.new_accumulator()
    for name, entry in pert.entries.items():
        g = grads.get(name)
        if g is None:
            continue
        g2 = entry.view(g).square()
        for key in entry.maps:
            d, inv = pert.scaled_delta(name, key)
            pert.accumulate(acc, entry, key, torch.mul(g2, d).mul_(d), inv * inv)
    return acc


def gradient_stats(ctx: Context, sources: Sequence[str] | None = None, chunks: int | None = None,
                   diag: bool | None = None) -> GradientStats:
    """One gradient pass over ``ctx.tokens``: every row projected on every option.

    Memory: the model, one sequence's activations and gradients, and the stored δ's; the
    per-row projections are ``R × n_options`` float64.
    """
    opts = ctx.options
    sources = tuple(sources or opts.sources)
    chunks = chunks or opts.fisher_chunks
    diag = opts.diag if diag is None else diag
    pert = ctx.perturbations
    local, offset = ctx.local(ctx.tokens)
    names = list(pert.entries)
    n_rows = local.shape[0] * len(sources) * chunks
    with ctx.meter.phase("gradients"), ctx._bar(n_rows, "gradients") as bar:
        rows = lm_gradient_rows(ctx.model, names, local, sources=sources, chunks=chunks,
                                seed=ctx.seed, seq_offset=offset)
        vs, ds, meta = project_rows(pert, rows, diag, on_row=bar.update)
    n_opt = ctx.layout.n_options
    V = torch.stack(vs) if vs else torch.zeros((0, n_opt), dtype=torch.float64)
    D = (torch.stack(ds) if ds else torch.zeros((0, n_opt), dtype=torch.float64)) if diag \
        else None
    T = torch.tensor([m.tokens for m in meta], dtype=torch.float64)
    src = torch.tensor([LABEL_SOURCES.index(m.source) for m in meta], dtype=torch.float64)
    seq = torch.tensor([m.seq for m in meta], dtype=torch.float64)
    with ctx.meter.phase("gather"):
        V = ctx.dist.gather_rows(V)
        D = ctx.dist.gather_rows(D) if D is not None else None
        T, src, seq = (ctx.dist.gather_rows(x[:, None])[:, 0] for x in (T, src, seq))
    check_finite(V, ctx.layout, "fisher projection g·δ")
    if D is not None:
        check_finite(D, ctx.layout, "fisher-diag projection g²·δ²")
    return GradientStats(V.numpy(), None if D is None else D.numpy(), T.numpy(),
                         np.array([LABEL_SOURCES[int(s)] for s in src.numpy()]),
                         seq.numpy().astype(np.int64))


def fisher_from_stats(layout: OptionLayout, stats: GradientStats, first_order: str = "off",
                      z: float = 3.0) -> Estimate:
    """The ``fisher`` estimate from gradient rows (module docstring for the formulas)."""
    V, T = stats.V, stats.T
    R = V.shape[0]
    if R == 0:
        raise ValidationError("calib_tokens", "no gradient rows; valid: at least one sequence")
    U = np.sqrt(T / R)[:, None] * V
    second = 0.5 * np.einsum("ri,ri->i", U, U)
    loss = second.copy()
    info: dict[str, Any] = {"rows": int(R), "tokens_per_row": float(T.mean()),
                            "label_sources": sorted(set(stats.source.tolist())),
                            "first_order": first_order}
    if first_order != "off":
        # The first-order change of the mean loss over all positions is Σ_r T_r v_r / Σ_r T_r
        w = T / T.sum()
        mean = w @ V
        if R > 1:
            var = (w[:, None] * (V - mean) ** 2).sum(0) * R / (R - 1)
            stderr = np.sqrt(var / R)
        else:
            stderr = np.full_like(mean, np.inf)
        keep = np.abs(mean) > z * stderr if first_order == "significant" \
            else np.ones_like(mean, dtype=bool)
        loss = loss + np.where(keep, mean, 0.0)
        info.update(first_order_z=z, first_order_kept=int(keep.sum()))
    return Estimate(layout, loss, U, info)


def diag_from_stats(layout: OptionLayout, stats: GradientStats) -> Estimate:
    """The ``fisher-diag`` estimate: ``½ Σ_i F̄_ii δ_i²`` with ``F̄_ii = mean_r T_r g_{r,i}²``."""
    if stats.D is None:
        raise ValidationError("diag", "False; the gradient pass did not compute diagonal rows")
    R = stats.D.shape[0]
    loss = 0.5 * (stats.T @ stats.D) / R
    return Estimate(layout, loss, None, {"rows": int(R),
                                         "label_sources": sorted(set(stats.source.tolist()))})
