"""``bitsack eval``: perplexity of a model (or compressed model dir) on WikiText-2, C4 or a file."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from bitsack.commands._args import DTYPES, NONNEG_INT, POSITIVE_INT, SEQLEN, integer
from bitsack.errors import ExitCode


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="perplexity under the GPTQ protocol",
        description="Perplexity under the GPTQ protocol: the evaluation text tokenized once, "
        "non-overlapping windows of --seqlen tokens, ppl = exp(mean window NLL).")
    p.add_argument("--model", required=True,
                   help="'default' (SmolLM2-135M GGUF), a .gguf file, a checkpoint or "
                   "compressed-model directory, or a hub id")
    p.add_argument("--data", default="wikitext2",
                   help="wikitext2 | c4 | a text file (default: wikitext2)")
    p.add_argument("--seqlen", type=SEQLEN, default=2048,
                   help=f"tokens per window (default 2048; {SEQLEN.valid})")
    p.add_argument("--windows", type=POSITIVE_INT, default=None,
                   help="evaluate only the first K windows (default: all)")
    p.add_argument("--batch-size", type=integer(1, 4096), default=1,
                   help="windows per forward pass (default 1)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="model dtype (default: the checkpoint's; float32 for GGUF)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--verify", action="store_true",
                   help="check a sample of packed layers against the float64 reference within "
                   "their computed error bounds while evaluating (exit 4 if a bound is broken)")
    p.add_argument("--verify-sample", type=NONNEG_INT, default=8, metavar="K",
                   help="packed layers checked by --verify (default 8; 0 = all)")
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run)


#: Exit status when --verify finds an output outside its computed bound.
EXIT_BOUND_BROKEN = ExitCode.VERIFY_FAILED


def run(args: argparse.Namespace) -> int:
    from bitsack.data import describe_spec, eval_tokens
    from bitsack.errors import ValidationError
    from bitsack.evaluate import perplexity
    from bitsack.models.loading import load_model
    from bitsack.progress import Progress, progress_mode

    data_info = describe_spec(args.data)  # fail on missing data before loading the model
    mode = progress_mode(quiet=args.json or args.quiet)
    with Progress("bitsack eval", unit="windows", mode=mode) as prog:
        prog.stage("loading the model")
        lm = load_model(args.model, dtype=args.dtype, device=args.device,
                        progress=mode == "bar")
        prog.stage("tokenizing")
        tokens = eval_tokens(args.data, lm.tokenizer)
        verify = None
        if args.verify:
            from bitsack.verify import Verifier

            verify = Verifier(lm.model, sample=args.verify_sample or None)
            if not verify.modules:
                raise ValidationError("--verify", f"model {args.model!r} has no packed "
                                      "layers; valid: a compressed-model directory "
                                      "(bitsack compress)")
        else:
            from bitsack.apply import cache_dequantized

            cache_dequantized(lm.model)  # CPU speed: dequantize each packed layer once
        prog.stage("perplexity")
        with verify if verify is not None else contextlib.nullcontext():
            result = perplexity(lm.model, tokens, args.seqlen, windows=args.windows,
                                batch_size=args.batch_size, progress=prog)
    report = None if verify is None else verify.report
    if args.json:
        print(json.dumps({"model": lm.source, "data": {**data_info, "tokens": tokens.shape[1]},
                          "result": result.to_dict(),
                          "verify": None if report is None else report.to_dict()}, indent=2))
    else:
        print(f"{args.data} perplexity {result.ppl:.4f} (nll {result.nll_mean:.5f} nats/token, "
              f"{result.windows} x {result.seqlen} tokens)")
        print(f"protocol: {result.protocol}; data: {data_info['file']} "
              f"({data_info['protocol']}, {tokens.shape[1]} tokens)")
        if report is not None:
            print(f"verify: {report.checked_outputs} outputs of {len(report.per_module)} packed "
                  f"layers, largest |error| / bound {report.max_ratio:.3g} "
                  f"({report.worst_module}): {'ok' if report.ok else 'BOUND BROKEN'}")
    if report is not None and not report.ok:
        print(f"bitsack eval: --verify: {report.worst_module} exceeded its computed error bound "
              f"by a factor {report.max_ratio:.3g}", file=sys.stderr)
        return EXIT_BOUND_BROKEN
    return 0
