"""``auto``: pick the best available backend for the instance, and say which in the certificate.

Order of preference (each entry only if registered, available, and not declining the
instance with :class:`UnsupportedProblem`):

1. ``brute`` for tiny instances (at most ``TINY`` assignments): exact, instant, no setup.
2. ``dp`` when it is exact (additive objective, one binding budget, non-overlapping groups,
   integer costs on a grid that fits): proven optimum without a MIP solver.
3. MIP backends: ``highs`` first (with interactions by outer approximation: on the generated
   N = 128 Llama-2-7B-shaped instances it proved 1 % in 10 s where SCIP's MIQP had no bound
   after 60 s, bench/results/solver.md), then ``scip`` (MIQP) and ``cpsat`` with interactions,
   ``cpsat`` and ``scip`` when additive.
4. ``dp`` in grid mode (one budget, fractional costs): near-exact with an honest gap.
5. ``brute`` up to its own limit, then ``greedy`` (always answers, with its Lagrangian bound).

The solution's ``certificate.solver`` names the backend that answered;
``certificate.params["auto"]`` records ``picked``, the ``reason`` and the backends ``declined``.
"""

from __future__ import annotations

import dataclasses
import math

from bitsack.solver.backends.base import (
    SolveOptions,
    UnsupportedProblem,
    register,
    registry,
)
from bitsack.solver.problem import Problem
from bitsack.solver.solution import Solution

#: Instances with at most this many assignments go to brute force first.
TINY = 4096


def candidates(problem: Problem) -> list[tuple[str, str]]:
    """The backends ``auto`` would try, in order, each with the reason it is considered."""
    from bitsack.solver.backends.dp import plan

    inter = problem.interactions
    has_inter = inter is not None and bool(
        inter.pairs or (inter.U is not None and bool((inter.U != 0).any())))
    size = math.prod(len(u.options) for u in problem.units)
    out: list[tuple[str, str]] = []
    if size <= TINY:
        out.append(("brute", f"tiny instance ({size} assignments)"))
    dp_plan = None
    if not has_inter:
        try:
            dp_plan = plan(problem)
        except UnsupportedProblem:
            dp_plan = None
    if dp_plan is not None and dp_plan.exact:
        out.append(("dp", f"additive, one binding budget, exact integer grid of "
                          f"{dp_plan.cells} cells"))
    mips = ("highs", "scip", "cpsat") if has_inter else ("highs", "cpsat", "scip")
    for name in mips:
        out.append((name, "MIP/MIQP backend" + (" for interactions" if has_inter else "")))
    if dp_plan is not None and not dp_plan.exact:
        out.append(("dp", f"grid mode ({dp_plan.cells} cells), no MIP backend available"))
    out.append(("brute", "small enough to enumerate"))
    out.append(("greedy", "fallback heuristic with a Lagrangian bound"))
    seen = set()
    unique = []
    for name, why in out:
        if name not in seen:
            seen.add(name)
            unique.append((name, why))
    return unique


@register
class AutoBackend:
    """Delegates to the best available backend for the instance."""

    name = "auto"
    exact = False

    @classmethod
    def is_available(cls) -> bool:
        return True

    def solve(self, problem: Problem, options: SolveOptions) -> Solution:
        reg = registry()
        declined: list[str] = []
        for name, reason in candidates(problem):
            cls = reg.get(name)
            if cls is None or not cls.is_available():
                declined.append(f"{name}: not available")
                continue
            try:
                sol = cls().solve(problem, options)
            except UnsupportedProblem as exc:
                declined.append(f"{name}: {exc}")
                continue
            params = dict(sol.certificate.params)
            params["auto"] = {"picked": name, "reason": reason, "declined": declined}
            cert = dataclasses.replace(sol.certificate, params=params)
            return dataclasses.replace(sol, certificate=cert)
        raise UnsupportedProblem("auto: no backend accepted this problem: " + "; ".join(declined))
