"""Importing bitsack (and its solver), or asking the CLI for help, loads no heavy framework."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "cupy", "ortools", "transformers")

_PROBE = """
import json, sys
{body}
print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _heavy_after(body: str) -> list[str]:
    code = _PROBE.format(body=body, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("body", [
    "import bitsack",
    "import bitsack.solver",
    "from bitsack.solver import load_problem, Problem, Solution, SolveOptions, evaluate",
    "import bitsack.solver.schema, bitsack.solver.problem, bitsack.solver.solution",
    "import bitsack.cli; bitsack.cli.build_parser()",
])
def test_import_is_lean(body):
    assert _heavy_after(body) == []


def test_help_is_lean():
    body = ("import bitsack.cli\n"
            "try:\n    bitsack.cli.main(['--help'])\nexcept SystemExit:\n    pass")
    assert _heavy_after(body) == []


def test_solving_with_dp_needs_no_ortools_or_torch(tmp_path):
    from pathlib import Path

    problem = Path(__file__).resolve().parents[2] / "problems" / "knapsack-hand.yaml"
    body = ("from bitsack.solver import load_problem, solve\n"
            f"s = solve(load_problem({str(problem)!r}), 'dp')\n"
            "assert s.status == 'optimal'")
    # the registry imports every backend module; their heavy dependencies must load lazily
    assert [m for m in _heavy_after(body) if m != "ortools"] == []
