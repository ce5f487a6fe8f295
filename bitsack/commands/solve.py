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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitsack.commands._args import AVG_BITS, GAP, SECONDS, SEED, THREADS
from bitsack.errors import ExitCode
from bitsack.solver.numeric import MAX_SEED, MAX_THREADS, MAX_TIME_LIMIT_S

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
    from bitsack.commands._args import add_format_arg

    add_format_arg(p, default=None)
    from bitsack.commands._args import add_scale_bits_arg

    add_scale_bits_arg(p, "memory_bytes re-priced with them, fp16 included (default auto: "
                       "as the problem is priced; `bitsack compress` reads the pricing from "
                       "the solution)")
    from bitsack.kernels.formats import GRIDS

    p.add_argument("--grid", default=None, choices=GRIDS,
                   help="the grid `bitsack compress` will quantize on, for --format gguf's "
                   "pricing: a symmetric one (sym, sym-mse, sym-hmse) stores 4 bits as Q4_0 "
                   "and, with --scale-bits, 2 / 3 bits as Q2_K / Q3_K; recorded in the "
                   "solution, which compress follows (default: as the problem is priced)")
    p.add_argument("--per-layer", action="store_true", help="also print the plan per layer")
    p.add_argument("--json", action="store_true", help="print the solution as one JSON object "
                   "(also when infeasible)")
    p.add_argument("--quiet", action="store_true", help="print no text (exit code only); "
                   "--json still prints its object")
    p.set_defaults(func=run)


def add_solve_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by solve and pareto (they mirror ``SolveOptions`` and the budgets).

    Numbers are range-checked while parsing (``bitsack.commands._args``: a one-line usage
    error naming the flag, exit 2) and again by ``solve_options`` / ``budget_of``, which take
    text too.
    """
    p.add_argument("--solver", default="auto", help="backend name (default: auto)")
    p.add_argument("--time-limit", metavar="S", type=SECONDS, help="wall-clock limit, seconds "
                   f"(0, {MAX_TIME_LIMIT_S:g}]")
    p.add_argument("--gap", metavar="G", type=GAP, help="relative gap tolerance in [0, 1) "
                   "(default 1e-4)")
    p.add_argument("--seed", default="0", type=SEED,
                   help=f"solver seed, 0..{MAX_SEED} (default 0)")
    p.add_argument("--threads", metavar="N", type=THREADS,
                   help=f"solver threads, 1..{MAX_THREADS} (backend default if unset)")
    add_budget_arguments(p)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="backend-specific parameter (VALUE parsed as JSON if it can be)")


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    """``--budget`` and ``--avg-bits`` (read by ``budget_of``)."""
    p.add_argument("--budget", action="append", default=[], metavar="RESOURCE=VALUE",
                   help="set (or with 'none' remove) a resource limit; repeatable")
    p.add_argument("--avg-bits", metavar="B", type=AVG_BITS,
                   help="memory budget as bits per original weight (overhead included): "
                   "memory_bytes = B * total params / 8; not together with --budget "
                   "memory_bytes")


def number(text: str | float | int, flag: str, lo: float, hi: float, *, integer: bool = False,
           lo_open: bool = False, hi_open: bool = False) -> Any:
    """A command-line number, range-checked: ``lo``..``hi`` (open ends as asked).

    Raises:
        bitsack.errors.ValidationError: naming ``flag``, the value and the valid range.
    """
    from bitsack.errors import ValidationError
    from bitsack.solver.bounded import short_repr

    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    valid = f"valid: {'an integer' if integer else 'a number'} in {interval}"
    shown = text if isinstance(text, str) and len(text) <= 40 else short_repr(text)
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValidationError(flag, f"{shown} is not a number; {valid}") from None
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if not math.isfinite(value) or below or above:
        raise ValidationError(flag, f"{shown} is out of range; {valid}")
    if integer:
        if not value.is_integer():
            raise ValidationError(flag, f"{shown} is not an integer; {valid}")
        return int(value)
    return value


def out_file(path: str, flag: str = "--out") -> Path:
    """An output file path: refuse a folder (or a path ending in '/') before any work.

    Raises:
        bitsack.errors.ValidationError: naming ``flag``.
    """
    from bitsack.errors import ValidationError

    out = Path(path)
    if out.is_dir() or path.endswith(("/", "\\")):
        raise ValidationError(flag, f"{path!r} is a folder; valid: a file path (e.g. "
                              f"{str(out / 'solution.json')!r})")
    return out


def solve_options(args: argparse.Namespace):
    """``SolveOptions`` from the shared flags.

    Raises:
        bitsack.errors.ValidationError: a malformed or out-of-range flag value, named.
    """
    from bitsack.errors import ValidationError
    from bitsack.solver.backends.base import SolveOptions

    kwargs: dict[str, Any] = {"seed": number(args.seed, "--seed", 0, MAX_SEED, integer=True)}
    if args.time_limit is not None:
        kwargs["time_limit_s"] = number(args.time_limit, "--time-limit", 0, MAX_TIME_LIMIT_S,
                                        lo_open=True)
    if args.gap is not None:
        kwargs["rel_gap"] = number(args.gap, "--gap", 0, 1, hi_open=True)
    if args.threads is not None:
        kwargs["threads"] = number(args.threads, "--threads", 1, MAX_THREADS, integer=True)
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValidationError("--param", f"{item!r} is not KEY=VALUE")
        try:
            params[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            params[key] = value
    kwargs["params"] = params
    return SolveOptions(**kwargs)


def budget_of(args: argparse.Namespace):
    """The :class:`bitsack.solver.budget.Budget` of ``--avg-bits`` / ``--budget``.

    Raises:
        bitsack.errors.ValidationError: a malformed or out-of-range value, or both
            ``--avg-bits`` and ``--budget memory_bytes``.
    """
    from bitsack.solver.budget import Budget

    return Budget.parse(args.avg_bits, args.budget)


def parse_budgets(items: list[str]) -> dict[str, float | None]:
    """``--budget RESOURCE=VALUE`` items -> {resource: limit}; ``none`` = no limit.

    Kept for callers of the dict form; the typed form is ``Budget.parse``.

    Raises:
        bitsack.errors.ValidationError: an item that is not RESOURCE=VALUE, a resource set
            twice, or a value that is not a number in range.
    """
    from bitsack.solver.budget import Budget

    return dict(Budget.parse(None, items).limits)


def apply_budgets(problem: Problem, args: argparse.Namespace) -> Problem:
    """The problem with ``--budget`` / ``--avg-bits`` applied (``Budget.apply``).

    Raises:
        bitsack.errors.ValidationError: malformed or unknown budget, or two flags setting the
            same resource.
    """
    return budget_of(args).apply(problem)


def run(args: argparse.Namespace) -> int:
    from bitsack.commands._args import check_scale_format
    from bitsack.errors import ValidationError
    from bitsack.io import write_json
    from bitsack.kernels.formats import symmetric
    from bitsack.solver import solve
    from bitsack.solver.schema import load_problem

    # every flag is checked before the problem is read or anything is solved
    options = solve_options(args)
    budget = budget_of(args)
    out = out_file(args.out) if args.out else None
    check_scale_format(args.format, args.scale_bits)
    if args.grid is not None and args.format != "gguf":
        raise ValidationError("grid", f"{args.grid!r} without --format gguf; valid: --grid "
                              "with --format gguf (only there does the grid change the bytes)")
    problem = load_problem(args.problem)
    if args.format is not None or args.scale_bits != "auto":
        from bitsack.solver.costs.formats import retarget, with_scale_bits

        told = args.scale_bits != "auto"  # S, or None for fp16 scales
        codes = args.scale_bits if told else None
        if args.format is not None:  # a target format prices its own scale codes
            problem = retarget(problem, args.format,
                               scale_bits=codes if args.format != "bitsack" else None,
                               symmetric=args.grid is not None and symmetric(args.grid))
            if args.grid is not None and \
                    bool(problem.metadata.get("symmetric")) != symmetric(args.grid):
                raise ValidationError("grid", f"{args.grid!r}, but {args.problem} is already "
                                      "priced for gguf on another grid; valid: a format-free "
                                      "profile (bitsack profile without --format)")
        if told and args.format in (None, "bitsack"):
            problem = with_scale_bits(problem, codes)
    problem = budget.apply(problem)
    solution = solve(problem, args.solver, options)
    # how its memory_bytes were priced: `bitsack compress` packs the scales so
    solution.extra.setdefault("scale_bits", problem.metadata.get("scale_bits")
                              if problem.metadata.get("format", "bitsack") != "compressed-tensors"
                              else None)
    if args.grid is not None:  # `bitsack compress` quantizes on the grid it was priced for
        solution.extra["grid"] = args.grid
    if problem.metadata.get("format", "bitsack") != "bitsack":  # its bytes are that file's
        solution.extra.setdefault("format", problem.metadata["format"])
    if out is not None:
        write_json(out, solution.to_dict())
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
    from bitsack.solver.problem import parse_option

    def order(oid: str) -> tuple[int, int]:  # by bits, then by group size (default first)
        spec = parse_option(oid)
        return spec.bits, spec.group_size or 0

    option_ids = sorted({o.id for u in problem.units for o in u.options}, key=order)
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
