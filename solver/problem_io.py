"""Reading and writing problem files (``.json`` or ``.yaml`` / ``.yml``, by extension).

Both hold the same document (DESIGN.md, "The problem"). Files are read within fixed bounds
(``bitsack.solver.bounded``: size, depth and node limits, no YAML aliases) and validated
completely (``bitsack.solver.validate``). YAML is read through PyYAML's *safe* machinery only,
so a file can never make the loader construct an object or run code. The low-rank interaction
factor ``U`` lives in an ``.npz`` sidecar inside the problem file's folder, read with
``allow_pickle=False`` after its header was checked. YAML is written by a small emitter
(``bitsack.solver.yaml_emit``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bitsack.errors import ValidationError
from bitsack.solver.bounded import (
    MAX_JSON_BYTES,
    MAX_YAML_BYTES,
    parse_json,
    parse_yaml,
    read_text_bounded,
)
from bitsack.solver.document import problem_to_dict
from bitsack.solver.problem import Interactions, Problem
from bitsack.solver.validate import problem_from_dict


def load_problem(path: str | Path) -> Problem:
    """Read and validate a problem file (``.json``, ``.yaml`` or ``.yml``).

    Args:
        path: the problem file; a sidecar named in ``interactions.file`` is read relative to
            the file's folder (and must lie inside it).

    Returns:
        The validated :class:`Problem`.

    Raises:
        bitsack.errors.ValidationError: unreadable file, unknown extension, a file beyond the
            size / depth / node bounds, YAML aliases, a malformed document or any invalid
            field (the message names its path).
    """
    path = Path(path)
    fmt = format_of(path)
    where = repr(str(path))
    if fmt == "json":
        data = parse_json(read_text_bounded(path, MAX_JSON_BYTES, "json"), where)
    else:
        data = parse_yaml(read_text_bounded(path, MAX_YAML_BYTES, "yaml"), where)
    return problem_from_dict(data, base_dir=path.parent, default_name=path.stem)


def dump_problem(problem: Problem, path: str | Path) -> None:
    """Write ``problem`` to ``path`` (JSON or YAML by extension), atomically.

    If the problem has a low-rank factor ``U`` it is written to the sidecar named by
    ``interactions.file`` (relative to the output folder), or ``<stem>.interactions.npz`` when
    the problem has none or names a path outside the output folder. The sidecar is written
    (atomically) before the problem file, so the problem file never names a missing sidecar.

    Raises:
        bitsack.errors.ValidationError: unknown extension, or ``path`` is a folder.
    """
    from bitsack.io import atomic_write, atomic_write_path
    from bitsack.solver.yaml_emit import emit_yaml

    path = Path(path)
    fmt = format_of(path)
    if path.is_dir():
        raise ValidationError("out", f"{str(path)!r} is a folder; valid: a problem file path")
    inter = problem.interactions
    if inter is not None and inter.U is not None:
        import numpy as np

        name = _sidecar_name(inter.file, path)
        if name != inter.file:
            problem = dataclasses.replace(problem, interactions=Interactions(
                U=inter.U, file=name, pairs=inter.pairs))
        U = np.ascontiguousarray(inter.U, dtype=np.float64)

        def write_npz(tmp: str) -> None:
            # np.savez appends ".npz" to a name without it; the temp name already ends in .npz
            with open(tmp, "wb") as handle:
                np.savez(handle, U=U)

        atomic_write_path(path.parent / name, write_npz)
    data = problem_to_dict(problem)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        if fmt == "json":
            json.dump(data, handle, indent=1, ensure_ascii=False, allow_nan=False)
            handle.write("\n")
        else:
            handle.write(emit_yaml(data))


def format_of(path: Path) -> str:
    """``json`` or ``yaml`` by the file's extension.

    Raises:
        ValidationError: any other extension.
    """
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ValidationError("problem", f"{str(path)!r} has extension {suffix!r}; "
                          "valid: .json, .yaml, .yml")


def _sidecar_name(current: str | None, out: Path) -> str:
    """The sidecar name to write beside ``out``: keep a plain relative name, else a default."""
    if current:
        p = Path(current)
        if not p.is_absolute() and ".." not in p.parts:
            return current
    return f"{out.stem}.interactions.npz"

