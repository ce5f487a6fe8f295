"""Argparse ``type=`` validators: every number on the command line is range-checked on parse.

Each factory returns a callable for ``add_argument(type=...)``. It converts the text or raises
``argparse.ArgumentTypeError`` with the bad value and what is valid; argparse puts the flag in
front (``argument --time-limit: '1e308' is out of range; valid: ...``) and the CLI prints that
as one line with exit code 2 (usage error), before any file is read or model loaded.

Every validator carries ``.valid``, the phrase describing its range, for help strings::

    p.add_argument("--time-limit", type=SECONDS, help=f"wall-clock limit ({SECONDS.valid})")

Ranges checked here are the flag's own (a count is positive, a fraction lies in (0, 1], a
duration is finite); where a library states a range (``bitsack.solver.numeric``,
``bitsack.solver.budget``, ``bitsack.solver.generate.ARG_RANGES``) the validator uses that
constant, so there is one source. Checks that need the input (a group size that must divide the
model's widths, a ``--budget`` resource the problem lacks) stay in the library, which raises
``bitsack.errors.ValidationError`` (exit 1).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from typing import Any

from bitsack.plan import MAX_VOCAB_GROUPS
from bitsack.solver.budget import MAX_AVG_BITS
from bitsack.solver.numeric import MAX_SEED, MAX_THREADS, MAX_TIME_LIMIT_S

#: Largest integer any count flag accepts (int32, what tensor indices and most solvers take).
MAX_INT = 2**31 - 1


class Validator:
    """A ``type=`` callable with a readable name and the description of its valid range."""

    def __init__(self, convert: Callable[[str], Any], valid: str, name: str):
        self._convert = convert
        self.valid = valid
        self.__name__ = name  # argparse names a type by __name__ in its fallback messages

    def __call__(self, text: str) -> Any:
        if not isinstance(text, str):  # a non-text default passes through argparse as is
            text = str(text)
        return self._convert(text)

    def __repr__(self) -> str:
        return f"<validator {self.__name__}: {self.valid}>"


def _shown(text: str, limit: int = 40) -> str:
    """The value as the user typed it, quoted and cut to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _parse_int(text: str, valid: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not an integer; valid: "
                                         f"{valid}") from None


def _parse_real(text: str, valid: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a number; valid: "
                                         f"{valid}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not a finite number; valid: "
                                         f"{valid}")
    return value


def integer(lo: int | None = 1, hi: int | None = MAX_INT, *, what: str = "an integer"
            ) -> Validator:
    """An integer in ``[lo, hi]`` (``None``: unbounded on that side).

    Args:
        lo, hi: inclusive bounds.
        what: the noun phrase of the description (``"a seed"``, ``"a number of layers"``).
    """
    if lo is not None and hi is not None:
        valid = f"{what} in [{lo}, {hi}]"
    elif lo is not None:
        valid = f"{what} >= {lo}"
    elif hi is not None:
        valid = f"{what} <= {hi}"
    else:
        valid = what

    def convert(text: str) -> int:
        value = _parse_int(text, valid)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{_shown(text)} is out of range; valid: {valid}")
        return value

    return Validator(convert, valid, "integer")


def real(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False, what: str = "a number") -> Validator:
    """A finite float in the interval from ``lo`` to ``hi`` (NaN and ±inf always refused).

    Args:
        lo, hi: bounds (``None``: unbounded on that side).
        lo_open, hi_open: exclude the bound itself.
        what: the noun phrase of the description.
    """
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    if lo is not None and hi is not None:
        valid = f"{what} in {left}{lo:g}, {hi:g}{right}"
    elif lo is not None:
        valid = f"{what} {'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        valid = f"{what} {'<' if hi_open else '<='} {hi:g}"
    else:
        valid = f"a finite {what.removeprefix('a ')}"

    def convert(text: str) -> float:
        value = _parse_real(text, valid)
        too_low = lo is not None and (value <= lo if lo_open else value < lo)
        too_high = hi is not None and (value >= hi if hi_open else value > hi)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{_shown(text)} is out of range; valid: {valid}")
        return value

    return Validator(convert, valid, "number")


def int_list(lo: int, hi: int, *, extra: Iterable[int] = (), what: str = "integers"
             ) -> Validator:
    """A comma-separated, non-empty list of integers, each in ``[lo, hi]`` or in ``extra``."""
    allowed_extra = tuple(extra)
    valid = f"comma-separated {what} in {lo}..{hi}" + "".join(f" or {e}" for e in allowed_extra)

    def convert(text: str) -> list[int]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{_shown(text)} is empty; valid: {valid}")
        out = []
        for part in parts:
            try:
                value = int(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{_shown(part)} in {_shown(text)} is not an "
                                                 f"integer; valid: {valid}") from None
            if not (lo <= value <= hi or value in allowed_extra):
                raise argparse.ArgumentTypeError(f"{_shown(part)} in {_shown(text)} is out of "
                                                 f"range; valid: {valid}")
            out.append(value)
        return out

    return Validator(convert, valid, "int_list")


def name_list(choices: Iterable[str]) -> Validator:
    """A comma-separated, non-empty list of names, each one of ``choices``."""
    allowed = tuple(choices)
    valid = f"comma-separated names from {', '.join(allowed)}"

    def convert(text: str) -> list[str]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        bad = [p for p in parts if p not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{_shown(bad[0])} in {_shown(text)} is not "
                                             f"valid; valid: {valid}")
        if not parts:
            raise argparse.ArgumentTypeError(f"{_shown(text)} is empty; valid: {valid}")
        return parts

    return Validator(convert, valid, "name_list")


def deferred(make: Callable[[], Validator], name: str = "deferred") -> Validator:
    """A validator built on first use: for ranges that live in a module too heavy to import
    while the parser is built (``bitsack --help`` stays fast). Its ``.valid`` is generic."""
    built: list[Validator] = []

    def convert(text: str) -> Any:
        if not built:
            built.append(make())
        return built[0](text)

    return Validator(convert, "see the error message for the range", name)


# ---- the validators the commands share ------------------------------------------------------
#: A count that must be at least one (sequences, windows, probes, processes, ...).
POSITIVE_INT = integer(1, what="a positive integer")
#: A count where 0 has a meaning (rank 0 = no interactions; sample 0 = all).
NONNEG_INT = integer(0, what="an integer")
#: A random seed (the solvers take 32-bit signed seeds; numpy and torch take them too).
SEED = integer(0, MAX_SEED, what="a seed")
#: Tokens per sequence or window: one prediction needs two tokens.
SEQLEN = integer(2, 2**20, what="a number of tokens")
#: A quantization group size or MLP block (the model's widths are checked later).
GROUP = integer(1, 2**16, what="a positive integer")

VOCAB_GROUPS = integer(1, MAX_VOCAB_GROUPS, what="a number of row ranges")
VOCAB_GROUPS_HELP = ("the token embedding (and an untied lm_head) as N units of row ranges "
                     "halving towards the front (frequent tokens have low ids), each free to "
                     "take its own option (default 1: one unit; " + VOCAB_GROUPS.valid + ")")
#: Solver threads.
THREADS = integer(1, MAX_THREADS, what="a number of threads")
#: A wall-clock limit in seconds.
SECONDS = real(0, MAX_TIME_LIMIT_S, lo_open=True, what="seconds")
#: A memory budget in bits per original weight.
AVG_BITS = real(0, MAX_AVG_BITS, lo_open=True, what="bits per weight")
#: A share of something, zero excluded.
FRACTION = real(0, 1, lo_open=True, what="a fraction")
#: A relative optimality gap.
GAP = real(0, 1, hi_open=True, what="a relative gap")
#: Bit-widths offered besides b16 (16 itself is accepted and means untouched).
BITS_LIST = int_list(1, 8, extra=(16,), what="bit-widths")
#: Model dtypes the loaders accept.
DTYPES = ("float32", "bfloat16", "float16", "float64")


#: ``--grid``'s help (run, demo, compress).
GRID_HELP = ("how each group's scale and zero are chosen: hmse (its range shrunk "
             "to the smallest squared error of its weights, each column's error weighted as "
             "GPTQ's loss weighs it; as mse where no Hessian is known), mse (the same "
             "unweighted) or minmax (its whole range); sym, sym-mse, sym-hmse: the same with "
             "every zero point at 2**(bits-1), what GGUF's Q4_0/Q5_0 and K-quants store "
             "(with --format gguf they buy cheaper tensor types)")


def scale_bits_arg() -> Validator:
    """``--scale-bits``: S (an int of ``SCALE_BITS``), ``fp16`` (None: fp16 scales) or
    ``auto`` (the default; what it means is the command's: by format for ``run`` and
    ``profile``, as priced for ``solve`` and ``compress``)."""
    from bitsack.kernels.formats import SCALE_BITS

    valid = f"{SCALE_BITS[0]}..{SCALE_BITS[-1]}, fp16 or auto"

    def convert(text: str) -> int | str | None:
        t = text.strip().lower()
        if t in ("auto", "fp16"):
            return None if t == "fp16" else t
        if t.isdigit() and int(t) in SCALE_BITS:
            return int(t)
        raise argparse.ArgumentTypeError(f"{_shown(text)}; valid: {valid}")

    return Validator(convert, valid, "scale_bits")


def add_scale_bits_arg(p: argparse.ArgumentParser, what: str) -> None:
    """``--scale-bits S|fp16|auto``: bitsack's double-quantized scales (profile, solve,
    compress); ``what`` says what the command does with them and what ``auto`` means."""
    kind = scale_bits_arg()
    p.add_argument("--scale-bits", type=kind, default="auto", metavar="S",
                   help="group scales stored as S-bit codes times an fp16 step per 256 "
                   f"columns ({kind.valid}; format bitsack or gguf): {what}")


def check_scale_format(fmt: str | None, scale_bits: int | None) -> None:
    """Refuse ``--scale-bits`` with a format that stores fp16 scales, before any work."""
    if scale_bits not in (None, "auto") and fmt not in (None, "bitsack", "gguf"):
        from bitsack.solver.costs.memory import MemoryModel

        MemoryModel(format=fmt, scale_bits=scale_bits)  # raises, naming both


def add_format_arg(p: argparse.ArgumentParser, default: str | None = "bitsack") -> None:
    """``--format``: the target file format (shared by run, demo, profile and solve)."""
    from bitsack.kernels.formats import TARGET_FORMATS

    p.add_argument("--format", default=default, choices=TARGET_FORMATS,
                   help="target file format: bitsack (default: options mix freely inside a "
                   "matrix), compressed-tensors or gguf (only options the format stores, one "
                   "per matrix: all head groups of a layer share one option, and so do its "
                   "MLP blocks; memory budgets in the bytes of that file's tensors; see "
                   "`bitsack export`)" + ("" if default else
                                          "; default: the problem's own"))
