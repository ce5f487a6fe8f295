"""What the storage of the group parameters costs: bytes saved by storing them more compactly,
and the quality lost, measured on uniform GPTQ models of the embedded default.

bitsack's packed format stored an fp16 scale and an fp16 zero per group up to schema v1
(32 bits per group: 0.5 bits/weight at g64, 1.0 at g32). Two more compact storages:

- ``intzero``: the zero as a ``bits``-bit integer. Lossless: the min-max grid
  (``bitsack.kernels.grid``) already makes the zero an integer in ``[0, 2**bits − 1]``, so the
  model is the same and only the bytes change (AutoGPTQ's ``qzeros``). The packed format
  stores its zero points so since schema v2 (this measurement is why).
- ``dq<S>``: the scale double-quantized (the idea of llama.cpp's K-quants): an fp16 step ``d``
  per ``--super`` columns of a row, and per group an ``S``-bit integer ``k`` in ``1..2**S − 1``
  with scale ``k·d``; the zero as in ``intzero``. Lossy: a group's scale is rounded *up* to
  the next multiple of ``d`` (no value clipped beyond half a step), unless it exceeds
  ``(2**S − 1)·d`` — then it is clipped there and the values outside the range clamp. ``d`` is
  ``max`` of the super-block's min-max scales of the *original* weights / (2**S − 1): GPTQ
  fixes a group's parameters from the error-updated weights when it reaches the group, and
  the super-block's later groups are not known then. Recorded: the groups whose scale reached
  the top step, ``s ≥ (2**S − 1)·d`` — clipped, though most only by the fp16 rounding of ``s``
  and ``d`` (≤ 0.1 %: on SmolLM2 at 3-bit g32 all of them; on a random layer every
  round-to-nearest one, while GPTQ widened 102 of 1,152 groups by up to 7 %). (On a
  random 64 × 576 layer at 3-bit g32, S = 6: GPTQ's layer loss +1.3 % over fp16 parameters
  with 9 % of the groups at the top step; a step 1.15–1.5× coarser clips none and loses 2.1–3.2 %,
  so ``--headroom`` defaults to 1.)

The packed format has had the double-quantized storage since (``--scale-bits``; its steps
keep ``11 − S`` significant bits so every scale is an exact fp16 value, and ``bench/e2e.py``'s
``uniform:b3g32s6`` cells measure it); this emulation is the measurement that led there.

The lossy storage is *emulated*: this script patches GPTQ's and round-to-nearest's parameter
choice inside one ``bitsack run --method uniform`` (the same run ``bench/gptq_noise.py`` makes)
so that every scale is the double-quantized value (kept in the fp16 field, rounded up to the
next fp16: at most 2⁻¹⁰ relative above ``k·d``), evaluates the model as ``bench/e2e.py`` does,
and counts the bytes the compact storage would take from the saved model's segments.

    python bench/param_storage.py --configs b3g32:dq6,b3g32,b3g16:dq6 --seed 3

Results: ``bench/results/param_storage/*.json`` (one per run, cached) and
``bench/results/param_storage.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _gptq_noise():
    """bench/gptq_noise.py as a module: its uniform run and, through it, bench/e2e.py."""
    spec = importlib.util.spec_from_file_location("bench_gptq_noise",
                                                  ROOT / "bench" / "gptq_noise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_config(text: str) -> tuple[str, int | None]:
    """``b3g32:dq6`` -> ("b3g32", 6); ``b3g32`` -> ("b3g32", None): fp16 parameters as stored."""
    option, _, storage = text.partition(":")
    if not storage:
        return option, None
    if not storage.startswith("dq") or not storage[2:].isdigit() \
            or not 2 <= int(storage[2:]) <= 8:
        raise SystemExit(f"--configs: {text!r}: the storage after ':' must be dq<S> with S in "
                         "2..8 (bits of a group's scale)")
    return option, int(storage[2:])


# ------------------------------------------------------------------------------------------
# The emulation: double-quantized scales inside GPTQ and round-to-nearest
# ------------------------------------------------------------------------------------------


class _Counter:
    """Groups given a double-quantized scale, and how many reached the top step (clipped, most
    of them only by fp16 rounding)."""

    def __init__(self) -> None:
        self.groups = 0
        self.clipped = 0


def _max_ranges(w, group_size: int, super_cols: int, headroom: float = 1.0):
    """Per row and super-block of ``w`` [rows, cols]: the largest min-max range of its groups
    (``bitsack.kernels.grid.super_ranges``, the real format's), times ``headroom``."""
    from bitsack.kernels.grid import super_ranges

    return super_ranges(w, group_size, super_cols) * headroom


def _double_quantize(scale, lo, maxq, max_range, levels: int, counter: _Counter):
    """Scales rounded up to ``k·d`` (k in 1..levels, d the fp16 step of the super-block:
    its largest range / maxq / levels, rounded up) and the integer zeros on that grid."""
    import torch

    from bitsack.kernels.grid import _fp16_round_up

    maxq_t = torch.as_tensor(maxq, dtype=torch.float64, device=scale.device)
    # an all-zero super-block keeps the grid's all-zero scale (the smallest fp16), never 0
    step = _fp16_round_up((max_range / maxq_t / levels).clamp(min=2.0**-24)).to(torch.float64)
    s = scale.to(torch.float64)
    k = torch.ceil(s / step * (1 - 1e-12)).clamp(min=1.0)
    counter.groups += int(k.numel())
    counter.clipped += int((k > levels).sum())
    s_q = _fp16_round_up(k.clamp(max=float(levels)) * step)
    zero = torch.minimum(torch.round(-lo / s_q.to(torch.float64)), maxq_t.expand_as(s))
    return s_q, zero.clamp(min=0.0).to(torch.float16)


@contextlib.contextmanager
def double_quantized_scales(scale_bits: int, super_cols: int,
                            headroom: float = 1.0) -> Iterator[_Counter]:
    """Within the block every GPTQ and round-to-nearest group gets a double-quantized scale
    (see the module docstring); yields the counter of groups and clipped groups."""
    import torch

    from bitsack.kernels import gptq as gptq_mod
    from bitsack.kernels import grid as grid_mod
    from bitsack.kernels.grid import QuantizedTensor, _codes, check_weight

    levels = (1 << scale_bits) - 1
    counter = _Counter()
    tables: dict[int, torch.Tensor] = {}
    run0, set0, rtn0 = gptq_mod.GPTQ._run, gptq_mod.GPTQ._set_params, grid_mod.rtn_quantize

    def run(self, W0, rects, *args, **kwargs):  # the original weights fix every super-step
        for rc in rects:
            tables[id(rc)] = _max_ranges(W0[rc.r0:rc.r1, rc.c0:rc.c1], rc.group_size,
                                         super_cols, headroom)
        try:
            return run0(self, W0, rects, *args, **kwargs)
        finally:
            for rc in rects:
                tables.pop(id(rc), None)

    def set_params(ev, values, a, s_out, z_out, col_weight=None):
        set0(ev, values, a, s_out, z_out, col_weight)
        if ev.all16:
            return
        rc = ev.rect
        rows = slice(ev.ra + a - rc.r0, ev.rb + a - rc.r0)
        max_range = tables[id(rc)][rows, (ev.gi * rc.group_size) // super_cols]
        lo = values.to(torch.float64).amin(-1).clamp(max=0.0)
        s_q, z = _double_quantize(rc.scale[rows, ev.gi], lo, ev.maxq.clamp(min=1), max_range,
                                  levels, counter)
        s_q = torch.where(ev.is16, rc.scale[rows, ev.gi], s_q)
        z = torch.where(ev.is16, rc.zero[rows, ev.gi], z)
        rc.scale[rows, ev.gi] = s_q
        rc.zero[rows, ev.gi] = z
        s_out.copy_(s_q)
        z_out.copy_(z)

    def rtn(w, bits, group_size):
        x = check_weight(w).detach().to(torch.float64)
        maxq = (1 << bits) - 1
        ranges = _max_ranges(x, group_size, super_cols)  # no updates: no headroom needed
        scales, zeros, codes = [], [], []
        for g0 in range(0, x.shape[1], group_size):
            grp = x[:, g0:g0 + group_size]
            s, _ = grid_mod.minmax_params(grp.unsqueeze(1), maxq)
            s_q, z = _double_quantize(s[:, 0], grp.amin(-1).clamp(max=0.0), maxq,
                                      ranges[:, g0 // super_cols], levels, counter)
            scales.append(s_q)
            zeros.append(z)
            codes.append(_codes(grp, s_q.unsqueeze(-1), z.unsqueeze(-1), maxq))
        return QuantizedTensor(torch.cat(codes, 1).to(torch.uint8), torch.stack(scales, 1),
                               torch.stack(zeros, 1), bits, group_size)

    patched = [(gptq_mod.GPTQ, "_run", run),
               (gptq_mod.GPTQ, "_set_params", staticmethod(set_params))]
    for name, mod in list(sys.modules.items()):  # every module that imported rtn_quantize
        if name.startswith("bitsack") and getattr(mod, "rtn_quantize", None) is rtn0:
            patched.append((mod, "rtn_quantize", rtn))
    saved = [(obj, attr, vars(obj)[attr]) for obj, attr, _ in patched]
    try:
        for obj, attr, new in patched:
            setattr(obj, attr, new)
        yield counter
    finally:
        for obj, attr, old in saved:
            setattr(obj, attr, old)


# ------------------------------------------------------------------------------------------
# Bytes of each storage, counted from the saved model's segments
# ------------------------------------------------------------------------------------------


def storage_bytes(model_dir: Path, scale_bits: int | None, super_cols: int) -> dict[str, Any]:
    """Bytes of the packed weights of a saved model under each storage of the group parameters:
    ``fp16`` (fp16 scale and zero: the packed format up to schema v1), ``intzero`` (fp16 scale,
    ``bits``-bit zero: the packed format since v2; equals the run's packed bytes) and, with
    ``scale_bits``, ``dq``. Codes and fp16 segments are the same in every storage."""
    from bitsack.checkpoint import load_compressed
    from bitsack.kernels.formats import num_groups, packed_nbytes, words_per_row
    from bitsack.kernels.packed import _SegmentStore

    model = load_compressed(model_dir).model
    fp16 = intzero = dq = 0
    groups = weights = 0
    seen = set()  # a tied embedding and lm_head share their segments: count them once
    for module in model.modules():
        if not isinstance(module, _SegmentStore):
            continue
        for seg in module.segments:
            data = seg.weight if seg.qdata is None else seg.qdata
            if data.data_ptr() in seen:
                continue
            seen.add(data.data_ptr())
            rows, cols = seg.shape
            weights += rows * cols
            intzero += packed_nbytes(rows, cols, seg.bits, seg.group_size)
            if seg.bits == 16:
                fp16 += 2 * rows * cols
                dq += 2 * rows * cols
                continue
            ng = num_groups(cols, seg.group_size)
            groups += rows * ng
            code_bits = rows * words_per_row(cols, seg.bits) * 32
            fp16 += code_bits // 8 + rows * ng * 4
            if scale_bits is not None:
                supers = rows * num_groups(cols, super_cols)
                dq += math.ceil((code_bits + rows * ng * (scale_bits + seg.bits)
                                 + supers * 16) / 8)
    out = {"weights": weights, "groups": groups, "fp16": fp16, "intzero": intzero}
    if scale_bits is not None:
        out["dq"] = dq
    return out


def run_one(config: str, seed: int, args, noise, e2e) -> dict[str, Any]:
    """One uniform GPTQ run of ``config`` (``b3g32`` or ``b3g32:dq6``) from draw ``seed``:
    ``noise`` and ``e2e`` are bench/gptq_noise.py (its ``uniform_run``) and bench/e2e.py."""
    import bitsack.apply  # noqa: F401 — loaded before the patch, so it is patched
    import bitsack.kernels.packed  # noqa: F401
    import bitsack.kernels.quantizers  # noqa: F401
    from bitsack.io import write_json

    option, scale_bits = parse_config(config)
    mach = e2e.machine()
    tag = f"{config.replace(':', '-')}_super{args.super}_h{args.headroom:g}_seed{seed}_" \
        + "".join(ch if ch.isalnum() else "-" for ch in mach["platform"])
    path = Path(args.results) / "param_storage" / f"{tag}.json"
    if path.is_file():
        print(f"{tag}: cached", file=sys.stderr)
        return json.loads(path.read_text())
    out = Path(args.runs) / tag
    t = time.time()
    patch = contextlib.nullcontext(None) if scale_bits is None else \
        double_quantized_scales(scale_bits, args.super, args.headroom)
    with patch as counter:
        summary, c4 = noise.uniform_run(option, seed, out, args, e2e, tag)
    nbytes = storage_bytes(out / "model", scale_bits, args.super)
    if nbytes["intzero"] != summary.packed_bytes:
        raise SystemExit(f"{tag}: counted {nbytes['intzero']} packed bytes, the run reports "
                         f"{summary.packed_bytes}: the byte count is wrong")
    result = {"config": config, "option": option, "scale_bits": scale_bits,
              "super_cols": args.super, "headroom": args.headroom, "seed": seed,
              "wikitext2": summary.ppl_after, "c4": c4, "bytes": nbytes,
              "clipped": None if counter is None else [counter.clipped, counter.groups],
              "eval_windows": args.eval_windows, "compress_nsamples": args.compress_nsamples,
              "summary": asdict(summary), "wall_s": time.time() - t, "machine": mach}
    write_json(path, result)
    return result


def report(results: Path) -> Path:
    """``param_storage.md``: every run with its bits/weight under each storage."""
    from bitsack.io import atomic_write

    runs = [json.loads(f.read_text()) for f in sorted((results / "param_storage").glob("*.json"))]
    runs.sort(key=lambda r: (r["machine"]["platform"], r["seed"], r["option"],
                             r["scale_bits"] or 0))
    L = ["# What the storage of the group parameters costs", "",
         "Uniform GPTQ models of SmolLM2-135M (embedded default; `bitsack run --method uniform`, "
         "C4 calibration, the e2e protocol: first 16 windows of 2048 tokens of WikiText-2 and "
         "C4). Bits per weight = bytes × 8 / weights of the packed matrices (the tied embedding "
         "included), under three storages of a group's parameters: **fp16** scale + fp16 zero "
         "(bitsack's packed format up to schema v1), **int zero** (fp16 scale + a `bits`-bit "
         "zero: the same model, lossless; the packed format since v2), **dq** (an S-bit "
         "scale times an fp16 step per super-block of columns + a `bits`-bit zero: "
         "*emulated*, the model quantized on that grid). "
         "See the docstring of `bench/param_storage.py`.", "",
         "Commands: `python bench/param_storage.py --configs b3g32:dq6,b3g32,b3g16:dq6,"
         "b3g64:dq6 --seed 3`; `… --configs b3g32:dq6 --headroom 1.2 --seed 3`; "
         "`… --configs b4g64:dq6,b3g32:dq4,b3g64 --seed 3`; `… --configs b2g32:dq6,b2g16:dq6 "
         "--seed 3`; `… --configs b3g32:dq6,b3g64 --seed 0`; "
         "`… --configs b3g16:dq6,b3g32 --seed 0`; this table: `… --report`. "
         "Each run's JSON holds its settings, machine (commit included) and wall time.", "",
         "| machine | seed | option | scales | WikiText-2 | C4 | bits/weight fp16 | int zero "
         "| dq | groups at the top step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        b = r["bytes"]
        bpw = {k: f"{b[k] * 8 / b['weights']:.3f}" for k in ("fp16", "intzero", "dq") if k in b}
        scales = "fp16" if r["scale_bits"] is None else \
            f"{r['scale_bits']}-bit × fp16 per {r['super_cols']}" \
            + (f", headroom {r['headroom']:g}" if r.get("headroom", 1.0) != 1.0 else "")
        clip = "—" if r["clipped"] is None else \
            f"{r['clipped'][0]} / {r['clipped'][1]} ({r['clipped'][0] / r['clipped'][1]:.2%})"
        L.append(f"| {r['machine']['platform']} | {r['seed']} | {r['option']} | {scales} | "
                 f"{r['wikitext2']:.2f} | {r['c4']:.2f} | "
                 f"{bpw['fp16'] if r['scale_bits'] is None else '—'} | "
                 f"{bpw['intzero'] if r['scale_bits'] is None else '—'} | "
                 f"{bpw.get('dq', '—')} | {clip} |")
    png = plot(runs, results / "param_storage.png")
    if png is not None:
        L += ["", f"![WikiText-2 perplexity vs bits per weight]({png.name})"]
    path = results / "param_storage.md"
    old = path.read_text() if path.is_file() else ""
    keep = old[old.index("<!-- findings -->"):] if "<!-- findings -->" in old else \
        "<!-- findings -->\n"
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L) + "\n\n" + keep)
    return path


def plot(runs: list[dict[str, Any]], path: Path) -> Path | None:
    """WikiText-2 vs bits/weight: each fp16-parameter run at its fp16 and integer-zero bytes
    (the same model), each double-quantized run at its bytes; one line per bit-width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in runs if r.get("headroom", 1.0) == 1.0 and r["wikitext2"] < 150]
    left_out = len([r for r in runs if r.get("headroom", 1.0) == 1.0]) - len(shown)
    runs = shown
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = (("fp16", None, "fp16 scale + fp16 zero (format v1)", "o-"),
              ("intzero", None, "fp16 scale + integer zero (format v2)", "s--"),
              ("dq", 6, "6-bit scale × fp16 step + integer zero", "*-"),
              ("dq", 4, "4-bit scale × fp16 step + integer zero", "v:"))
    for key, sbits, label, style in series:
        for bits in sorted({int(r["option"][1]) for r in runs}):
            pts = sorted((r["bytes"][key] * 8 / r["bytes"]["weights"], r["wikitext2"],
                          r["option"]) for r in runs
                         if int(r["option"][1]) == bits and key in r["bytes"]
                         and r["scale_bits"] == sbits)
            if not pts:
                continue
            xs, ys, names = zip(*pts, strict=True)
            ax.plot(xs, ys, style, markersize=9, label=f"{bits}-bit: {label}")
            for x, y, n in pts:
                ax.annotate(n[2:], (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (packed matrices, parameters included)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("SmolLM2-135M, uniform GPTQ: the storage of group parameters"
                 + (f"\n({left_out} runs above 150 in the table only)" if left_out else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="b3g32:dq6,b3g32,b3g16:dq6",
                   help="options, each with ':dq<S>' for S-bit double-quantized scales")
    p.add_argument("--seed", type=int, default=0, help="the calibration draw")
    p.add_argument("--super", type=int, default=256, help="columns per fp16 step (dq)")
    p.add_argument("--headroom", type=float, default=1.0,
                   help="dq: the fp16 step covers this × the largest original group range "
                        "(1: groups GPTQ widened beyond it are clipped; on random layers "
                        "clipping a few groups cost less than a coarser step)")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--compress-nsamples", type=int, default=32)
    p.add_argument("--model", default="default")
    p.add_argument("--runs", default=str(ROOT / "runs" / "param_storage"))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--report", action="store_true", help="only rebuild the report")
    args = p.parse_args(argv)
    if not args.report:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        for c in configs:
            parse_config(c)
        noise = _gptq_noise()
        e2e = noise._e2e()
        for c in configs:
            run_one(c, args.seed, args, noise, e2e)
    print(report(Path(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
