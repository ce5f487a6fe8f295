"""The Python API for notebooks: ``bitsack.compress`` and ``bitsack.load``.

    import bitsack

    result = bitsack.compress("default", avg_bits=3.5, out="smollm2-3.5")  # or a loaded model
    result.model           # the compressed transformers model (packed layers)
    result.plan            # unit id -> option id
    result.summary         # perplexity before/after, bytes, the search record or certificate
    model = bitsack.load("smollm2-3.5/model")

``compress`` is ``bitsack run`` (``bitsack.pipeline.run``) with keyword settings: the same
stages, records and resumption, in a run directory (``out``; a new temporary one when not
given).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Compressed:
    """What ``bitsack.compress`` returns.

    Attributes:
        model: the compressed model (a transformers causal LM with packed layers).
        tokenizer: its tokenizer.
        plan: unit id -> option id (``prune``, ``b3g64``, …).
        summary: the run's ``RunSummary`` (perplexity, bytes, search record or certificate).
        out: the run directory (``out/model`` is the compressed folder).
    """

    model: Any
    tokenizer: Any
    plan: dict[str, str]
    summary: Any
    out: str


def fingerprint(model) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes, dtypes, bytes): what an
    in-memory model's run records are keyed by."""
    import torch

    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def compress(model: Any = "default", *, avg_bits: float | None = None,
             budgets: dict[str, float | None] | None = None, method: str = "search",
             out: str | os.PathLike | None = None, tokenizer: Any = None,
             progress: bool = False, force: bool = False, **settings: Any) -> Compressed:
    """Compress ``model`` under a budget (see ``bitsack.pipeline.RunConfig`` for ``settings``).

    Args:
        model: a model spec (``"default"``, a checkpoint folder, a ``.gguf`` file, a hub id)
            or an already loaded transformers causal LM (then ``tokenizer`` is needed for
            calibration and evaluation text; the model object is compressed in place).
        avg_bits: bits per original weight, overhead included.
        budgets: other resource limits, e.g. ``{"prefill_latency_us": 900}``.
        method: ``search`` (measured, default), ``oneshot``, ``uniform`` or ``sequential``.
        out: run directory (created; an earlier run's finished stages are reused).
        tokenizer: the tokenizer of an in-memory ``model``.
        progress: print progress lines to stderr.
        force: write into a non-empty ``out`` that is not a run directory.
        **settings: any other ``RunConfig`` field (``menu``, ``eval_windows``, …).

    Raises:
        bitsack.errors.ValidationError: a bad setting (named), an in-memory model without a
            tokenizer.
    """
    import sys

    from bitsack.config import RunConfig
    from bitsack.errors import ValidationError
    from bitsack.models.base import LoadedModel
    from bitsack.pipeline import run

    loaded = None
    spec = model
    if not isinstance(model, (str, os.PathLike)):
        if tokenizer is None:
            raise ValidationError("tokenizer", "None; an in-memory model needs its tokenizer "
                                  "(calibration and evaluation text are tokenized with it)")
        loaded = LoadedModel(model=model, tokenizer=tokenizer,
                             source={"kind": "object", "spec": type(model).__name__,
                                     "sha256": fingerprint(model)})
        spec = f"<{type(model).__name__}>"
    out = str(out) if out is not None else tempfile.mkdtemp(prefix="bitsack-run-")
    cfg = RunConfig(model=str(spec), out=out, avg_bits=avg_bits, budgets=dict(budgets or {}),
                    method=method, **settings)
    say = (lambda msg: print(f"bitsack: {msg}", file=sys.stderr, flush=True)) if progress \
        else None
    summary = run(cfg, progress=say, force=force, loaded=loaded)
    from bitsack.models.checkpoint import load_compressed

    lm = load_compressed(os.path.join(out, "model"))
    plan = dict(lm.model.bitsack_plan)
    return Compressed(model=lm.model, tokenizer=lm.tokenizer or tokenizer, plan=plan,
                      summary=summary, out=out)


def load(path: str | os.PathLike, device: str = "cpu", **kwargs: Any):
    """A compressed folder's model (``bitsack.checkpoint.load_compressed``; hashes checked).

    Returns the transformers model with packed layers; ``load(path).bitsack_plan`` is its
    plan. ``kwargs``: ``dtype``, ``backend``, ``attn_implementation``.
    """
    from bitsack.models.checkpoint import load_compressed

    return load_compressed(path, device=device, **kwargs).model
