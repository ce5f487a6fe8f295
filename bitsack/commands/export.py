"""``bitsack export``: write a compressed model folder as compressed-tensors or GGUF."""

from __future__ import annotations

import argparse
import json

FORMATS = ("compressed-tensors", "gguf")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a compressed model to compressed-tensors (vLLM) or GGUF "
        "(llama.cpp)",
        description="Write the compressed model folder DIR in another engine's format, "
        "without re-quantizing: compressed-tensors pack-quantized (vLLM, transformers; "
        "pruned models as DeciLM / Nemotron-NAS with their model code, "
        "trust_remote_code) or GGUF (llama.cpp; arch llama, or deci for pruned models). "
        "Engines store one type per tensor, so every matrix must have one bit-width and "
        "group size; what a format cannot store is refused with the module and the reason.")
    p.add_argument("dir", metavar="DIR", help="a compressed model folder (bitsack compress / "
                   "bitsack run)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="compressed-tensors (pruned models: DeciLM layout) or gguf")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier "
                   "export of the same format (replaced atomically); anything else is refused")
    p.add_argument("--force", action="store_true", help="replace --out even when it is a "
                   "non-empty folder that is not an export (its contents are deleted)")
    p.add_argument("--tokenizer-gguf", default=None, metavar="FILE",
                   help="gguf only: the GGUF to copy tokenizer metadata from (default: the "
                   "GGUF the model was compressed from, e.g. the embedded SmolLM2)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: files, bytes, per-tensor types, notes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bitsack.errors import ValidationError
    from bitsack.export import export_model

    if args.tokenizer_gguf is not None and args.format != "gguf":
        raise ValidationError("--tokenizer-gguf", f"given with --format {args.format}; valid: "
                              "only with --format gguf")
    opts = {"tokenizer_gguf": args.tokenizer_gguf} if args.format == "gguf" else {}
    result = export_model(args.dir, args.out, args.format, force=args.force, **opts)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(f"{args.format} export of {args.dir} written to {result.out}")
    for name, size in result.files.items():
        print(f"  {name}: {size} bytes")
    packed = result.source_packed_bytes
    print(f"total {result.total_bytes} bytes"
          + (f" (bitsack packed weights: {packed} bytes)" if packed else ""))
    print(f"layout: {result.layout.get('kind')}, arch {result.layout.get('architecture')}; "
          "tensor types: " + ", ".join(f"{k} x{v}" for k, v in result.type_counts().items()))
    for note in result.notes:
        print(f"note: {note}")
    return 0
