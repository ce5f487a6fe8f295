"""``bitsack regress [DIR]``: solve every golden instance with every exact backend, compare.

For each problem file under DIR (default ``problems``) with a golden ``<stem>.golden.json``
beside it, every available exact backend (or those named by ``--solver``) solves it with a
tight gap; a difference in status, or in objective beyond a relative 1e-6, fails (exit 4).
A backend that declines an instance (raises ``UnsupportedProblem``: ``brute`` above its size
limit, ``dp`` with interactions) is skipped; any other solver error fails, and so does an
instance no backend accepts.

``--update`` rewrites goldens deliberately: the reference answer comes from ``brute`` when it
accepts the instance, else ``dp``, else the first exact backend; every other available exact
backend must agree before the golden is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from bitsack.commands._args import SECONDS
from bitsack.errors import ExitCode


@dataclass(frozen=True)
class Outcome:
    """One (instance, backend) comparison."""

    instance: str
    backend: str
    result: str  # ok | FAIL | skip | updated
    detail: str


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "regress", help="check every golden instance against every exact backend",
        description="Solve every problems/**/<stem>.yaml that has a <stem>.golden.json with "
        "every available exact backend; fail on any difference in status or objective.")
    p.add_argument("dir", nargs="?", default="problems", help="folder of instances "
                   "(default: problems)")
    p.add_argument("--solver", nargs="+", metavar="NAME", help="only these backends")
    p.add_argument("--update", action="store_true", help="rewrite the goldens (deliberately)")
    p.add_argument("--time-limit", default="120", metavar="S", type=SECONDS,
                   help=f"per solve (default 120; {SECONDS.valid})")
    p.add_argument("--json", action="store_true", help="print the outcomes as one JSON object")
    p.add_argument("--quiet", action="store_true", help="print failures only")
    p.set_defaults(func=run)


def exact_backends(names: list[str] | None = None) -> list[str]:
    """Available exact backends (``exact`` attribute true; auto and greedy are not).

    Raises:
        bitsack.errors.SolverError: a named backend is unknown or unavailable.
    """
    from bitsack.solver.backends.base import get_backend, registry

    reg = registry()
    if names:
        for name in names:
            get_backend(name)  # raises with the valid names
        return list(names)
    return sorted(n for n, c in reg.items() if getattr(c, "exact", True) and c.is_available())


def regress(root: str, solvers: list[str] | None = None, update: bool = False,
            time_limit_s: float = 120.0, progress: bool = False) -> list[Outcome]:
    """Run the regression (or ``update`` the goldens); returns one outcome per comparison."""
    from bitsack.errors import SolverError
    from bitsack.io import write_json
    from bitsack.solver.backends.base import SolveOptions, UnsupportedProblem, get_backend
    from bitsack.solver.golden import (
        REGRESS_REL_GAP,
        compare,
        find_instances,
        golden_from_solution,
        load_golden,
    )
    from bitsack.solver.schema import load_problem

    names = exact_backends(solvers)
    options = SolveOptions(rel_gap=REGRESS_REL_GAP, abs_gap=1e-12, time_limit_s=time_limit_s)
    instances = [(p, g) for p, g in find_instances(root) if update or g.exists()]
    outcomes: list[Outcome] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(instances) * len(names), unit="solve", leave=False)
    for path, gpath in instances:
        problem = load_problem(path)
        label = str(path)
        solved = {}
        for name in names:
            try:
                solved[name] = get_backend(name).solve(problem, options)
            except UnsupportedProblem as exc:
                outcomes.append(Outcome(label, name, "skip", str(exc)))
            except SolverError as exc:  # a crash or refusal that is not a declared decline
                outcomes.append(Outcome(label, name, "FAIL", f"solver error: {exc}"))
            if bar is not None:
                bar.update(1)
        if not solved:
            if not any(o.instance == label and o.result == "FAIL" for o in outcomes):
                outcomes.append(Outcome(label, "-", "FAIL", "no exact backend accepted it"))
            continue
        if update:
            order = sorted(solved, key=lambda n: (n != "brute", n != "dp", n))
            ref = solved[order[0]]
            if ref.status not in ("optimal", "infeasible"):
                outcomes.append(Outcome(label, order[0], "FAIL", f"reference ended "
                                        f"{ref.status}; not writing a golden"))
                continue
            golden = golden_from_solution(ref, cross_checked=tuple(order[1:]))
            bad = [(n, compare(golden, s)) for n, s in solved.items()]
            bad = [(n, why) for n, why in bad if why]
            if bad:
                outcomes.extend(Outcome(label, n, "FAIL", f"disagrees with {order[0]}: {why}")
                                for n, why in bad)
                continue
            write_json(gpath, golden.to_dict())
            outcomes.append(Outcome(label, ",".join(order), "updated",
                                    f"{golden.status} {golden.objective!r}"))
            continue
        golden = load_golden(gpath)
        for name, sol in solved.items():
            why = compare(golden, sol)
            outcomes.append(Outcome(label, name, "FAIL" if why else "ok", why or (
                f"{sol.status} {sol.objective!r} in {sol.certificate.wall_time_s:.2g} s")))
    if bar is not None:
        bar.close()
    return outcomes


def run(args: argparse.Namespace) -> int:
    from bitsack.commands.solve import number
    from bitsack.solver.numeric import MAX_TIME_LIMIT_S

    time_limit = number(args.time_limit, "--time-limit", 0, MAX_TIME_LIMIT_S, lo_open=True)
    outcomes = regress(args.dir, args.solver, args.update, time_limit,
                       progress=sys.stderr.isatty() and not (args.json or args.quiet))
    failed = [o for o in outcomes if o.result == "FAIL"]
    if args.json:
        json.dump({"ok": not failed, "outcomes": [o.__dict__ for o in outcomes]}, sys.stdout,
                  indent=2)
        sys.stdout.write("\n")
    else:
        for o in outcomes:
            if not args.quiet or o.result == "FAIL":
                print(f"{o.result:<8}{o.backend:<8} {o.instance}: {o.detail}")
        if not args.quiet:
            n = len({o.instance for o in outcomes})
            done = (f"{sum(o.result == 'updated' for o in outcomes)} golden(s) written"
                    if args.update else
                    f"{sum(o.result == 'ok' for o in outcomes)} agreeing solves")
            print(f"{'FAILED' if failed else 'passed'}: {n} instance(s), {done}, "
                  f"{len(failed)} failure(s)")
    return ExitCode.VERIFY_FAILED if failed else ExitCode.OK
