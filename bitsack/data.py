"""Calibration and evaluation token streams: WikiText-2, C4, or any text file.

Data files are located by ``find_data_file``, in order: an explicit path, ``$BITSACK_DATA``,
``../shared/data`` next to the repository (of this source file, then of the working
directory), then the Hugging Face hub (best effort, skipped when offline).

Protocols (GPTQ, Frantar et al. 2022, and the files described in ``../shared/data/README.md``):

- evaluation, ``wikitext2``: the 4,358 rows of the raw test split joined by ``"\\n\\n"``,
  tokenized once; ``c4``: documents 0–1099 of ``c4_validation_2k.parquet`` joined by ``" "``.
- calibration, ``wikitext2``: random windows of the *validation* split
  (``wiki.valid.tokens``) — GPTQ samples the train split, which is not available here;
  ``c4``: random windows of random documents among 1100–1999 (never the evaluation part);
  a text file: random windows of the whole file.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bitsack.errors import DataError, ValidationError

WIKITEXT2_TEST_ROWS = "wikitext2_raw_test_rows.json"
WIKITEXT2_VALID = "wiki.valid.tokens"
C4_FILE = "c4_validation_2k.parquet"
C4_EVAL_DOCS = range(0, 1100)
C4_CALIB_DOCS = range(1100, 2000)
#: Calibration documents split in two pools: quantizer calibration (GPTQ Hessians, profiling
#: gradients: ``calibration_tokens``) and measurement (the search's screen / select / held-out
#: splits: ``calibration_splits``), so no measured token was seen by the quantizer. A text
#: source is split the same way: its first half calibrates, its second half measures.
C4_QUANT_DOCS = range(1100, 1550)
C4_MEASURE_DOCS = range(1550, 2000)
NAMED_SPECS = ("wikitext2", "c4")

_REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- locating files ----------------------------------------------------------------------
def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached, or None when it can (one short TCP connect)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "skipped: HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as exc:
        return f"skipped: {host} unreachable ({exc.__class__.__name__}: {exc})"


def _hub_cache_dir() -> Path:
    env = os.environ.get("BITSACK_DATA")
    return Path(env) if env else Path.home() / ".cache" / "bitsack" / "data"


def _write_atomic(path: Path, write: Callable[[str], None]) -> Path:
    from bitsack.io import atomic_write_path

    atomic_write_path(path, write)
    return path


def _fetch_wikitext_rows(dest: Path) -> Path:
    import pyarrow.parquet as pq
    from huggingface_hub import hf_hub_download

    src = hf_hub_download("Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet",
                          repo_type="dataset")
    rows = pq.read_table(src, columns=["text"]).column("text").to_pylist()

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(rows), encoding="utf-8")

    return _write_atomic(dest, write)


def _fetch_wikitext_valid(dest: Path) -> Path:
    import pyarrow.parquet as pq
    from huggingface_hub import hf_hub_download

    # The word-level (v1, <unk>) validation split, rows concatenated as in wiki.valid.tokens.
    src = hf_hub_download("Salesforce/wikitext", "wikitext-2-v1/validation-00000-of-00001.parquet",
                          repo_type="dataset")
    rows = pq.read_table(src, columns=["text"]).column("text").to_pylist()
    return _write_atomic(dest, lambda tmp: Path(tmp).write_text("".join(rows), encoding="utf-8"))


def _fetch_c4(dest: Path) -> Path:
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import hf_hub_download

    # The first 2,000 documents of the first validation shard. The local file's shard and
    # order are not verified either, so C4 figures compare among bitsack runs only.
    src = hf_hub_download("allenai/c4", "en/c4-validation.00000-of-00008.json.gz",
                          repo_type="dataset")
    texts: list[str] = []
    with gzip.open(src, "rt", encoding="utf-8") as fh:
        for line in fh:
            texts.append(json.loads(line)["text"])
            if len(texts) == 2000:
                break
    table = pa.table({"text": texts})
    return _write_atomic(dest, lambda tmp: pq.write_table(table, tmp))


_HUB_FETCHERS: dict[str, Callable[[Path], Path]] = {
    WIKITEXT2_TEST_ROWS: _fetch_wikitext_rows,
    WIKITEXT2_VALID: _fetch_wikitext_valid,
    C4_FILE: _fetch_c4,
}


def data_search_dirs() -> list[tuple[str, Path]]:
    """The local directories searched, in order, with a label saying why each is searched."""
    dirs: list[tuple[str, Path]] = []
    env = os.environ.get("BITSACK_DATA")
    if env:
        dirs.append(("$BITSACK_DATA", Path(env).expanduser()))
    dirs.append(("../shared/data next to the bitsack repository",
                 _REPO_ROOT.parent / "shared" / "data"))
    dirs.append(("../shared/data next to the working directory",
                 Path.cwd().parent / "shared" / "data"))
    return dirs


def find_data_file(name: str, path: str | os.PathLike | None = None) -> Path:
    """Locate a data file by name.

    Args:
        name: a file name such as ``wikitext2_raw_test_rows.json``, or a path to a file.
        path: an explicit file, or a directory to look in first.

    Returns:
        The path of an existing file.

    Raises:
        DataError: not found; the message lists every place that was searched.
    """
    tried: list[str] = []
    if path is not None:
        p = Path(path).expanduser()
        candidate = p / name if p.is_dir() else p
        if candidate.is_file():
            return candidate
        tried.append(f"explicit path: {candidate}")
    direct = Path(name).expanduser()
    if direct.is_file():
        return direct
    if direct.is_absolute() or len(direct.parts) > 1:
        tried.append(f"as a path: {direct}")
    else:
        if not os.environ.get("BITSACK_DATA"):
            tried.append("$BITSACK_DATA: not set")
        for label, d in data_search_dirs():
            candidate = d / name
            if candidate.is_file():
                return candidate
            tried.append(f"{label}: {candidate}")
        fetch = _HUB_FETCHERS.get(name)
        if fetch is None:
            tried.append("hub: no hub source for this file")
        else:
            reason = hub_unreachable_reason()
            if reason is None:
                try:
                    return fetch(_hub_cache_dir() / name)
                except Exception as exc:  # best effort: any hub failure becomes one line
                    reason = f"failed ({exc.__class__.__name__}: {exc})"
            tried.append(f"hub: {reason}")
    raise DataError(f"data file {name!r} not found; looked in:\n  " + "\n  ".join(tried))


# ---- tokenizing --------------------------------------------------------------------------
def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's defaults (as GPTQ's ``tokenizer(text)``)."""
    enc = tokenizer(text)
    ids = enc["input_ids"]
    return list(ids)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"data file {str(path)!r} cannot be read as UTF-8 text: {exc}") from exc


def _wikitext_test_rows(path: Path) -> list[str]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a JSON list of strings ({exc})") from exc
    if not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
        raise DataError(f"{path}: not a JSON list of strings")
    return rows


def c4_documents(indices: Sequence[int] | range, path: Path | None = None) -> list[str]:
    """Documents ``indices`` of ``c4_validation_2k.parquet`` (column ``text``)."""
    import pyarrow.parquet as pq

    path = path or find_data_file(C4_FILE)
    try:
        column = pq.read_table(path, columns=["text"]).column("text")
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{path}: cannot read column 'text' of the parquet file ({exc})") from exc
    stop = max(indices) + 1 if len(indices) else 0
    if column.length() < stop:
        raise DataError(f"{path}: has {column.length()} documents; bitsack needs at least {stop} "
                        "(0-1099 for evaluation, 1100-1999 for calibration)")
    texts = column.to_pylist()
    return [texts[i] for i in indices]


def _text_for(spec: str) -> tuple[str, Path]:
    """The whole text of a file spec: a path or a data-file name."""
    try:
        path = find_data_file(spec)
    except DataError as exc:
        raise DataError(f"data: {spec!r} is neither one of {', '.join(NAMED_SPECS)} nor a "
                        f"readable text file. {exc}") from exc
    return _read_text(path), path


def eval_tokens(spec: str, tokenizer):
    """The evaluation token stream ``LongTensor[1, T]`` of ``spec``.

    Args:
        spec: ``wikitext2`` (raw test rows joined by ``"\\n\\n"``), ``c4`` (documents 0–1099
            joined by ``" "``), or a text file (path or data-file name).
        tokenizer: called once on the whole text.
    """
    import torch

    if spec == "wikitext2":
        text = "\n\n".join(_wikitext_test_rows(find_data_file(WIKITEXT2_TEST_ROWS)))
    elif spec == "c4":
        text = " ".join(c4_documents(C4_EVAL_DOCS))
    else:
        text, _ = _text_for(spec)
    ids = _encode(tokenizer, text)
    if not ids:
        raise DataError(f"data: {spec!r} tokenizes to no tokens")
    return torch.tensor([ids], dtype=torch.long)


def calibration_tokens(spec: str, tokenizer, nsamples: int, seqlen: int, seed: int = 0):
    """``nsamples`` random windows of ``seqlen`` tokens: ``LongTensor[nsamples, seqlen]``.

    Args:
        spec: ``wikitext2`` (validation split: the train split is not available here), ``c4``
            (documents 1100–1549 only; each sample a random window of a random document
            longer than ``seqlen``, as GPTQ does), or a text file (path or data-file name);
            only the quantizer pool of each source is read (``C4_QUANT_DOCS``; a text's
            first half), so measurement splits (``calibration_splits``) never overlap it.
        tokenizer: a transformers tokenizer (or anything called as ``tok(text)["input_ids"]``).
        nsamples: number of sequences.
        seqlen: tokens per sequence.
        seed: the windows depend on this seed only.

    Raises:
        ValidationError: ``nsamples`` or ``seqlen`` is not a positive integer.
        DataError: data missing, or too short for ``seqlen``.
    """
    import numpy as np
    import torch

    for field_name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValidationError(field_name, f"{value!r} must be a positive integer")
    rng = np.random.default_rng(seed)
    if spec == "c4":
        docs = [_encode(tokenizer, d) for d in c4_documents(C4_QUANT_DOCS)]
        eligible = [d for d in docs if len(d) > seqlen]
        if not eligible:
            longest = max(len(d) for d in docs)
            raise ValidationError("seqlen", f"{seqlen} is too long for C4 calibration documents"
                                  f" (the longest has {longest} tokens); use at most "
                                  f"{longest - 1}")
        rows = []
        for _ in range(nsamples):
            doc = eligible[int(rng.integers(len(eligible)))]
            start = int(rng.integers(0, len(doc) - seqlen + 1))
            rows.append(doc[start:start + seqlen])
        return torch.tensor(rows, dtype=torch.long)
    if spec == "wikitext2":
        text = _read_text(find_data_file(WIKITEXT2_VALID))
    else:
        text, _ = _text_for(spec)
    ids = torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    ids = ids[:max(seqlen, ids.numel() // 2)]  # the quantizer pool: the first half
    if ids.numel() < seqlen:
        raise ValidationError("seqlen", f"{seqlen} is longer than {spec!r} ({ids.numel()} "
                              f"tokens); use at most {ids.numel()}")
    starts = rng.integers(0, ids.numel() - seqlen + 1, size=nsamples)
    return torch.stack([ids[int(s):int(s) + seqlen] for s in starts])


def calibration_splits(spec: str, tokenizer, sizes: Mapping[str, tuple[int, int]],
                       seed: int = 0) -> dict[str, Any]:
    """Disjoint calibration splits: name -> ``LongTensor[nsamples, seqlen]`` per
    ``sizes[name] = (nsamples, seqlen)``.

    No token of one split appears in another, nor in the quantizer pool
    (``calibration_tokens``): the measurement pool is partitioned first — C4 documents
    1550–1999 shuffled by ``seed`` and dealt out in proportion to each split's tokens; the
    second half of a text (``wikitext2``'s validation split or a file) cut into contiguous
    regions in the same proportions — and each split's windows are drawn from its own part
    only (random windows, as ``calibration_tokens``). Evaluation data (WikiText-2 test, C4
    documents 0–1099) is never touched.

    Raises:
        ValidationError: a size that is not two positive integers.
        DataError: data missing, or a part too short for its windows.
    """
    import numpy as np
    import torch

    names = list(sizes)
    for name in names:
        n, L = sizes[name]
        for what, value in (("nsamples", n), ("seqlen", L)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValidationError(f"splits.{name}.{what}", f"{value!r} must be a positive "
                                      "integer")
    demand = np.array([sizes[n][0] * sizes[n][1] for n in names], dtype=np.float64)
    share = demand / demand.sum()
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    if spec == "c4":
        docs = [_encode(tokenizer, d) for d in c4_documents(C4_MEASURE_DOCS)]
        order = rng.permutation(len(docs))
        total = sum(len(d) for d in docs)
        bounds = np.concatenate([[0.0], np.cumsum(share)]) * total
        parts: list[list[list[int]]] = [[] for _ in names]
        seen = 0
        for i in order:
            k = min(int(np.searchsorted(bounds, seen, side="right")) - 1, len(names) - 1)
            parts[k].append(docs[i])
            seen += len(docs[i])
        for k, name in enumerate(names):
            n, L = sizes[name]
            eligible = [d for d in parts[k] if len(d) > L]
            if not eligible:
                raise DataError(f"c4: the {len(parts[k])} calibration documents of split "
                                f"{name!r} hold no window of {L} tokens; ask for shorter or "
                                "fewer sequences")
            rows = []
            for _ in range(n):
                doc = eligible[int(rng.integers(len(eligible)))]
                start = int(rng.integers(0, len(doc) - L + 1))
                rows.append(doc[start:start + L])
            out[name] = torch.tensor(rows, dtype=torch.long)
        return out
    text = _read_text(find_data_file(WIKITEXT2_VALID)) if spec == "wikitext2" else \
        _text_for(spec)[0]
    ids = torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    ids = ids[ids.numel() // 2:]  # the measurement pool: the second half
    edges = (np.concatenate([[0.0], np.cumsum(share)]) * ids.numel()).astype(int)
    for k, name in enumerate(names):
        n, L = sizes[name]
        lo, hi = int(edges[k]), int(edges[k + 1])
        if hi - lo < L:
            raise DataError(f"{spec}: split {name!r} gets {hi - lo} tokens, fewer than one "
                            f"window of {L}; use a longer text or shorter sequences")
        starts = rng.integers(lo, hi - L + 1, size=n)
        out[name] = torch.stack([ids[int(s):int(s) + L] for s in starts])
    return out


def describe_spec(spec: str) -> dict:
    """Where ``spec``'s evaluation data comes from (for reports): name and file path."""
    if spec == "wikitext2":
        return {"data": spec, "file": str(find_data_file(WIKITEXT2_TEST_ROWS)),
                "protocol": 'raw test rows joined by "\\n\\n", tokenized once'}
    if spec == "c4":
        return {"data": spec, "file": str(find_data_file(C4_FILE)),
                "protocol": 'documents 0-1099 joined by " ", tokenized once'}
    return {"data": spec, "file": str(find_data_file(spec)),
            "protocol": "whole file, tokenized once"}


__all__ = [
    "NAMED_SPECS",
    "C4_EVAL_DOCS",
    "C4_CALIB_DOCS",
    "C4_QUANT_DOCS",
    "C4_MEASURE_DOCS",
    "find_data_file",
    "data_search_dirs",
    "hub_unreachable_reason",
    "eval_tokens",
    "calibration_tokens",
    "calibration_splits",
    "c4_documents",
    "describe_spec",
]
