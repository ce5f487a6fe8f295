"""Whole-model GPU figures of a compressed folder: the CuPy kernels on a real model.

Takes a compressed model folder (``bitsack run``'s ``model/``, tokenizer included) and, on one
CUDA device, answers:

1. Is the model the same on the GPU? WikiText-2 perplexity (GPTQ protocol, the first
   ``--windows`` windows of ``--seqlen`` tokens) of the folder run by the ``cpu`` backend on the
   CPU (fp32, the reference every other bitsack figure uses), by the ``cupy`` kernels on the GPU
   (fp16 and fp32 activations) and by the ``torch`` backend on the GPU (dequantize every matrix
   per call + cuBLAS); the largest logit difference on the first window against the CPU's.
2. What do decode and prefill cost on the GPU? Per-token decode time at batch 1 with the KV
   cache (an 8-token prompt, then ``--decode`` steps; median step, synchronised), and the time
   of one ``--seqlen``-token prefill, for the ``cupy`` kernels, the ``torch`` backend, and the
   same shapes run as dense fp16 matrices (every packed matrix dequantized once and cached:
   the speed of a dense model of the compressed shapes, not of the base model).

Decode of a 135M-parameter model at batch 1 is bound by Python and launch overhead on a large
GPU; the kernels' own throughput is ``bench/kernels_gpu.py``'s.

    python bench/gpu_model.py MODEL_DIR [--windows 16] [--out bench/results/gpu_model.md]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def _load(path: Path, device: str, backend: str, dtype):
    from bitsack.models.checkpoint import load_compressed

    return load_compressed(path, device=device, backend=backend, dtype=dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _decode_ms(model, prompt, steps: int, device: str) -> float:
    """Median milliseconds of one decode step at batch 1 (KV cache)."""
    times = []
    with torch.inference_mode():
        out = model(prompt, use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            out = model(nxt, past_key_values=past, use_cache=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return 1e3 * statistics.median(times[2:] or times)


def _prefill_ms(model, ids, device: str, repeats: int = 3) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return 1e3 * min(times[1:])


def _first_logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids, use_cache=False).logits.float().cpu()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_model.md")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    ap.add_argument("--eval", default="wikitext2", help="evaluation data (bitsack's specs)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU configurations only (a test that the script runs; no GPU figure)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_model: no CUDA device", file=sys.stderr)
        return 1
    from bitsack.data import eval_tokens
    from bitsack.evaluate import perplexity
    from bitsack.models.checkpoint import cache_dequantized

    configs = [("cpu backend, CPU, fp32", "cpu", "cpu", torch.float32),
               ("cupy kernels, GPU, fp16", "cuda", "cupy", torch.float16),
               ("cupy kernels, GPU, fp32", "cuda", "cupy", torch.float32),
               ("torch backend, GPU, fp16", "cuda", "torch", torch.float16),
               ("dense fp16 (dequantized once), GPU", "cuda", "torch", torch.float16)]
    if args.smoke:
        configs = [(label.replace("GPU", "CPU (smoke)").replace("fp16", "fp32"), "cpu", backend,
                    torch.float32)
                   for label, device, backend, _ in configs if backend != "cupy"]
    reference = _load(args.model_dir, *configs[0][1:])  # its tokenizer, and the first row's
    tokenizer = reference.tokenizer
    if tokenizer is None:
        print(f"gpu_model: {args.model_dir} holds no tokenizer", file=sys.stderr)
        return 1
    tokens = eval_tokens(args.eval, tokenizer)
    first = tokens[:, :args.seqlen]
    prompt = tokens[:, :8]
    meta = json.loads((args.model_dir / "bitsack.json").read_text())

    rows, ref_logits = [], None
    for i, (label, device, backend, dtype) in enumerate(configs):
        lm = reference if i == 0 else _load(args.model_dir, device, backend, dtype)
        model = lm.model.eval()
        if label.startswith("dense"):
            cache_dequantized(model)
        t0 = time.perf_counter()
        ppl = perplexity(model, tokens, args.seqlen, windows=args.windows, progress=False)
        eval_s = time.perf_counter() - t0
        logits = _first_logits(model, first.to(device))
        if ref_logits is None:
            ref_logits = logits
        diff = float((logits - ref_logits).abs().max())
        row = {"config": label, "ppl": ppl.ppl, "eval_s": eval_s, "max_logit_diff": diff,
               "logit_scale": float(ref_logits.abs().max())}
        if device == "cuda" or args.smoke and len(rows):
            row["decode_ms"] = _decode_ms(model, prompt.to(device), args.decode, device)
            row["prefill_ms"] = _prefill_ms(model, first.to(device), device)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, lm
        reference = None
        if device == "cuda":
            torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name(0) if not args.smoke else "none (smoke run on the CPU)"
    ref = rows[0]["ppl"]
    L = ["# A compressed model on the GPU: the CuPy kernels against the CPU path", "",
         f"Command: `python bench/gpu_model.py {args.model_dir.name} --windows {args.windows} "
         f"--eval {args.eval} "
         f"--seqlen {args.seqlen} --decode {args.decode}` ({time.strftime('%Y-%m-%d')})", "",
         f"Machine: {gpu}, torch {torch.__version__}, Python {platform.python_version()}, "
         f"{platform.machine()}.", "",
         f"Model: `{args.model_dir.name}` ({meta['model_type']}, {meta['packed_bytes']:,} packed "
         f"bytes, apply {json.dumps(meta.get('apply', {}), sort_keys=True)}).",
         "",
         f"{args.eval}, first {args.windows} windows of {args.seqlen} tokens. Logit difference: "
         f"largest |Δ| on the first window against the CPU's (its largest |logit| "
         f"{rows[0]['logit_scale']:.3g}). Decode: median of {args.decode} single-token steps "
         "at batch 1 after an 8-token prompt, synchronised per step. Prefill: best of 3, one "
         f"window of {args.seqlen} tokens.", "",
         "| configuration | perplexity | ratio to CPU | max logit Δ | eval (s) | decode (ms/token)"
         " | prefill (ms) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['config']} | {r['ppl']:.4f} | {r['ppl'] / ref:.5f} | "
                 f"{r['max_logit_diff']:.3g} | {r['eval_s']:.1f} | "
                 f"{r.get('decode_ms', math.nan):.2f} | {r.get('prefill_ms', math.nan):.1f} |")
    text = "\n".join(L) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "rows": rows},
                                        indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
