"""Exports of compressed model folders to other engines' formats.

- ``compressed-tensors`` (``export_compressed_tensors``): ``pack-quantized``, read by vLLM and
  transformers; bitsack's packed words relabelled, no re-quantization; pruned models in the
  DeciLM / Nemotron-NAS layout (zero-padded, with its model code; ``bitsack.export.decilm``).
- ``gguf`` (``export_gguf``): llama.cpp; per-tensor ggml types (Q4_1 / Q5_1 / Q8_0 / F16),
  arch ``llama`` for bits-only models and ``deci`` (per-layer head and FFN sizes) for pruned
  ones.

Both read a folder written by ``bitsack.checkpoint.save_compressed``, need every matrix on one
grid (one bit-width and group size), refuse what the format cannot hold with an
``ExportError`` naming the module and the reason, and write their output folder atomically
(``bitsack_export.json`` beside the files says what was written and where it is not bit-exact).
"""

from __future__ import annotations

import os
from typing import Any

from bitsack.export.common import ExportedTensor, ExportError, ExportResult

__all__ = ["FORMATS", "ExportError", "ExportResult", "ExportedTensor", "export_model"]

#: Export formats by name.
FORMATS = ("compressed-tensors", "gguf")


def export_model(source_dir: str | os.PathLike, out: str | os.PathLike, format: str, *,
                 force: bool = False, **options: Any) -> ExportResult:
    """Export the compressed folder ``source_dir`` to ``out`` in ``format``.

    Args:
        source_dir: a bitsack compressed-model folder.
        out: the output folder (new, empty, or an earlier export of ``format``).
        format: one of ``FORMATS``.
        force: replace ``out`` whatever it holds.
        **options: format options (gguf: ``tokenizer_gguf``).

    Raises:
        ValidationError: unknown format or option, or an ``out`` that is not ours.
        ExportError: the model cannot be stored in ``format``.
    """
    from bitsack.errors import ValidationError

    if format == "compressed-tensors":
        from bitsack.export.compressed_tensors import export_compressed_tensors as fn
        allowed: tuple[str, ...] = ()
    elif format == "gguf":
        from bitsack.export.gguf import export_gguf as fn
        allowed = ("tokenizer_gguf",)
    else:
        raise ValidationError("format", f"{format!r}; valid: {', '.join(FORMATS)}")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValidationError(unknown[0], f"is not an option of the {format} export; valid: "
                              f"{', '.join(allowed) or 'none'}")
    return fn(source_dir, out, force=force, **options)
