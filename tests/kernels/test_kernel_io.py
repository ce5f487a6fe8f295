"""Tensor files: atomic save, hashes, refusal of truncated / modified / mismatched files."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from bitsack.errors import FormatError
from bitsack.kernels.io import dtype_name, load_tensors, save_tensors, tensor_sha256
from bitsack.kernels.packed import PackedLinear


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    layer = PackedLinear.from_dense(torch.randn(16, 64), [(0, 8, 3), (8, 16, 16)], 32,
                                    bias=torch.randn(16))
    out = {f"layer.{k}": v for k, v in layer.state_dict().items()}
    out["emb"] = torch.randn(4, 8).bfloat16()
    out["emb_tied"] = out["emb"]  # shared storage: written as a copy
    return out


def _expected(tensors, hashes):
    return {k: (tuple(v.shape), dtype_name(v.dtype), hashes[k]) for k, v in tensors.items()}


def test_round_trip_bit_identical(tmp_path):
    t = _tensors()
    hashes = save_tensors(tmp_path / "m.safetensors", t, {"schema": "x/v1", "dims": [1, 2]})
    assert hashes["layer.seg0_qdata"] == tensor_sha256(t["layer.seg0_qdata"])
    got, meta = load_tensors(tmp_path / "m.safetensors", _expected(t, hashes))
    assert meta == {"schema": "x/v1", "dims": "[1, 2]"}
    for k, v in t.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left


def test_refuses_truncated(tmp_path):
    t = _tensors()
    hashes = save_tensors(tmp_path / "m.safetensors", t, {})
    data = (tmp_path / "m.safetensors").read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 20, 4):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(FormatError, match="truncated"):
            load_tensors(p, _expected(t, hashes))
        with pytest.raises(FormatError, match="truncated"):
            load_tensors(p)  # integrity check even without expectations


def test_refuses_hash_mismatch(tmp_path):
    t = _tensors()
    path = tmp_path / "m.safetensors"
    hashes = save_tensors(path, t, {})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"tensor '.*' has SHA-256 .*expected"):
        load_tensors(path, _expected(t, hashes))


def test_refuses_wrong_shape_dtype_missing_extra(tmp_path):
    t = _tensors()
    path = tmp_path / "m.safetensors"
    hashes = save_tensors(path, t, {})
    exp = _expected(t, hashes)
    bad = dict(exp)
    bad["emb"] = ((8, 4), "bfloat16", hashes["emb"])
    with pytest.raises(FormatError, match=r"tensor 'emb' has shape \[4, 8\]; expected \[8, 4\]"):
        load_tensors(path, bad)
    bad["emb"] = ((4, 8), "float16", hashes["emb"])
    with pytest.raises(FormatError, match="tensor 'emb' has dtype BF16; expected float16"):
        load_tensors(path, bad)
    bad = dict(exp)
    bad["missing"] = ((1,), "float32", "0" * 64)
    with pytest.raises(FormatError, match=r"missing tensor\(s\) \['missing'\]"):
        load_tensors(path, bad)
    bad = dict(exp)
    del bad["emb"]
    with pytest.raises(FormatError, match=r"unexpected tensor\(s\) \['emb'\]"):
        load_tensors(path, bad)
    got, _ = load_tensors(path, bad, strict=False)
    assert "emb" in got
    with pytest.raises(FormatError, match="no such file"):
        load_tensors(tmp_path / "nope.safetensors")


def test_refuses_inconsistent_header(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)  # 4 bytes too many
    with pytest.raises(FormatError, match="trailing bytes"):
        load_tensors(path)
    path.write_bytes(struct.pack("<Q", 10**9) + header)
    with pytest.raises(FormatError, match="header length"):
        load_tensors(path)


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "m.safetensors"
    t = _tensors()
    save_tensors(path, t, {})
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises
        save_tensors(path, {"bad": torch.randn(2, 2).to_sparse()}, {})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_packed_layer_save_reload_bit_identical(tmp_path):
    import json as _json

    torch.manual_seed(2)
    layer = PackedLinear.from_dense(torch.randn(32, 96), [(0, 32, 2), (32, 64, 16), (64, 96, 3)],
                                    16, axis=1, bias=torch.randn(32).half())
    x = torch.randn(3, 96)
    hashes = save_tensors(tmp_path / "l.safetensors", layer.state_dict(),
                          {"layout": layer.layout()})
    tensors, meta = load_tensors(tmp_path / "l.safetensors",
                                 {k: (tuple(v.shape), dtype_name(v.dtype), hashes[k])
                                  for k, v in layer.state_dict().items()})
    layout = _json.loads(meta["layout"])
    assert layout == layer.layout()
    again = PackedLinear.from_layout(96, 32, layout, bias_dtype=torch.float16)
    again.load_state_dict(tensors)
    assert torch.equal(again(x), layer(x))
    assert again.nbytes == layer.nbytes
