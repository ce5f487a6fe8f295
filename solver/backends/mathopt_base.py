"""What the two MathOpt backends (``highs``, ``scip``) share: running a model, reading its
answer, and turning it into a :class:`Solution` — written once.

- ``MathOptBackend``: the base class. A subclass names its MathOpt ``solver_type`` and
  implements ``run(problem, options, watch) -> MathOptRun``; ``solve`` does the rest (timing,
  the certificate params every MathOpt solve records, ``make_solution``).
- running: ``solve_params`` (bitsack options → MathOpt parameters), ``run_mathopt`` (errors
  → ``SolverError``), ``read_result`` (→ ``MipAnswer``), ``hint_params``;
- budgets met only up to the solver's tolerance: ``budget_excess`` / ``tighten_budgets``;
- the plan that ignores interactions (``additive_plan``), a start for the harder models.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bitsack.errors import SolverError
from bitsack.solver.backends.base import SolveOptions, Stopwatch, check_params, make_solution
from bitsack.solver.backends.mathopt_model import MipFormulation, build_mip
from bitsack.solver.problem import Problem
from bitsack.solver.solution import Solution

if TYPE_CHECKING:
    from ortools.math_opt.python import mathopt


@dataclass
class MathOptRun:
    """What a MathOpt backend's ``run`` found, for ``MathOptBackend.solve`` to report.

    Attributes:
        form: the built model (its sizes go into the certificate).
        assignment: the best plan that meets every budget, or None.
        dual_bound: a valid lower bound on the optimum, or None.
        infeasible: the solver proved the problem infeasible.
        build_s: seconds spent building the model.
        params: what the backend records beyond the common fields (mode, rounds, ...).
    """

    form: MipFormulation
    assignment: dict[str, str] | None
    dual_bound: float | None
    infeasible: bool
    build_s: float
    params: dict[str, Any] = field(default_factory=dict)


class MathOptBackend:
    """Base of the MathOpt backends: subclasses set ``name``, ``solver_type`` (the MathOpt
    ``SolverType`` name), ``params`` (the ``SolveOptions.params`` keys they accept) and
    implement ``run``."""

    name = ""
    solver_type = ""
    params: tuple[str, ...] = ()

    @classmethod
    def is_available(cls) -> bool:
        """True when OR-Tools imports and MathOpt's solver of this type solves a trivial MIP."""
        return mathopt_solver_works(cls.solver_type)

    def run(self, problem: Problem, options: SolveOptions, watch: Stopwatch) -> MathOptRun:
        raise NotImplementedError

    def solve(self, problem: Problem, options: SolveOptions) -> Solution:
        """Solve ``problem`` to ``options.rel_gap`` within ``options.time_limit_s``.

        Raises:
            SolverError: an unknown ``params`` key or value, or the solver failed.
        """
        watch = Stopwatch()
        check_params(self.name, options.params, self.params)
        run = self.run(problem, options, watch)
        used = {
            "time_limit_s": options.time_limit_s,
            "rel_gap": options.rel_gap,
            "abs_gap": options.abs_gap,
            "seed": options.seed,
            "threads": options.threads,
            **run.params,
            "build_s": round(run.build_s, 3),
            **run.form.counts,
        }
        return make_solution(
            problem, assignment=run.assignment, dual_bound=run.dual_bound, solver=self.name,
            solver_version=f"ortools {ortools_version()} (MathOpt {self.solver_type})",
            options=options, wall_time_s=watch(), params=used, infeasible=run.infeasible,
        )


def solve_params(options: Any, *, time_limit_s: float | None, rel_gap: float,
                 objective_scale: float = 1.0, threads: bool = True) -> mathopt.SolveParameters:
    """MathOpt ``SolveParameters`` from bitsack ``SolveOptions`` (time, gap, seed, threads).

    ``objective_scale`` is the formulation's σ: the absolute gap is in model units.
    """
    from ortools.math_opt.python import mathopt

    kwargs: dict[str, Any] = {
        "relative_gap_tolerance": rel_gap,
        "absolute_gap_tolerance": options.abs_gap * objective_scale,
        "random_seed": int(options.seed),
        "enable_output": bool(options.verbose),
    }
    if time_limit_s is not None:
        kwargs["time_limit"] = datetime.timedelta(seconds=max(time_limit_s, 0.0))
    if threads and options.threads is not None:
        kwargs["threads"] = int(options.threads)
    return mathopt.SolveParameters(**kwargs)


@contextlib.contextmanager
def _native_stdout_silenced(active: bool):
    """Send file descriptor 1 to /dev/null while a native solver runs (``active`` only).

    HiGHS prints a debug line ("HighsMipSolverData::transformNewIntegerFeasibleSolution
    tmpSolver.run();") straight to the process's stdout when it is given a solution hint,
    whatever its output setting; on ``bitsack solve --json`` that would corrupt the JSON.
    """
    if not active:
        yield
        return
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no real stdout (captured, embedded)
        fd = 1
    sys.stdout.flush()
    try:
        saved = os.dup(fd)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def run_mathopt(model: mathopt.Model, solver_type: mathopt.SolverType, backend: str,
                params: mathopt.SolveParameters, model_params: Any = None):
    """``mathopt.solve`` with its failures turned into ``SolverError``.

    MathOpt translates a solver's ``StatusNotOk`` into a Python exception with a helper that
    fails with this pybind11-abseil (``'StatusNotOk' object has no attribute
    'canonical_code'``); the real message is then on the exception's context, so unwrap it.
    """
    from ortools.math_opt.python import mathopt

    try:
        with _native_stdout_silenced(not params.enable_output):
            return mathopt.solve(model, solver_type, params=params, model_params=model_params)
    except AttributeError as exc:
        cause = exc.__context__
        if cause is not None and type(cause).__name__ == "StatusNotOk":
            raise SolverError(f"{backend}: the solver refused the model: {cause}") from None
        raise
    except (RuntimeError, ValueError) as exc:
        raise SolverError(f"{backend}: the solver failed: {exc}") from exc


def read_assignment(problem: Problem, values: np.ndarray) -> dict[str, str]:
    """Unit -> option from x values: the option with the largest value in each unit.

    Integer solutions come back as 0/1 up to the solver's integrality tolerance; the largest
    value is the chosen option.
    """
    start = problem.arrays.start
    out = {}
    for ui, unit in enumerate(problem.units):
        seg = values[start[ui]:start[ui + 1]]
        out[unit.id] = unit.options[int(np.argmax(seg))].id
    return out


def ortools_version() -> str:
    """The installed OR-Tools version string."""
    import ortools

    return str(ortools.__version__)


@functools.cache
def mathopt_solver_works(solver_type_name: str) -> bool:
    """Whether MathOpt can solve a one-variable MIP with this solver type here."""
    try:
        from ortools.math_opt.python import mathopt

        solver_type = getattr(mathopt.SolverType, solver_type_name)
        model = mathopt.Model()
        v = model.add_binary_variable(name="v")
        model.add_linear_constraint(v >= 1)
        model.minimize(v)
        result = mathopt.solve(model, solver_type)
        return result.termination.reason == mathopt.TerminationReason.OPTIMAL
    except Exception:  # any failure (import, missing solver, crash) means "not available"
        return False


@dataclass(frozen=True)
class MipAnswer:
    """What one MathOpt solve said, in bitsack's terms.

    Attributes:
        assignment: unit -> option, or None without a primal solution.
        dual_bound: the solver's lower bound on the model's objective (None when it has none
            or the termination does not vouch for it).
        infeasible: the solver proved the model infeasible.
        termination: the MathOpt termination reason and detail, for the certificate.
    """

    assignment: dict[str, str] | None
    dual_bound: float | None
    infeasible: bool
    termination: str


def read_result(problem: Problem, form: MipFormulation, result: Any, backend: str) -> MipAnswer:
    """Map a MathOpt ``SolveResult`` to a ``MipAnswer``.

    ``INFEASIBLE_OR_UNBOUNDED`` counts as infeasible: the model is bounded (x binary, y fixed by
    x, t ≥ 0, w in [0, 1]), so only infeasibility is left.

    Raises:
        SolverError: the solver ended in an error (numerical, unbounded, other).
    """
    from ortools.math_opt.python import mathopt

    reasons = mathopt.TerminationReason
    term = result.termination
    text = f"{term.reason.name}" + (f" ({term.detail})" if term.detail else "")
    if term.reason in (reasons.INFEASIBLE, reasons.INFEASIBLE_OR_UNBOUNDED):
        return MipAnswer(None, None, True, text)
    if term.reason in (reasons.UNBOUNDED, reasons.NUMERICAL_ERROR, reasons.OTHER_ERROR):
        raise SolverError(f"{backend}: the solver ended in {text}")
    dual = term.objective_bounds.dual_bound / form.objective_scale
    if term.reason == reasons.IMPRECISE or not math.isfinite(dual):
        dual = None
    assignment = None
    if result.has_primal_feasible_solution():
        values = np.asarray(result.variable_values(form.x), dtype=np.float64)
        assignment = read_assignment(problem, values)
    return MipAnswer(assignment, dual, False, text)


def budget_excess(problem: Problem, assignment: dict[str, str]) -> dict[str, float]:
    """Resource -> amount by which ``assignment`` exceeds its limit beyond ``evaluate``'s tolerance.

    A solver accepts rows violated by its feasibility tolerance (~1e-6 of the scaled row);
    bitsack's own check is stricter (1e-9), so a backend tightens those rows and solves again.
    """
    from bitsack.solver.solution import FEASIBILITY_TOL

    arrays = problem.arrays
    start = arrays.start
    chosen = np.array([start[ui] + [o.id for o in u.options].index(assignment[u.id])
                       for ui, u in enumerate(problem.units)], dtype=np.int64)
    out = {}
    for res in problem.resources:
        if res.limit is None:
            continue
        excess = float(np.sum(arrays.cost[res.name][chosen])) - res.limit
        if excess > FEASIBILITY_TOL * max(1.0, abs(res.limit)):
            out[res.name] = excess
    return out


def tighten_budgets(form: MipFormulation, excess: dict[str, float]) -> None:
    """Lower the ``budget[r]`` rows by twice the observed excess (see ``budget_excess``)."""
    for name, amount in excess.items():
        row, scale = form.budget_rows[name]
        con = form.model.get_linear_constraint(row)
        con.upper_bound = con.upper_bound - 2.0 * amount / scale


def hint_params(form: MipFormulation, problem: Problem, plan: dict[str, str]) -> Any:
    """``ModelSolveParameters`` carrying ``plan`` as a solution hint on x and y = √σ·Ux.

    y is given too because completing a partial hint is a sub-MIP for SCIP: with only x
    hinted, the 7B-shaped MIQP spent its whole minute there and never proved a bound. The
    solver completes the z literals, w and t (few, or cheap) itself.
    """
    from ortools.math_opt.python import mathopt

    from bitsack.solver.solution import option_vector

    chosen = np.zeros(problem.n_options, dtype=bool)
    chosen[option_vector(problem, plan)] = True
    values = {xi: float(c) for xi, c in zip(form.x, chosen, strict=True)}
    if form.y and form.U is not None:
        y = form.U[:, chosen].sum(axis=1)
        values.update({yk: float(v) for yk, v in zip(form.y, y, strict=True)})
    return mathopt.ModelSolveParameters(
        solution_hints=[mathopt.SolutionHint(variable_values=values)])


def additive_plan(problem: Problem, solver_type: Any, backend: str, options: Any,
                  time_limit_s: float | None) -> tuple[dict[str, str] | None, MipAnswer]:
    """The best plan with the interactions left out (the plain multiple-choice knapsack).

    The interactions are a correction to the standalone losses, so this plan is close to the
    optimum: a starting point (hint, first tangent point). Its bound is not a bound of the
    problem and is not returned. The plan is None if it misses a budget by the solver's
    tolerance (a hint must be feasible to help).
    """
    from dataclasses import replace

    form = build_mip(replace(problem, interactions=None))
    params = solve_params(options, time_limit_s=time_limit_s, rel_gap=options.rel_gap,
                          objective_scale=form.objective_scale,
                          threads=solver_type.name != "HIGHS")
    answer = read_result(problem, form, run_mathopt(form.model, solver_type, backend, params),
                         backend)
    plan = answer.assignment
    if plan is not None and budget_excess(problem, plan):
        plan = None
    return plan, answer
