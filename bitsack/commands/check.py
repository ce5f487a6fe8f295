"""``bitsack check PROBLEM SOLUTION``: verify a solution file independently of its solver.

Recomputes feasibility, objective, usage and gap from the problem alone and compares them with
what the solution records (``bitsack.solver.certify.verify``). Exit 0 when every check holds,
4 when one fails, 1 when the input is malformed.
"""

from __future__ import annotations

import argparse
import json
import sys

from bitsack.commands._args import AVG_BITS
from bitsack.errors import ExitCode


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check", help="independently verify a solution against its problem",
        description="Recompute feasibility, objective, usage and gap of SOLUTION from PROBLEM "
        "and compare with what it records. Exit 0 if everything holds, 4 if a check fails, "
        "1 if an input is malformed.")
    p.add_argument("problem", help="problem file (.yaml, .yml or .json)")
    p.add_argument("solution", help="solution JSON (bitsack solve --out)")
    p.add_argument("--budget", action="append", default=[], metavar="RESOURCE=VALUE",
                   help="the budgets the solution was solved under, if they were overridden")
    p.add_argument("--avg-bits", metavar="B", type=AVG_BITS,
                   help="the --avg-bits the solution was solved under, if any")
    p.add_argument("--json", action="store_true", help="print the checks as one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitsack.commands.solve import budget_of
    from bitsack.solver.certify import verify
    from bitsack.solver.schema import load_problem
    from bitsack.solver.solution import load_solution

    budget = budget_of(args)
    problem = budget.apply(load_problem(args.problem))
    solution = load_solution(args.solution)
    items = verify(problem, solution)
    ok = all(i.ok for i in items)
    if args.json:
        json.dump({"ok": ok, "status": solution.status,
                   "checks": [{"name": i.name, "ok": i.ok, "detail": i.detail} for i in items]},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for i in items:
            print(f"{'ok  ' if i.ok else 'FAIL'}  {i.name}: {i.detail}")
        print(f"{'valid' if ok else 'INVALID'}: {solution.status} solution of {problem.name}")
    return ExitCode.OK if ok else ExitCode.VERIFY_FAILED
