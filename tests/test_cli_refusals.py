"""Issue 12's acceptance through the command line: each hostile input is refused with its exit
code, within 10 s and 1 GB of address space, with one line on stderr naming the field.

The files are built here, small; one child process (under ``RLIMIT_AS``) runs every case so the
limits hold for the whole CLI, imports included.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bitsack.errors import ExitCode

HAND = str(Path(__file__).resolve().parents[1] / "problems" / "knapsack-hand.yaml")
HEAD = "schema: bitsack.problem/v1\nname: x\n"
UNIT = "units:\n  - {id: a, options: [{id: b2, loss: 0.2}, {id: b4, loss: 0.1}]}\n"


def _alias_bomb() -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return HEAD.replace("name: x\n", "") + "\n".join(lines) + "\nname: *a9\n" + UNIT


def _npz_claiming(shape: tuple[int, int]) -> bytes:
    """An .npz whose U.npy header claims ``shape`` (3.2 GB) but holds no data."""
    header = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (118 - len(header)) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()


def _build(tmp: Path) -> dict[str, tuple[list[str], int, str]]:
    """case -> (argv, expected exit code, the field the one line must name)."""
    (tmp / "bomb.yaml").write_text(_alias_bomb())
    (tmp / "deep.json").write_text('{"schema": "bitsack.problem/v1", "name": "x", "metadata": '
                                   + "[" * 100_000 + "]" * 100_000 + "}")
    (tmp / "big.yaml").write_text(HEAD + UNIT + "#" + "x" * (33 << 20) + "\n")
    (tmp / "escape.yaml").write_text(HEAD + UNIT + "interactions: {file: ../outside.npz}\n")
    (tmp / "absolute.yaml").write_text(HEAD + UNIT + "interactions: {file: /etc/U.npz}\n")
    with zipfile.ZipFile(tmp / "huge.npz", "w") as z:
        z.writestr("U.npy", _npz_claiming((20000, 20000)))
    (tmp / "huge.yaml").write_text(HEAD + UNIT + "interactions: {file: huge.npz}\n")
    (tmp / "loss.yaml").write_text(
        HEAD + "resources: {memory_bytes: {limit: 300}}\nunits:\n"
        "  - {id: a, options: [{id: b2, loss: 1e308, cost: {memory_bytes: 100}},"
        " {id: b4, loss: 0.1, cost: {memory_bytes: 200}}]}\n"
        "  - {id: b, options: [{id: b2, loss: 0.3, cost: {memory_bytes: 100}},"
        " {id: b4, loss: 0.1, cost: {memory_bytes: 200}}]}\n")
    (tmp / "python.yaml").write_text(HEAD + "metadata: !!python/object/apply:os.system [ls]\n"
                                     + UNIT)
    folder = tmp / "a-folder"
    folder.mkdir()
    keep = tmp / "project"
    keep.mkdir()
    (keep / "keep.txt").write_text("precious")
    solve = ["solve", "--solver", "dp"]
    bad = ExitCode.BAD_INPUT
    return {
        "yaml alias bomb": ([*solve, str(tmp / "bomb.yaml")], bad, "problem"),
        "deeply nested json": ([*solve, str(tmp / "deep.json")], bad, "problem"),
        "33 MB yaml": ([*solve, str(tmp / "big.yaml")], bad, "problem"),
        "interactions.file with ..": ([*solve, str(tmp / "escape.yaml")], bad,
                                      "interactions.file"),
        "interactions.file absolute": ([*solve, str(tmp / "absolute.yaml")], bad,
                                       "interactions.file"),
        "npz header claims 3.2 GB": ([*solve, str(tmp / "huge.yaml")], bad,
                                     "interactions.file"),
        "loss 1e308": ([*solve, str(tmp / "loss.yaml")], bad, "units[0].options[0].loss"),
        "python tag": ([*solve, str(tmp / "python.yaml")], bad, "problem"),
        "--time-limit 1e308": (["solve", HAND, "--time-limit", "1e308"], ExitCode.USAGE,
                               "--time-limit"),
        "--out names a folder": (["solve", HAND, "--out", str(folder)], bad, "--out"),
        "compress --out a foreign folder": (
            ["compress", "--model", "m", "--problem", HAND, "--solution", "s.json", "--out",
             str(keep)], bad, "--out"),
    }


_CHILD = """
import contextlib, io, json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from bitsack.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err, out = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    results[name] = {"code": code, "err": err.getvalue(), "s": time.perf_counter() - start}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    cases = _build(tmp)
    proc = subprocess.run([sys.executable, "-c", _CHILD,
                           json.dumps({k: v[0] for k, v in cases.items()})],
                          capture_output=True, text=True, timeout=120, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: (cases[name], got[name], tmp) for name in cases}


CASES = ["yaml alias bomb", "deeply nested json", "33 MB yaml", "interactions.file with ..",
         "interactions.file absolute", "npz header claims 3.2 GB", "loss 1e308", "python tag",
         "--time-limit 1e308", "--out names a folder", "compress --out a foreign folder"]


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_is_refused_fast_small_and_in_one_line(outcomes, case):
    (argv, code, field), got, tmp = outcomes[case]
    assert got["code"] == code, got["err"]
    lines = got["err"].strip("\n").split("\n")
    assert len(lines) == 1 and "Traceback" not in got["err"], got["err"]
    assert f"error: {field}" in lines[0] or f"argument {field}:" in lines[0], lines[0]
    assert len(lines[0]) < 2200
    assert got["s"] < 10
    if case == "compress --out a foreign folder":
        assert (tmp / "project" / "keep.txt").read_text() == "precious"
