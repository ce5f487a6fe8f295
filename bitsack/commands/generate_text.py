"""``bitsack generate-text``: greedy decoding of a few tokens, a smoke test of a model."""

from __future__ import annotations

import argparse
import json

from bitsack.commands._args import DTYPES, integer

#: Tokens one smoke test may generate.
NEW_TOKENS = integer(1, 65536, what="a number of tokens")


def register(subparsers) -> None:
    p = subparsers.add_parser("generate-text", help="greedy-decode a prompt (smoke test)",
                              description="Greedy-decode --max-new-tokens tokens after --prompt.")
    p.add_argument("--model", required=True,
                   help="'default', a .gguf file, a checkpoint or compressed-model dir, a hub id")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=NEW_TOKENS, default=32,
                   help=f"tokens to generate (default 32; {NEW_TOKENS.valid})")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="model dtype (default: the checkpoint's; float32 for GGUF)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def generate_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, list[int]]:
    """The greedy continuation of ``prompt`` (text and token ids), without the prompt."""
    import torch

    from bitsack.errors import ValidationError

    if max_new_tokens < 1:
        raise ValidationError("max_new_tokens", f"{max_new_tokens} must be a positive integer")
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long)
    if ids.shape[1] == 0:
        raise ValidationError("prompt", "is empty after tokenization; give some text")
    device = next(model.parameters()).device
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    with torch.no_grad():
        out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


def run(args: argparse.Namespace) -> int:
    from bitsack.models.loading import load_model
    from bitsack.progress import progress_mode

    lm = load_model(args.model, dtype=args.dtype, device=args.device,
                    progress=progress_mode(quiet=args.json) == "bar")
    text, ids = generate_greedy(lm.model, lm.tokenizer, args.prompt, args.max_new_tokens)
    if args.json:
        print(json.dumps({"model": lm.source, "prompt": args.prompt, "completion": text,
                          "token_ids": ids}, indent=2))
    else:
        print(args.prompt + text)
    return 0
