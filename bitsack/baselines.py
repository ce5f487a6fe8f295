"""Baseline plans the methods people use would make, for comparisons on equal bytes.

- ``sequential``: prune first, then quantize — the prunable units with the smallest Fisher
  ``prune`` loss (Kwon et al. 2022's mask Fisher), as many as the non-memory budgets need
  with every other unit at its cheapest bits; then mixed precision of what is left by the same
  solver on the same objective (the staging of prune-then-quantize pipelines). Joint
  allocation is measured against it where pruning must take part (a latency budget bits alone
  cannot meet).
"""

from __future__ import annotations

from collections.abc import Iterable

from bitsack.errors import ValidationError


def prune_order(problem) -> list[str]:
    """Prunable units by increasing standalone ``prune`` loss (ties by id): the Fisher mask."""
    losses = []
    for unit in problem.units:
        for opt in unit.options:
            if opt.is_prune:
                losses.append((opt.loss, unit.id))
    return [uid for _, uid in sorted(losses)]


def sequential_problem(problem, n_prune: int, name: str | None = None):
    """Stage 1 of the sequential baseline fixed: the ``n_prune`` cheapest units pruned.

    The first ``n_prune`` units of ``prune_order`` get only ``prune``; every other unit loses
    its ``prune`` option. What is left is the mixed-precision problem of stage 2.
    """
    from bitsack.solver.schema import restrict_options

    order = prune_order(problem)
    if not 0 <= n_prune <= len(order):
        raise ValidationError("n_prune", f"{n_prune}; valid: 0..{len(order)} (prunable units)")
    pruned = set(order[:n_prune])
    allowed = {u.id: (["prune"] if u.id in pruned else
                      [o.id for o in u.options if not o.is_prune]) for u in problem.units}
    return restrict_options(problem, allowed, name=name)


def prune_count(problem, resources: Iterable[str], start: int = 0) -> int:
    """Smallest ``n ≥ start`` such that pruning the first ``n`` of ``prune_order`` leaves the
    bits-only rest able to meet every listed budget (cheapest option per unit).

    Raises:
        ValidationError: no number of pruned units meets the budgets.
    """
    order = prune_order(problem)
    limits = {r: problem.limits[r] for r in resources if r in problem.limits}
    by_id = {u.id: u for u in problem.units}

    def cheapest(unit, res: str, pruned: bool) -> float:
        return min(o.cost.get(res, 0.0) for o in unit.options if o.is_prune == pruned)

    first = set(order[:start])
    usage = {r: sum(cheapest(u, r, u.id in first) for u in problem.units) for r in limits}
    for n in range(start, len(order) + 1):
        if all(usage[r] <= lim * (1 + 1e-12) for r, lim in limits.items()):
            return n
        if n < len(order):
            unit = by_id[order[n]]
            for r in limits:
                usage[r] += cheapest(unit, r, True) - cheapest(unit, r, False)
    raise ValidationError("budget", f"{limits} cannot be met even with all {len(order)} "
                          "prunable units pruned")


def sequential(problem):
    """The sequential prune-then-quantize problem of ``problem`` (budgets applied): as many
    cheapest prunes as the budgets other than memory need, then bits for the rest."""
    others = [r for r in problem.limits if r != "memory_bytes"]
    n = prune_count(problem, others) if others else 0
    return sequential_problem(problem, n, name=f"{problem.name}-sequential")
