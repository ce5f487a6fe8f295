"""Perplexity under the GPTQ protocol (Frantar et al. 2022, ``datautils``/``llama_eval``).

The token stream is cut into non-overlapping windows of ``seqlen`` tokens (a tail shorter
than a window is dropped); each window is evaluated on its own, with no context carried over.
Window ``w`` has mean next-token loss ``ℓ_w`` over its ``seqlen − 1`` predictions; GPTQ sums
``ℓ_w · seqlen`` and divides by ``windows · seqlen``, i.e.

    nll_mean = (1 / W) Σ_w ℓ_w,        ppl = exp(nll_mean).

Per-token losses come from float32 log-softmax; every sum is accumulated in float64.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bitsack.errors import NumericalError, ValidationError

if TYPE_CHECKING:
    from bitsack.progress import ProgressFn


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity and exactly how it was measured.

    Attributes:
        ppl: ``exp(nll_mean)``.
        nll_mean: mean over windows of each window's mean next-token loss (nats/token).
        tokens_evaluated: tokens fed to the model (``windows · seqlen``).
        predictions: next-token predictions scored (``windows · (seqlen − 1)``).
        windows: windows evaluated.
        windows_available: windows in the whole stream.
        seqlen: tokens per window.
        protocol: one line stating the protocol.
    """

    ppl: float
    nll_mean: float
    tokens_evaluated: int
    predictions: int
    windows: int
    windows_available: int
    seqlen: int
    protocol: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def window_losses(model, tokens, seqlen: int, *, windows: int | None = None,
                  batch_size: int = 1, progress: bool | ProgressFn = True):
    """Mean next-token loss of each window (float64 tensor ``[W]``); see the module docstring.

    ``progress``: a bar on a terminal when true, or a ``(stage, done, total)`` callback
    (``bitsack.progress.Progress``) told after every batch."""
    import torch
    import torch.nn.functional as F

    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValidationError("tokens", f"shape {tuple(tokens.shape)} must be [1, T]")
    for name, value in (("seqlen", seqlen), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValidationError(name, f"{value!r} must be a positive integer")
    if seqlen < 2:
        raise ValidationError("seqlen", f"{seqlen} must be at least 2 (one prediction)")
    available = tokens.shape[1] // seqlen
    if available == 0:
        raise ValidationError("seqlen", f"{seqlen} is longer than the {tokens.shape[1]} tokens "
                              "of the data")
    if windows is None:
        windows = available
    if not isinstance(windows, int) or isinstance(windows, bool) or not 1 <= windows <= available:
        raise ValidationError("windows", f"{windows!r} must be an integer in 1..{available} "
                              f"({tokens.shape[1]} tokens / seqlen {seqlen})")
    device = next(model.parameters()).device
    chunks = tokens[0, : windows * seqlen].view(windows, seqlen)
    losses = torch.empty(windows, dtype=torch.float64)
    bar = None
    tick = progress if callable(progress) else None
    if tick is not None:
        tick("windows", 0, windows)
    elif progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=windows, desc="perplexity", unit="win")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, windows, batch_size):
                batch = chunks[start:start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                      batch[:, 1:].reshape(-1), reduction="none")
                per_window = nll.double().view(batch.shape[0], seqlen - 1).mean(dim=1)
                losses[start:start + batch.shape[0]] = per_window.cpu()
                if bar is not None:
                    bar.update(batch.shape[0])
                if tick is not None:
                    tick("windows", start + batch.shape[0], windows)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if not torch.isfinite(losses).all():
        bad = int((~torch.isfinite(losses)).nonzero()[0])
        raise NumericalError(f"perplexity: window {bad} has a non-finite loss ({losses[bad]})")
    return losses, available


def perplexity(model, tokens, seqlen: int, *, windows: int | None = None, batch_size: int = 1,
               progress: bool | ProgressFn = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``tokens`` (``LongTensor[1, T]``), GPTQ protocol.

    Args:
        model: a causal LM returning ``.logits``.
        tokens: the whole tokenized evaluation text.
        seqlen: tokens per window.
        windows: evaluate only the first ``windows`` windows (default: all).
        batch_size: windows per forward pass.
        progress: progress bar on a terminal, or a ``(stage, done, total)`` callback.

    Raises:
        ValidationError: bad ``seqlen`` / ``windows`` / ``batch_size`` / token shape.
        NumericalError: a window's loss is not finite.
    """
    losses, available = window_losses(model, tokens, seqlen, windows=windows,
                                      batch_size=batch_size, progress=progress)
    w = losses.numel()
    nll_mean = float(losses.sum().item()) / w
    protocol = (f"GPTQ: non-overlapping windows of {seqlen} tokens, first {w} of {available}, "
                f"mean next-token NLL over the {seqlen - 1} predictions of each window, "
                "ppl = exp(mean over windows)")
    return PerplexityResult(ppl=math.exp(nll_mean), nll_mean=nll_mean,
                            tokens_evaluated=w * seqlen, predictions=w * (seqlen - 1),
                            windows=w, windows_available=available, seqlen=seqlen,
                            protocol=protocol)
