"""Small I/O helpers shared by every stage: atomic writes, JSON output, content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _umask_mode() -> int:
    """0666 minus the process umask: the mode an ordinary ``open(path, "w")`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it over ``path``.

    A failure while writing leaves any previous ``path`` untouched and removes the temporary
    file, so a failed write never leaves a half-written file in place of a good one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_path(path: str | os.PathLike, writer) -> None:
    """Call ``writer(tmp_path)`` to produce a file, then rename it over ``path`` atomically.

    For libraries that insist on writing to a path themselves (safetensors, numpy, matplotlib).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp",
                               dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, allow_nan=False)
        handle.write("\n")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """SHA-256 of a JSON-able object (keys sorted; non-JSON values by ``str``): a record key
    for "were these the same inputs?"."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def dir_mode() -> int:
    """0777 minus the process umask: the mode an ordinary ``mkdir`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def check_output_dir(path: str | os.PathLike, *, what: str, is_ours, force: bool = False,
                     flag: str = "--out") -> Path:
    """Refuse to write into or replace an existing folder that is not of the kind we write.

    ``path`` may be missing, an empty folder, or a folder ``is_ours(path)`` recognises (a
    previous output of the same kind); anything else — a non-empty ordinary folder, a file —
    is refused with a ``ValidationError`` naming ``flag``, unless ``force``. Nothing is
    deleted here.

    Args:
        path: the output folder.
        what: what we write there, for the message ("bitsack model folder").
        is_ours: ``Path -> bool``, whether an existing folder is an output of this kind.
        force: accept any existing folder (the caller replaces or writes into it).
        flag: the option that named ``path``.
    """
    from bitsack.errors import ValidationError

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return path
    if not path.is_dir():
        raise ValidationError(flag, f"{str(path)!r} exists and is not a folder; valid: a new "
                              f"or empty folder, or an existing {what}")
    if force or is_ours(path) or not any(path.iterdir()):
        return path
    raise ValidationError(flag, f"{str(path)!r} is a non-empty folder that is not a {what}; "
                          "refusing to write there, nothing was changed (valid: a new or empty "
                          f"folder, an existing {what}, or --force to replace it)")


#: Marker of bitsack's temporary sibling folders: ``.<name>.bitsack-<tag>-<pid>-<random>``.
_TMP_TAG = ".bitsack-"


def temp_sibling(path: Path, tag: str) -> Path:
    """A new, empty folder beside ``path`` named after it, this process and ``tag`` (``tmp`` /
    ``old``), with an ordinary mode; ``remove_stale_siblings`` recognises it later."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP_TAG}{tag}-{os.getpid()}-",
                                dir=path.parent))
    os.chmod(tmp, dir_mode())  # mkdtemp makes 0700 folders
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Remove temporary folders left beside ``path`` by a killed bitsack process.

    Only folders named by ``temp_sibling`` for this ``path`` whose process is gone are removed
    (a live writer's folders are left alone). Returns what was removed.
    """
    import shutil

    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    prefix = f".{path.name}{_TMP_TAG}"
    for cand in path.parent.iterdir():
        if not cand.name.startswith(prefix) or not cand.is_dir() or cand.is_symlink():
            continue
        parts = cand.name[len(prefix):].split("-")
        if len(parts) < 2 or not parts[1].isdigit():
            continue
        if int(parts[1]) == os.getpid() or _pid_alive(int(parts[1])):
            continue
        shutil.rmtree(cand, ignore_errors=True)
        removed.append(cand)
    return removed


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out``, replacing what was there, as atomically as
    a file system allows (two renames; the old folder is removed last)."""
    import shutil

    old = None
    if out.exists() or out.is_symlink():
        old = temp_sibling(out, "old")
        os.rmdir(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
