"""A variant store: every weight matrix of a model quantized once at every option of a menu.

A plan is then *stitched* (``Stitcher``): each unit's rows or columns copied from the
variant of its choice, and measured, without running GPTQ inside the search (EvoPress keeps
such a database of compressed layers; Sieberling et al. 2025).

How the variants are made: one sequential GPTQ walk of the model on the layer engine
(``bitsack.engine``), exactly as ``bitsack.apply`` applies a *uniform* plan (the
``incumbent`` choice everywhere: true-sequential stages, Hessians from the already-quantized
layers before), except that at every matrix GPTQ also quantizes the matrix at every other menu
choice with the same Hessian. So the stored variants of the incumbent *are* the uniform
compressed model, and every other variant is what GPTQ makes of that matrix in the uniform
model's context (EvoPress' ``calibration_bitwidth``: Hessians from a model already quantized
at the target level rather than from the full-precision one).

Stitching is exact per matrix where units own rows (q/k/v head groups, gate/up channels,
embeddings: GPTQ treats rows independently) and approximate where units own columns (o_proj,
down_proj: GPTQ's error compensation crosses column ranges) and wherever the upstream layers of
a plan differ from the uniform model the Hessians came from. The search therefore re-measures
its final plan after the real sequential apply.

A store can also be walked along a *plan* (``build(..., walk=plan)``): every layer's inputs
come from the layers before it quantized as the plan chooses (its variants stitched unit by
unit), so the plan's own variants are its sequential apply (up to column units, as above) and
the other variants are what GPTQ makes of each matrix in the plan's context. The search walks
a new store along its result to continue from there (``SearchConfig.rewalks``): at 2.5–3
bits/weight on SmolLM2 the sequential apply of a searched plan measured 0.3–0.4 nats of KL
better than its stitched estimate from a uniform walk.

On disk (``root``): one safetensors file per layer (packed codes, scales, zeros of every
variant) and ``store.json`` naming what was built, so an interrupted build resumes.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsack.errors import FormatError, ValidationError
from bitsack.models import get_adapter
from bitsack.models.plumbing import dense_weight, is_conv1d, output_name, tied_pairs
from bitsack.plan import FP16, Choice, module_name
from bitsack.search.menu import Menu

STORE_SCHEMA = "bitsack.store/v1"


@dataclass(frozen=True)
class StoreConfig:
    """How variants are quantized (the same knobs as ``bitsack.apply.ApplyConfig``)."""

    quantizer: str = "gptq"
    damp: float = 0.01
    act_order: bool = True
    batch_size: int = 8
    true_sequential: bool = True
    scale_bits: int | None = None  # double-quantized scales (``bitsack.kernels.formats``)
    grid: str = "hmse"  # how groups' parameters are chosen (``bitsack.kernels.grid``)


def write_weight(mod: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite a linear's weight with ``weight`` (``[out, in]``, any float dtype)."""
    target = mod.weight
    w = weight.t() if is_conv1d(mod) else weight
    with torch.no_grad():
        target.data.copy_(w.to(dtype=target.dtype, device=target.device))


@dataclass(frozen=True)
class Piece:
    """Part of a variant: rows (``axis`` 0) or columns (1) ``start:stop`` of a matrix, as a
    ``QuantizedTensor`` (or fp16 weights for ``b16``). Column pieces are one unit's columns,
    grouped inside themselves, exactly as the packer groups a column segment."""

    axis: int
    start: int
    stop: int
    q: Any

    def dense(self) -> torch.Tensor:
        from bitsack.kernels.quantizers import QuantizedTensor

        if isinstance(self.q, QuantizedTensor):
            return self.q.dequantize(torch.float32)
        return self.q.to(torch.float32)


def quantize_choices(weight: torch.Tensor, hessian, choices: Iterable[Choice],
                     cfg: StoreConfig, col_bounds: Sequence[tuple[int, int]] | None = None
                     ) -> dict[Choice, tuple[Piece, ...]]:
    """``weight`` ([out, in] float32) quantized at each choice, as pieces. GPTQ with
    ``hessian`` (a ``Hessian``), RTN without.

    A matrix whose units own rows is one piece per choice; GPTQ treats rows independently, so
    all its choices are one GPTQ run over the choices' copies stacked along the rows (one
    Cholesky, one column loop). A matrix whose units own columns (``col_bounds``: the units'
    column ranges) is quantized per choice with one column segment per unit, so groups restart
    at unit boundaries as in the packed format.
    """
    from bitsack.kernels.quantizers import GPTQ, SegmentSpec, rtn_quantize

    rows, cols = weight.shape
    bounds = list(col_bounds) if col_bounds else None
    out: dict[Choice, tuple[Piece, ...]] = {}
    quant = []
    for c in choices:
        if c == FP16:
            out[c] = (Piece(0, 0, rows, weight.to(torch.float16)),)
        else:
            quant.append(c)
    if hessian is None or cfg.quantizer == "rtn":
        for c in quant:
            out[c] = tuple(Piece(1, a, b, rtn_quantize(weight[:, a:b], c.bits, c.group_size,
                                                       cfg.scale_bits, cfg.grid))
                           for a, b in bounds) if bounds else \
                (Piece(0, 0, rows, rtn_quantize(weight, c.bits, c.group_size, cfg.scale_bits,
                                                cfg.grid)),)
        return out
    gptq = GPTQ.from_hessian(hessian)
    opts = {"damp": cfg.damp, "act_order": cfg.act_order, "return_weight": False}
    if bounds:
        for c in quant:
            res = gptq.quantize_segments(weight, [SegmentSpec(1, a, b, c.bits, c.group_size,
                                                              cfg.scale_bits, cfg.grid)
                                                  for a, b in bounds], **opts)
            out[c] = tuple(Piece(1, a, b, q) for (a, b), q in zip(bounds, res.parts,
                                                                  strict=True))
        return out
    per_call = max(1, (1 << 24) // max(1, rows * cols))  # ≈128 MiB of float64 per copy set
    for k in range(0, len(quant), per_call):
        batch = quant[k:k + per_call]
        specs = [SegmentSpec(0, j * rows, (j + 1) * rows, c.bits, c.group_size,
                             cfg.scale_bits, cfg.grid) for j, c in enumerate(batch)]
        res = gptq.quantize_segments(weight.repeat(len(batch), 1), specs, **opts)
        for c, q in zip(batch, res.parts, strict=True):
            out[c] = (Piece(0, 0, rows, q),)
    return out


def column_bounds(units) -> dict[str, list[tuple[int, int]]]:
    """Module name -> the units' column ranges, for matrices whose units own columns."""
    out: dict[str, list[tuple[int, int]]] = {}
    for u in units:
        for s in u.slices:
            if s.dim == 1:
                out.setdefault(module_name(s.param), []).append((s.start, s.stop))
    return {k: sorted(v) for k, v in out.items()}


class VariantStore:
    """Quantized variants per (matrix, choice); see module docstring.

    Attributes:
        menu: the choices stored.
        incumbent: the uniform choice whose sequential walk made the Hessians (a plan walk:
            its most common choice).
        walk: unit id -> choice of a plan walk (None: the walk was uniform ``incumbent``).
        variants: module name -> choice -> the variant's ``Piece``s (in order).
        tied: embedding module name -> head module name, for tied weights (stored once,
            under the embedding's name).
        scale_bits: None (fp16 scales) or S: every quantized variant's scales are S-bit codes
            times an fp16 step per 256 columns (``StoreConfig.scale_bits``).
    """

    def __init__(self, menu: Menu, incumbent: Choice, root: Path | None = None,
                 walk: Mapping[str, Choice] | None = None, scale_bits: int | None = None,
                 grid: str = "minmax"):
        self.menu = menu
        self.scale_bits = scale_bits
        self.grid = grid  # how the groups' parameters were chosen (``StoreConfig.grid``)
        self.incumbent = incumbent
        self.walk = dict(walk) if walk is not None else None
        self.root = Path(root) if root is not None else None
        self.variants: dict[str, dict[Choice, tuple[Piece, ...]]] = {}
        self.tied: dict[str, str] = {}
        self._dense: OrderedDict[tuple[str, Choice], torch.Tensor] = OrderedDict()
        self._errors: dict[tuple[str, Choice], float] = {}
        self._lines: dict[tuple[str, Choice, int], torch.Tensor] = {}

    # ---- reading ----------------------------------------------------------------------
    #: dequantized variants kept for reuse (least recently used dropped first)
    DENSE_CACHE = 48

    def dense(self, name: str, choice: Choice) -> torch.Tensor:
        """The variant ``choice`` of module ``name`` dequantized, float32 ``[out, in]``
        (zeros for prune); the most recently used ones are cached."""
        key = (name, choice)
        if key in self._dense:
            self._dense.move_to_end(key)
        else:
            if choice.pruned:
                ref = self.dense(name, FP16)
                self._dense[key] = torch.zeros_like(ref)
            else:
                if choice not in self.variants.get(name, {}):
                    raise ValidationError("choice", f"{choice} of {name!r} is not in the store "
                                          f"(menu {list(self.menu.option_ids)})")
                pieces = self.variants[name][choice]
                self._dense[key] = torch.cat([p.dense() for p in pieces],
                                             dim=pieces[0].axis)
            while len(self._dense) > self.DENSE_CACHE:
                self._dense.popitem(last=False)
        return self._dense[key]

    def error(self, unit, choice: Choice) -> float:
        """``Σ (ŵ − w)²`` over the unit's slices for variant ``choice`` (w: the fp16 weights;
        prune: ŵ = 0) — how much the choice moves the unit's weights."""
        from bitsack.plan import module_name

        key = (unit.id, choice)
        if key not in self._errors:
            self._errors[key] = sum(
                float(self._line_errors(self.stored_name(module_name(s.param)), choice,
                                        s.dim)[s.start:s.stop].sum()) for s in unit.slices)
        return self._errors[key]

    def _line_errors(self, name: str, choice: Choice, dim: int) -> torch.Tensor:
        """Per row (``dim`` 0) or per column (1): Σ (ŵ − w)² of variant ``choice``, float64
        (one dequantization of the matrix serves every unit in it)."""
        key = (name, choice, dim)
        if key not in self._lines:
            diff = self.dense(name, choice).double() - self.dense(name, FP16).double()
            self._lines[key] = diff.square().sum(dim=1 - dim)
        return self._lines[key]

    def stored_name(self, name: str) -> str:
        """The module a variant of ``name`` is stored under (a tied head: its embedding)."""
        if name in self.variants:
            return name
        return next((e for e, h in self.tied.items() if h == name), name)

    def part(self, name: str, choice: Choice, dim: int, start: int, stop: int) -> Any:
        """A unit's slice of variant ``choice`` of module ``name`` as stored: a
        ``QuantizedTensor`` (fp16 tensor for ``b16``) of rows (``dim`` 0) or of the unit's own
        columns (``dim`` 1) — what ``bitsack.apply.assemble`` packs."""
        from bitsack.kernels.quantizers import QuantizedTensor

        pieces = self.variants[name][choice]
        if dim == 1:
            for p in pieces:
                if p.axis == 1 and (p.start, p.stop) == (start, stop):
                    return p.q
            if len(pieces) == 1 and pieces[0].axis == 0 and isinstance(pieces[0].q,
                                                                       torch.Tensor):
                return pieces[0].q[:, start:stop].contiguous()
            raise ValidationError("slice", f"columns {start}:{stop} of {name!r} are not a unit "
                                  "of the store")
        (p,) = pieces
        if isinstance(p.q, QuantizedTensor):
            q = p.q
            return QuantizedTensor(q.codes[start:stop].contiguous(),
                                   q.scale[start:stop].contiguous(),
                                   q.zero[start:stop].contiguous(), q.bits, q.group_size,
                                   q.scale_bits,
                                   None if q.step is None else q.step[start:stop].contiguous())
        return p.q[start:stop].contiguous()

    def nbytes(self) -> int:
        """Bytes held by the quantized variants (codes as uint8, scales, zeros, steps)."""
        total = 0
        for per in self.variants.values():
            for pieces in per.values():
                for p in pieces:
                    ts = [p.q] if isinstance(p.q, torch.Tensor) else [
                        t for t in (p.q.codes, p.q.scale, p.q.zero, p.q.step) if t is not None]
                    total += sum(t.numel() * t.element_size() for t in ts)
        return total

    # ---- building ---------------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, units, menu: Menu,
              walk: Choice | Mapping[str, Choice],
              calib_tokens: torch.Tensor | None, cfg: StoreConfig | None = None,
              root: str | os.PathLike | None = None, *, key: Any = None,
              progress: Callable[[int, int], None] | None = None) -> VariantStore:
        """Quantize every linear of ``model`` at every menu choice (see module docstring).

        ``model`` is left as the walk makes it (dense weights holding the dequantized values
        of the walk's choices), which is where a search starts.

        Args:
            model: a supported causal LM, unpruned, full precision.
            units: its units (``bitsack.models.model_units``): which matrices' units own
                columns, and where.
            menu: the choices to store.
            walk: the uniform choice of the walk (a menu choice), or a plan (unit id ->
                choice, every unit: menu choices or pruned) walked unit by unit.
            calib_tokens: GPTQ calibration tokens (None with ``cfg.quantizer == "rtn"``).
            cfg: quantizer knobs.
            root: a folder to persist the store in (per layer; resumed when ``key`` — a
                JSON-able description of every input — matches ``store.json``).
            key: what the stored files were built from.
            progress: ``(layers done, layers)`` after every layer.
        """
        from bitsack.engine import LayerEngine

        cfg = cfg or StoreConfig()
        if menu.scale_bits != cfg.scale_bits:
            raise ValidationError("menu.scale_bits", f"{menu.scale_bits}, but the store "
                                  f"quantizes with scale_bits {cfg.scale_bits}; valid: the "
                                  "same (the menu's order is priced with them)")
        plan = None if isinstance(walk, Choice) else dict(walk)
        incumbent = walk if plan is None else _walk_fallback(plan, units, menu)
        menu.index(incumbent)
        if cfg.quantizer == "gptq" and calib_tokens is None:
            raise ValidationError("calib_tokens", "None; gptq needs calibration tokens")
        store = cls(menu, incumbent, Path(root) if root is not None else None, walk=plan,
                    scale_bits=cfg.scale_bits, grid=cfg.grid)
        if store.root is not None:
            store._open(key)
        place = store._placer(model, units)
        adapter = get_adapter(model)
        choices = store.choices
        cols = column_bounds(units)
        tied = tied_pairs(model)
        store.tied = dict(tied)
        head = output_name(model)
        n_layers = len(adapter.layers())
        tick = progress or (lambda done, total: None)

        # embeddings (and projections) outside the layers, but the head: RTN first, as
        # compress does, so layer 0's calibration inputs are what the model computes
        place(store._add_outside(model, units))
        engine = None
        if cfg.quantizer == "gptq":
            engine = LayerEngine(model, calib_tokens, batch_size=cfg.batch_size)
        for i in range(n_layers):
            prefix = adapter.layer_prefix(i)
            mods = {prefix + rel: m for rel, m in adapter.linear_modules(i).items()}
            if not store._load_layer(i):
                if engine is None:
                    for name, mod in mods.items():
                        store._add(name, quantize_choices(dense_weight(mod), None, choices,
                                                          cfg, cols.get(name)))
                        place([name])
                else:
                    stages = engine.stages(mods) if cfg.true_sequential else [list(mods)]
                    for stage in stages:
                        hess = engine.hessians({n: mods[n] for n in stage})
                        for name in stage:
                            store._add(name, quantize_choices(dense_weight(mods[name]),
                                                              hess[name], choices, cfg,
                                                              cols.get(name)))
                        place(stage)
                store._save_layer(i, list(mods))
            else:
                place(list(mods))
            if engine is not None:
                engine.advance()
            tick(i + 1, n_layers + 1)
        # the head (a tied embedding is stored under the embedding's name)
        heads = {emb: hd for emb, hd in tied.items()} or ({head: head} if head else {})
        if not store._load_layer(n_layers):
            for name, head_name in heads.items():
                mod = model.get_submodule(name)
                hmod = model.get_submodule(head_name)
                hess = engine.head_hessian(hmod) if engine is not None else None
                store._add(name, quantize_choices(mod.weight.detach().float(), hess, choices,
                                                  cfg))
            store._save_layer(n_layers, list(heads))
        place(list(heads))
        tick(n_layers + 1, n_layers + 1)
        return store

    def _placer(self, model: nn.Module, units) -> Callable[[Iterable[str]], None]:
        """A function writing the walk's weights of the named modules into ``model``: the
        uniform choice's variant, then (a plan walk) each unit's slices from its own choice."""
        by_module: dict[str, list[tuple[Any, str]]] = {}
        for u in units:
            for s in u.slices:
                by_module.setdefault(module_name(s.param), []).append((s, u.id))
        stitch = Stitcher(model, units, self) if self.walk is not None else None

        def place(names: Iterable[str]) -> None:
            for name in names:
                write_weight(model.get_submodule(name), self.dense(name, self.incumbent))
                if stitch is None:
                    continue
                for s, uid in by_module.get(name, ()):
                    if self.walk[uid] != self.incumbent:
                        stitch.write_slice(s, self.walk[uid])

        return place

    @classmethod
    def open(cls, root: str | os.PathLike, model: nn.Module, units) -> VariantStore:
        """A store ``build`` persisted under ``root``, read back whole for ``model`` (its
        unquantized weights) without a calibration walk — to inspect or re-measure variants
        (``bench/in_context.py``). The few matrices outside the layers that ``build`` does not
        persist (an untied input embedding: RTN) are quantized again from ``model``.

        Raises:
            FormatError: no ``store.json`` under ``root``, or a layer it needs is missing.
        """
        from bitsack.plan import parse_choice

        root = Path(root)
        try:
            manifest = json.loads((root / "store.json").read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(f"{root}: not a variant store ({exc})") from None
        menu = Menu.parse(manifest["menu"], scale_bits=manifest.get("scale_bits"))
        walk = {u: parse_choice(o, 64, "store.walk")
                for u, o in manifest["walk"].items()} if "walk" in manifest else None
        store = cls(menu, parse_choice(manifest["incumbent"], 64, "store.incumbent"), root,
                    walk=walk, scale_bits=manifest.get("scale_bits"),
                    grid=manifest.get("grid", "minmax"))  # absent: built before the MSE grid
        store.tied = dict(tied_pairs(model))
        n_layers = len(get_adapter(model).layers())
        for i in range(n_layers + 1):
            if not store._load_layer(i):
                raise FormatError(f"{root}: layer {i} of {n_layers} (+ head) is missing; "
                                  "finish the store with VariantStore.build")
        store._add_outside(model, units)
        return store

    def _add_outside(self, model: nn.Module, units) -> list[str]:
        """Quantize (RTN) the units' matrices outside the layers, but the head and tied
        embeddings, at every choice; returns their names."""
        choices = self.choices
        outside = sorted({module_name(s.param) for u in units if u.layer is None
                          for s in u.slices} - set(tied_pairs(model)) - {output_name(model)})
        for name in outside:
            self._add(name, quantize_choices(dense_weight(model.get_submodule(name)), None,
                                             choices, StoreConfig(quantizer="rtn",
                                                                  scale_bits=self.scale_bits,
                                                                  grid=self.grid)))
        return outside

    @property
    def choices(self) -> tuple[Choice, ...]:
        """Every choice a matrix is stored at: the menu's, and fp16 (the reference weights)."""
        return tuple(dict.fromkeys((*self.menu.steps, FP16)))

    def _add(self, name: str, per_choice: dict[Choice, tuple[Piece, ...]]) -> None:
        self.variants[name] = per_choice
        for key in [k for k in self._dense if k[0] == name]:
            del self._dense[key]

    # ---- persistence ------------------------------------------------------------------
    def _open(self, key: Any) -> None:
        assert self.root is not None
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self.root / "store.json"
        # as JSON reads it back (a tuple in the key is a list there): else no key would match
        want = json.loads(json.dumps({"schema": STORE_SCHEMA, "key": key,
                                      "menu": list(self.menu.option_ids),
                                      "incumbent": self.incumbent.option_id}))
        if self.walk is not None:
            want["walk"] = {u: c.option_id for u, c in sorted(self.walk.items())}
        if self.scale_bits is not None:  # absent: fp16 scales (stores built before stay valid)
            want["scale_bits"] = self.scale_bits
        if self.grid != "minmax":  # likewise: min-max groups
            want["grid"] = self.grid
        if manifest.is_file():
            try:
                have = json.loads(manifest.read_text())
            except ValueError:
                have = None
            if have == want:
                return
        for f in self.root.glob("layer_*.safetensors"):  # built from other inputs: stale
            f.unlink()
        from bitsack.io import write_json

        write_json(manifest, want)

    def _file(self, i: int) -> Path | None:
        return None if self.root is None else self.root / f"layer_{i:04d}.safetensors"

    def _save_layer(self, i: int, names: list[str]) -> None:
        path = self._file(i)
        if path is None:
            return
        from safetensors.torch import save_file

        from bitsack.io import atomic_write_path
        from bitsack.kernels.formats import pack

        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            for c, pieces in self.variants[name].items():
                for p in pieces:
                    k = f"{name}|{c.option_id}|{p.axis}|{p.start}|{p.stop}"
                    if isinstance(p.q, torch.Tensor):
                        tensors[k + "|weight"] = p.q.contiguous()
                        continue
                    tensors[k + "|qdata"] = pack(p.q.codes, p.q.bits).view(
                        torch.int32).contiguous()
                    tensors[k + "|scale"] = p.q.scale.contiguous()
                    tensors[k + "|zero"] = p.q.zero.contiguous()
                    tensors[k + "|cols"] = torch.tensor([p.q.codes.shape[1]],
                                                        dtype=torch.int64)
                    if p.q.scale_bits is not None:  # scale = code·step: exact in fp16
                        tensors[k + "|step"] = p.q.step.contiguous()
                        tensors[k + "|scale_bits"] = torch.tensor([p.q.scale_bits],
                                                                  dtype=torch.int64)
        atomic_write_path(path, lambda tmp: save_file(tensors, tmp))

    def _load_layer(self, i: int) -> bool:
        path = self._file(i)
        if path is None or not path.is_file():
            return False
        from safetensors.torch import load_file

        from bitsack.kernels.formats import unpack_torch
        from bitsack.kernels.quantizers import QuantizedTensor
        from bitsack.plan import parse_choice

        try:
            raw = load_file(str(path))
        except Exception as exc:  # a truncated or foreign file: rebuild this layer
            raise FormatError(f"{path}: not a readable store layer ({exc}); delete it to "
                              "rebuild") from None
        found: dict[str, dict[Choice, list[Piece]]] = {}
        for k in sorted({k.rsplit("|", 1)[0] for k in raw},
                        key=lambda k: (k.split("|")[:2], int(k.split("|")[3]))):
            name, oid, axis, start, stop = k.split("|")
            c = parse_choice(oid, 64, "store")
            if f"{k}|weight" in raw:
                q: Any = raw[f"{k}|weight"]
            else:
                ncols = int(raw[f"{k}|cols"][0])
                codes = unpack_torch(raw[f"{k}|qdata"].view(torch.uint32), c.bits, ncols)
                dq = (int(raw[f"{k}|scale_bits"][0]), raw[f"{k}|step"]) \
                    if f"{k}|step" in raw else (None, None)
                q = QuantizedTensor(codes.to(torch.uint8), raw[f"{k}|scale"],
                                    raw[f"{k}|zero"], c.bits, c.group_size, *dq)
            found.setdefault(name, {}).setdefault(c, []).append(
                Piece(int(axis), int(start), int(stop), q))
        for name, per in found.items():
            self._add(name, {c: tuple(p) for c, p in per.items()})
        return True


class Stitcher:
    """Writes units' choices from a ``VariantStore`` into a dense model's weights."""

    def __init__(self, model: nn.Module, units: Sequence[Any], store: VariantStore):
        self.model = model
        self.units = {u.id: u for u in units}
        self.store = store
        self.params = dict(model.named_parameters())
        # a tied head's slices name the embedding's parameter; the store keys the embedding
        self.n_layers = max((u.layer for u in units if u.layer is not None), default=-1) + 1

    def write(self, changes: Mapping[str, Choice]) -> int | None:
        """Write ``changes`` (unit -> choice); returns the first changed layer (None: an
        embedding; ``n_layers``: only the head)."""
        first: int | None = self.n_layers
        for uid, choice in changes.items():
            unit = self.units[uid]
            for s in unit.slices:
                self.write_slice(s, choice)
            if unit.layer is None:
                first = None if self._is_input(unit) else (first if first is None
                                                           else min(first, self.n_layers))
            elif first is not None:
                first = min(first, unit.layer)
        return first

    def write_slice(self, s, choice: Choice) -> None:
        """Write one slice of a unit (``bitsack.models`` ``Slice``) from variant ``choice``."""
        src = self.store.dense(self.store.stored_name(module_name(s.param)), choice)
        dst = self.params[s.param]
        view = dst.data.T if s.transposed else dst.data
        idx = (slice(s.start, s.stop), slice(None)) if s.dim == 0 else \
            (slice(None), slice(s.start, s.stop))
        view[idx] = src[idx].to(view.dtype)

    def _is_input(self, unit) -> bool:
        emb = self.model.get_input_embeddings()
        return any(self.params[s.param] is emb.weight for s in unit.slices)


def _walk_fallback(plan: Mapping[str, Choice], units, menu: Menu) -> Choice:
    """The choice a plan walk writes first into every matrix (the plan's most common kept
    choice, by weights; ties: the menu's order), before its units' own choices.

    Raises:
        ValidationError: the plan misses a unit, or chooses off the menu.
    """
    weights: dict[Choice, int] = {}
    for u in units:
        if u.id not in plan:
            raise ValidationError("walk", f"unit {u.id!r} has no choice; valid: a choice for "
                                  "every unit")
        c = plan[u.id]
        if c.pruned:
            continue
        if c not in menu.steps:
            raise ValidationError("walk", f"{u.id}: {c.option_id!r} is not in the menu "
                                  f"{list(menu.option_ids)}")
        weights[c] = weights.get(c, 0) + u.params
    if not weights:
        return menu.steps[0]
    return max(menu.steps, key=lambda c: (weights.get(c, 0), -menu.index(c)))
