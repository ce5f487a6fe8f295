"""The ``bitsack`` command line: a thin layer over typed library functions.

Each subcommand lives in its own module under ``bitsack/commands/`` with two functions:
``register(subparsers)`` adds its parser (cheap: argparse only) and sets ``func`` to a
``run(args) -> int``; heavy imports (torch, OR-Tools) happen inside ``run``.

This module is the only place that turns outcomes into exit codes (``bitsack.errors.ExitCode``):
a usage error (argparse) is 2, a ``BitsackError`` or an OS error on a named path is 1, anything
unexpected is 5 — always one line on stderr, the traceback only with ``--debug`` (or
``BITSACK_DEBUG=1``). With ``--json`` an error is also one JSON object on stdout,
``{"error": {"exit_code", "type", "field", "message"}}``, so a script reading stdout always gets
exactly one object.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import sys
import textwrap
import traceback
from collections.abc import Sequence
from typing import NoReturn

from bitsack import __version__
from bitsack.errors import BitsackError, ExitCode

# Order here is the order in `bitsack --help`.
_COMMAND_MODULES = (
    "bitsack.commands.run",
    "bitsack.commands.demo",
    "bitsack.commands.solve",
    "bitsack.commands.check",
    "bitsack.commands.generate",
    "bitsack.commands.regress",
    "bitsack.commands.pareto",
    "bitsack.commands.compress",
    "bitsack.commands.eval",
    "bitsack.commands.export",
    "bitsack.commands.generate_text",
    "bitsack.commands.profile",
)

#: Longest error message printed (a hostile file must not turn one line into megabytes).
MAX_MESSAGE_CHARS = 2000


class UsageError(Exception):
    """The command line itself is wrong (raised by the parsers instead of exiting)."""

    def __init__(self, prog: str, message: str):
        self.prog = prog
        super().__init__(message)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and an exception, not usage + exit.

    ``main`` catches ``UsageError``, prints ``<prog>: error: <message>; see '<prog> --help'``
    and returns ``ExitCode.USAGE`` (argparse's own 2). Subparsers inherit the class.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def exit_code_table() -> str:
    """The exit codes, one per line, for ``bitsack --help``."""
    lines = ["exit codes:"]
    for code in ExitCode:
        body = textwrap.wrap(code.meaning, width=72)
        lines.append(f"  {int(code):<5}{body[0]}")
        lines.extend(f"       {rest}" for rest in body[1:])
    lines += ["", "errors are one line on stderr (--debug adds the traceback); with --json, "
              "stdout", 'also holds one JSON object {"error": {"exit_code", "type", "field", '
              '"message"}}.']
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="bitsack",
        description="Joint pruning and mixed-precision quantization of causal LMs, "
        "solved as a certified multiple-choice knapsack.",
        epilog=exit_code_table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"bitsack {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="print the traceback of an error (also: BITSACK_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for sp in sub.choices.values():
        # after the command too (`bitsack solve p.yaml --debug`); SUPPRESS keeps a --debug
        # given before the command from being reset by the subparser's default
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an error")
    return parser


def _one_line(text: str) -> str:
    flat = " | ".join(part.strip() for part in str(text).splitlines() if part.strip())
    if len(flat) > MAX_MESSAGE_CHARS:
        flat = flat[:MAX_MESSAGE_CHARS] + f"... ({len(flat) - MAX_MESSAGE_CHARS} more characters)"
    return flat


def _wants_json(argv: Sequence[str]) -> bool:
    for token in argv:
        if token == "--":
            return False
        if token == "--json":
            return True
    return False


def _usage_field(message: str) -> str | None:
    """The flag an argparse message is about (``argument --seqlen: ...``), if it names one."""
    match = re.match(r"argument ([^:]+): ", message)
    return match.group(1).split("/")[-1] if match else None


def _report(prog: str, code: ExitCode, label: str, message: str, *, json_out: bool, kind: str,
            field: str | None = None) -> int:
    """``<prog>: <label>: <message>`` as one line on stderr (and with --json one JSON object
    on stdout); returns ``code``."""
    line = _one_line(message)
    print(f"{prog}: {label}: {line}", file=sys.stderr)
    if json_out:
        with contextlib.suppress(OSError):
            print(json.dumps({"error": {"exit_code": int(code), "type": kind, "field": field,
                                        "message": line}}))
    return int(code)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    json_out = _wants_json(argv)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # argparse would blame `bitsack`; the flags belong to the command
            prog = f"bitsack {args.command}" if getattr(args, "command", None) else "bitsack"
            raise UsageError(prog, f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as exc:
        return _report(exc.prog, ExitCode.USAGE, "error", f"{exc}; see '{exc.prog} --help'",
                       json_out=json_out, kind="UsageError", field=_usage_field(str(exc)))
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return int(ExitCode.USAGE)
    prog = f"bitsack {args.command}"
    json_out = bool(getattr(args, "json", False))
    debug = bool(getattr(args, "debug", False)) or os.environ.get("BITSACK_DEBUG") not in (
        None, "", "0")
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # stdout closed early (e.g. `bitsack solve --json | head`): not an error of ours
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return int(ExitCode.OK)
    except KeyboardInterrupt:
        return _report(prog, ExitCode.INTERRUPTED, "interrupted", "stopped by the user",
                       json_out=json_out, kind="KeyboardInterrupt")
    except BitsackError as exc:
        if debug:
            traceback.print_exc()
        return _report(prog, ExitCode.BAD_INPUT, "error", str(exc), json_out=json_out,
                       kind=type(exc).__name__, field=getattr(exc, "path", None) or None)
    except OSError as exc:
        # a path that is missing, a folder, unreadable, or a full disk: the user's to fix
        if debug:
            traceback.print_exc()
        return _report(prog, ExitCode.BAD_INPUT, "error", str(exc), json_out=json_out,
                       kind=type(exc).__name__,
                       field=None if exc.filename is None else str(exc.filename))
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, exit 5
        if debug:
            traceback.print_exc()
        what = ("out of memory (MemoryError)" if isinstance(exc, MemoryError)
                else f"{type(exc).__name__}: {exc}")
        hint = "" if debug else "; rerun with --debug for the traceback"
        return _report(prog, ExitCode.INTERNAL, "internal error", what + hint,
                       json_out=json_out, kind=type(exc).__name__)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
