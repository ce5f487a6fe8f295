"""Atomic writes: a failed write leaves the previous file intact and no temp files behind."""

import json
import os
import stat

import pytest

from bitsack.io import atomic_write, atomic_write_path, write_json


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"good": True})
    with pytest.raises(RuntimeError), atomic_write(path) as fh:
        fh.write('{"half": ')
        raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"good": True}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_failed_writer_keeps_old_file(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")

    def writer(tmp):
        with open(tmp, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write_path(path, writer)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_files_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", [1])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "n.json", {"x": float("nan")})
    assert not list(tmp_path.iterdir())
