"""The exceptions bitsack raises on bad input or failure.

Infeasible problems and time limits are *statuses* of a ``Solution``, not exceptions. An
exception means the input was wrong (its message names the field, the bad value and what would
be valid) or something broke.
"""

from __future__ import annotations


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
