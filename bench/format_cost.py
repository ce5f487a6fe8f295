"""The quality cost of one format per matrix (issue #9, item 2): free mixing (``bitsack``)
against ``compressed-tensors`` and ``gguf`` at equal bytes — a thin driver over
``bitsack.pipeline.run``.

    python bench/format_cost.py                              # the grid below
    python bench/format_cost.py --methods uniform --budgets 4.5
    python bench/format_cost.py --report                     # rebuild format_cost.md only

Cells: ``<method>:<format>@<budget>``, method ∈ {uniform, oneshot, search}, format ∈
{bitsack, compressed-tensors, gguf}, budget in bits per original weight of the planned units,
*counted in the target format's bytes* (``memory_bytes`` of ``--format``: the export's tensor
bytes; bitsack's own packed bytes for ``bitsack``). Each cell is one ``bitsack run --format F``
into ``--runs/<cell>`` (resumable; one-shot cells of a group size share one profile, copied
into each run directory with its stage record: the profile is format-free, ``run`` retargets
it); results go to ``bench/results/format_cost/<cell>.json`` keyed by the hash of the cell's
configuration (a cell with the same key is not run again), the table to
``bench/results/format_cost.md`` with the command line and machine facts.

Protocol (defaults): SmolLM2-135M (the embedded default); planned units = head groups and MLP
blocks (``--units heads,mlp``; the tied embedding stays fp16 outside the budget in every cell:
compressed-tensors can only store it fp16, which is 3.4 bits per weight of this model's
budget on its own, so with the embedding planned no compressed-tensors plan fits 3.5 or 4.5);
group size 64 for ``bitsack`` and ``compressed-tensors`` and 32 for ``gguf`` (every ggml block
of 32 has its own scale, so finer groups are free there); one-shot: fisher profile, GPTQ
perturbations, ``--profile-nsamples`` × 256 C4 tokens; GPTQ apply with
``--compress-nsamples`` × 512 C4 tokens; WikiText-2 perplexity on the first
``--eval-windows`` windows of 2048 tokens. With ``--export`` (default) every compressed-tensors
and gguf cell is exported and its unit tensors' bytes compared to the plan's certificate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCHEMA = "bitsack.bench.format_cost/v1"
FORMATS = ("bitsack", "compressed-tensors", "gguf")
METHODS = ("uniform", "oneshot", "search")
GROUP = {"bitsack": 64, "compressed-tensors": 64, "gguf": 32}


def cells_of(args) -> list[str]:
    return [f"{m}:{f}{'' if g == 'minmax' else '+' + g}@{b}" for b in args.budgets
            for m in args.methods for f in args.formats for g in args.grids]


def cell_config(cell: str, args) -> dict[str, Any]:
    """The ``RunConfig`` fields of a cell (JSON-able; hashed into the cell's record). A cell
    ``method:format+grid/S/mN@budget`` runs on that grid with S-bit scale codes (``/S`` left
    out: fp16 scales) and MLP blocks of N channels (``/mN`` left out: the default 128), and
    with ``/noprune`` no unit pruned;
    without ``+…`` on the pinned min-max grid with fp16 scales."""
    method_fmt, _, budget = cell.partition("@")
    method, _, fmt_grid = method_fmt.partition(":")
    fmt, _, grid_spec = fmt_grid.partition("+")
    cfg = {"model": args.model, "method": method, "format": fmt, "avg_bits": float(budget),
           "units": list(args.units), "group_size": GROUP[fmt], "calib": "c4",
           "eval": "wikitext2", "eval_windows": args.eval_windows,
           "profile_nsamples": args.profile_nsamples, "profile_quantizer":
           args.profile_quantizer, "compress_nsamples": args.compress_nsamples,
           "search_budget": args.search_budget, "search_start": args.search_start, "seed": 0}
    if grid_spec:  # (only then: the keys of the pinned cells stay as they were)
        grid, *rest = grid_spec.split("/")
        codes = [int(x) for x in rest if x.isdigit()]
        cfg.update(grid=grid, scale_bits=codes[0] if codes else None)
        mlp = [int(x[1:]) for x in rest if x.startswith("m")]
        if mlp:
            cfg["mlp_group"] = mlp[0]
        if "noprune" in rest:
            cfg["prune"] = False
    return cfg


def _name(cell: str) -> str:
    return cell.replace(":", "-").replace("@", "_").replace("/", "-")


def _seed_run_dir(run_dir: Path, runs: Path, cfg: dict[str, Any]) -> None:
    """Copy the base evaluation and an earlier cell's profile of the same group size into a
    new run directory (the stage records decide whether they are reused)."""
    for f in ("eval_base.json", "eval_base.stage.json"):
        src = runs / "base" / f
        if src.is_file() and not (run_dir / f).is_file():
            shutil.copy(src, run_dir / f)
    if (run_dir / "profile.stage.json").is_file():
        return
    for other in sorted(runs.iterdir()):
        rec = other / "profile.stage.json"
        if other == run_dir or not rec.is_file():
            continue
        inputs = json.loads(rec.read_text()).get("inputs", {})
        if inputs.get("group_size") == cfg["group_size"] and \
                inputs.get("units") == cfg["units"] and \
                inputs.get("mlp_group", 128) == cfg.get("mlp_group", 128):
            shutil.copytree(other / "profile", run_dir / "profile", dirs_exist_ok=True)
            shutil.copy(rec, run_dir / "profile.stage.json")
            return


def run_cell(cell: str, args) -> dict[str, Any]:
    """One ``bitsack run`` (and, with ``--export``, the export of its model); cached."""
    from dataclasses import asdict

    from bitsack.errors import ValidationError
    from bitsack.io import json_digest, write_json

    cfg_fields = cell_config(cell, args)
    key = json_digest({"schema": SCHEMA, "cell": cell, "config": cfg_fields,
                       "export": args.export})
    path = Path(args.results) / "format_cost" / f"{_name(cell)}.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            print(f"{cell}: cached", file=sys.stderr)
            return old
    from bitsack.pipeline import RunConfig, run

    runs = Path(args.runs)
    run_dir = runs / _name(cell)
    run_dir.mkdir(parents=True, exist_ok=True)
    _seed_run_dir(run_dir, runs, cfg_fields)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg_fields.items()}
    t = time.time()
    result: dict[str, Any] = {"schema": SCHEMA, "key": key, "cell": cell,
                              "config": cfg_fields, "command": _command(args.argv),
                              "machine": machine()}
    try:
        pinned = {"scale_bits": None, "grid": "minmax"}  # the defaults the cells ran under
        summary = run(RunConfig(out=str(run_dir), **{**pinned, **fields}),
                      progress=lambda m: print(f"[{cell} {time.time() - t:6.0f} s] {m}",
                                               file=sys.stderr, flush=True))
    except ValidationError as exc:  # no plan of this format meets the budget: a result too
        if exc.path not in ("budget", "menu") and not exc.path.startswith("units."):
            raise  # anything else is a fault, not a result
        result.update({"status": "no plan", "reason": str(exc), "wall_s": time.time() - t})
        write_json(path, result)
        return result
    cert = summary.certificate
    usage = cert.get("usage", {}).get("memory_bytes")
    limit = cert.get("limits", {}).get("memory_bytes")
    result.update({
        "status": summary.status, "wikitext2": summary.ppl_after,
        "base": {"wikitext2": summary.ppl_before}, "format_bytes": usage,
        # the limit is avg_bits · (original weights of the planned units) / 8
        "bits_per_weight": cfg_fields["avg_bits"] * usage / limit if usage and limit else None,
        "packed_bytes": summary.packed_bytes, "plan_counts": summary.plan_counts,
        "pruned": sum(v.get("prune", 0) for v in summary.plan_counts.values()),
        "summary": asdict(summary), "wall_s": time.time() - t})
    if args.export and cfg_fields["format"] != "bitsack":
        result["export"] = export_check(run_dir, cfg_fields["format"], usage,
                                        args.tokenizer_gguf)
    write_json(path, result)
    return result


def export_check(run_dir: Path, fmt: str, usage: float | None,
                 tokenizer_gguf: str | None = None) -> dict[str, Any]:
    """Export the cell's model; the bytes of the units' tensors against the certificate."""
    from bitsack.export import export_model

    t = time.time()
    out = run_dir / f"export-{fmt}"
    kw = {"tokenizer_gguf": tokenizer_gguf} if fmt == "gguf" and tokenizer_gguf else {}
    res = export_model(run_dir / "model", out, format=fmt, force=True, **kw)
    # the planned units' matrices are the packed modules of the compressed folder
    packed = json.loads((run_dir / "model" / "bitsack.json").read_text())["packed"]
    # as the memory model prices them: compressed-tensors' 16-byte weight_shape of each module
    # is left out (solver.costs.memory; cells before 2026-12-05 priced and counted it)
    unit_bytes = sum(tns.nbytes for tns in res.tensors
                     if tns.source in packed and not tns.name.endswith(".weight_shape"))
    return {"unit_tensor_bytes": unit_bytes, "certificate_bytes": usage,
            "equal": usage is not None and unit_bytes == usage, "file_bytes": res.total_bytes,
            "types": res.type_counts(), "architecture": res.layout.get("architecture"),
            "seconds": time.time() - t}


def base_eval(args) -> None:
    """Evaluate the base model once; every run directory gets its record."""
    from bitsack.pipeline import RunConfig, evaluate_base

    base_dir = Path(args.runs) / "base"
    if (base_dir / "eval_base.json").is_file():
        return
    evaluate_base(RunConfig(model=args.model, out=str(base_dir), avg_bits=16.0,
                            eval_windows=args.eval_windows), print)


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "load": [round(x, 2) for x in
                                                         os.getloadavg()]}


# ---- report -------------------------------------------------------------------------------
def load_results(results: Path) -> dict[str, dict]:
    out = {}
    for f in sorted((results / "format_cost").glob("*.json")):
        d = json.loads(f.read_text())
        if d.get("schema") == SCHEMA:
            out[d["cell"]] = d
    return out


def write_report(args, argv: list[str]) -> Path:
    from bitsack.io import atomic_write

    results = Path(args.results)
    res = load_results(results)
    base = next((r["base"]["wikitext2"] for r in res.values() if r.get("base")), None)
    machines = {json.dumps({k: v for k, v in r["machine"].items() if k != "load"},
                           sort_keys=True) for r in res.values()}
    loads = [r["machine"]["load"][0] for r in res.values() if r.get("machine")]
    first = next(iter(res.values()), None)
    units = first["config"]["units"] if first else list(args.units)
    windows = first["config"]["eval_windows"] if first else args.eval_windows
    L = ["# The quality cost of one format per matrix",
         "",
         "Free mixing inside a matrix (`--format bitsack`) against the per-matrix formats the "
         "exports write (`compressed-tensors`, `gguf`), at equal bytes **in each target "
         "format** (a budget of B bits per weight = B/8 bytes per original weight of the "
         "planned units, in that format's tensor bytes). SmolLM2-135M (embedded default; its "
         "weights come from a Q4_1 GGUF, so 4-bit g32 is near-lossless by construction). "
         "Planned units: " + ", ".join(units) + ("" if "embed" in units else
                                                  " (the tied embedding stays fp16, outside "
                                                  "the budget)") +
         f". WikiText-2 perplexity, first {windows} windows of 2048 "
         f"tokens (GPTQ protocol); base {_f(base)}. Group size 64 (bitsack, "
         "compressed-tensors), 32 (gguf: free there).",
         "",
         ("Commands that produced the cells (each cell's JSON records its own): "
          + ", ".join(f"`{c}`" for c in sorted({r.get("command", "?") for r in res.values()}))
          + f"; this table: `{_command(argv)}`." if res else
          "No cells yet: `python bench/format_cost.py` runs the grid (about an hour on an idle "
          "2-core machine; `--methods uniform` alone about 15 minutes)."),
         "",
         "Machine: " + ("; ".join(sorted(machines)) + (
             f"; load average during the cells {min(loads):.1f}–{max(loads):.1f}"
             if loads else "") if res else "—"),
         "",
         "| budget | method | format | bits/weight (format bytes) | WikiText-2 | × free | "
         "plan | pruned | export = budget bytes |",
         "|---|---|---|---|---|---|---|---|---|"]
    for cell in sorted(res, key=_order):
        r = res[cell]
        cfg = r["config"]
        free = res.get(f"{cfg['method']}:bitsack@{_b(cfg['avg_bits'])}")
        if r.get("status") == "no plan":
            L.append(f"| {_b(cfg['avg_bits'])} | {cfg['method']} | {_fmt(cfg)} | — | — | "
                     f"— | no plan: {_short(r['reason'])} | — | — |")
            continue
        ratio = (f"{r['wikitext2'] / free['wikitext2']:.3f}"
                 if free and free.get("wikitext2") and r.get("wikitext2") else "—")
        plan = "; ".join(f"{k}: " + ", ".join(f"{o}×{n}" for o, n in sorted(v.items()))
                         for k, v in r["plan_counts"].items())
        exp = r.get("export")
        exp_s = "—" if not exp else (f"yes ({exp['unit_tensor_bytes']:,} B, "
                                     f"{exp['architecture']})" if exp["equal"] else
                                     f"NO: {exp['unit_tensor_bytes']:,} vs "
                                     f"{exp['certificate_bytes']:,}")
        L.append(f"| {_b(cfg['avg_bits'])} | {cfg['method']} | {_fmt(cfg)} | "
                 f"{_f(r['bits_per_weight'])} | {_f(r['wikitext2'])} | {ratio} | {plan} | "
                 f"{r['pruned']} | {exp_s} |")
    path = results / "format_cost.md"
    findings = _findings(path)
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(L) + "\n" + findings)
    return path


def _command(argv: list[str]) -> str:
    return "python bench/format_cost.py" + (" " + shlex.join(argv) if argv else "")


def _order(cell: str) -> tuple:
    mf, _, b = cell.partition("@")
    m, _, fg = mf.partition(":")
    f, _, g = fg.partition("+")
    return (float(b), METHODS.index(m) if m in METHODS else 9,
            FORMATS.index(f) if f in FORMATS else 9, g)


def _fmt(cfg: dict[str, Any]) -> str:
    """The cell's format and, where it is not the pinned min-max with fp16 scales, grid."""
    if "grid" not in cfg:
        return cfg["format"]
    codes = f", {cfg['scale_bits']}-bit scale codes" if cfg.get("scale_bits") else ""
    mlp = f", MLP blocks of {cfg['mlp_group']}" if cfg.get("mlp_group") else ""
    prune = ", no pruning" if cfg.get("prune") is False else ""
    return f"{cfg['format']} ({cfg['grid']}{codes}{mlp}{prune})"


def _short(text: str, n: int = 120) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def _b(x: float) -> str:
    return f"{x:g}"


def _findings(path: Path) -> str:
    """Hand-written findings below the marker survive a rebuild."""
    marker = "<!-- findings -->"
    if path.is_file() and marker in path.read_text():
        return "\n" + marker + path.read_text().split(marker, 1)[1]
    return "\n" + marker + "\n"


def _f(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", type=_list(METHODS), default=("uniform", "oneshot"),
                   help="uniform, oneshot, search (default uniform,oneshot: search cells take "
                   "about an hour each on 2 cores)")
    p.add_argument("--formats", type=_list(FORMATS), default=FORMATS)
    p.add_argument("--grids", type=_list(None), default=("minmax",),
                   help="grids as GRID[/S][/mN] (S-bit scale codes, default fp16 scales; MLP "
                   "blocks of N channels, default 128), e.g. sym-hmse/4/m256; minmax "
                   "(default) is the pinned grid the first cells ran on")
    p.add_argument("--budgets", type=_list(None), default=("3.5", "4.5"),
                   help="bits per weight (default 3.5,4.5)")
    p.add_argument("--units", type=_list(("heads", "mlp", "embed")), default=("heads", "mlp"))
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--profile-nsamples", type=int, default=16)
    p.add_argument("--profile-quantizer", default=None, choices=["gptq", "rtn"],
                   help="one-shot profile perturbations (default: the apply quantizer, gptq)")
    p.add_argument("--compress-nsamples", type=int, default=16)
    p.add_argument("--search-budget", type=float, default=3000.0)
    p.add_argument("--search-start", default="both", choices=["both", "uniform"])
    p.add_argument("--no-export", dest="export", action="store_false",
                   help="skip exporting the per-matrix cells (and the bytes check)")
    p.add_argument("--tokenizer-gguf", default=None, help="GGUF whose tokenizer the gguf "
                   "exports copy (default: the model's own GGUF)")
    p.add_argument("--report", action="store_true", help="only rebuild format_cost.md")
    p.add_argument("--runs", default=str(ROOT / "runs" / "format_cost"))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--model", default="default")
    args = p.parse_args(argv)
    args.argv = argv
    if not args.report:
        base_eval(args)
        for cell in cells_of(args):
            run_cell(cell, args)
    print(write_report(args, argv))
    return 0


def _list(valid):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if valid is not None and x not in valid]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}; valid: a comma-separated subset of "
                                             f"{', '.join(valid or ('numbers',))}")
        return items

    return parse


if __name__ == "__main__":
    sys.exit(main())
