"""``bitsack solve PROBLEM``: solve a problem file, print the plan and its certificate.

Exit codes: 0 a solution is present (optimal or feasible), 3 infeasible / no solution in the
limits (the explanation says which budget and the smallest limit that could be met), 1 bad
input, 2 usage error (one line on stderr, from ``bitsack.cli.main``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING, Any

from bitsack.commands._args import GAP, SECONDS, SEED, THREADS, check_output_file
from bitsack.errors import ExitCode

if TYPE_CHECKING:
    from bitsack.solver.problem import Problem
    from bitsack.solver.solution import Solution


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "solve", help="solve a problem file (YAML/JSON) and print the plan and certificate",
        description="Solve a bitsack problem: choose prune / b-bits per unit under the "
        "budgets, with a certificate. Exit 0 with a solution, 3 without one (infeasible or none "
        "within the limits), 1 on bad input, 2 on a usage error.")
    p.add_argument("problem", help="problem file (.yaml, .yml or .json)")
    add_solve_arguments(p)
    p.add_argument("--out", metavar="SOLUTION.json", help="write the solution JSON here")
    p.add_argument("--per-layer", action="store_true", help="also print the plan per layer")
    p.add_argument("--json", action="store_true", help="print the solution as one JSON object "
                   "(also when infeasible; errors as {\"error\": ...})")
    p.add_argument("--quiet", action="store_true", help="print no text (exit code only); "
                   "--json still prints its object")
    p.set_defaults(func=run)


def add_solve_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by solve and pareto (they mirror ``SolveOptions`` and the budgets)."""
    p.add_argument("--solver", default="auto", help="backend name (default: auto)")
    p.add_argument("--time-limit", type=SECONDS, metavar="S",
                   help=f"wall-clock limit ({SECONDS.valid})")
    p.add_argument("--gap", type=GAP, metavar="G", help="relative gap tolerance "
                   f"(default 1e-4; {GAP.valid})")
    p.add_argument("--seed", type=SEED, default=0, help="solver seed (default 0)")
    p.add_argument("--threads", type=THREADS, help="solver threads (backend default if unset)")
    p.add_argument("--budget", action="append", default=[], metavar="RESOURCE=VALUE",
                   help="set (or with 'none' remove) a resource limit; repeatable")
    p.add_argument("--avg-bits", type=float, metavar="B",
                   help="memory budget as bits per original weight (overhead included)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="backend-specific parameter (VALUE parsed as JSON if it can be)")


def solve_options(args: argparse.Namespace):
    """``SolveOptions`` from the shared flags.

    Raises:
        bitsack.errors.ValidationError: a malformed flag value.
    """
    from bitsack.errors import ValidationError
    from bitsack.solver.backends.base import SolveOptions

    kwargs: dict[str, Any] = {"seed": args.seed}
    if args.time_limit is not None:
        if not (args.time_limit > 0 and math.isfinite(args.time_limit)):
            raise ValidationError("--time-limit", f"{args.time_limit!r} is not a positive "
                                  "number of seconds")
        kwargs["time_limit_s"] = args.time_limit
    if args.gap is not None:
        if not (0 <= args.gap < 1):
            raise ValidationError("--gap", f"{args.gap!r} is out of range; valid: [0, 1)")
        kwargs["rel_gap"] = args.gap
    if args.threads is not None:
        if args.threads < 1:
            raise ValidationError("--threads", f"{args.threads} is not a positive integer")
        kwargs["threads"] = args.threads
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValidationError("--param", f"{item!r} is not KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    kwargs["params"] = params
    return SolveOptions(**kwargs)


def parse_budgets(items: list[str]) -> dict[str, float | None]:
    """``--budget RESOURCE=VALUE`` items -> {resource: limit}; ``none``/``inf`` = no limit.

    Raises:
        bitsack.errors.ValidationError: an item that is not RESOURCE=VALUE, a resource set
            twice, or a value that is not a number.
    """
    from bitsack.errors import ValidationError

    limits: dict[str, float | None] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValidationError("--budget", f"{item!r} is not RESOURCE=VALUE")
        if name in limits:
            raise ValidationError("--budget", f"{name!r} is set twice")
        if value.strip().lower() in ("none", "null", "inf"):
            limits[name] = None
            continue
        try:
            limits[name] = float(value)
        except ValueError:
            raise ValidationError(f"--budget {name}", f"{value!r} is not a number; valid: a "
                                  "number >= 0 or 'none'") from None
    return limits


def apply_budgets(problem: Problem, args: argparse.Namespace) -> Problem:
    """The problem with ``--budget`` / ``--avg-bits`` applied.

    Raises:
        bitsack.errors.ValidationError: malformed or unknown budget, or two flags setting the
            same resource.
    """
    from bitsack.errors import ValidationError
    from bitsack.solver.schema import avg_bits_limit, with_limits

    limits = parse_budgets(args.budget)
    if args.avg_bits is not None:
        if "memory_bytes" in limits:
            raise ValidationError("--avg-bits", "and --budget memory_bytes=... both set the "
                                  "memory budget; give one")
        limits["memory_bytes"] = avg_bits_limit(problem, args.avg_bits)
    return with_limits(problem, limits) if limits else problem


def run(args: argparse.Namespace) -> int:
    from bitsack.io import write_json
    from bitsack.solver import solve
    from bitsack.solver.schema import load_problem

    if args.out:
        check_output_file(args.out)  # before the solve, not after it
    problem = apply_budgets(load_problem(args.problem), args)
    options = solve_options(args)
    solution = solve(problem, args.solver, options)
    if args.out:
        write_json(args.out, solution.to_dict())
    if args.json:
        json.dump(solution.to_dict(), sys.stdout, indent=2, allow_nan=False)
        sys.stdout.write("\n")
    elif not args.quiet:
        print(summarize(problem, solution, per_layer=args.per_layer))
    return ExitCode.OK if solution.has_solution else ExitCode.NO_SOLUTION


def summarize(problem: Problem, solution: Solution, per_layer: bool = False) -> str:
    """A readable plan summary and certificate (what ``bitsack solve`` prints)."""
    cert = solution.certificate
    lines = [f"problem  {problem.name}: {len(problem.units)} units, {problem.n_options} options"]
    if problem.limits:
        lines.append("budgets  " + ", ".join(f"{r} <= {v:.6g}" for r, v in
                                               problem.limits.items()))
    lines.append(f"status   {solution.status}  (solver {cert.solver}, "
                 f"{cert.wall_time_s:.3g} s)")
    picked = cert.params.get("auto")
    if isinstance(picked, dict):
        lines.append(f"auto     picked {picked.get('picked')}: {picked.get('reason')}")
    if solution.message:
        lines.append(f"message  {solution.message}")
    if not solution.has_solution:
        for inf in solution.infeasibility:
            lines.append(f"  {inf.resource}: limit {inf.limit:.6g} cannot be met; the smallest "
                         f"feasible limit is {inf.min_achievable:.6g}")
        if cert.dual_bound is not None:
            lines.append(f"dual bound {cert.dual_bound:.8g}")
        return "\n".join(lines)
    lines.append(f"objective {solution.objective:.8g}  (predicted loss increase, nats/token)")
    dual = "none" if cert.dual_bound is None else f"{cert.dual_bound:.8g}"
    gap = "unknown" if cert.rel_gap is None else f"{cert.rel_gap:.3g} (abs {cert.abs_gap:.3g})"
    lines.append(f"certificate  primal {cert.primal_bound:.8g}  dual {dual}  rel gap {gap}")
    for res, used in cert.usage.items():
        limit = cert.limits.get(res)
        share = f"  ({100 * used / limit:.2f}% of {limit:.6g})" if limit else ""
        lines.append(f"usage    {res} {used:.6g}{share}")
    total_params = problem.total_params
    if total_params and all(u.params for u in problem.units):
        mem = cert.usage.get("memory_bytes")
        kept_bits = sum(u.params * u.option(solution.assignment[u.id]).bits
                        for u in problem.units)
        text = f"avg bits {kept_bits / total_params:.3f} per weight (nominal)"
        if mem is not None:
            text += f", {8 * mem / total_params:.3f} incl. scales/zeros"
        lines.append(text)
    lines.append("")
    lines.extend(plan_table(problem, solution.assignment, per_layer))
    return "\n".join(lines)


def plan_table(problem: Problem, assignment: dict[str, str], per_layer: bool) -> list[str]:
    """Counts of units per option, by unit kind (and by layer when asked)."""
    from bitsack.solver.problem import option_bits

    option_ids = sorted({o.id for u in problem.units for o in u.options}, key=option_bits)
    rows: dict[str, dict[str, int]] = {}
    layers: dict[int, dict[str, int]] = {}
    for unit in problem.units:
        kind = unit.kind or "unit"
        rows.setdefault(kind, dict.fromkeys(option_ids, 0))[assignment[unit.id]] += 1
        if unit.layer is not None:
            layers.setdefault(unit.layer, dict.fromkeys(option_ids, 0))[assignment[unit.id]] += 1
    total = dict.fromkeys(option_ids, 0)
    for counts in rows.values():
        for k, v in counts.items():
            total[k] += v
    width = max([len("plan (units)")] + [len(k) for k in rows]) + 2
    head = "plan (units)".ljust(width) + "".join(f"{o:>7}" for o in option_ids)
    out = [head]
    for kind, counts in rows.items():
        out.append(kind.ljust(width) + "".join(f"{counts[o]:>7}" for o in option_ids))
    if len(rows) > 1:
        out.append("all".ljust(width) + "".join(f"{total[o]:>7}" for o in option_ids))
    if per_layer and layers:
        out.append("")
        out.append("per layer".ljust(width) + "".join(f"{o:>7}" for o in option_ids))
        for layer in sorted(layers):
            counts = layers[layer]
            out.append(f"L{layer}".ljust(width) + "".join(f"{counts[o]:>7}" for o in option_ids))
    return out
