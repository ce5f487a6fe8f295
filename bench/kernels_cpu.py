"""CPU micro-benchmark: the ``torch`` backend's packed layer vs a dense fp32 matmul.

    python bench/kernels_cpu.py            # -> bench/results/kernels_cpu.md

For a few shapes (SmolLM2-135M's 576×576 and 1536×576, and square 2048², 4096²), bit-widths
2/3/4/8 (group size 64) and batch 1 (decode) / 128 (prefill), times ``layer(x)`` of a
``PackedLinear`` on the ``torch`` backend (unpack + dequantize every call, then one fp32
matmul) against ``x @ W.T`` with the dense fp32 weight. Best of repeated runs after warmup
(the machine may be shared; the load average is recorded), ``torch.set_num_threads`` as
given. The ratio says what the CPU path costs for its memory saving (bytes: packed vs dense
fp32 and fp16).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bitsack.kernels.packed import PackedLinear

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(576, 576), (1536, 576), (2048, 2048), (4096, 4096)]
BITS = (2, 3, 4, 8)
BATCHES = (1, 128)
GROUP = 64


def best_time(fn, reps: int, warmup: int = 2) -> float:
    """Fastest of ``reps`` runs: on a shared machine the minimum is the least disturbed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/kernels_cpu.md")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: robust when other jobs share the cores)")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows_out = []
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    with torch.inference_mode():
        for out_f, in_f in SHAPES:
            w = torch.randn(out_f, in_f) * 0.02
            for bits in BITS:
                layer = PackedLinear.from_dense(w, bits, GROUP, backend="torch")
                t_deq = best_time(lambda layer=layer: layer.dequantize(), args.reps)
                for batch in BATCHES:
                    x = torch.randn(batch, in_f)
                    t_dense = best_time(lambda x=x, w=w: x @ w.T, args.reps)
                    t_packed = best_time(lambda x=x, layer=layer: layer(x), args.reps)
                    rows_out.append((f"{out_f}×{in_f}", bits, batch, t_dense * 1e3,
                                     t_packed * 1e3, t_packed / t_dense, t_deq * 1e3,
                                     layer.nbytes, out_f * in_f * 4, out_f * in_f * 2))
                    print(rows_out[-1], flush=True)
    total = time.perf_counter() - t_start
    L = ["# bitsack CPU kernels: `torch` backend vs dense fp32 matmul", "",
         f"Command: `python bench/kernels_cpu.py --threads {args.threads} --reps {args.reps}` "
         f"({time.strftime('%Y-%m-%d')}, {total:.0f} s)", "",
         f"Machine: {platform.processor() or platform.machine()}, "
         f"torch {torch.__version__}, {args.threads} threads, load average "
         f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after (other jobs shared the "
         f"cores when above {os.cpu_count()}). Group size {GROUP}. Times are best of "
         f"{args.reps}, in ms. `packed/dense` > 1 means the packed layer is slower: the CPU path "
         "unpacks and dequantizes the whole weight on every call (`dequant ms`), then runs the "
         "same fp32 matmul, so it trades time for memory (bytes columns).", "",
         "| shape (out×in) | bits | batch | dense fp32 ms | packed ms | packed/dense | "
         "dequant ms | packed bytes | fp32 bytes | fp16 bytes |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows_out:
        L.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.1f}× | "
                 f"{r[6]:.3f} | {r[7]:,} | {r[8]:,} | {r[9]:,} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(L) + "\n", encoding="utf-8")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
