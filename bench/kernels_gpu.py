"""GPU benchmark of bitsack's CuPy kernels: compile, test, time, write a Markdown report.

One command on one GPU, a few minutes:

    python bench/kernels_gpu.py                 # -> bench/results/kernels_gpu.md
    python bench/kernels_gpu.py --dry-run       # CPU only: compile with NVRTC, build the plans

On a lent device machine whose python3 already has CUDA torch + CuPy (no network there),
install bitsack itself without dependencies first:

    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
      && PYTHONUNBUFFERED=1 python3 bench/kernels_gpu.py --out $OUT/kernels_gpu.md

Steps: device facts; NVRTC compile of every source (and RawModule load on the GPU); the
``gpu``-marked kernel tests (pytest, in a subprocess); the device-to-device copy bandwidth
(cudaMemcpyAsync of a large buffer, read + write bytes); the mixed-bit GEMV at batch 1 on
4096² and 8192² at 2/3/4/8 bits and on two mixed-bit 8192² matrices (row segments as q/k/v,
column segments as o_proj), achieved GB/s = bytes of qdata + scale + zero + x + y per call
over the median kernel time (CUDA events around a CUDA graph of many launches, after warmup,
so Python launch overhead is not counted; the plain ``layer(x)`` module call is timed too);
dequantize + cuBLAS GEMM for prefill against a dense fp16 GEMM; and an error-bound check of
the timed 4096² outputs against the float64 reference. Targets (DESIGN.md): at 8192², 4-bit
≥ 70 %, 2/3-bit ≥ 60 % of the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bitsack.kernels.backends import (
    dequant_plan,
    gemv_plan,
    get_backend,
    launch_prepared,
    prepare_plan,
    reference_output,
)
from bitsack.kernels.bounds import layer_error_bound
from bitsack.kernels.cuda_build import compile_ptx, get_module, kernel_names, sources
from bitsack.kernels.formats import SUPER_COLS, pack_zero
from bitsack.kernels.packed import PackedLinear, Segment

ROOT = Path(__file__).resolve().parents[1]
GROUP = 128
TARGETS = {2: 0.60, 3: 0.60, 4: 0.70}


@dataclass(frozen=True)
class Case:
    name: str
    rows: int
    cols: int
    axis: int
    bits: tuple[int, ...]  # one per equal segment along axis
    group: int = GROUP
    scale_bits: int | None = None  # S-bit scale codes × fp16 steps instead of fp16 scales


def cases() -> list[Case]:
    out = [Case(f"{n}² {b}-bit", n, n, 0, (b,)) for n in (4096, 8192) for b in (2, 3, 4, 8)]
    out.append(Case("8192² mixed rows 2/3/4/8", 8192, 8192, 0, (2, 3, 4, 8)))
    out.append(Case("8192² mixed cols 2/3/4/8", 8192, 8192, 1, (2, 3, 4, 8)))
    # the kernels reading 6-bit scale codes against the same shapes with fp16 scales, at g32
    # (where the scales are the most bytes and the decoding the most work)
    for b in (3, 4):
        out.append(Case(f"8192² {b}-bit g32", 8192, 8192, 0, (b,), group=32))
        out.append(Case(f"8192² {b}-bit g32, 6-bit scale codes", 8192, 8192, 0, (b,),
                        group=32, scale_bits=6))
    return out


def random_layer(case: Case, device: str, seed: int = 0) -> PackedLinear:
    """A packed layer with random codes and plausible fp16 scales (no quantization needed)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = case.rows if case.axis == 0 else case.cols
    step = n // len(case.bits)
    segs = []
    for i, b in enumerate(case.bits):
        rows = step if case.axis == 0 else case.rows
        cols = case.cols if case.axis == 0 else step
        words = -(-b * cols // 32)
        q = torch.randint(-2**31, 2**31, (rows, words), dtype=torch.int64, generator=g)
        qdata = q.to(torch.int32).view(torch.uint32)
        ng = -(-cols // case.group)  # a short last group when the group does not divide cols
        zero = pack_zero(torch.randint(0, 2**b, (rows, ng), generator=g), b)
        if case.scale_bits:
            sb = case.scale_bits
            dq = {"scale_bits": sb, "scale_codes": pack_zero(
                      torch.randint(1, 2**sb, (rows, ng), generator=g), sb),
                  "step": (torch.rand(rows, -(-cols // SUPER_COLS), generator=g) * 1e-4
                           + 1e-4).half()}
        else:
            dq = {"scale": (torch.rand(rows, ng, generator=g) * 1e-3 + 1e-3).half()}
        segs.append(Segment(case.axis, i * step, (i + 1) * step, b, case.group, (rows, cols),
                            qdata=qdata, zero=zero, **dq))
    layer = PackedLinear(case.cols, case.rows, segs, backend="torch")
    return layer.to(device)


def bytes_per_call(layer: PackedLinear, batch: int) -> int:
    return layer.nbytes + batch * (layer.in_features + layer.out_features) * 4


def device_facts() -> dict[str, str]:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    clock_khz = props.get("memoryClockRate", 0)
    bus = props.get("memoryBusWidth", 0)
    nominal = 2 * clock_khz * 1e3 * bus / 8 / 1e9 if clock_khz and bus else float("nan")
    return {
        "device": torch.cuda.get_device_name(0),
        "compute capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "SMs": str(props.get("multiProcessorCount")),
        "memory": f"{props.get('totalGlobalMem', 0) / 2**30:.1f} GiB",
        "nominal memory bandwidth (2·clock·bus width)": f"{nominal:.0f} GB/s",
        "CUDA runtime / driver": f"{cupy.cuda.runtime.runtimeGetVersion()} / "
                                 f"{cupy.cuda.runtime.driverGetVersion()}",
        "torch / cupy": f"{torch.__version__} / {cupy.__version__}",
        "host": platform.node(),
        "nvidia-smi": _nvidia_smi(),
    }


def _nvidia_smi() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.memory,"
                              "clocks.max.sm,power.limit,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().replace("\n", "; ") or out.stderr.strip()[:200]
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"


def time_graph(launch_once, reps: int = 50, iters: int = 30) -> tuple[float, str]:
    """Median seconds of one ``launch_once()`` (a CUDA graph of ``reps`` copies).

    Falls back to a plain launch loop (which then includes launch overhead) if graph capture
    fails; the second value says which.
    """
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    launch_once()  # compile/load outside the capture
    cupy.cuda.Device().synchronize()
    try:
        with stream:
            stream.begin_capture()
            for _ in range(reps):
                launch_once()
            graph = stream.end_capture()
        run, how = (lambda: graph.launch(stream)), "graph"
    except Exception:  # noqa: BLE001 - any capture failure: fall back to a loop
        def run() -> None:
            with stream:
                for _ in range(reps):
                    launch_once()
        how = "loop"
    for _ in range(3):
        run()
    stream.synchronize()
    times = []
    for _ in range(iters):
        start.record(stream)
        run()
        end.record(stream)
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3 / reps)
    return statistics.median(times), how


def time_torch_call(fn, iters: int = 50) -> float:
    """Median seconds of a torch-level call (includes Python and launch overhead)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written."""
    import cupy

    a = cupy.ones(nbytes, dtype=cupy.uint8)
    b = cupy.empty_like(a)

    def once() -> None:
        b.data.copy_from_device_async(a.data, nbytes, cupy.cuda.get_current_stream())

    t, _ = time_graph(once, reps=5, iters=20)
    return 2 * nbytes / t / 1e9


def run_gpu_tests() -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels", "-p",
           "no:cacheprovider"]
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    except subprocess.TimeoutExpired:
        return 124, "timed out after 400 s"
    lines = [ln for ln in out.stdout.strip().splitlines() if ln.strip()]
    return out.returncode, (lines[-1] if lines else out.stderr.strip()[-300:])


def dry_run(out_path: Path | None) -> int:
    lines = ["# bitsack GPU kernels: dry run (no GPU)", "",
             f"Command: `python bench/kernels_gpu.py --dry-run`  ({time.strftime('%Y-%m-%d')})",
             "", "**Not measured: no GPU was available.** This run compiled every kernel "
             "source with NVRTC and built the benchmark's launch plans on the CPU.", "",
             "| source | NVRTC compile (s) | PTX (KiB) | kernels |", "|---|---|---|---|"]
    for name in sources():
        t0 = time.perf_counter()
        ptx, lowered = compile_ptx(name)
        lines.append(f"| {name} | {time.perf_counter() - t0:.1f} | {len(ptx) / 1024:.0f} | "
                     f"{len(lowered)} |")
    lines += ["", "| case | segments | packed bytes | bytes/call (batch 1) | launches |",
              "|---|---|---|---|---|"]
    for case in cases():
        layer = random_layer(case, "cpu")
        x = torch.zeros(1, case.cols)
        y = torch.zeros(1, case.rows)
        plan = gemv_plan(layer, x, y)
        w = torch.empty(case.rows, case.cols, dtype=torch.float16)
        dq = dequant_plan(layer, w)
        lines.append(f"| {case.name} | {len(layer.segments)} | {layer.nbytes} | "
                     f"{bytes_per_call(layer, 1)} | {len(plan)} GEMV + {len(dq)} dequant |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out_path:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text, encoding="utf-8")
    return 0


def gpu_run(out_path: Path, skip_tests: bool) -> int:
    import cupy

    t_start = time.perf_counter()
    facts = device_facts()
    compile_rows = []
    for name in sources():
        t0 = time.perf_counter()
        compile_ptx(name)
        t_nvrtc = time.perf_counter() - t0
        t0 = time.perf_counter()
        for k in kernel_names(name):
            get_module(name).get_function(k)
        compile_rows.append((name, t_nvrtc, time.perf_counter() - t0))
    test_rc, test_line = (0, "skipped (--skip-tests)") if skip_tests else run_gpu_tests()
    copy_gbs = copy_bandwidth()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)

    gemv_rows = []
    for case in cases():
        layer = random_layer(case, "cuda")
        layer.backend = "cupy"
        x = torch.randn(1, case.cols, device="cuda")
        y = torch.empty(1, case.rows, device="cuda")
        prepared = prepare_plan(gemv_plan(layer, x, y))  # no torch/DLPack inside the capture
        t, how = time_graph(lambda prepared=prepared: launch_prepared(prepared))
        t_mod = time_torch_call(lambda layer=layer, x=x: layer(x))
        nbytes = bytes_per_call(layer, 1)
        gbs = nbytes / t / 1e9
        check = ""
        if case.rows <= 4096 or case.name == "8192² mixed rows 2/3/4/8" or case.group != GROUP:
            cpu = layer.to("cpu")
            y_ref = reference_output(cpu, x.cpu())
            bound = layer_error_bound(cpu, x.cpu(), "cupy", y_ref=y_ref)
            layer.to("cuda")
            got = layer(x).cpu().double()
            ratio = float(((got - y_ref).abs() / bound).max())
            check = f"{ratio:.3f}"
        bits = max(case.bits) if len(case.bits) == 1 else None
        target = TARGETS.get(bits) if case.rows == 8192 else None
        verdict = "" if target is None else ("pass" if gbs >= target * copy_gbs else "FAIL")
        gemv_rows.append((case.name, nbytes, t * 1e6, how, gbs, gbs / copy_gbs, t_mod * 1e6,
                          "" if target is None else f"≥ {target:.0%}", verdict, check))
        print(gemv_rows[-1], flush=True)
        del layer

    prefill_rows = []
    for batch in (512, 2048):
        case = Case(f"8192² 4-bit, batch {batch}", 8192, 8192, 0, (4,))
        layer = random_layer(case, "cuda")
        x16 = torch.randn(batch, 8192, device="cuda", dtype=torch.float16)
        w16 = torch.empty(8192, 8192, device="cuda", dtype=torch.float16)
        dq = prepare_plan(dequant_plan(layer, w16))
        t_dq, _ = time_graph(lambda dq=dq: launch_prepared(dq), reps=10, iters=10)
        xc, wc = cupy.from_dlpack(x16), cupy.from_dlpack(w16)
        t_mm, _ = time_graph(lambda xc=xc, wc=wc: cupy.matmul(xc, wc.T), reps=10,
                             iters=10)
        layer.backend = "cupy"
        t_all = time_torch_call(lambda layer=layer, x16=x16: layer(x16), iters=20)
        flops = 2 * batch * 8192 * 8192
        prefill_rows.append((case.name, t_dq * 1e6, t_mm * 1e6, t_all * 1e6,
                             flops / t_all / 1e12, flops / t_mm / 1e12,
                             layer.nbytes / t_dq / 1e9))
        print(prefill_rows[-1], flush=True)
        del layer

    total = time.perf_counter() - t_start
    L = ["# bitsack GPU kernels (CuPy raw kernels)", "",
         f"Command: `python bench/kernels_gpu.py`  ({time.strftime('%Y-%m-%d %H:%M')}, "
         f"{total:.0f} s in all)", "", "## Device", "", "| fact | value |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in facts.items()]
    L += ["", "## Compile", "", "| source | NVRTC → PTX (s) | RawModule load (s) |",
          "|---|---|---|"]
    L += [f"| {n} | {a:.1f} | {b:.1f} |" for n, a, b in compile_rows]
    L += ["", f"GPU tests (`pytest -m gpu tests/kernels`): exit {test_rc}: `{test_line}`", "",
          "## Decode: mixed-bit GEMV, batch 1, group size 128 (32 where named)", "",
          f"Measured device-to-device copy bandwidth (read + write): **{copy_gbs:.0f} GB/s**. "
          "Bytes per call = qdata + scale + zero + x (fp32) + y (fp32). Kernel time: median "
          "over CUDA-graph launches (no Python overhead); module time: `layer(x)` from "
          "Python, all overheads included. err/bound: largest |y − y_ref| / bound over the "
          "outputs (must be ≤ 1).", "",
          "| case | bytes/call | kernel µs | timing | GB/s | % of copy BW | module µs | "
          "target | verdict | err/bound |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in gemv_rows:
        L.append(f"| {r[0]} | {r[1]:,} | {r[2]:.1f} | {r[3]} | {r[4]:.0f} | {r[5]:.0%} | "
                 f"{r[6]:.1f} | {r[7]} | {r[8]} | {r[9]} |")
    L += ["", "## Prefill: dequantize (fp16) + cuBLAS GEMM via CuPy", "",
          "| case | dequant µs | GEMM µs | module µs | module TFLOP/s | GEMM-only TFLOP/s | "
          "dequant read GB/s |", "|---|---|---|---|---|---|---|"]
    for r in prefill_rows:
        L.append(f"| {r[0]} | {r[1]:.0f} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.1f} | {r[5]:.1f} | "
                 f"{r[6]:.0f} |")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(L) + "\n", encoding="utf-8")
    print("\n".join(L))
    return 0 if test_rc == 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true",
                   help="CPU only: compile with NVRTC and build the plans; no timing")
    p.add_argument("--out", type=Path, default=None,
                   help="report path (default bench/results/kernels_gpu.md; dry run: stdout)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the gpu tests")
    args = p.parse_args(argv)
    np.random.seed(0)
    if args.dry_run:
        return dry_run(args.out)
    if not get_backend("cupy").is_available():
        print("no CUDA device / CuPy here; use --dry-run", file=sys.stderr)
        return 1
    return gpu_run(args.out or ROOT / "bench/results/kernels_gpu.md", args.skip_tests)


if __name__ == "__main__":
    sys.exit(main())
