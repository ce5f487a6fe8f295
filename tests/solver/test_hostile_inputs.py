"""Hostile and out-of-range inputs: each refused with exit 1 (bad input; 2 for a flag outside its
own range: a usage error), one line naming the field, within 10 s and 1 GB (the CLI runs in a
subprocess under ``resource`` limits).

The files are small and built here; none is committed.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

PROBLEMS = Path(__file__).resolve().parents[2] / "problems"
HAND = PROBLEMS / "knapsack-hand.yaml"  # 3 units x 3 options = 9 options
MEMORY_LIMIT = 1 << 30
TIME_LIMIT_S = 10.0


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def refused(*argv: str, field: str, fragment: str = "", code: int = 1) -> str:
    """Run ``bitsack ARGV`` under 1 GB / 10 s; it must exit ``code`` (1: bad input) with one
    line naming ``field``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bitsack.cli", *argv], capture_output=True,
                          text=True, timeout=TIME_LIMIT_S, preexec_fn=_limit_memory, env=env)
    elapsed = time.monotonic() - t0
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, err[-2000:], proc.stdout[-500:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
    assert len(err) < 1000, f"message of {len(err)} characters"
    command = argv[0]
    assert err.startswith(f"bitsack {command}: error: {field}"), err
    assert fragment in err, err
    assert elapsed < TIME_LIMIT_S
    return err


def hand_doc() -> dict:
    return yaml.safe_load(HAND.read_text())


def write_json(tmp_path: Path, doc: dict, name: str = "p.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


# --- bounded files ------------------------------------------------------------------------

def test_yaml_alias_bomb_is_refused(tmp_path):
    # "billion laughs": 9 levels of 9 aliases = 9^9 (387M) strings, in a field that an error
    # message prints (a unit id must be a string; this one is a nested list)
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for k in range(1, 10):
        refs = ",".join([f"*a{k - 1}"] * 9)
        lines.append(f"a{k}: &a{k} [{refs}]")
    bomb = "\n".join(lines)
    path = tmp_path / "bomb.yaml"
    path.write_text("schema: bitsack.problem/v1\nname: bomb\nmetadata:\n"
                    + "\n".join("  " + line for line in bomb.splitlines())
                    + "\nunits: [{id: *a9, options: [{id: b4, loss: 0.1}]}]\n")
    refused("solve", str(path), field="problem", fragment="uses a YAML alias or anchor")


def test_a_plain_anchor_is_refused_too(tmp_path):
    path = tmp_path / "anchor.yaml"
    path.write_text("schema: bitsack.problem/v1\nname: &n x\nunits: [{id: a, options: "
                    "[{id: b4, loss: 0.1}]}]\n")
    refused("solve", str(path), field="problem", fragment="(line 2, column 7)")


@pytest.mark.parametrize("depth", [40, 200_000])
def test_deeply_nested_json_is_refused(tmp_path, depth):
    doc = hand_doc()
    path = tmp_path / "deep.json"
    text = json.dumps(doc)[:-1] + ', "metadata": {"x": ' + "[" * depth + "]" * depth + "}}"
    path.write_text(text)
    refused("solve", str(path), field="problem", fragment="nests containers deeper than 32")


@pytest.mark.parametrize("style", ["flow", "block"])
def test_deeply_nested_yaml_is_refused(tmp_path, style):
    depth = 5000
    nested = "[" * depth + "]" * depth if style == "flow" else "- " * depth + "x"
    path = tmp_path / "deep.yaml"
    path.write_text(HAND.read_text() + "metadata:\n  x: " + ("\n    " if style == "block"
                                                             else "") + nested + "\n")
    refused("solve", str(path), field="problem")


def test_oversized_yaml_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as handle:  # sparse: 40 MB on paper, nothing on disk
        handle.truncate(40 << 20)
    refused("solve", str(path), field="problem",
            fragment="valid: a yaml problem file of at most 33554432 bytes")


def test_error_messages_quote_huge_values_briefly(tmp_path):
    doc = hand_doc()
    doc["units"][0]["kind"] = ["k" * 1000] * 100_000  # 100 MB if printed in full
    err = refused("solve", str(write_json(tmp_path, doc)), field="units[0].kind",
                  fragment="is not a non-empty string")
    assert "..." in err


# --- .npz sidecars ------------------------------------------------------------------------

def _npz_claiming(path: Path, shape: tuple[int, ...], data_bytes: int) -> None:
    """An .npz whose member U.npy declares ``shape`` float64 but holds ``data_bytes``."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("U.npy", header.getvalue() + bytes(data_bytes))


@pytest.mark.parametrize("shape, fragment", [
    ((44_000_000, 9), "U has 44000000 rows"),  # 3.2 GB as float64
    ((9, 44_000_000), "U has shape [9, 44000000]; valid: [N, 9]"),
])
def test_npz_claiming_a_huge_array_is_refused_from_its_header(tmp_path, shape, fragment):
    _npz_claiming(tmp_path / "U.npz", shape, 3 << 20)  # a 3 MB file
    doc = hand_doc()
    doc["interactions"] = {"file": "U.npz"}
    assert (tmp_path / "U.npz").stat().st_size < 4 << 20
    refused("solve", str(write_json(tmp_path, doc)), field="interactions.file (U.npz)",
            fragment=fragment)


@pytest.mark.parametrize("name, fragment", [
    ("/etc/passwd", "is not a plain relative name"),
    ("../outside.npz", "is not a plain relative name"),
    ("sub/../../outside.npz", "is not a plain relative name"),
    ("link.npz", "leads outside the problem file's folder"),
])
def test_interactions_file_is_confined_to_the_problem_folder(tmp_path, name, fragment):
    folder = tmp_path / "here"
    folder.mkdir()
    np.savez(tmp_path / "outside.npz", U=np.zeros((2, 9)))
    (folder / "link.npz").symlink_to(tmp_path / "outside.npz")
    doc = hand_doc()
    doc["interactions"] = {"file": name}
    refused("solve", str(write_json(folder, doc)), field="interactions.file",
            fragment=fragment)


def test_a_sidecar_inside_the_folder_still_loads(tmp_path):
    from bitsack.solver.schema import load_problem

    (tmp_path / "sub").mkdir()
    np.savez(tmp_path / "sub" / "U.npz", U=np.full((2, 9), 0.01))
    doc = hand_doc()
    doc["interactions"] = {"file": "sub/U.npz"}
    assert load_problem(write_json(tmp_path, doc)).interactions.U.shape == (2, 9)


# --- numbers outside the safe range -------------------------------------------------------

def _with(path_keys, value):
    doc = hand_doc()
    target = doc
    for k in path_keys[:-1]:
        target = target[k]
    target[path_keys[-1]] = value
    return doc


@pytest.mark.parametrize("doc, field, fragment", [
    (_with(["units", 0, "options", 1, "loss"], 1e308), "units[0].options[1].loss",
     "times the problem's typical loss"),
    (_with(["units", 0, "options", 1, "loss"], -1e300), "units[0].options[1].loss",
     "valid: at most 1e+09 times it"),
    (_with(["units", 2, "options", 2, "cost", "memory_bytes"], 1e308),
     "units[2].options[2].cost.memory_bytes", "times the problem's typical memory_bytes cost"),
    (_with(["resources", "memory_bytes", "limit"], 1e300), "resources.memory_bytes.limit",
     "is above 1e+150"),
    (_with(["units", 1, "options", 0, "loss"], 10**400), "units[1].options[0].loss",
     "is too large"),
])
def test_numbers_outside_the_safe_range_are_refused(tmp_path, doc, field, fragment):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    refused("solve", str(path), field=field, fragment=fragment)


def test_sums_that_would_overflow_are_refused(tmp_path):
    # every loss alike (so within range of each other) but their sum is past 1e150
    doc = hand_doc()
    for unit in doc["units"]:
        for opt in unit["options"]:
            opt["loss"] = 1e150
    refused("solve", str(write_json(tmp_path, doc)), field="units[*].options[*].loss",
            fragment="Σ over units of the largest |loss| is 3e+150")


def test_interaction_terms_outside_the_range_are_refused(tmp_path):
    U = np.zeros((1, 9))
    U[0, 4] = 1e6  # ½‖U_i‖² = 5e11, far beyond the losses' scale (~0.2)
    np.savez(tmp_path / "U.npz", U=U)
    doc = hand_doc()
    doc["interactions"] = {"file": "U.npz"}
    refused("solve", str(write_json(tmp_path, doc)), field="interactions.file (U.npz)",
            fragment="column 4 (units[1].options[1])")
    doc["interactions"] = {"pairs": [{"a": ["a", "b2"], "b": ["b", "b2"], "value": 1e12}]}
    refused("solve", str(write_json(tmp_path, doc)), field="interactions.pairs[0].value")


# --- command-line numbers and paths -------------------------------------------------------

# Flags with a range of their own are refused while parsing (usage error, exit 2: the command
# line itself is wrong); values whose validity depends on more (a budget, a backend parameter)
# are refused by the library (bad input, exit 1). Both name the flag in one line.
USAGE = 2


@pytest.mark.parametrize("argv, code, field", [
    (["solve", str(HAND), "--time-limit", "1e308"], USAGE,
     "argument --time-limit: '1e308' is out of range"),
    (["solve", str(HAND), "--time-limit", "0"], USAGE, "argument --time-limit: '0' is out of"),
    (["solve", str(HAND), "--gap", "nan"], USAGE, "argument --gap: 'nan' is not a finite"),
    (["solve", str(HAND), "--seed", "1e308"], USAGE, "argument --seed: '1e308' is not an int"),
    (["solve", str(HAND), "--seed", "1.5"], USAGE, "argument --seed: '1.5' is not an integer"),
    (["solve", str(HAND), "--threads", "1e308"], USAGE, "argument --threads: '1e308'"),
    (["solve", str(HAND), "--avg-bits", "1e308"], USAGE, "argument --avg-bits: '1e308' is out"),
    (["solve", str(HAND), "--budget", "memory_bytes=1e308"], 1,
     "--budget memory_bytes: 1e+308 is above 1e+150"),
    (["solve", str(HAND), "--solver", "highs", "--param", "max_rounds=1e308"], 1,
     "params.max_rounds: 1e+308 is out of range"),
    (["solve", str(HAND), "--solver", "greedy", "--param", "iterations=1e308"], 1,
     "params.iterations: 1e+308 is out of range"),
    (["solve", str(HAND), "--solver", "dp", "--param", "max_work=1e308"], 1,
     "params.max_work: 1e+308 is out of range"),
    (["solve", str(HAND), "--solver", "cpsat", "--param", "deterministic_time=1e308"], 1,
     "params.deterministic_time: 1e+308 is out of range"),
    (["check", str(HAND), str(HAND), "--avg-bits", "-1"], USAGE,
     "argument --avg-bits: '-1' is out of range"),
    (["pareto", str(HAND), "--resource", "memory_bytes", "--points", "1e308"], USAGE,
     "argument --points: '1e308'"),
    (["pareto", str(HAND), "--resource", "memory_bytes", "--time-limit", "inf"], USAGE,
     "argument --time-limit: 'inf' is not a finite number"),
    (["generate", "--out", "x.yaml", "--rank", "1e308"], USAGE, "argument --rank: '1e308'"),
    (["generate", "--out", "x.yaml", "--layers", "1e9"], USAGE, "argument --layers: '1e9'"),
    (["generate", "--out", "x.yaml", "--tightness", "2"], USAGE,
     "argument --tightness: '2' is out of range"),
    (["regress", str(PROBLEMS), "--time-limit", "1e308"], USAGE,
     "argument --time-limit: '1e308' is out of range"),
])
def test_every_numeric_cli_option_is_range_checked(tmp_path, argv, code, field):
    refused(*argv, field=field, code=code)


def test_out_naming_a_folder_is_refused_before_solving(tmp_path):
    refused("solve", str(HAND), "--out", str(tmp_path), field="--out", fragment="is a folder")
    refused("solve", str(HAND), "--out", str(tmp_path / "new") + "/", field="--out")
    refused("generate", "--out", str(tmp_path), field="--out", fragment="is a folder")
    (tmp_path / "front.json").mkdir()
    refused("pareto", str(HAND), "--resource", "memory_bytes", "--out",
            str(tmp_path / "front"), field="--out", fragment="front.json' is a folder")
