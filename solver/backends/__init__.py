"""Solver backends. Importing this package registers every backend module listed here."""

# One line per backend module; each registers itself with @register on import.
# (Backends whose dependency is missing still register; is_available() says so.)
import bitsack.solver.backends.auto  # noqa: F401  (picks the best available backend)
import bitsack.solver.backends.brute  # noqa: F401  (exhaustive, the test oracle)
import bitsack.solver.backends.cpsat  # noqa: F401  (OR-Tools CP-SAT)
import bitsack.solver.backends.dp  # noqa: F401  (exact DP, one budget, additive)
import bitsack.solver.backends.greedy  # noqa: F401  (Lagrangian / convex-hull heuristic)
import bitsack.solver.backends.highs  # noqa: F401  (OR-Tools MathOpt + HiGHS)
import bitsack.solver.backends.scip  # noqa: F401  (OR-Tools MathOpt + SCIP)
from bitsack.solver.backends.base import (  # noqa: F401
    Backend,
    SolveOptions,
    get_backend,
    make_solution,
    register,
    registry,
)
