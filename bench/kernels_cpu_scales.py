"""CPU micro-benchmark: the packed kernels reading 6-bit scale codes vs fp16 scales, paired.

    python bench/kernels_cpu_scales.py     # -> bench/results/kernels_cpu_scales.md

With ``--scale-bits S`` a segment holds no fp16 scales: the C++ kernels decode each group's
scale from its S-bit code and its row's fp16 step per 256 columns (``Scales::at`` in
``kernels/cpu/packed_cpu.cpp``). The value is the same fp32 number as the expanded fp16 scale,
so the outputs are bit-identical; this measures what the decoding costs. For SmolLM2-135M's
576×576 and 1536×576 and square 2048², 4096², 3 and 4 bits at group sizes 32 / 64 / 128,
batch 1 (decode: the fused GEMV) and 128 (prefill: tiles dequantized, then BLAS): one
RTN-quantized weight packed twice — its codes with the double-quantized scales
(``codes``) and the same codes with the scales expanded to fp16 (``fp16``) — timed in
interleaved rounds with the dense fp32 matmul (``bench/kernels_cpu.py``'s protocol: each
sample the mean of calls lasting ≥ 1 ms; the ratio of the fastest samples, and the median of
the per-round ratios to show the noise).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_cpu import copy_bandwidth, interleaved, machine_facts  # noqa: E402

from bitsack.kernels import cpu_build  # noqa: E402
from bitsack.kernels.grid import rtn_quantize  # noqa: E402
from bitsack.kernels.packed import PackedLinear, Segment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(576, 576), (1536, 576), (2048, 2048), (4096, 4096)]
BITS = (3, 4)
GROUPS = (32, 64, 128)
BATCHES = (1, 128)


def pair(w: torch.Tensor, bits: int, g: int, scale_bits: int) -> tuple[PackedLinear,
                                                                      PackedLinear]:
    """The weight packed with scale codes, and the same codes with fp16 scales."""
    q = rtn_quantize(w, bits, g, scale_bits)
    out_f, in_f = w.shape
    coded = PackedLinear(in_f, out_f, [Segment.from_quantized(q, 0, 0)], backend="cpu")
    seg = coded.segments[0]
    plain = PackedLinear(in_f, out_f, [Segment(0, 0, out_f, bits, g, (out_f, in_f),
                                               qdata=seg.qdata, scale=seg.scales(),
                                               zero=seg.zero)], backend="cpu")
    return coded, plain


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/kernels_cpu_scales.md")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--scale-bits", type=int, default=6)
    p.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES),
                   help="out×in shapes, e.g. 576x576,4096x4096")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lib = cpu_build.load()
    if lib is None:
        raise SystemExit(f"C++ kernels not loaded ({cpu_build.load_error()}): nothing to "
                         "measure (the torch fallback expands the codes)")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    bw = copy_bandwidth()
    rows = []
    with torch.inference_mode():
        for out_f, in_f in shapes:
            w = torch.randn(out_f, in_f) * 0.02
            for bits in BITS:
                for g in GROUPS:
                    coded, plain = pair(w, bits, g, args.scale_bits)
                    for batch in BATCHES:
                        x = torch.randn(batch, in_f)
                        if not torch.equal(coded(x), plain(x)):
                            raise SystemExit(f"{out_f}×{in_f} {bits}-bit g{g} batch {batch}: "
                                             "outputs differ (they must be bit-identical)")
                        res = interleaved({"dense": lambda x=x, w=w: x @ w.T,
                                           "fp16": lambda x=x, m=plain: m(x),
                                           "codes": lambda x=x, m=coded: m(x)}, args.rounds)
                        t = {k: min(v) for k, v in res.items()}
                        paired = statistics.median(c / f for c, f in zip(
                            res["codes"], res["fp16"], strict=True))
                        row = (f"{out_f}×{in_f}", bits, g, batch, t["dense"] * 1e3,
                               t["fp16"] * 1e3, t["codes"] * 1e3, t["codes"] / t["fp16"],
                               paired, plain.nbytes, coded.nbytes)
                        rows.append(row)
                        print(row, flush=True)
    total = time.perf_counter() - t_start
    load_after = os.getloadavg()
    cmd = "python bench/kernels_cpu_scales.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    dec = [r[7] for r in rows if r[3] == 1]
    pre = [r[7] for r in rows if r[3] != 1]
    L = [f"# bitsack CPU kernels: {args.scale_bits}-bit scale codes vs fp16 scales", "",
         f"Command: `{cmd.strip()}` ({time.strftime('%Y-%m-%d %H:%M')}, {total:.0f} s)", "",
         f"Machine: {machine_facts()}; torch {torch.__version__}, {args.threads} thread(s); "
         f"C++ kernels loaded. Load average (1/5/15 min) {load_before[0]:.1f}/"
         f"{load_before[1]:.1f}/{load_before[2]:.1f} before, {load_after[0]:.1f}/"
         f"{load_after[1]:.1f}/{load_after[2]:.1f} after (ratios are the robust figures, "
         f"absolute times are not). Memory copy bandwidth {bw / 1e9:.1f} GB/s.", "",
         "One RTN weight packed twice: `codes` holds the scale codes and steps (what a "
         f"`--scale-bits {args.scale_bits}` model holds), `fp16` the same codes with the "
         "scales expanded to fp16 (the outputs were checked equal bit for bit before "
         f"timing). Times are ms per call, the fastest of {args.rounds} interleaved samples; "
         "`codes/fp16` the ratio of the fastest samples (> 1: decoding the codes costs "
         "time), `paired` the median of the per-round ratios. Batch 1 is decode (fused GEMV), "
         "batch 128 prefill (tiles dequantized, BLAS).", "",
         f"Summary: decode `codes/fp16` median **{statistics.median(dec):.2f}** (range "
         f"{min(dec):.2f}–{max(dec):.2f}); prefill median **{statistics.median(pre):.2f}** "
         f"(range {min(pre):.2f}–{max(pre):.2f}).", "",
         "| shape (out×in) | bits | group | batch | dense fp32 ms | fp16 scales ms | "
         "codes ms | codes/fp16 | paired | bytes fp16 | bytes codes |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} | "
                 f"{r[6]:.3f} | **{r[7]:.2f}** | {r[8]:.2f} | {r[9]:,} | {r[10]:,} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from bitsack.io import atomic_write

    with atomic_write(args.out, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
