"""bitsack's solver: choose prune / keep-at-b-bits for every unit, with a certificate.

The math model. It is stated once, here; every backend solves exactly this, and the MIP
builder (``solver/backends/mathopt_model.py``) labels its variables and rows with the names
on the left::

    data
      units u = 1..n; options i ∈ O(u) (flat index, file order), each `prune`, `b<k>` or
        `b<k>g<G>`; bits(i) = k (0 for prune): group sizes do not enter the constraints
      ℓ_i        standalone loss of option i (predicted increase of the global loss)
      a_{r,i}    cost of option i on resource r (missing = 0);  L_r  limit of resource r
      U ∈ R^{N×|O|}  optional low-rank interaction factor, column U_i per option
      pairs p = (i, j, v_p)  optional explicit interaction terms (i, j of different units)
    variables
      x_i ∈ {0, 1}          option i is chosen
      y_k ∈ R               k < N: y = U x, the interaction factor of the choice
      z_{c,b} ∈ {0, 1}      same_bits group c keeps its units at b bits
      w_p ∈ [0, 1]          pair p is active (= x_i x_j at every integer point)
    objective
      min  Σ_u ℓ_{o_u}  +  Σ_{u<u'} U_{o_u}·U_{o_u'}  +  Σ_p v_p x_i x_j
         = Σ_i (ℓ_i − ½‖U_i‖²) x_i  +  ½ Σ_k y_k²  +  Σ_p v_p w_p
    constraints
      one_option[u]:        Σ_{i∈O(u)} x_i = 1                  every unit takes one option
      budget[r]:            Σ_i a_{r,i} x_i ≤ L_r               every resource with a limit
      same_option[c,u,o]:   x_{u,o} = x_{u0,o}                  u ∈ c after its first unit u0,
                                                                o an option id all of c have;
                            x_{u,o} = 0                         o an id some unit of c lacks
      same_bits[c]:         Σ_b z_{c,b} ≤ 1                     kept units of c share a width
      same_bits[c,u,o]:     x_{u,o} ≤ z_{c,bits(o)}             every kept option o of u ∈ c
                                                                (prune is free)
      min_kept[c]:          Σ_{u∈c} Σ_{i∈O(u), i≠prune} x_i ≥ count_c   at least count_c kept
      interaction[k]:       y_k − Σ_i U_{k,i} x_i = 0
      pair[p]:              w_p ≥ x_i + x_j − 1                 v_p > 0 (w_p is pushed down)
      pair[p].a, pair[p].b: w_p ≤ x_i,  w_p ≤ x_j               v_p < 0 (w_p is pushed up)

Why the two objective forms agree: with one option per unit, ``Σ_u U_{o_u} = U x`` and
``Σ_u ‖U_{o_u}‖² = Σ_i ‖U_i‖² x_i``, so ``Σ_{u<u'} U_{o_u}·U_{o_u'} = ½‖Ux‖² − ½Σ_i‖U_i‖² x_i``:
a linear term plus a convex quadratic. At every integer point the model's objective equals
``evaluate``'s, so any valid bound of the model is a valid bound of the problem. With the
Fisher factor (``U = v/√N``, DESIGN.md) this is the exact empirical-Fisher quadratic form,
convex in the one-hot choice vector x, so a MIQP solver proves optimality, and outer
approximation (tangent cuts ``oa_cut[j,k]: t_k ≥ 2 p_k y_k − p_k²`` of the convex term at
points p = U x_j, or one aggregated cut ``oa_cut[j]: t ≥ (Uᵀp)·x − ½‖p‖²``) gives valid lower
bounds with ½Σ_k y_k² replaced by ½Σ_k t_k, t_k ≥ 0. The interaction term is bounded below by
``−½Σ_i‖U_i‖² x_i`` (drop the square), which is how the greedy backend keeps its Lagrangian
bound valid.

Numerics (what the MIP builder adds, none of it changing the optimum): the objective is
multiplied by σ, a power of 4 that brings a lower estimate of the optimum near 10³ (then y is
√σ·Ux, exact in floating point); each ``budget[r]`` row is divided by ``max(L_r, max_i a_{r,i})``;
inputs are refused outside a numerically safe range (``bitsack.solver.numeric``).

Certificates: a backend proposes an assignment and a dual (lower) bound; ``evaluate``
recomputes the objective, usage and violations from the problem alone, the dual bound (and any
infeasibility claim) is checked against bounds bitsack computes itself
(``solver/certify.py``), and ``optimal`` means the recomputed gap is within tolerance
(``solver/solution.py``). Infeasible and time-limited runs are statuses, bad input is an
exception (``bitsack.errors``).

Public API (imports are lazy: ``import bitsack.solver`` loads neither NumPy-heavy backends nor
OR-Tools)::

    from bitsack.solver import load_problem, solve, SolveOptions
    problem = load_problem("problems/smollm2-135m.yaml")
    solution = solve(problem, solver="auto", options=SolveOptions(time_limit_s=10))
    print(solution.status, solution.objective, solution.certificate.rel_gap)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bitsack.solver.backends.base import SolveOptions
    from bitsack.solver.problem import Problem
    from bitsack.solver.solution import Solution

__all__ = [
    "Budget",
    "OptionSpec",
    "Problem",
    "ProblemSettings",
    "Solution",
    "SolveOptions",
    "avg_bits_limit",
    "backend_names",
    "dump_problem",
    "evaluate",
    "load_problem",
    "option_costs",
    "option_id",
    "own_bounds",
    "parse_option",
    "solve",
    "verify",
    "with_interaction_weight",
    "restrict_options",
    "without_option",
    "with_limits",
]

# name -> module that defines it; resolved on first attribute access (PEP 562).
_LAZY = {
    "Budget": "bitsack.solver.budget",
    "OptionSpec": "bitsack.solver.problem",
    "ProblemSettings": "bitsack.solver.problem",
    "parse_option": "bitsack.solver.problem",
    "option_id": "bitsack.solver.problem",
    "option_costs": "bitsack.solver.costs.base",
    "own_bounds": "bitsack.solver.certify",
    "verify": "bitsack.solver.certify",
    "Problem": "bitsack.solver.problem",
    "Solution": "bitsack.solver.solution",
    "evaluate": "bitsack.solver.solution",
    "SolveOptions": "bitsack.solver.backends.base",
    "load_problem": "bitsack.solver.schema",
    "dump_problem": "bitsack.solver.schema",
    "with_limits": "bitsack.solver.schema",
    "with_interaction_weight": "bitsack.solver.schema",
    "restrict_options": "bitsack.solver.schema",
    "without_option": "bitsack.solver.schema",
    "avg_bits_limit": "bitsack.solver.schema",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bitsack.solver' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def solve(problem: Problem, solver: str = "auto", options: SolveOptions | None = None) -> Solution:
    """Solve ``problem`` with backend ``solver`` (``auto`` picks one; see ``backend_names``).

    Args:
        problem: a validated problem (``load_problem`` or ``bitsack.solver.generate``).
        solver: a registered backend name.
        options: limits and knobs; defaults to ``SolveOptions()``.

    Returns:
        The :class:`Solution`, whose certificate was recomputed by ``evaluate``.

    Raises:
        bitsack.errors.SolverError: unknown or unavailable backend, a backend declining the
            instance (``UnsupportedProblem``), or a backend failure.
    """
    from bitsack.solver.backends.base import SolveOptions, get_backend

    return get_backend(solver).solve(problem, options or SolveOptions())


def backend_names(available_only: bool = True) -> list[str]:
    """Registered backend names (only those whose dependency is present, by default)."""
    from bitsack.solver.backends.base import registry

    return sorted(n for n, c in registry().items() if not available_only or c.is_available())
