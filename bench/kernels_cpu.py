"""CPU micro-benchmark: packed layers (``cpu`` backend) vs a dense fp32 matmul, interleaved.

    python bench/kernels_cpu.py            # -> bench/results/kernels_cpu.md

For SmolLM2-135M's 576×576 and 1536×576 and square 2048², 4096², bit-widths 2/3/4/8 (group
size 64, and 128 where it leaves a ragged last group) and batch 1 (decode) / 128 (prefill),
times ``layer(x)`` of a ``PackedLinear`` on the ``cpu`` backend (fused packed GEMV for decode,
tiled dequantize + BLAS for prefill) against ``x @ W.T`` with the dense fp32 weight, and the
``torch`` backend (whole-weight dequantization per call: the previous CPU path, now a debug
mode) for reference. The variants are timed in interleaved rounds (dense, cpu, torch, dense,
cpu, …) so a change of load on a shared machine hits them alike; each sample is the mean of
enough calls to last ≥ 1 ms; the table gives the fastest sample of each, their ratio (the
figure the acceptance uses: the least disturbed run of each) and the median of the per-round
ratios (which a load spike in one of a pair's samples moves: it shows the noise). Achieved
bandwidth = packed bytes / time, next to the machine's measured memory copy bandwidth (a
256 MiB fp32 ``copy_``, bytes read + written) — matrices that fit in the caches (576×576:
0.2 MB packed) run above it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bitsack.kernels import cpu_build
from bitsack.kernels.packed import PackedLinear

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(576, 576), (1536, 576), (2048, 2048), (4096, 4096)]
BITS = (2, 3, 4, 8)
BATCHES = (1, 128)
GROUP = 64


def sample(fn, min_s: float = 1e-3) -> float:
    """Seconds per call, averaged over enough calls to last ≥ min_s."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return dt / n
        n = max(2 * n, int(n * min_s / max(dt, 1e-7)) + 1)


def interleaved(fns: dict[str, object], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Each round times every variant once, in order; returns the samples per variant."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            out[k].append(sample(fn))
    return out


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Bytes per second of a large fp32 copy_ (read + write counted)."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    best = min(sample(lambda: dst.copy_(src), 0.05) for _ in range(reps))
    return 2 * nbytes / best


def machine_facts() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        pick = ("Model name", "CPU(s)", "L2 cache", "L3 cache")
        facts = [f"{key} {val.strip()}" for key, _, val in
                 (line.partition(":") for line in lscpu.splitlines()) if key.strip() in pick]
    except OSError:
        facts = [platform.processor() or platform.machine()]
    return ", ".join(facts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/kernels_cpu.md")
    p.add_argument("--threads", type=int, default=1,
                   help="torch / kernel threads (1: robust when other jobs share the cores)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--torch-rounds", type=int, default=2,
                   help="rounds that also time the slow torch backend (0: never)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lib = cpu_build.load()
    native = "C++ kernels loaded" if lib is not None else \
        f"C++ kernels NOT loaded ({cpu_build.load_error()}): torch fallback path"
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    bw = copy_bandwidth()
    rows_out = []
    cells = [(s, b, GROUP) for s in SHAPES for b in BITS] + [((576, 576), 3, 128),
                                                            ((1536, 576), 4, 128)]
    with torch.inference_mode():
        for (out_f, in_f), bits, g in cells:
            w = torch.randn(out_f, in_f) * 0.02
            layer = PackedLinear.from_dense(w, bits, g, backend="cpu")
            debug = PackedLinear.from_dense(w, bits, g, backend="torch")
            for batch in BATCHES:
                x = torch.randn(batch, in_f)
                fns = {"dense": lambda x=x, w=w: x @ w.T,
                       "cpu": lambda x=x, layer=layer: layer(x)}
                res = interleaved(fns, args.rounds)
                t_torch = float("nan")
                if args.torch_rounds:
                    res_t = interleaved({"torch": lambda x=x, d=debug: d(x)}, args.torch_rounds,
                                        warmup=1)
                    t_torch = min(res_t["torch"])
                t_dense, t_cpu = min(res["dense"]), min(res["cpu"])
                paired = statistics.median(c / d for c, d in zip(res["cpu"], res["dense"],
                                                                 strict=True))
                row = (f"{out_f}×{in_f}", bits, g, batch, t_dense * 1e3, t_cpu * 1e3,
                       t_cpu / t_dense, t_torch * 1e3, layer.nbytes, layer.nbytes / t_cpu / 1e9,
                       out_f * in_f * 4 / t_dense / 1e9, paired)
                rows_out.append(row)
                print(row, flush=True)
    total = time.perf_counter() - t_start
    load_after = os.getloadavg()
    cmd = "python bench/kernels_cpu.py " + " ".join(shlex.quote(a) for a in (argv or
                                                                             sys.argv[1:]))
    L = ["# bitsack CPU kernels: `cpu` backend vs dense fp32 matmul", "",
         f"Command: `{cmd.strip()}` ({time.strftime('%Y-%m-%d %H:%M')}, {total:.0f} s)", "",
         f"Machine: {machine_facts()}; torch {torch.__version__}, {args.threads} thread(s); "
         f"{native}. Load average (1/5/15 min) {load_before[0]:.1f}/{load_before[1]:.1f}/"
         f"{load_before[2]:.1f} before, {load_after[0]:.1f}/{load_after[1]:.1f}/"
         f"{load_after[2]:.1f} after (other engineers' jobs share the {os.cpu_count()} cores: "
         "ratios are the robust figures, absolute times are not).", "",
         f"Measured memory copy bandwidth: **{bw / 1e9:.1f} GB/s** (256 MiB fp32 `copy_`, "
         "read + write bytes).", "",
         f"Times are ms per call, the fastest of {args.rounds} interleaved samples; "
         "`cpu/dense` is the ratio of the fastest samples (< 1: the packed layer is faster), "
         "`paired` the median of the per-round ratios. "
         "`torch ms` is the whole-weight dequantization path (debug mode now; "
         f"{args.torch_rounds} samples). `packed GB/s` = packed bytes (codes + fp16 scale and "
         "zero) / cpu time; `dense GB/s` = fp32 weight bytes / dense time. Batch 1 is decode "
         "(fused GEMV over the packed words), batch 128 prefill (tiles dequantized into a "
         "reused buffer, BLAS).", "",
         "| shape (out×in) | bits | group | batch | dense fp32 ms | cpu ms | cpu/dense | "
         "paired | torch ms | packed bytes | packed GB/s | dense GB/s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows_out:
        L.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} | "
                 f"**{r[6]:.2f}** | {r[11]:.2f} | {r[7]:.2f} | {r[8]:,} | {r[9]:.1f} | "
                 f"{r[10]:.1f} |")
    dec = [r for r in rows_out if r[3] == 1]
    big4 = [r for r in dec if r[0] == "4096×4096" and r[1] == 4]
    worst = max(dec, key=lambda r: r[6])
    L += ["", "Acceptance (issue 10, batch 1, on `cpu/dense`): 4-bit 4096×4096 at or below "
          "dense: "
          f"{'met' if all(r[6] <= 1.0 for r in big4) else 'NOT met'} "
          f"({', '.join(f'{r[6]:.2f}' for r in big4)}); every other cell ≤ 2× dense: "
          f"{'met' if all(r[6] <= 2.0 for r in dec) else 'NOT met'} (worst {worst[6]:.2f} at "
          f"{worst[0]} {worst[1]}-bit g{worst[2]})."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(L) + "\n", encoding="utf-8")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
