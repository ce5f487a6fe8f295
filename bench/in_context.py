"""How the KL answers one matrix's precision, in context and alone.

Why the search measures moves in context rather than trusting weight error: this takes the
variant store of a finished search run (``runs/e2e/search_3.5/store``, every matrix of
SmolLM2-135M GPTQ-quantized at every menu choice along a uniform b3g64 walk) and measures, on
that search's own ``select`` split (48 × 256 C4 tokens, seed 0), the paired change of mean
per-token KL(base ‖ model) when

- A. one layer's attention or MLP group takes another variant, in the uniform b3g64 model;
- B. one attention matrix of a layer takes fp16 or b4g64, in the uniform b3g64 model;
- C. the same attention variants go into the otherwise *unquantized* model;

next to each variant's weight error Σ(ŵ − w)² and output error Σ‖(ŵ − w)x‖² / n on the layer's
inputs in the uniform model. Writes ``bench/results/in_context.md``.

    BITSACK_DATA=../shared/data python bench/in_context.py --run-dir runs/e2e/search_3.5
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ("b3g128", "b3g32", "b4g128", "b4g64")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default=str(ROOT / "runs" / "e2e" / "search_3.5"),
                   help="a search run whose store/ holds the variants")
    p.add_argument("--layers", default="12,20", help="layers measured (comma-separated)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "in_context.md"))
    args = p.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")]
    torch.manual_seed(0)
    from bitsack.data import calibration_splits
    from bitsack.models import model_units
    from bitsack.models.loading import load_model
    from bitsack.plan import parse_choice
    from bitsack.search.meter import KLMeter, Paired
    from bitsack.search.store import Stitcher, VariantStore, write_weight

    t0 = time.time()
    lm = load_model("default", progress=False)
    model = lm.model
    units = model_units(model, mlp_group=128)
    store = VariantStore.open(Path(args.run_dir) / "store", model, units)
    # the search's splits, drawn exactly as `bitsack run` draws them (sizes and seed)
    splits = calibration_splits("c4", lm.tokenizer, {"screen": (16, 256), "select": (48, 256),
                                                     "holdout": (16, 256)}, seed=0)
    meter = KLMeter(model, {"select": splits["select"]}, batch_size=4)
    stitch = Stitcher(model, units, store)
    choice = lambda oid: parse_choice(oid, 64, "option")  # noqa: E731
    uniform = {u.id: store.incumbent for u in units}
    rows: list[tuple[str, str, str, str, float, float]] = []

    def matrices(layer: int, mats, oid: str, context: str, base) -> None:
        names = [f"model.layers.{layer}.self_attn.{m}" for m in mats]
        saved = {n: model.get_submodule(n).weight.data.clone() for n in names}
        for n in names:
            write_weight(model.get_submodule(n), store.dense(n, choice(oid)))
        d = Paired.of(meter.kl("select", layer), base)
        for n in names:
            model.get_submodule(n).weight.data.copy_(saved[n])
        what = "attention" if len(mats) == len(ATTN) else "+".join(mats)
        rows.append((context, f"L{layer}", what, oid, d.mean, d.se))
        print(f"  {context} L{layer} {what} -> {oid}: {d.mean:+.5f} ± {d.se:.5f}", flush=True)

    # C. the unquantized model
    base = meter.trace("select")
    print(f"[{time.time() - t0:.0f} s] unquantized model", flush=True)
    for layer, mats in [(layers[-1], ("v_proj",))] + [(li, ATTN) for li in layers]:
        for oid in ("b3g64", *OPTIONS):
            matrices(layer, mats, oid, "unquantized", base)
    # A and B: the uniform b3g64 model
    stitch.write(uniform)
    base = meter.trace("select")
    uniform_kl = float(base.mean())
    print(f"[{time.time() - t0:.0f} s] uniform {store.incumbent.option_id}: select KL "
          f"{uniform_kl:.5f}", flush=True)
    for layer in layers:
        for kind in ("head_group", "mlp_group"):
            ids = [u.id for u in units if u.layer == layer and u.kind == kind]
            for oid in OPTIONS:
                start = stitch.write({u: choice(oid) for u in ids})
                d = Paired.of(meter.kl("select", start), base)
                stitch.write({u: uniform[u] for u in ids})
                what = "attention (group)" if kind == "head_group" else "MLP (group)"
                rows.append(("uniform b3g64", f"L{layer}", what, oid, d.mean, d.se))
                print(f"  L{layer} {what} -> {oid}: {d.mean:+.5f} ± {d.se:.5f}", flush=True)
    for mat in ATTN:
        for oid in ("b16", "b4g64"):
            matrices(layers[-1], (mat,), oid, "uniform b3g64", base)
    errors = _errors(model, store, meter, layers[-1], choice)
    _write(Path(args.out), rows, errors, uniform_kl, args, time.time() - t0)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _errors(model, store, meter, layer: int, choice) -> list[tuple[str, str, float, float]]:
    """Weight and output error of every attention variant of ``layer`` (inputs: the select
    split through the uniform model)."""
    xs: list[torch.Tensor] = []
    mod = model.get_submodule(f"model.layers.{layer}.self_attn.q_proj")
    hook = mod.register_forward_pre_hook(
        lambda m, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        meter.kl("select", layer)
    finally:
        hook.remove()
    x = torch.cat(xs).double()
    h = x.T @ x / x.shape[0]
    out = []
    for mat in ATTN[:3]:  # q, k, v share their inputs
        name = f"model.layers.{layer}.self_attn.{mat}"
        w = store.dense(name, choice("b16")).double()
        for oid in ("b3g128", "b3g64", *OPTIONS[1:]):
            e = store.dense(name, choice(oid)).double() - w
            out.append((mat, oid, float(e.square().sum()),
                        float(torch.einsum("ij,jk,ik->", e, h, e))))
    return out


def _write(path: Path, rows, errors, uniform_kl: float, args, seconds: float) -> None:
    lines = [
        "# The KL's answer to one matrix's precision, in context and alone",
        "",
        f"Command: `python bench/in_context.py --run-dir {args.run_dir} --layers "
        f"{args.layers}`  ",
        f"Machine: {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__} on {torch.get_num_threads()} threads; {seconds / 60:.1f} min.  ",
        "Variants: the store of the e2e `search@3.5` run (SmolLM2-135M, GPTQ along a uniform "
        "b3g64 walk: every variant's Hessian comes from the uniform b3g64 model). KL: mean "
        "per-token KL(base ‖ model) on the search's `select` split (48 × 256 C4 tokens); Δ is "
        f"paired over its 48 sequences (± one standard error). Uniform b3g64: {uniform_kl:.5f}.",
        "",
        "| context | layer | moved | to | ΔKL | ± SE |",
        "|---|---|---|---|---:|---:|",
    ]
    lines += [f"| {c} | {lay} | {what} | {oid} | {d:+.5f} | {se:.5f} |"
              for c, lay, what, oid, d, se in rows]
    layer = args.layers.split(",")[-1]
    lines += ["", f"Errors of layer {layer}'s attention variants (output error: "
              "tr(E H Eᵀ) with H = XᵀX / n from the layer's inputs in the uniform model):", "",
              "| matrix | variant | Σ (ŵ − w)² | output error |", "|---|---|---:|---:|"]
    lines += [f"| {m} | {oid} | {fe:.1f} | {he:.3f} |" for m, oid, fe, he in errors]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
