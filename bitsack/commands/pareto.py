"""``bitsack pareto PROBLEM --resource R --points K``: the loss-vs-budget frontier.

Prints a table (limit, status, objective, dual bound, gap) and writes ``PREFIX.png`` (the
frontier, with the dual bounds) and ``PREFIX.json`` (the data). The sweep itself is
``bitsack.solver.pareto.pareto_sweep``; this command only prints and plots. Exit 3 when no
point of the sweep has a solution.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bitsack.commands._args import deferred, integer
from bitsack.errors import ExitCode


def _points_range():
    from bitsack.solver.pareto import MAX_POINTS  # numpy: imported only when --points is given

    return integer(1, MAX_POINTS, what="a number of points")


POINTS = deferred(_points_range, "points")


def register(subparsers: argparse._SubParsersAction) -> None:
    from bitsack.commands.solve import add_solve_arguments

    p = subparsers.add_parser(
        "pareto", help="sweep one budget and plot loss vs budget",
        description="Solve PROBLEM at K limits of resource R, from its least to its most "
        "usage; print a table and write PREFIX.png and PREFIX.json.")
    p.add_argument("problem", help="problem file (.yaml, .yml or .json)")
    p.add_argument("--resource", required=True, help="resource whose limit is swept")
    p.add_argument("--points", default="11", type=POINTS,
                   help="number of limits, 1..1000 (default 11)")
    add_solve_arguments(p)
    p.add_argument("--out", metavar="PREFIX", help="output prefix (default: <problem "
                   "name>-pareto in the current folder)")
    p.add_argument("--json", action="store_true", help="print the sweep as one JSON object")
    p.add_argument("--quiet", action="store_true", help="print no text (--json still prints "
                   "its object)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitsack.commands.solve import budget_of, number, out_file, solve_options
    from bitsack.io import write_json
    from bitsack.solver.pareto import MAX_POINTS, pareto_sweep
    from bitsack.solver.schema import load_problem

    points = number(args.points, "--points", 1, MAX_POINTS, integer=True)
    options = solve_options(args)
    budget = budget_of(args)
    if args.out:
        out_file(args.out)
    problem = budget.apply(load_problem(args.problem))
    prefix = Path(args.out) if args.out else Path(f"{problem.name}-pareto")
    json_path = out_file(str(prefix.with_name(prefix.name + ".json")))
    png = out_file(str(prefix.with_name(prefix.name + ".png")))
    result = pareto_sweep(problem, args.resource, points, solver=args.solver, options=options,
                          progress=sys.stderr.isatty() and not (args.json or args.quiet))
    write_json(json_path, result.to_dict())
    plot(result, png)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    elif not args.quiet:
        print(f"{problem.name}: {args.resource} from {result.min_usage:.6g} to "
              f"{result.max_usage:.6g}")
        print(f"{'limit':>14} {'status':<12}{'objective':>14}{'dual':>14}{'rel gap':>10}  solver")
        for p in result.points:
            obj = "-" if p.objective is None else f"{p.objective:.6g}"
            dual = "-" if p.dual_bound is None else f"{p.dual_bound:.6g}"
            gap = "-" if p.rel_gap is None else f"{p.rel_gap:.2g}"
            print(f"{p.limit:>14.6g} {p.status:<12}{obj:>14}{dual:>14}{gap:>10}  {p.solver}")
        print(f"wrote {png} and {json_path}")
    if any(p.objective is not None for p in result.points):
        return ExitCode.OK
    return ExitCode.NO_SOLUTION


def plot(result, path: Path) -> None:
    """Loss vs budget (and the dual bounds) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bitsack.io import atomic_write_path

    pts = [p for p in result.points if p.objective is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([p.limit for p in pts], [p.objective for p in pts], "o-", label="objective (plan)")
    duals = [p for p in result.points if p.dual_bound is not None]
    if duals:
        ax.plot([p.limit for p in duals], [p.dual_bound for p in duals], "--", color="gray",
                label="dual bound")
    ax.set_xlabel(f"{result.resource} limit")
    ax.set_ylabel("predicted loss increase (nats/token)")
    ax.set_title(f"{result.problem}: loss vs {result.resource}")
    if pts and min(p.objective for p in pts) > 0:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write_path(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
