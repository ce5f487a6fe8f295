"""Build and load the CPU kernels (``kernels/cpu/packed_cpu.cpp``) with the machine's compiler.

The source is plain C++ (no Python or torch headers: it builds in about a second) compiled
with ``-O3 -march=native -fopenmp`` into a shared library loaded with ``ctypes``. The build is
cached per source, compiler, flags and CPU (``$BITSACK_CACHE_DIR/cpu-kernels/<key>/``, default
``~/.cache/bitsack``), written atomically so concurrent processes never load a half-written
file, and done once per process. Where it cannot be built (no compiler, a compile error, an
unloadable library) ``load()`` returns None and says why in ``load_error()``: the ``cpu``
backend then runs its pure-torch path. ``BITSACK_CPU_KERNELS=0`` disables the library;
``CXX`` chooses the compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["SOURCE", "build", "cache_dir", "load", "load_error", "reset"]

SOURCE = Path(__file__).with_name("cpu") / "packed_cpu.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
ABI_VERSION = 3

_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    """Where built libraries are kept: ``$BITSACK_CACHE_DIR`` or ``~/.cache/bitsack``."""
    root = os.environ.get("BITSACK_CACHE_DIR") or Path.home() / ".cache" / "bitsack"
    return Path(root) / "cpu-kernels"


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if Path(cxx).is_file() else None)
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` depends on them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(cxx: str) -> str:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = "?"
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), " ".join(FLAGS).encode(),
                 _cpu_flags().encode(), platform.machine().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def build() -> Path:
    """Compile (or find in the cache) the library; return its path.

    Raises:
        RuntimeError: no compiler, or the compiler failed (its message included).
    """
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    out_dir = cache_dir() / _key(cxx)
    lib = out_dir / "bitsack_cpu.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)  # atomic: another process sees the old state or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i, p, lg = ctypes.c_int, ctypes.c_void_p, ctypes.c_long
    lib.bs_cpu_abi_version.restype = i
    lib.bs_cpu_abi_version.argtypes = []
    lib.bs_gemv.restype = i
    lib.bs_gemv.argtypes = [i, p, p, p, p, i, p, i, i, i, p, i, lg, p, lg, i, i, i]
    lib.bs_dequant.restype = i
    lib.bs_dequant.argtypes = [i, p, p, p, p, i, p, i, i, i, i, i, p, lg, i]
    lib.bs_gemv_fp16.restype = i
    lib.bs_gemv_fp16.argtypes = [p, i, i, p, i, lg, p, lg, i, i, i]
    if lib.bs_cpu_abi_version() != ABI_VERSION:
        raise RuntimeError(f"library ABI {lib.bs_cpu_abi_version()}; valid: {ABI_VERSION}")
    return lib


def load() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None where it cannot be built or loaded."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        lib = None
        if os.environ.get("BITSACK_CPU_KERNELS", "1") == "0":
            _state["error"] = "disabled by BITSACK_CPU_KERNELS=0"
        else:
            try:
                lib = _bind(ctypes.CDLL(str(build())))
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state["error"] = str(exc)
        _state["lib"] = lib
        return lib


def load_error() -> str | None:
    """Why ``load()`` returned None (None if it loaded or was not tried yet)."""
    return _state.get("error")  # type: ignore[return-value]


def reset() -> None:
    """Forget the loaded library (the next ``load()`` tries again; for tests)."""
    with _lock:
        _state.clear()
