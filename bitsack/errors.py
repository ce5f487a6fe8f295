"""The exceptions bitsack raises on bad input or failure.

Infeasible problems and time limits are *statuses* of a ``Solution``, not exceptions. An
exception means the input was wrong (its message names the field, the bad value and what would
be valid) or something broke.

The command line maps outcomes to the exit codes of ``ExitCode`` (the table is in
``bitsack --help`` and the README); library code raises, it never exits.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit statuses of the ``bitsack`` command line, one meaning each.

    ``USAGE`` is argparse's own code: the command line itself is wrong (unknown flag, missing
    argument, a flag value of the wrong type or outside its range), found before any work.
    ``BAD_INPUT`` is a well-formed command refused on its inputs: a file, model, data or flag
    value that is wrong in context, or an output bitsack will not overwrite.
    """

    OK = 0
    BAD_INPUT = 1
    USAGE = 2
    NO_SOLUTION = 3
    VERIFY_FAILED = 4
    INTERNAL = 5
    INTERRUPTED = 130

    @property
    def meaning(self) -> str:
        """One line for ``bitsack --help`` and the README."""
        return _EXIT_MEANINGS[self]


_EXIT_MEANINGS = {
    ExitCode.OK: "success",
    ExitCode.BAD_INPUT: "bad input or refused: a file, model, data or flag value is wrong in "
    "context, or an output would be destroyed (one line on stderr naming the field)",
    ExitCode.USAGE: "usage error: unknown flag, missing argument, or a flag value of the wrong "
    "type or out of range (checked before any work)",
    ExitCode.NO_SOLUTION: "no solution: the problem is infeasible or no plan was found within "
    "the limits (the output says which budget and the smallest value that could be met)",
    ExitCode.VERIFY_FAILED: "a verification failed: `check` found a false claim, `regress` a "
    "difference from a golden, `eval --verify` an output outside its error bound",
    ExitCode.INTERNAL: "internal error: an unexpected exception, a bug (one line; --debug "
    "prints the traceback)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C)",
}


class BitsackError(Exception):
    """Base class of every error bitsack raises on purpose."""


class ValidationError(BitsackError, ValueError):
    """An input (problem file, solution file, flag) is malformed.

    The message has the form ``<field path>: <value> <what is wrong>; <what is valid>``.
    """

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class SolverError(BitsackError):
    """A solver backend failed in a way that is not a status (crash, unavailable backend)."""


class ModelError(BitsackError):
    """A model cannot be loaded, is of an unsupported architecture, or is inconsistent."""


class DataError(BitsackError):
    """Calibration or evaluation data cannot be found or read."""


class FormatError(BitsackError):
    """A packed model or tensor file is truncated, corrupt or of an unknown version."""


class NumericalError(BitsackError):
    """A computation produced non-finite values (the message names where)."""
