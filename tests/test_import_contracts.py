"""The dependency rules of DESIGN.md are a checked contract: ``lint-imports`` on pyproject.toml.

import-linter finds a package's modules by walking its folder, and bitsack's stages live
outside ``bitsack/`` (``package-dir``: ``bitsack.solver`` is ``solver/``, and so on), so run on
the source tree it would not see them. This test builds the installed layout as a tree of
symbolic links (``bitsack/`` plus one link per stage folder) and runs ``lint-imports`` on it,
from a folder where the source tree is not importable. By hand::

    .venv/bin/python tests/test_import_contracts.py   # builds the tree in a temp dir, runs all

Contracts that code outside the solver still breaks are marked below (``OTHERS_FIXING``): they
run and are reported, and the lead removes the mark once the code they name is fixed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"

#: Contract id -> what breaks it today (owned outside the solver; the lead finishes them).
OTHERS_FIXING: dict[str, str] = {}


def contract_ids() -> list[str]:
    config = tomllib.loads(PYPROJECT.read_text())
    return [c["id"] for c in config["tool"]["importlinter"]["contracts"]]


def installed_layout(dest: Path) -> Path:
    """A folder holding ``bitsack/`` as installed: links to its files and to each stage."""
    mapping = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    top = dest / "bitsack"
    top.mkdir(parents=True)
    for entry in (ROOT / mapping["bitsack"]).iterdir():
        if entry.name != "__pycache__":
            (top / entry.name).symlink_to(entry)
    for name, folder in mapping.items():
        if name != "bitsack":
            (top / name.split(".", 1)[1]).symlink_to(ROOT / folder)
    return dest


def lint_imports(layout: Path, *contracts: str) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "lint-imports is missing: `pip install -e .[dev]` (the dev extra has it)"
    args = [exe, "--no-cache", str(PYPROJECT)]
    for contract in contracts:
        args += ["--contract", contract]
    env = dict(os.environ, PYTHONPATH=str(layout))
    # cwd is the layout: the source tree's own bitsack/ must not be found first
    return subprocess.run(args, cwd=layout, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return installed_layout(tmp_path_factory.mktemp("layout"))


def test_the_layout_shows_every_stage(layout):
    proc = subprocess.run([sys.executable, "-c", "import bitsack.solver.problem as m, "
                           "bitsack.kernels.formats as k; print(m.__file__); print(k.__file__)"],
                          cwd=layout, env=dict(os.environ, PYTHONPATH=str(layout)),
                          capture_output=True, text=True, check=True)
    assert all(line.startswith(str(layout)) for line in proc.stdout.split())


@pytest.mark.parametrize("contract", [
    pytest.param(c, marks=pytest.mark.xfail(reason=f"others are still fixing: {OTHERS_FIXING[c]}"))
    if c in OTHERS_FIXING else c for c in contract_ids()])
def test_import_contract(layout, contract):
    proc = lint_imports(layout, contract)
    assert "Analyzed" in proc.stdout and "Could not find package" not in proc.stdout, \
        proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


if __name__ == "__main__":  # pragma: no cover
    with tempfile.TemporaryDirectory() as tmp:
        result = lint_imports(installed_layout(Path(tmp)))
        print(result.stdout, result.stderr)
        sys.exit(result.returncode)
