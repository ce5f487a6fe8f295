"""The run report: ``report.md`` with an allocation heat map and the loss-vs-budget frontier."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bitsack.io import atomic_write, atomic_write_path

_UNIT_RE = re.compile(r"^L(\d+)\.(attn|mlp)\.[gc](\d+)$")


def _nominal(option_id: str, scale_bits: int | None = None) -> float:
    from bitsack.plan import nominal_bits, parse_choice

    return nominal_bits(parse_choice(option_id, 64), scale_bits)


def allocation_grid(units, assignment: dict[str, str]
                    ) -> tuple[list[str], list[list[str | None]]]:
    """Layers × unit columns of option ids (None = pruned or not planned) for the heat map.

    ``units``: anything with ``.id`` (problem units, model units). Columns are ``attn g0..``,
    then ``mlp c0..``; units of other kinds are not shown.
    """
    cells: dict[tuple[int, str, int], str | None] = {}
    for unit in units:
        m = _UNIT_RE.match(unit.id)
        if not m or unit.id not in assignment:
            continue
        oid = str(assignment[unit.id])
        cells[(int(m.group(1)), m.group(2), int(m.group(3)))] = None if oid == "prune" else oid
    if not cells:
        return [], []
    layers = max(k[0] for k in cells) + 1
    cols = [("attn", i) for i in sorted({k[2] for k in cells if k[1] == "attn"})] + \
           [("mlp", i) for i in sorted({k[2] for k in cells if k[1] == "mlp"})]
    grid = [[cells.get((layer, kind, i)) for kind, i in cols] for layer in range(layers)]
    labels = [f"{'g' if kind == 'attn' else 'c'}{i}" for kind, i in cols]
    return labels, grid


def _save_png(fig: Any, path: str | Path) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    atomic_write_path(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


def plot_allocation(units, assignment: dict[str, str], path: str | Path,
                    title: str = "", scale_bits: int | None = None) -> Path | None:
    """Heat map (layers × unit, colour = option, ordered by bits per weight — with
    ``scale_bits``, S-bit scale codes; blank = pruned) as a PNG; None if no structural
    units."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap

    labels, grid = allocation_grid(units, assignment)
    if not grid:
        return None
    present = sorted({c for row in grid for c in row if c is not None},
                     key=lambda c: _nominal(c, scale_bits))
    pos = {c: k for k, c in enumerate(present)}
    index = np.array([[np.nan if c is None else pos[c] for c in row] for row in grid])
    cmap = ListedColormap(plt.get_cmap("viridis")(np.linspace(0, 1, max(2, len(present))))
                          [:max(1, len(present))]).with_extremes(bad="white")
    norm = BoundaryNorm(np.arange(len(present) + 1) - 0.5, max(1, len(present)))
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
    ax.set_title(title or "option per unit")
    cbar = fig.colorbar(im, ax=ax, ticks=range(len(present)))
    cbar.ax.set_yticklabels([f"{c} ({_nominal(c, scale_bits):g} b/w)" for c in present])
    return _save_png(fig, path)


def plot_search_trail(search: dict[str, Any], path: str | Path, title: str = "") -> Path | None:
    """The search's trail: incumbent KL on select and holdout after every step, accepted
    steps marked, candidates' select KL as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = search.get("steps") or []
    start = search.get("start", {}).get("kl", {})
    if not steps or not start:
        return None
    sel, hold = [start["select"]], [start["holdout"]]
    cand = []
    for st in steps:
        d_sel = st["select"]["delta"] if st.get("select") else None
        if d_sel is not None:
            cand.append((st["iteration"], sel[-1] + d_sel))
        if st["accepted"]:
            sel.append(sel[-1] + st["select"]["delta"])
            hold.append(hold[-1] + st["holdout"]["delta"])
        else:
            sel.append(sel[-1])
            hold.append(hold[-1])
    x = list(range(len(sel)))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(x, sel, "o-", label="incumbent, select split")
    ax.plot(x, hold, "s--", label="incumbent, holdout split")
    if cand:
        ax.plot([c[0] for c in cand], [c[1] for c in cand], "x", color="grey",
                label="best candidate (select)")
    for st in steps:
        if st["accepted"]:
            ax.axvline(st["iteration"], color="tab:green", alpha=0.15)
    ax.set_xlabel("search step (green: accepted)")
    ax.set_ylabel("mean KL(base ‖ plan), nats/token")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title or "measured search")
    return _save_png(fig, path)


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
    return _save_png(fig, path)


def write_report(out: str | Path, cfg, units, planned, summary) -> Path:
    """Write ``report.md``, ``allocation.png`` (and ``search.png`` for a search) into ``out``
    (``cfg``: the run's ``bitsack.pipeline.RunConfig``; ``planned``: its ``Planned``)."""
    out = Path(out)
    assignment = {u: str(c) for u, c in planned.plan.items()}
    plot_allocation(units, assignment, out / "allocation.png",
                    title=f"{cfg.method}: option per unit", scale_bits=cfg.scale_bits)
    cert = planned.certificate or {}
    lines = [
        f"# bitsack run ({cfg.method})",
        "",
        f"Model `{cfg.model}`, calibration `{cfg.calib}`, quantizer `{cfg.quantizer}`, "
        f"menu {', '.join(cfg.menu)}" + (f", one-shot estimator `{cfg.estimator}`"
                                        if cfg.method in ("oneshot", "sequential") else "")
        + ".",
        "",
        "## Result",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| perplexity ({cfg.eval}, {cfg.eval_windows or 'all'} × {cfg.eval_seqlen} tokens) | "
        f"{_fmt(summary.ppl_before)} | {_fmt(summary.ppl_after)} |",
        f"| model tensors in memory (bytes) | {summary.memory_before_bytes:,} | "
        f"{_fmt_int(summary.memory_after_bytes)} |",
        f"| bits per weight of the planned units (packed bytes, overhead included) | — | "
        f"{_fmt(summary.bits_per_weight)} |",
        "",
        f"Measured loss increase (Δ ln ppl): {_fmt(summary.measured_loss_increase)} "
        "nats/token" + (f"; predicted by the solver: {_fmt(summary.predicted_loss_increase)}"
                        if summary.predicted_loss_increase is not None else "") + ".",
        "",
        "## Budget",
        "",
        "| resource | usage | limit |",
        "|---|---|---|",
    ]
    for res, use in (cert.get("usage") or {}).items():
        lines.append(f"| {res} | {use:,.1f} | {_fmt((cert.get('limits') or {}).get(res))} |")
    if cfg.method in ("oneshot", "sequential"):
        lines += ["", f"Certificate: status **{planned.status}**; primal bound "
                  f"{_fmt(cert.get('primal_bound'))}, dual bound {_fmt(cert.get('dual_bound'))}"
                  f", relative gap {_fmt(cert.get('rel_gap'))}; solver {cert.get('solver')}."]
    if planned.search:
        lines += _search_lines(out, planned.search)
    labels = sorted({lab for c in summary.plan_counts.values() for lab in c},
                    key=lambda lab: -1.0 if lab == "prune" else
                    (99.0 if lab == "unplanned" else _nominal(lab, cfg.scale_bits)))
    lines += ["", "## Plan", "", "| unit kind | " + " | ".join(labels) + " |",
              "|---|" + "---|" * len(labels)]
    for kind, counts in summary.plan_counts.items():
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(lab, 0)) for lab in labels)
                     + " |")
    lines += ["", "![allocation](allocation.png)", ""]
    lines += _matrix_unit_lines(units, assignment)
    lines += ["## Stages", "", "| stage | seconds |", "|---|---|"]
    for stage, sec in summary.stage_seconds.items():
        note = " (reused)" if stage in summary.reused else ""
        lines.append(f"| {stage} | {sec:.1f}{note} |")
    path = out / "report.md"
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def _matrix_unit_lines(units, assignment: dict[str, str]) -> list[str]:
    """The units outside the layers (embeddings, lm_head, their token-id ranges with
    ``--vocab-groups``), which the heat map does not show: one row each."""
    rows = [u for u in units if getattr(u, "layer", 0) is None and u.id in assignment]
    if not rows:
        return []
    lines = ["## Embeddings", "", "| unit | rows | option |", "|---|---|---|"]
    for u in rows:
        s = u.slices[0]
        lines.append(f"| {u.id} | {s.start}–{s.stop - 1} | {assignment[u.id]} |")
    return [*lines, ""]


def _search_lines(out: Path, search: dict[str, Any]) -> list[str]:
    start = search.get("start", {})
    final = search.get("final", {})
    lines = ["", "## Search", "",
             f"Start: {start.get('incumbent')} (select KL "
             + ", ".join(f"{k} {v:.5f}" for k, v in (start.get("select_kl") or {}).items())
             + f"). Stopped: {search.get('stopped')}; {search.get('forwards', 0):.0f} "
             f"sequence-forwards, {search.get('linearisations')} linearisations.",
             ""]
    for key, d in start.items():
        if key.startswith("descend") and isinstance(d, dict):
            if "skipped" in d:
                lines.append(f"- {d.get('from')} not descended: {d['skipped']}.")
                continue
            lines.append(f"- {d.get('from')} descended to fit: "
                         + (f"{d['changed']} units down, predicted Δ screen KL "
                            f"{d['predicted']:+.5f}" if "changed" in d else "no plan fits")
                         + f" ({d.get('forwards', 0):.0f} forwards spent by then).")
    lines += ["", "| split | start KL | final KL |", "|---|---|---|"]
    for split, v in (search.get("kl") or {}).items():
        lines.append(f"| {split} | {_fmt((start.get('kl') or {}).get(split))} | {_fmt(v)} |")
    if final:
        lines += ["", f"Final model: **{final.get('kept')}** (holdout KL stitched from the "
                  f"variant store {_fmt(final.get('stitched_holdout_kl'))}, sequential GPTQ "
                  f"apply {_fmt(final.get('sequential_holdout_kl'))})."]
    lines += ["", "| step | k | reach | units changed | predicted Δ | screen Δ | "
              "select Δ ± SE | holdout Δ | decision |", "|---|---|---|---|---|---|---|---|---|"]
    for st in search.get("steps", []):
        sel = st.get("select") or {}
        hold = st.get("holdout") or {}
        lines.append(f"| {st['iteration']} | {st['k']} | {_fmt(st.get('reach'))} | "
                     f"{len(st['changed'])} | "
                     f"{_fmt(st['predicted'])} | {_fmt((st.get('screen') or {}).get('delta'))}"
                     f" | {_fmt(sel.get('delta'))} ± {_fmt(sel.get('se'))} | "
                     f"{_fmt(hold.get('delta'))} | "
                     f"{'accepted' if st['accepted'] else 'rejected'} |")
    if plot_search_trail(search, out / "search.png"):
        lines += ["", "![search](search.png)"]
    return lines


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _fmt_int(v: Any) -> str:
    return "—" if v is None else f"{int(v):,}"
