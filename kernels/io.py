"""Tensor files: safetensors written atomically, read back only if they are what was written.

``save_tensors`` writes to a temporary name beside the target and renames it (a failed write
never leaves a half-written file) and returns each tensor's SHA-256. ``load_tensors`` checks,
before trusting anything, that the file is a complete safetensors file (the header's byte
ranges tile the data exactly and the file is not shorter or longer), that every expected
tensor is there with its shape and dtype, and that its bytes hash to the expected SHA-256.

The SHA-256 of a tensor is that of its raw bytes, C order, little-endian: exactly the bytes
safetensors stores for it, so a loader can hash the file's byte range without decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bitsack.errors import FormatError, ValidationError
from bitsack.io import atomic_write_path

__all__ = ["dtype_name", "load_tensors", "save_tensors", "tensor_sha256"]

# safetensors dtype codes <-> torch dtypes.
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (the spelling ``load_tensors`` accepts)."""
    return str(dtype).removeprefix("torch.")


def _as_dtype(value: Any, field: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    dt = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValidationError(field, f"{value!r} is not a dtype; valid: e.g. 'float16', "
                              "'uint32' or a torch.dtype")
    return dt


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 (hex) of the tensor's raw little-endian bytes in C order."""
    return hashlib.sha256(_tensor_bytes(t)).hexdigest()


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write ``tensors`` to a safetensors file atomically.

    Args:
        path: target file.
        tensors: name -> tensor (any device; copied to CPU; tensors sharing memory are
            written as separate copies).
        metadata: stored in the header; non-string values are stored as JSON text.

    Returns:
        name -> SHA-256 hex of each tensor's bytes.
    """
    from safetensors.torch import save_file

    cpu: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValidationError(f"tensors[{name!r}]", f"{type(t).__name__}; valid: a tensor")
        c = t.detach().cpu().contiguous()
        ptr = c.untyped_storage().data_ptr()
        # safetensors refuses tensors that share storage (tied weights, slices): copy them.
        if ptr in seen or c.untyped_storage().nbytes() != c.numel() * c.element_size():
            c = c.clone()
        seen.add(c.untyped_storage().data_ptr())
        cpu[name] = c
    meta = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True)
            for k, v in (metadata or {}).items()}
    hashes = {name: tensor_sha256(t) for name, t in cpu.items()}
    atomic_write_path(path, lambda tmp: save_file(cpu, tmp, metadata=meta))
    return hashes


def _read_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """Parse and check a safetensors header; return (header, data start, file size)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise FormatError(f"{path}: {size} bytes, too short for a safetensors header "
                              "(truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise FormatError(f"{path}: header length {n} exceeds the file's {size} bytes "
                              "(truncated or not a safetensors file)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    start = 8 + n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor {name!r} has no valid data_offsets") from None
        end = max(end, hi)
        if lo > hi:
            raise FormatError(f"{path}: tensor {name!r} has data_offsets {lo} > {hi}")
    if start + end != size:
        raise FormatError(f"{path}: {size} bytes, but the header describes {start + end} "
                          f"({'truncated' if size < start + end else 'trailing bytes'})")
    return header, start, size


def load_tensors(path: str | os.PathLike,
                 expected: Mapping[str, tuple[tuple[int, ...], Any, str]] | None = None,
                 device: str | torch.device = "cpu", strict: bool = True,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file, refusing one that is not what ``expected`` says.

    Args:
        path: the file.
        expected: name -> (shape, dtype, sha256 hex) for every tensor that must be there;
            None checks only the file's integrity.
        device: where the tensors are returned.
        strict: refuse tensors in the file that ``expected`` does not list.

    Returns:
        ``(tensors, metadata)``.

    Raises:
        FormatError: missing or unreadable file, truncation, a missing or extra tensor, a
            wrong shape or dtype, or a hash mismatch (the message names the tensor).
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    header, start, _ = _read_header(path)
    names = {k for k in header if k != "__metadata__"}
    if expected is not None:
        missing = sorted(set(expected) - names)
        if missing:
            raise FormatError(f"{path}: missing tensor(s) {missing}")
        extra = sorted(names - set(expected))
        if strict and extra:
            raise FormatError(f"{path}: unexpected tensor(s) {extra}")
        with open(path, "rb") as fh:
            for name, (shape, dtype, sha) in expected.items():
                info = header[name]
                want_dt = _as_dtype(dtype, f"expected[{name!r}].dtype")
                got_dt = _ST_DTYPES.get(info.get("dtype"))
                if got_dt != want_dt:
                    raise FormatError(f"{path}: tensor {name!r} has dtype {info.get('dtype')}; "
                                      f"expected {dtype_name(want_dt)}")
                if list(info.get("shape", [])) != list(shape):
                    raise FormatError(f"{path}: tensor {name!r} has shape {info.get('shape')}; "
                                      f"expected {list(shape)}")
                lo, hi = info["data_offsets"]
                fh.seek(start + lo)
                digest = hashlib.sha256(fh.read(hi - lo)).hexdigest()
                if digest != sha:
                    raise FormatError(f"{path}: tensor {name!r} has SHA-256 {digest}; "
                                      f"expected {sha} (corrupt or modified file)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device=str(device))
    except SafetensorError as exc:
        raise FormatError(f"{path}: {exc}") from None
    meta = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
    return tensors, meta
