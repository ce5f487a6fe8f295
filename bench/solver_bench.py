"""Solver benchmark: every backend on model-shaped instances, additive and with interactions.

    python bench/solver_bench.py          # full run, ~15 min -> bench/results/solver.{md,png,json}
    python bench/solver_bench.py --quick  # smoke check, ~1 min -> bench/results/solver_quick.*

Instances come from ``bitsack.solver.generate.generate_problem`` with the Llama-2-7B preset
(8 KV-group units + 86 MLP-block units per layer, options prune/b2/b3/b4/b8/b16, budgets on
``memory_bytes`` and ``decode_latency_us`` at tightness 0.5, seed 0); the number of layers
sets the size (564 binaries per layer: 2 layers ≈ 1.1k, 32 layers = the 7B shape ≈ 18k,
54 layers ≈ 30k). Families:

- ``additive``: no interactions; every backend asked for a proven relative gap of 1e-4
  within 10 s (the DESIGN target for the 7B shape). One more 7B instance with the memory
  budget only, so the one-budget ``dp`` has something to solve.
- ``rank 32`` / ``rank 128``: a low-rank Fisher-shaped factor U; asked for 1 % within 60 s
  (the DESIGN target for N = 128).

Every backend runs with the same ``SolveOptions`` (seed 0, default threads: SCIP and HiGHS
MIP are single-threaded, CP-SAT runs one worker). On the interaction families one variant runs
as well: ``scip:interactions=outer`` (SCIP on the outer approximation that ``highs`` uses,
instead of its default MIQP). "Time to gap" is the wall time of a solve
whose certificate reached the requested gap (status ``optimal``), else "—". The best known
objective of an instance is the smallest primal any backend found; the best known bound the
largest dual bound; greedy's gap is measured against the best known objective. The machine
may be shared with other jobs: the load average is recorded at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("scip", "highs", "cpsat", "dp", "greedy")
#: Extra variants run on the interaction families only: ``backend:param=value``.
VARIANTS = ("scip:interactions=outer",)
BINARIES_PER_LAYER = 94 * 6


@dataclass(frozen=True)
class Case:
    """One benchmark instance and what is asked of the backends on it."""

    family: str
    layers: int
    rank: int
    resources: tuple[str, ...]
    rel_gap: float
    time_limit_s: float

    @property
    def name(self) -> str:
        budgets = "+".join(r.split("_")[0] for r in self.resources)
        return f"{self.family} L{self.layers} ({budgets})"

    @property
    def binaries(self) -> int:
        return self.layers * BINARIES_PER_LAYER


BOTH = ("memory_bytes", "decode_latency_us")


def cases(quick: bool) -> list[Case]:
    """The instance list (module docstring)."""
    if quick:
        return [Case("additive", 2, 0, BOTH, 1e-4, 5.0),
                Case("additive", 8, 0, BOTH, 1e-4, 5.0),
                Case("additive", 8, 0, ("memory_bytes",), 1e-4, 5.0),
                Case("rank 32", 2, 32, BOTH, 1e-2, 10.0),
                Case("rank 128", 8, 128, BOTH, 1e-2, 10.0)]
    out = [Case("additive", layers, 0, BOTH, 1e-4, 10.0) for layers in (2, 8, 16, 32, 54)]
    out.append(Case("additive", 32, 0, ("memory_bytes",), 1e-4, 10.0))
    for rank in (32, 128):
        out += [Case(f"rank {rank}", layers, rank, BOTH, 1e-2, 60.0) for layers in (2, 8, 32)]
    return out


def machine_facts() -> dict[str, str]:
    """CPU model, cores, RAM, versions: what the numbers depend on."""
    import numpy
    import ortools

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "ram": mem,
        "python": platform.python_version(),
        "ortools": ortools.__version__,
        "numpy": numpy.__version__,
        "os": platform.platform(),
    }


def run_case(case: Case, backends: list[str], seed: int) -> list[dict]:
    """Solve one instance with every backend; one record per backend."""
    from bitsack.errors import SolverError
    from bitsack.solver.backends import SolveOptions, get_backend
    from bitsack.solver.backends.base import UnsupportedProblem
    from bitsack.solver.generate import PRESETS, generate_problem

    shape = dict(PRESETS["llama-2-7b"])
    shape["layers"] = case.layers
    problem = generate_problem(**shape, rank=case.rank, resources=case.resources, seed=seed)
    records = []
    for name in backends + (list(VARIANTS) if case.rank else []):
        backend, _, spec = name.partition(":")
        params = dict(kv.split("=", 1) for kv in spec.split(",")) if spec else {}
        options = SolveOptions(time_limit_s=case.time_limit_s, rel_gap=case.rel_gap, seed=seed,
                               params=params)
        rec: dict = {"case": case.name, "family": case.family, "layers": case.layers,
                     "rank": case.rank, "resources": list(case.resources),
                     "binaries": problem.n_options, "backend": name,
                     "rel_gap_asked": case.rel_gap, "time_limit_s": case.time_limit_s}
        t0 = time.perf_counter()
        try:
            sol = get_backend(backend).solve(problem, options)
        except UnsupportedProblem as exc:
            rec.update(status="n/a", note=str(exc))
            records.append(rec)
            continue
        except SolverError as exc:
            rec.update(status="error", note=str(exc), wall_s=time.perf_counter() - t0)
            records.append(rec)
            continue
        cert = sol.certificate
        rec.update(status=sol.status, objective=sol.objective, dual=cert.dual_bound,
                   rel_gap=cert.rel_gap, wall_s=cert.wall_time_s,
                   reached=sol.status == "optimal")
        records.append(rec)
    best = min((r["objective"] for r in records if r.get("objective") is not None),
               default=None)
    lower = max((r["dual"] for r in records if r.get("dual") is not None), default=None)
    fastest = min((r["wall_s"] for r in records if r.get("reached")), default=None)
    for r in records:
        r["best_known"] = best
        r["best_bound"] = lower
        if r.get("objective") is not None and best is not None:
            r["to_best"] = (r["objective"] - best) / max(abs(best), 1e-12)
        if r.get("reached") and fastest:
            r["time_ratio"] = r["wall_s"] / fastest
    return records


def _fmt_gap(g: float | None) -> str:
    if g is None or (isinstance(g, float) and math.isnan(g)):
        return "—"
    if g == 0:
        return "0"
    return f"{g:.1e}"


def _cell(r: dict) -> str:
    """Compact summary cell: time to gap (×fastest) or the final gap reached in the limit."""
    if r["status"] == "n/a":
        return "n/a"
    if r["status"] == "error":
        return "error"
    if r.get("reached"):
        return f"{r['wall_s']:.2f} s (×{r['time_ratio']:.1f})"
    if r["status"] == "feasible":
        return f"gap {_fmt_gap(r['rel_gap'])} @ {r['wall_s']:.2f} s"
    return f"{r['status']} @ {r.get('wall_s', 0):.2f} s"


def write_markdown(path: Path, records: list[dict], facts: dict, command: str,
                   load: tuple, backends: list[str], wall: float) -> None:
    """The results file: command, machine, summary tables, detail table, targets."""
    lines = [
        "# Solver benchmark",
        "",
        f"Command: `{command}` (total {wall / 60:.1f} min).",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in facts.items()) + ".",
        f"Load average (1/5/15 min) at start {load[0]}, at end {load[1]} — the machine was "
        "shared with other jobs when the load exceeds the core count, and times are then "
        "inflated.",
        "",
        "Generated by `bench/solver_bench.py` (its docstring says what the instances are and how "
        "each number is measured). Each cell of the summaries: wall time to the requested "
        "proven gap and its ratio to the fastest backend that reached it, or the gap "
        "reached when the time limit stopped the solve. `n/a`: the backend declines the "
        "instance by design (reason in the detail table).",
        "",
    ]
    families = []
    for r in records:
        if r["family"] not in families:
            families.append(r["family"])
    for fam in families:
        rows = [r for r in records if r["family"] == fam]
        asked = rows[0]["rel_gap_asked"]
        limit = rows[0]["time_limit_s"]
        cols = list(dict.fromkeys(r["backend"] for r in rows))
        lines += [f"## {fam}: proven gap {asked:g} asked, limit {limit:g} s", "",
                  "| instance | binaries | " + " | ".join(cols)
                  + " | greedy ÷ best known − 1 | best known certified gap |",
                  "|---|---:|" + "---|" * len(cols) + "---:|---:|"]
        for case in dict.fromkeys(r["case"] for r in rows):
            by = {r["backend"]: r for r in rows if r["case"] == case}
            any_r = next(iter(by.values()))
            greedy = by.get("greedy", {})
            best, low = any_r["best_known"], any_r["best_bound"]
            cert = None if best is None or low is None else max(0.0, best - low) / abs(best)
            lines.append(f"| {case} | {any_r['binaries']} | "
                         + " | ".join(_cell(by[b]) if b in by else "—" for b in cols)
                         + f" | {_fmt_gap(greedy.get('to_best'))} | {_fmt_gap(cert)} |")
        lines.append("")
    lines += ["## Detail", "",
              "| instance | backend | status | objective | dual bound | final gap | wall s | "
              "÷ best known − 1 | note |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in records:
        obj = "—" if r.get("objective") is None else f"{r['objective']:.9g}"
        dual = "—" if r.get("dual") is None else f"{r['dual']:.9g}"
        note = r.get("note", "").replace("|", "/")
        note = note if len(note) < 120 else note[:117] + "..."
        wall_s = r.get("wall_s")
        lines.append(f"| {r['case']} | {r['backend']} | {r['status']} | {obj} | {dual} | "
                     f"{_fmt_gap(r.get('rel_gap'))} | "
                     f"{'—' if wall_s is None else f'{wall_s:.2f}'} | "
                     f"{_fmt_gap(r.get('to_best'))} | {note} |")
    lines += ["", "## Targets (DESIGN.md)", ""]
    lines += _targets(records)
    path.write_text("\n".join(lines) + "\n")


#: Why a target can be missed, from investigating the runs (shown only when it is missed).
WHY_MISSED = {
    ("scip", "rank 128"): "SCIP's default MIQP keeps y = Ux as N dense rows (2.3M nonzeros "
    "at this size); in a verbose run presolve took 6 s and the first root LP about 40 s, so "
    "the bound is still the root LP's when the minute ends. The `outer` variant (no dense "
    "rows) is the way to use SCIP here.",
    ("cpsat", "rank 128"): "declines low-rank interactions by design.",
    ("greedy", "additive"): "a heuristic: its Lagrangian bound certifies its gap, it does not "
    "search for a proof.",
    ("greedy", "rank 128"): "a heuristic that ignores the interactions when choosing.",
    ("dp", "additive"): "handles one budget; this instance has two.",
    ("dp", "rank 128"): "handles an additive objective only.",
}


def _targets(records: list[dict]) -> list[str]:
    out = []
    specs = [("additive", 32, BOTH, 1e-4, 10.0,
              "Llama-2-7B shape, additive: rel. gap ≤ 1e-4 in ≤ 10 s"),
             ("rank 128", 32, BOTH, 1e-2, 60.0,
              "same with interactions N = 128: rel. gap ≤ 1 % in ≤ 60 s")]
    for fam, layers, res, gap, limit, text in specs:
        rows = [r for r in records if r["family"] == fam and r["layers"] == layers
                and tuple(r["resources"]) == res]
        if not rows:
            continue
        out.append(f"- {text}:")
        for r in rows:
            why = WHY_MISSED.get((r["backend"].split(":")[0], fam), "")
            if r["status"] in ("n/a", "error"):
                out.append(f"  - {r['backend']}: {r['status']}" + (f" — {why}" if why else ""))
                continue
            met = r.get("reached") and r["wall_s"] <= limit and r["rel_gap_asked"] <= gap
            verdict = "met" if met else "missed"
            line = (f"  - {r['backend']}: {verdict} (final gap {_fmt_gap(r['rel_gap'])} "
                    f"after {r['wall_s']:.2f} s)")
            if not met and why:
                line += f" — {why}"
            out.append(line)
    return out


def write_plot(path: Path, records: list[dict], backends: list[str]) -> None:
    """Wall time vs binaries per family; filled marker = gap reached, hollow = limit hit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in records))
    backends = list(dict.fromkeys(r["backend"] for r in records))
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for ax, fam in zip(axes[0], families, strict=True):
        limit = None
        for i, b in enumerate(backends):
            rows = sorted((r for r in records if r["family"] == fam and r["backend"] == b
                           and r.get("wall_s") is not None and len(r["resources"]) == 2),
                          key=lambda r: r["binaries"])
            if not rows:
                continue
            limit = rows[0]["time_limit_s"]
            color = f"C{i}"
            ax.plot([r["binaries"] for r in rows], [r["wall_s"] for r in rows], "-",
                    color=color, label=b)
            for r in rows:
                ax.plot(r["binaries"], r["wall_s"], "o", color=color,
                        markerfacecolor=color if r.get("reached") else "none")
        if limit is not None:
            ax.axhline(limit, color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("binaries (options)")
        ax.set_ylabel("wall time, s")
        ax.set_title(f"{fam} (hollow: gap not reached)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (~1 min)")
    p.add_argument("--out", type=Path, default=None,
                   help="output prefix (default bench/results/solver or solver_quick)")
    p.add_argument("--backends", nargs="*", default=list(BACKENDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from tqdm import tqdm

    from bitsack.solver.backends import registry

    reg = registry()
    backends = [b for b in args.backends if b in reg and reg[b].is_available()]
    prefix = args.out or ROOT / "bench" / "results" / ("solver_quick" if args.quick else "solver")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    load0 = tuple(round(x, 2) for x in os.getloadavg())
    t0 = time.perf_counter()
    records: list[dict] = []
    todo = cases(args.quick)
    bar = tqdm(todo, disable=args.quiet or not sys.stderr.isatty(), unit="instance")
    for case in bar:
        bar.set_description(case.name)
        records += run_case(case, backends, args.seed)
    wall = time.perf_counter() - t0
    load1 = tuple(round(x, 2) for x in os.getloadavg())
    facts = machine_facts()
    command = "python bench/solver_bench.py" + (" --quick" if args.quick else "")
    if args.backends != list(BACKENDS):
        command += " --backends " + " ".join(args.backends)
    prefix.with_suffix(".json").write_text(json.dumps(
        {"command": command, "machine": facts, "load": [load0, load1], "wall_s": wall,
         "records": records}, indent=1))
    write_markdown(prefix.with_suffix(".md"), records, facts, command, (load0, load1),
                   backends, wall)
    write_plot(prefix.with_suffix(".png"), records, backends)
    if not args.quiet:
        print(f"wrote {prefix.with_suffix('.md')} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
