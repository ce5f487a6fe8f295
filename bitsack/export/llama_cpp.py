"""llama.cpp as a test and benchmark engine: build llama-cpp-python once, run a GGUF on tokens.

PyPI ships llama-cpp-python only as a source distribution (its prebuilt wheels live on the
maintainer's own index), so ``ensure_llama_cpp`` downloads the sdist with pip, builds a wheel
(a C/C++ compiler and CMake ≥ 3.21 are needed; 26 minutes here on two busy cores) and unpacks it
into a cache folder, which later calls reuse. Nothing is installed into the running
environment: ``gguf_perplexity`` runs llama.cpp in a child process whose ``PYTHONPATH`` points
at the cache, so a crash inside llama.cpp cannot take the caller down.

Perplexity follows bitsack's protocol (``bitsack.evaluate.perplexity``): non-overlapping windows
of ``seqlen`` tokens, every window scored from its first token (no BOS added), the NLL of
tokens 1..seqlen−1 of each window from the logits of the previous position, ppl =
exp(mean NLL) over all scored tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bitsack.errors import BitsackError

#: The llama-cpp-python release the tests were written against (vendored llama.cpp with the
#: ``deci`` architecture and per-layer head / FFN arrays).
LLAMA_CPP_PYTHON_SPEC = "llama-cpp-python==0.3.36"


class LlamaCppError(BitsackError):
    """llama-cpp-python could not be built, or llama.cpp failed on a GGUF file."""


def default_cache_dir() -> Path:
    """``$BITSACK_LLAMA_CPP_CACHE``, else ``.cache/llama-cpp`` in the current folder."""
    return Path(os.environ.get("BITSACK_LLAMA_CPP_CACHE", ".cache/llama-cpp")).resolve()


def ensure_llama_cpp(cache_dir: str | os.PathLike | None = None, *, jobs: int = 2,
                     spec: str = LLAMA_CPP_PYTHON_SPEC) -> Path:
    """A folder from which ``import llama_cpp`` works; built on first use, then reused.

    Args:
        cache_dir: where the build is cached (default ``default_cache_dir()``).
        jobs: parallel compile jobs.
        spec: the pip requirement to build.

    Returns:
        The ``site`` folder to put on ``PYTHONPATH``.

    Raises:
        LlamaCppError: pip could not download or build the package (the log tail is in the
            message).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    site = cache / "site"
    stamp = site / ".bitsack-built"
    if stamp.is_file() and stamp.read_text().strip() == spec:
        return site
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / "wheels"
    wheel = _find_wheel(wheels)
    if wheel is None:
        sdist_dir = cache / "sdist"
        _pip(["download", "--no-binary", ":all:", "--no-deps", spec, "-d", str(sdist_dir)],
             cache / "download.log")
        sdists = sorted(sdist_dir.glob("*.tar.gz"))
        if not sdists:
            raise LlamaCppError(f"{sdist_dir}: pip download left no source distribution")
        env = {"CMAKE_BUILD_PARALLEL_LEVEL": str(jobs),
               # the library only: no tests, examples or tools
               "CMAKE_ARGS": "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                             "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF "
                             "-DLLAVA_BUILD=OFF"}
        _pip(["wheel", "--no-deps", str(sdists[-1]), "-w", str(wheels)],
             cache / "build.log", env=env)
        wheel = _find_wheel(wheels)
        if wheel is None:
            raise LlamaCppError(f"{wheels}: the build produced no wheel (see "
                                f"{cache / 'build.log'})")
    tmp = Path(tempfile.mkdtemp(prefix=".site-", dir=cache))
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp)
    # llama_cpp imports diskcache at import time; its other dependencies (numpy, jinja2,
    # typing-extensions) are bitsack's own
    _pip(["install", "--no-deps", "--target", str(tmp), "diskcache>=5.6.1"],
         cache / "diskcache.log")
    for lib in (tmp / "llama_cpp" / "lib").glob("*.so*"):
        lib.chmod(0o755)
    (tmp / ".bitsack-built").write_text(spec + "\n")
    if site.exists():
        shutil.rmtree(site)
    os.replace(tmp, site)
    return site


def _find_wheel(folder: Path) -> Path | None:
    found = sorted(folder.glob("llama_cpp_python-*.whl")) if folder.is_dir() else []
    return found[-1] if found else None


def _pip(args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}, check=False)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise LlamaCppError(f"pip {' '.join(args[:2])} failed (exit {proc.returncode}); "
                            f"log {log}:\n{tail}")


@dataclass(frozen=True)
class LlamaCppPerplexity:
    """Perplexity of a GGUF under llama.cpp (protocol: module docstring).

    Attributes:
        ppl: exp(mean NLL).
        nll_mean: mean next-token NLL, nats.
        window_nll: mean NLL of each window.
        seqlen: tokens per window.
        n_vocab: the model's vocabulary as llama.cpp loaded it.
    """

    ppl: float
    nll_mean: float
    window_nll: tuple[float, ...]
    seqlen: int
    n_vocab: int


_CHILD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama

path, tokens_file, seqlen, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
windows = np.load(tokens_file)
llm = Llama(model_path=path, n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen, n_threads=threads,
            n_threads_batch=threads, logits_all=True, verbose=False, seed=0)
out = []
for w in windows:
    llm.reset()
    llm.eval([int(t) for t in w])
    logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    nll = -logp[np.arange(len(w) - 1), w[1:]]
    out.append(float(nll.mean()))
print(json.dumps({"window_nll": out, "n_vocab": llm.n_vocab()}))
"""


def gguf_perplexity(gguf_file: str | os.PathLike, windows, site: str | os.PathLike, *,
                    threads: int = 2, timeout_s: float = 3600.0) -> LlamaCppPerplexity:
    """Perplexity of the GGUF ``gguf_file`` on token ``windows`` under llama.cpp.

    Args:
        gguf_file: the model.
        windows: integer array ``[n_windows, seqlen]`` (e.g. the first windows of
            ``bitsack.data.eval_tokens``), each scored on its own from its first token.
        site: the folder ``ensure_llama_cpp`` returned.
        threads: llama.cpp threads.
        timeout_s: give up after this long.

    Raises:
        LlamaCppError: llama.cpp could not load the file or failed while running it.
    """
    import math

    import numpy as np

    arr = np.asarray(windows, dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise LlamaCppError(f"windows: shape {arr.shape}; valid: [n_windows, seqlen >= 2]")
    with tempfile.TemporaryDirectory() as td:
        tok = Path(td) / "tokens.npy"
        np.save(tok, arr)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(gguf_file), str(tok),
                               str(arr.shape[1]), str(threads)], capture_output=True,
                              text=True, env=env, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise LlamaCppError(f"llama.cpp failed on {gguf_file} (exit {proc.returncode}):\n"
                            f"{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    nll = tuple(res["window_nll"])
    mean = sum(nll) / len(nll)
    return LlamaCppPerplexity(ppl=math.exp(mean), nll_mean=mean, window_nll=nll,
                              seqlen=int(arr.shape[1]), n_vocab=int(res["n_vocab"]))
