"""Whole-model CPU figures of a compressed model: bytes (plan vs disk vs RAM) and time.

Takes a finished ``bitsack run`` / ``bitsack demo`` directory and answers two questions of
issue #4 on the CPU path:

1. Does the packed model take the bytes the plan said? The plan's ``memory_bytes`` (the
   solver's certificate) must equal the packed bytes of the planned units, both as recorded in
   ``bitsack.json`` and as counted from the loaded modules' buffers; the file on disk adds only
   the unplanned tensors (norms, biases) and the safetensors header.
2. What do prefill and decode cost, dense vs packed? The dense model as loaded (fp32), the
   packed model on the ``cpu`` backend (the default: fused packed GEMV for decode, tiled
   dequantize + BLAS for prefill), the packed model on the ``torch`` backend (dequantizing
   every matrix on every call: the old path, now a debug mode), and the packed model with its
   dequantized weights cached (``bitsack.apply.cache_dequantized``, which gives the memory
   back). Configurations are timed in interleaved rounds (``time_interleaved`` of
   ``bench/prune_speed.py``) so a change of load on a shared machine hits them alike.
3. What does a process hold? Resident memory (``VmRSS``) of a fresh process that loads one
   configuration and decodes, against the same process without a model.

Usage:
    python bench/kernels_model.py RUN_DIR [--tokens 256] [--decode 16] [--repeats 5]
        [--out bench/results/kernels.md] [--no-rss]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_speed import time_interleaved  # noqa: E402

from bitsack.io import atomic_write  # noqa: E402


def _module_bytes(model) -> tuple[int, int]:
    """(packed bytes of packed modules, bytes of every other tensor), shared tensors once."""
    from bitsack.kernels.packed import PackedEmbedding, PackedLinear

    seen: set[int] = set()
    packed = other = 0
    packed_ids: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, (PackedLinear, PackedEmbedding)):
            for t in mod.buffers(recurse=False):
                packed_ids.add(t.data_ptr())
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.data_ptr()
        if t.device.type == "meta" or ptr in seen:
            continue
        seen.add(ptr)
        if ptr in packed_ids:
            packed += t.numel() * t.element_size()
        else:
            other += t.numel() * t.element_size()
    return packed, other


def _resident(run_dir: Path, config: str, tokens: int, decode: int, threads: int) -> int:
    """Resident bytes of a fresh process that holds ``config`` after it decoded."""
    out = subprocess.run([sys.executable, __file__, str(run_dir), "--rss-child", config,
                          "--tokens", str(tokens), "--decode", str(decode),
                          "--threads", str(threads)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _vm_rss() -> int:
    """Current resident bytes (``VmRSS``) after returning freed heap to the OS."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_child(args) -> int:
    from bitsack.apply import cache_dequantized, load_compressed
    from bitsack.data import eval_tokens
    from bitsack.models.loading import load_model

    run_dir = Path(args.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    base = load_model(summary["config"]["model"], progress=False)
    prompt = eval_tokens("wikitext2", base.tokenizer)[:, :8]
    model = None
    if args.rss_child == "dense":
        model = base.model.eval()
    del base  # the tokenizer's model: only the prompt is kept
    if args.rss_child in ("cpu", "cached"):
        backend = "torch" if args.rss_child == "cached" else "cpu"
        model = load_compressed(run_dir / "model", backend=backend).model.eval()
        if args.rss_child == "cached":
            cache_dequantized(model)
    if model is not None:
        with torch.inference_mode():
            out = model(prompt, use_cache=True, logits_to_keep=1)
            past, nxt = out.past_key_values, prompt[:, -1:]
            for _ in range(args.decode):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
    print(_vm_rss())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a finished `bitsack run` / `bitsack demo` directory")
    ap.add_argument("--tokens", type=int, default=256, help="prefill prompt length")
    ap.add_argument("--decode", type=int, default=16, help="decode steps timed after prefill")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.md"))
    ap.add_argument("--no-rss", action="store_true", help="skip the resident-memory runs")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        return _rss_child(args)

    from bitsack.apply import cache_dequantized, load_compressed
    from bitsack.data import eval_tokens
    from bitsack.models.loading import load_model

    run_dir = Path(args.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    solution = json.loads((run_dir / "solution.json").read_text())
    meta = json.loads((run_dir / "model" / "bitsack.json").read_text())
    plan_bytes = solution["certificate"]["usage"]["memory_bytes"]
    load_before = os.getloadavg()[0]

    base = load_model(summary["config"]["model"], progress=False)
    packed_dir = run_dir / "model"
    fused = load_compressed(packed_dir, backend="cpu").model.eval()
    slow = load_compressed(packed_dir, backend="torch").model.eval()
    fast = load_compressed(packed_dir, backend="torch").model.eval()
    cache_dequantized(fast)
    packed_ram, other_ram = _module_bytes(fused)
    dense_ram = sum(p.numel() * p.element_size() for p in {id(p): p for p in
                                                             base.model.parameters()}.values())
    disk = sum(f.stat().st_size for f in packed_dir.glob("*.safetensors"))

    prompt = eval_tokens("wikitext2", base.tokenizer)[:, :args.tokens]
    models = {"dense fp32": base.model.eval(), "packed, `cpu` backend (default)": fused,
              "packed, `torch` backend (dequantize per call, debug)": slow,
              "packed, cached dequantized weights": fast}

    def prefill(m):
        return lambda: m(prompt, use_cache=False, logits_to_keep=1)

    def decode(m):
        def go():
            out = m(prompt[:, :8], use_cache=True, logits_to_keep=1)
            past, nxt = out.past_key_values, prompt[:, 8:9]
            for _ in range(args.decode):
                out = m(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
        return go

    with torch.inference_mode():
        for m in models.values():  # warm the caches (the cached mode dequantizes here)
            m(prompt[:, :8])
    t0 = time.perf_counter()
    pre = time_interleaved([prefill(m) for m in models.values()], args.repeats, 1)
    dec = time_interleaved([decode(m) for m in models.values()], args.repeats, 1)
    bench_s = time.perf_counter() - t0
    load_after = os.getloadavg()[0]
    rss_rows = []
    if not args.no_rss:
        rss = {c: _resident(run_dir, c, args.tokens, args.decode, args.threads)
               for c in ("none", "dense", "cpu", "cached")}
        rss_rows = ["| process | resident MB | minus no-model baseline MB |", "|---|---|---|"]
        names = {"none": "Python + torch + libraries, no model", "dense": "dense fp32 model",
                 "cpu": "packed, `cpu` backend", "cached": "packed, cached dequantized"}
        for c, v in rss.items():
            rss_rows.append(f"| {names[c]} | {v / 1e6:.0f} | {(v - rss['none']) / 1e6:.0f} |")
        rss_rows += ["", f"Packed buffers + other tensors of the packed model: "
                     f"{(packed_ram + other_ram) / 1e6:.0f} MB; dense parameters "
                     f"{dense_ram / 1e6:.0f} MB. Each row is a fresh process that loads its "
                     f"model, decodes {args.decode} tokens after an 8-token prompt (KV cache "
                     "and activations included) and then reads its `VmRSS` after "
                     "`gc.collect()` + `malloc_trim(0)` (the base model read for the "
                     "tokenizer is freed first; what loading touched and did not free is "
                     "counted)."]

    rows = [
        "| quantity | bytes | ratio to plan |",
        "|---|---|---|",
        f"| plan `memory_bytes` (solver certificate) | {plan_bytes:,.0f} | 1.000 |",
        f"| packed bytes recorded in `bitsack.json` | {meta['packed_bytes']:,} | "
        f"{meta['packed_bytes'] / plan_bytes:.4f} |",
        f"| packed buffers of the loaded model (RAM) | {packed_ram:,} | "
        f"{packed_ram / plan_bytes:.4f} |",
        f"| other tensors of the loaded model (norms, biases; not planned) | {other_ram:,} | — |",
        f"| `model.safetensors` on disk (packed + other + header) | {disk:,} | "
        f"{disk / plan_bytes:.4f} |",
        f"| dense model as loaded (fp32 parameters) | {dense_ram:,} | "
        f"{dense_ram / plan_bytes:.2f} |",
    ]
    t_rows = ["| model | prefill ms (median) | × dense | decode ms/token (median) | × dense |",
              "|---|---|---|---|---|"]
    for (name, _), (p_min, p_med), (d_min, d_med) in zip(models.items(), pre, dec, strict=True):
        t_rows.append(f"| {name} | {p_min * 1e3:.0f} ({p_med * 1e3:.0f}) | "
                      f"{p_min / pre[0][0]:.2f} | {d_min / args.decode * 1e3:.1f} "
                      f"({d_med / args.decode * 1e3:.1f}) | {d_min / dec[0][0]:.2f} |")
    match = meta["packed_bytes"] == round(plan_bytes) == packed_ram
    text = "\n".join([
        "# Kernels and packed models: what is measured",
        "",
        "- Whole-model CPU figures (this page): packed bytes vs the plan, dense vs packed "
        "prefill and decode time.",
        "- Per-layer CPU kernels, `cpu` backend vs dense fp32 matmul: "
        "[kernels_cpu.md](kernels_cpu.md).",
        "- CPU prefill time of pruned models: [prune_speed.md](prune_speed.md).",
        "- GPU kernels (CuPy, mixed-bit GEMV vs copy bandwidth): [kernels_gpu.md]"
        "(kernels_gpu.md) — **not measured yet: no GPU has been lent**; only the NVRTC "
        "compilation of every kernel and the launch plans are checked (CI compiles them too).",
        "",
        f"Command: `python bench/kernels_model.py {args.run_dir} --tokens {args.tokens} "
        f"--decode {args.decode} --repeats {args.repeats} --threads {args.threads}` "
        f"({time.strftime('%Y-%m-%d')}, timing {bench_s:.0f} s)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores visible, torch "
        f"{torch.__version__} ({args.threads} thread(s)), Python {platform.python_version()}; "
        f"load average {load_before:.1f} before / {load_after:.1f} after (other jobs share "
        "the cores when above the thread count).",
        "",
        f"Run: `{run_dir}` — {summary['config']['model']} at "
        f"{summary['bits_per_weight']:.3f} bits per planned weight, "
        f"{sum(c.get('prune', 0) for c in summary['plan_counts'].values())} units pruned, "
        f"ppl {summary['ppl_before']:.2f} -> {summary['ppl_after']:.2f}.",
        "",
        "## Bytes",
        "",
        *rows,
        "",
        f"Plan bytes = recorded packed bytes = packed buffers in RAM: **{match}** (exact, "
        "integers).",
        "",
        "## Time (CPU)",
        "",
        f"Prefill: 1 × {args.tokens} tokens (start of the WikiText-2 test stream), logits of "
        f"the last position. Decode: an 8-token prompt, then {args.decode} single-token steps "
        "with the KV cache; the whole time divided by the steps (the prompt's forward included). "
        f"Minimum of {args.repeats} interleaved runs, median in parentheses.",
        "",
        *t_rows,
        "",
        "The `cpu` backend decodes from the packed words (fused unpack + dequantize + GEMV per "
        "matrix, never a dense weight) and prefills tile by tile (dequantize a tile into a "
        "reused buffer, BLAS); the `torch` backend unpacks and dequantizes every matrix on "
        "every forward (the old CPU path, kept as a debug mode); the cached mode holds fp32 "
        "weights again.",
        "",
        "## Resident memory",
        "",
        *(rss_rows or ["Not measured (`--no-rss`)."]),
        "",
    ])
    out = Path(args.out)
    with atomic_write(out, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text)
    return 0 if match else 1


if __name__ == "__main__":
    raise SystemExit(main())
