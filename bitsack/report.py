"""The run report: ``report.md`` with an allocation heat map and the loss-vs-budget frontier."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from bitsack.io import atomic_write, atomic_write_path

_BITS_ORDER = (1, 2, 3, 4, 5, 6, 7, 8, 16)
_UNIT_RE = re.compile(r"^L(\d+)\.(attn|mlp)\.[gc](\d+)$")


def allocation_grid(problem, assignment: dict[str, str]) -> tuple[list[str], list[list[float]]]:
    """Layers × unit columns of bits (NaN = pruned) for the heat map.

    Columns are ``attn g0..``, then ``mlp c0..``; units of other kinds are not shown.
    """
    from bitsack.solver.problem import option_bits

    cells: dict[tuple[int, str, int], float] = {}
    for unit in problem.units:
        m = _UNIT_RE.match(unit.id)
        if not m or unit.id not in assignment:
            continue
        bits = option_bits(assignment[unit.id])
        cells[(int(m.group(1)), m.group(2), int(m.group(3)))] = math.nan if bits == 0 else bits
    if not cells:
        return [], []
    layers = max(k[0] for k in cells) + 1
    cols = [("attn", i) for i in sorted({k[2] for k in cells if k[1] == "attn"})] + \
           [("mlp", i) for i in sorted({k[2] for k in cells if k[1] == "mlp"})]
    grid = [[cells.get((layer, kind, i), math.nan) for kind, i in cols]
            for layer in range(layers)]
    labels = [f"{'g' if kind == 'attn' else 'c'}{i}" for kind, i in cols]
    return labels, grid


def plot_allocation(problem, assignment: dict[str, str], path: str | Path,
                    title: str = "") -> Path | None:
    """Heat map (layers × unit, colour = bits, blank = pruned) as a PNG; None if no units."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap

    labels, grid = allocation_grid(problem, assignment)
    if not grid:
        return None
    data = np.array(grid, dtype=float)
    present = [b for b in _BITS_ORDER if np.any(data == b)]
    index = np.full(data.shape, np.nan)
    for k, b in enumerate(present):
        index[data == b] = k
    cmap = ListedColormap(plt.get_cmap("viridis")(np.linspace(0, 1, max(2, len(present))))
                          [:len(present)]).with_extremes(bad="white")
    norm = BoundaryNorm(np.arange(len(present) + 1) - 0.5, len(present))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(labels) + 2), max(4, 0.22 * len(grid) + 1.5)))
    im = ax.imshow(np.ma.masked_invalid(index), aspect="auto", cmap=cmap, norm=norm,
                   interpolation="nearest")
    n_attn = sum(lab.startswith("g") for lab in labels)
    if 0 < n_attn < len(labels):
        ax.axvline(n_attn - 0.5, color="black", linewidth=1)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel("layer")
    ax.set_xlabel("attention head groups | MLP channel blocks   (white = pruned)")
    ax.set_title(title or "bits per unit")
    cbar = fig.colorbar(im, ax=ax, ticks=range(len(present)))
    cbar.ax.set_yticklabels([f"{b} bits" for b in present])
    fig.tight_layout()
    out = Path(path)
    atomic_write_path(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


def plot_frontier(points: list[dict[str, Any]], path: str | Path, *, x_label: str,
                  marker: tuple[float, float] | None = None,
                  measured: list[tuple[float, float]] | None = None,
                  title: str = "") -> Path:
    """Predicted loss increase vs budget (and measured points, if any) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ok = [p for p in points if p.get("objective") is not None]
    ax.plot([p["x"] for p in ok], [p["objective"] for p in ok], "o-", label="predicted (solver)")
    if marker is not None:
        ax.plot([marker[0]], [marker[1]], "r*", markersize=14, label="this plan (predicted)")
    if measured:
        ax.plot([m[0] for m in measured], [m[1] for m in measured], "s", color="tab:orange",
                label="measured Δ ln ppl")
    ax.set_xlabel(x_label)
    ax.set_ylabel("loss increase (nats / token)")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or "loss vs budget frontier")
    fig.tight_layout()
    out = Path(path)
    atomic_write_path(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


def write_report(out: str | Path, cfg, problem, solution, summary,
                 frontier_points: int = 8) -> Path:
    """Write ``report.md``, ``allocation.png`` and ``frontier.png`` into ``out``
    (``cfg``: the run's ``bitsack.pipeline.RunConfig``)."""
    from bitsack.solver.backends import SolveOptions
    from bitsack.solver.pareto import pareto_sweep

    out = Path(out)
    plot_allocation(problem, solution.assignment, out / "allocation.png",
                    title=f"{problem.name}: bits per unit")
    params = problem.total_params or 1
    frontier_rows: list[dict[str, Any]] = []
    if frontier_points >= 2 and "memory_bytes" in problem.limits:
        sweep = pareto_sweep(problem, "memory_bytes", frontier_points, solver=cfg.solver,
                             options=SolveOptions(time_limit_s=min(cfg.time_limit_s, 20.0),
                                                  rel_gap=max(cfg.gap, 1e-3), seed=cfg.seed))
        for p in sweep.points:
            frontier_rows.append({"x": 8 * p.limit / params, "objective": p.objective,
                                  "status": p.status, "rel_gap": p.rel_gap})
        usage = solution.certificate.usage.get("memory_bytes", 0.0)
        measured = [(8 * usage / params, summary.measured_loss_increase)] \
            if summary.measured_loss_increase is not None else None
        plot_frontier(frontier_rows, out / "frontier.png", x_label="bits per weight (budget)",
                      marker=(8 * usage / params, solution.objective), measured=measured,
                      title=f"{problem.name}: predicted loss vs memory budget")
    cert = solution.certificate
    lines = [
        f"# bitsack run: {problem.name}",
        "",
        f"Model `{cfg.model}`, calibration `{cfg.calib}`, estimator `{cfg.estimator}`, "
        f"solver `{cert.solver}`, quantizer `{cfg.quantizer}`, group size {cfg.group_size}, "
        f"profile perturbations `{cfg.perturbation_quantizer}`, interaction weight "
        f"{cfg.interactions:g}" + ("" if cfg.prune else ", pruning off") + ".",
        "",
        "## Result",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| perplexity ({cfg.eval}, {cfg.eval_windows or 'all'} × {cfg.eval_seqlen} tokens) | "
        f"{_fmt(summary.ppl_before)} | {_fmt(summary.ppl_after)} |",
        f"| model tensors in memory (bytes) | {summary.memory_before_bytes:,} | "
        f"{_fmt_int(summary.memory_after_bytes)} |",
        f"| bits per weight of the planned units (overhead included) | 16 (fp16) / 32 (fp32) | "
        f"{_fmt(summary.bits_per_weight)} |",
        "",
        "Loss increase, nats/token: predicted (solver objective) "
        f"{_fmt(summary.predicted_loss_increase)}, "
        f"measured (Δ ln ppl) {_fmt(summary.measured_loss_increase)}.",
        "",
        "## Certificate",
        "",
        f"status **{solution.status}**; primal bound {_fmt(cert.primal_bound)}, dual bound "
        f"{_fmt(cert.dual_bound)}, relative gap {_fmt(cert.rel_gap)}; "
        f"solver {cert.solver} {cert.solver_version}, {cert.wall_time_s:.2f} s.",
        "",
        "| resource | usage | limit |",
        "|---|---|---|",
    ]
    for res, use in cert.usage.items():
        lines.append(f"| {res} | {use:,.1f} | {_fmt(cert.limits.get(res))} |")
    lines += ["", "## Plan", "", "| unit kind | " + " | ".join(_labels(summary.plan_counts))
              + " |", "|---|" + "---|" * len(_labels(summary.plan_counts))]
    for kind, counts in summary.plan_counts.items():
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(lab, 0))
                                                  for lab in _labels(summary.plan_counts)) + " |")
    lines += ["", "![allocation](allocation.png)", ""]
    if frontier_rows:
        lines += ["## Frontier (predicted)", "", "| bits/weight budget | predicted loss | "
                  "status | gap |", "|---|---|---|---|"]
        for r in frontier_rows:
            lines.append(f"| {r['x']:.3f} | {_fmt(r['objective'])} | {r['status']} | "
                         f"{_fmt(r['rel_gap'])} |")
        lines += ["", "![frontier](frontier.png)", ""]
    lines += ["## Stages", "", "| stage | seconds |", "|---|---|"]
    for stage, sec in summary.stage_seconds.items():
        note = " (reused)" if stage in summary.reused else ""
        lines.append(f"| {stage} | {sec:.1f}{note} |")
    path = out / "report.md"
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def _labels(counts: dict[str, dict[str, int]]) -> list[str]:
    labels = {lab for c in counts.values() for lab in c}
    order = ["prune"] + [f"{b}b" for b in _BITS_ORDER]
    return [lab for lab in order if lab in labels]


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _fmt_int(v: Any) -> str:
    return "—" if v is None else f"{int(v):,}"
