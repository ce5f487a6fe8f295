"""The ``bitsack`` command line: a thin layer over typed library functions.

Each subcommand lives in its own module under ``bitsack/commands/`` with two functions:
``register(subparsers)`` adds its parser (cheap: argparse only) and sets ``func`` to a
``run(args) -> int``; heavy imports (torch, OR-Tools) happen inside ``run``.

Exit codes: 0 success, 1 bad input or failure (one line on stderr, no traceback), 2 for a
well-formed problem without a solution (infeasible / no solution in the limits).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence

from bitsack import __version__
from bitsack.errors import BitsackError

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

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NO_SOLUTION = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitsack",
        description="Joint pruning and mixed-precision quantization of causal LMs, "
        "solved as a certified multiple-choice knapsack.",
    )
    parser.add_argument("--version", action="version", version=f"bitsack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    try:
        return int(args.func(args))
    except BitsackError as exc:
        print(f"bitsack {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except FileNotFoundError as exc:
        print(f"bitsack {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # stdout closed early (e.g. `bitsack solve --json | head`): not an error of ours
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"bitsack {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
