"""Solver backends. Importing this package registers every backend module listed here."""

from bitsack.solver.backends.base import (  # noqa: F401
    Backend,
    SolveOptions,
    get_backend,
    make_solution,
    register,
    registry,
)

# One line per backend module; each registers itself with @register on import.
# (Backends whose dependency is missing still register; is_available() says so.)
