"""The noise floor of a GPTQ result: one uniform configuration quantized from different
calibration draws (``--seeds``), each evaluated as the e2e cells are, on this machine.

A comparison of two methods at equal bytes (``bench/results/e2e.md``) is only as sharp as the
spread of one method over calibration draws — and over machines: float kernels round
differently on different CPUs, and GPTQ's rounding decisions amplify that. Every run records
its machine; the report groups runs by configuration and machine.

    python bench/gptq_noise.py --config b3g64 --seeds 0,1,2

Results: ``bench/results/gptq_noise/*.json`` (one per run, cached) and
``bench/results/gptq_noise.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _e2e():
    """bench/e2e.py as a module (its C4 evaluation and machine facts)."""
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def host(m: dict[str, Any]) -> str:
    """A machine's short name: its platform string (kernel build included)."""
    return m["platform"]


def uniform_run(option: str, seed: int, out: Path, args, e2e, tag: str):
    """One ``bitsack run --method uniform`` of ``option`` from calibration draw ``seed`` into
    ``out``, evaluated as the e2e cells are: (its ``RunSummary``, C4 perplexity)."""
    from bitsack.pipeline import RunConfig, run

    t = time.time()
    summary = run(RunConfig(model=args.model, out=str(out), method="uniform", menu=(option,),
                            avg_bits=16.0, calib="c4", eval="wikitext2",
                            eval_windows=args.eval_windows,
                            compress_nsamples=args.compress_nsamples, seed=seed,
                            scale_bits=None, grid="minmax"),  # as recorded (the defaults before)
                  progress=lambda m: print(f"[{tag} {time.time() - t:5.0f} s] {m}",
                                           file=sys.stderr, flush=True))
    return summary, e2e.c4_perplexity(out / "model", args.eval_windows, args.model)


def run_one(config: str, seed: int, args, e2e) -> dict[str, Any]:
    from bitsack.io import write_json

    mach = e2e.machine()
    tag = f"{config}_seed{seed}_" + "".join(ch if ch.isalnum() else "-" for ch in host(mach))
    path = Path(args.results) / "gptq_noise" / f"{tag}.json"
    if path.is_file():
        print(f"{tag}: cached", file=sys.stderr)
        return json.loads(path.read_text())
    t = time.time()
    summary, c4 = uniform_run(config, seed, Path(args.runs) / tag, args, e2e, tag)
    result = {"config": config, "seed": seed, "wikitext2": summary.ppl_after, "c4": c4,
              "bits_per_weight": summary.bits_per_weight, "eval_windows": args.eval_windows,
              "compress_nsamples": args.compress_nsamples, "summary": asdict(summary),
              "wall_s": time.time() - t, "machine": mach}
    write_json(path, result)
    return result


def report(results: Path) -> Path:
    from bitsack.io import atomic_write

    runs = [json.loads(f.read_text()) for f in sorted((results / "gptq_noise").glob("*.json"))]
    seen = {(r["config"], host(r["machine"]), r["seed"]) for r in runs}
    # e2e's cells are runs too (also those measured on packed layout v1: the same models)
    for f in sorted([*(results / "e2e").glob("uniform-*.json"),
                     *(results / "e2e_v1").glob("uniform-*.json")]):
        r = json.loads(f.read_text())
        cfg = r["config"]
        if cfg["menu"][0] not in {c for c, _, _ in seen} \
                or (cfg["menu"][0], host(r["machine"]), cfg["seed"]) in seen:
            continue  # a config not studied here, or the same run again (same host and seed)
        runs.append({"config": cfg["menu"][0], "seed": cfg["seed"], "wikitext2": r["wikitext2"],
                     "c4": r["c4"], "machine": r["machine"], "source": "e2e"})
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["config"], host(r["machine"])), []).append(r)
    L = ["# The noise floor of one GPTQ result", "",
         "One uniform configuration of SmolLM2-135M quantized by GPTQ from different C4 "
         "calibration draws (`seed`), evaluated as `bench/results/e2e.md` evaluates (first 16 "
         "windows of 2048 tokens of WikiText-2 and C4). Runs on different machines are listed "
         "apart: same code and seed, different CPU float kernels.", "",
         "Command: `python bench/gptq_noise.py --config b3g64 --seeds 0,1,2`.", "",
         "| config | machine | seed | WikiText-2 | C4 |", "|---|---|---|---|---|"]
    for (config, h), rs in sorted(groups.items()):
        for r in sorted(rs, key=lambda r: r["seed"]):
            src = " (e2e cell)" if r.get("source") == "e2e" else ""
            L.append(f"| {config} | {h} | {r['seed']}{src} | {r['wikitext2']:.2f} | "
                     f"{r['c4']:.2f} |")
    L += ["", "| config | machine | runs | WikiText-2 mean ± sd (max / min) | "
          "C4 mean ± sd (max / min) |", "|---|---|---|---|---|"]
    for (config, h), rs in sorted(groups.items()):
        cells = []
        for key in ("wikitext2", "c4"):
            v = [r[key] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else float("nan")
            cells.append(f"{statistics.mean(v):.2f} ± {sd:.2f} ({max(v) / min(v):.3f})")
        L.append(f"| {config} | {h} | {len(rs)} | {cells[0]} | {cells[1]} |")
    path = results / "gptq_noise.md"
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="b3g64", help="one menu option, e.g. b3g64")
    p.add_argument("--seeds", default="0,1,2", help="calibration draws (comma-separated)")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--compress-nsamples", type=int, default=32)
    p.add_argument("--model", default="default")
    p.add_argument("--runs", default=str(ROOT / "runs" / "gptq_noise"))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--report", action="store_true", help="only rebuild the report")
    args = p.parse_args(argv)
    if not args.report:
        e2e = _e2e()
        for s in [int(x) for x in args.seeds.split(",") if x.strip()]:
            run_one(args.config, s, args, e2e)
    print(report(Path(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
