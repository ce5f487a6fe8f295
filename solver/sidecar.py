"""The interaction sidecar: the low-rank factor ``U`` in an ``.npz`` beside the problem file.

``interactions.file`` must name a file inside the problem file's folder (relative, no ``..``,
no link leading out). The member ``U.npy`` is checked by its header alone — a real numeric
dtype, shape ``[N, n_options]`` with ``1 <= N <= MAX_FACTOR_ROWS`` and at most
``MAX_FACTOR_BYTES`` as float64 — before its data is read (with ``allow_pickle=False``), so
a small file claiming a huge array costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitsack.errors import ValidationError
from bitsack.solver.bounded import npz_member_header, npz_names, short_repr

#: Most rows of an interaction factor (calibration samples; the design uses 128).
MAX_FACTOR_ROWS = 1 << 16
#: Most bytes of an interaction factor, as float64.
MAX_FACTOR_BYTES = 1 << 30

_s = short_repr


def sidecar_path(file: str, base_dir: str | Path) -> Path:
    """Where ``interactions.file`` points: inside ``base_dir``, or an error.

    The name must be relative, without ``..``, and (after resolving symbolic links) inside
    the problem file's folder: a problem file cannot make bitsack read files elsewhere.

    Raises:
        ValidationError: an absolute path, a ``..`` part, or a link leading outside.
    """
    name = Path(file)
    if name.is_absolute() or name.anchor or ".." in name.parts or "\\" in file:
        raise ValidationError("interactions.file", f"{_s(file)} is not a plain "
                              "relative name; valid: a file inside the problem file's folder "
                              "(no absolute path, no '..')")
    base = Path(base_dir).resolve()
    path = (base / name).resolve()
    if path != base and base not in path.parents:
        raise ValidationError("interactions.file", f"{_s(file)} leads outside the "
                              "problem file's folder (through a link); valid: a file inside it")
    return path


def read_sidecar(file: str, base_dir: str | Path | None, n_options: int) -> Any:
    """The factor ``U`` from the sidecar, its header checked before the data is read.

    Raises:
        ValidationError: no file given, outside the folder, missing, no array ``U``, a bad
            header, or unreadable data.
    """
    import numpy as np

    if base_dir is None:
        raise ValidationError("interactions.file", f"{_s(file)} cannot be located: "
                              "the problem was not read from a file; pass U explicitly")
    path = sidecar_path(file, base_dir)
    where = file_label(file)
    if not path.is_file():
        raise ValidationError("interactions.file", f"{_s(file)} does not exist next to "
                              f"the problem (looked for {_s(str(path), 200)})")
    header = npz_member_header(path, "U")
    if header is None:
        raise ValidationError("interactions.file", f"{_s(file)} has arrays "
                              f"{_s(npz_names(path))}; valid: an .npz with an array "
                              "named 'U'")
    check_factor_header(header.dtype, header.shape, n_options, where)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz["U"]
    except Exception as exc:  # truncated / corrupt data behind a valid header
        raise ValidationError("interactions.file", f"{_s(file)} cannot be read as an "
                              f".npz of numbers: {_s(str(exc), 160)}") from None


def file_label(file: str) -> str:
    """``interactions.file (NAME)``: how messages name the factor read from the sidecar."""
    return f"interactions.file ({file if len(file) <= 60 else _s(file)})"


def check_factor_header(dtype: Any, shape: tuple[int, ...], n_options: int, path: str) -> None:
    """Refuse a factor by its dtype and shape alone (before any allocation).

    Raises:
        ValidationError: not a real numeric dtype, not [N, n_options], or too large.
    """
    if dtype.kind not in "iuf" or dtype.hasobject:
        raise ValidationError(path, f"U has dtype {dtype}; valid: a real numeric array")
    if len(shape) != 2 or shape[1] != n_options:
        raise ValidationError(path, f"U has shape {list(shape)}; valid: [N, {n_options}] "
                              f"(N factors x the problem's {n_options} options in file order)")
    if not 1 <= shape[0] <= MAX_FACTOR_ROWS or shape[0] * n_options * 8 > MAX_FACTOR_BYTES:
        raise ValidationError(path, f"U has {shape[0]} rows ({shape[0] * n_options * 8} bytes as "
                              f"float64); valid: 1..{MAX_FACTOR_ROWS} rows and at most "
                              f"{MAX_FACTOR_BYTES} bytes")


def check_factor(U: Any, n_options: int, path: str) -> Any:
    """``U`` as a read-only float64 array of shape [N, n_options] with finite entries.

    Raises:
        ValidationError: wrong dtype or shape, too large, or a non-finite entry.
    """
    import numpy as np

    arr = np.asarray(U)
    check_factor_header(arr.dtype, arr.shape, n_options, path)
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        value = float(arr[tuple(bad)])
        raise ValidationError(path, f"U[{bad[0]}, {bad[1]}] = {value!r} is not finite")
    arr.setflags(write=False)
    return arr


