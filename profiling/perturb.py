"""Weight perturbations δ(u, o) of every unit and option, and reductions over unit slices.

An option's perturbation is what it does to the weights (DESIGN.md, "Where the numbers come
from"):

- ``b<k>``: ``δ = Q_k(W_u) − W_u`` on every slice of the unit, with the quantizer apply uses
  (``bitsack.kernels.quantizers.fake_quantize``: min-max RTN by default, GPTQ as an option).
  ``b16`` is the fp16 round trip (δ ≈ 0).
- ``prune``: ``δ = −W_u`` on the unit's *output* slices only — the column slices of o_proj /
  down_proj (``Slice.dim == 1``). Zeroing those columns is exactly the pruned model's function
  (the head group's or channels' contribution to the residual is gone), and the loss along
  that direction is the loss of a structure mask m (output scaled by m, m: 1 → 0), whose
  Fisher is Kwon et al. 2022's ("A Fast Post-Training Pruning Framework for Transformers").
  The q/k/v (gate/up) rows only feed the zeroed columns; perturbing them too would add
  linearized terms for changes that have no effect once the columns are zero.

Why one quantization per matrix and bit-width is enough: RTN groups run along a row's input
columns, so quantizing a whole matrix at k bits gives, for every row-slice unit (q/k/v,
gate/up, embeddings), exactly the δ that quantizing its rows alone would give; and for every
column-slice unit (o_proj, down_proj) the same, because its columns start and end on group
boundaries (checked here). GPTQ is not separable (it spreads each column's error over later
columns): its per-matrix δ is the one-shot δ of the whole matrix at k bits with the matrix's
own full-precision Hessian, an approximation of what a mixed-bit sequential apply produces.

Storage: δ is kept per (matrix, bit-width) in fp16 scaled by a power of two chosen so the
largest possible |δ| lands below 2¹⁵: 11 significant bits for every entry within 2²⁸ of
the largest, at a quarter of float64's memory (SmolLM2-135M at 1,2,3,4,8 bits: 1.35 GB). The
prune δ is the weight itself and the ``b16`` δ (the fp16 round trip) is recomputed when read:
neither is stored.

Reductions: ``reduce(f)`` sums an elementwise function ``f(entry, key)`` (for example g ⊙ δ)
over each option's slices with one ``sum`` along the non-unit axis and one ``index_add_``
into a float64 vector (one slot per flat option plus a discard slot).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from bitsack.errors import ModelError, NumericalError, ValidationError
from bitsack.models.base import Slice, UnitSpec
from bitsack.profiling.layout import OptionLayout, option_key

#: fp16 target exponent for the largest |δ| of a matrix: max |δ|·2^s ∈ [2¹⁴, 2¹⁵).
_FP16_TOP = 14
QUANTIZERS = ("rtn", "gptq")


def weight_2d(param: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A parameter as ``[out_features, in_features]`` (a view; GPT-2 Conv1D is transposed)."""
    return param.T if transposed else param


def output_slices(unit: UnitSpec) -> tuple[Slice, ...]:
    """The slices that carry a unit's output to the residual stream (its prune δ).

    The column slices (``dim == 1``) of a prunable unit; a unit without any (no built-in
    adapter makes one) falls back to all its slices.
    """
    cols = tuple(s for s in unit.slices if s.dim == 1)
    return cols or unit.slices


@dataclass
class ParamEntry:
    """One weight matrix touched by the units, and where its rows or columns go.

    Attributes:
        name: parameter name in ``model.named_parameters()``.
        param: the parameter.
        transposed: stored ``[in, out]`` (GPT-2 Conv1D).
        axis: 0 if the units own rows of it (reductions sum over columns), 1 if columns.
        length: rows (axis 0) or columns (axis 1) of the ``[out, in]`` view.
        maps: option key (``"prune"`` or bits) -> LongTensor ``[length]``: the flat option
            index each row/column adds to (``n_options`` = discarded).
        slices: (unit index, slice) pairs on this matrix.
    """

    name: str
    param: torch.nn.Parameter
    transposed: bool
    axis: int
    length: int
    maps: dict[int | str, torch.Tensor] = field(default_factory=dict)
    slices: list[tuple[int, Slice]] = field(default_factory=list)

    def view(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """``t`` (default: the weight) in ``[out, in]`` orientation."""
        return weight_2d(self.param if t is None else t, self.transposed)


class Perturbations:
    """δ(u, o) for every option of a layout, stored per matrix and bit-width.

    Build with ``Perturbations(model, layout, group_size, quantizer)`` and then
    ``compute(hessians=...)`` (RTN needs no Hessians). The reductions map elementwise
    quantities to per-option float64 sums.
    """

    def __init__(self, model: torch.nn.Module, layout: OptionLayout, group_size: int,
                 quantizer: str = "rtn"):
        if quantizer not in QUANTIZERS:
            raise ValidationError("quantizer", f"{quantizer!r} is unknown; valid: "
                                  f"{', '.join(QUANTIZERS)}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValidationError("group_size", f"{group_size!r}; valid: a positive integer")
        self.layout = layout
        self.group_size = group_size
        self.quantizer = quantizer
        self.n_options = layout.n_options
        self.entries: dict[str, ParamEntry] = {}
        self._deltas: dict[tuple[str, int], tuple[torch.Tensor, float]] = {}
        self.rtn_fallback: list[str] = []
        params = dict(model.named_parameters())
        for ui, unit in enumerate(layout.units):
            prune_slices = set(output_slices(unit)) if layout.has(ui, "prune") else set()
            for s in unit.slices:
                entry = self._entry(params, unit, s)
                entry.slices.append((ui, s))
                for oid in layout.option_ids[ui]:
                    key = option_key(oid)
                    if key == "prune" and s not in prune_slices:
                        continue
                    m = entry.maps.get(key)
                    if m is None:
                        m = torch.full((entry.length,), self.n_options, dtype=torch.long)
                        entry.maps[key] = m
                    if bool((m[s.start:s.stop] != self.n_options).any()):
                        raise ModelError(f"units: {unit.id!r} overlaps another unit on "
                                         f"{s.param} [{s.start}:{s.stop}] (dim {s.dim})")
                    m[s.start:s.stop] = layout.index(ui, oid)

    def _entry(self, params: Mapping[str, torch.nn.Parameter], unit: UnitSpec,
               s: Slice) -> ParamEntry:
        if s.param not in params:
            raise ModelError(f"units: {unit.id!r} names {s.param!r}, which is not a parameter "
                             "of the model")
        entry = self.entries.get(s.param)
        p = params[s.param]
        w = weight_2d(p, s.transposed)
        if w.dim() != 2:
            raise ModelError(f"units: {unit.id!r} slices {s.param!r} of shape "
                             f"{tuple(p.shape)}; valid: a 2-D weight")
        if entry is None:
            axis = s.dim
            entry = ParamEntry(s.param, p, s.transposed, axis, int(w.shape[axis]))
            self.entries[s.param] = entry
        if s.dim != entry.axis:
            raise ModelError(f"units: {s.param!r} is sliced along rows by one unit and along "
                             f"columns by {unit.id!r}; profiling needs one axis per matrix")
        return entry

    # ---- δ ------------------------------------------------------------------------------
    def bit_keys(self, entry: ParamEntry) -> list[int]:
        return sorted(k for k in entry.maps if k != "prune")

    def compute(self, hessians: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None,
                progress: Callable[[int], None] | None = None,
                gptq_options: Mapping[str, object] | None = None) -> None:
        """Quantize every matrix at every bit-width it needs and store δ.

        Args:
            hessians: for ``gptq``: a callable returning an iterator of (parameter name,
                ``H = 2XXᵀ/n``) from the full-precision model; matrices without one (an
                untied input embedding is a lookup, not a product) use RTN (listed in
                ``rtn_fallback``).
            progress: called with 1 after each matrix.
            gptq_options: keyword options for ``GPTQ.quantize`` (default: damp 0.01,
                act_order True — apply's defaults).
        """
        done: set[str] = set()
        if self.quantizer == "gptq":
            if hessians is None:
                raise ValidationError("hessians", "None; quantizer 'gptq' needs each matrix's "
                                      "input Hessian from calibration data")
            opts = {"damp": 0.01, "act_order": True, **(gptq_options or {})}
            for name, H in hessians():
                if name in self.entries and name not in done:
                    self._store(self.entries[name], H, opts)
                    done.add(name)
                    if progress:
                        progress(1)
        for name, entry in self.entries.items():
            if name in done:
                continue
            if self.quantizer == "gptq":
                self.rtn_fallback.append(name)
            self._store(entry, None, {})
            if progress:
                progress(1)

    def _store(self, entry: ParamEntry, hessian: torch.Tensor | None,
               gptq_options: Mapping[str, object]) -> None:
        from bitsack.kernels.gptq import GPTQ
        from bitsack.kernels.segments import SegmentSpec

        w = entry.view(entry.param.detach())
        tiles = column_tiles(entry)
        for bits in self.bit_keys(entry):
            if bits == 16:
                continue  # recomputed when read: exact, and 2 bytes/weight less to hold
            if hessian is None:
                self._deltas[(entry.name, bits)] = _rtn_delta_fp16(w, bits, self.group_size,
                                                                   tiles)
            else:
                w32 = w.float()
                specs = [SegmentSpec(1, a, b, bits, self.group_size) for a, b in tiles] \
                    if tiles else [SegmentSpec(0, 0, w32.shape[0], bits, self.group_size)]
                res = GPTQ.from_hessian(hessian).quantize_segments(w32, specs, **gptq_options)
                self._deltas[(entry.name, bits)] = _to_scaled_fp16(res.weight - w32)
        _trim_heap()

    def delta(self, name: str, key: int | str) -> torch.Tensor:
        """δ of matrix ``name`` for option key ``key`` in ``[out, in]`` float32.

        For ``"prune"`` this is ``−W`` on the whole matrix: only the output slices' columns
        are ever read (the prune map discards the rest).
        """
        entry = self.entries[name]
        if key == "prune":
            return -entry.view(entry.param.detach()).float()
        if key == 16:
            return _fp16_delta(entry.view(entry.param.detach()))
        stored, inv = self._deltas[(name, key)]
        return stored.float().mul_(inv)

    def scaled_delta(self, name: str, key: int | str) -> tuple[torch.Tensor, float]:
        """(δ·2^s in fp16 — or −W for prune —, 2^−s): for reductions that rescale once."""
        entry = self.entries[name]
        if key == "prune":
            return -entry.view(entry.param.detach()), 1.0
        if key == 16:
            return _fp16_delta(entry.view(entry.param.detach())), 1.0
        return self._deltas[(name, key)]

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored δ's."""
        return sum(t.numel() * t.element_size() for t, _ in self._deltas.values())

    # ---- reductions ---------------------------------------------------------------------
    def new_accumulator(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """A float64 zero vector with one slot per option plus the discard slot."""
        return torch.zeros(self.n_options + 1, dtype=torch.float64, device=device)

    def accumulate(self, out: torch.Tensor, entry: ParamEntry, key: int | str,
                   values: torch.Tensor, scale: float = 1.0) -> None:
        """Add ``scale · values`` (``[out, in]``) summed over the non-unit axis into ``out``."""
        r = values.sum(dim=1 - entry.axis, dtype=torch.float32)
        if scale != 1.0:
            r.mul_(scale)
        m = entry.maps[key]
        if m.device != out.device:
            m = m.to(out.device)
            entry.maps[key] = m
        out.index_add_(0, m, r.to(torch.float64))

    def reduce(self, fn: Callable[[ParamEntry, int | str], torch.Tensor | None],
               out: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ over each option's slices of fn(entry, key)`` (elementwise, ``[out, in]``).

        ``fn`` may return None to skip a (matrix, key). Returns the float64 vector
        ``[n_options + 1]`` (last slot: discarded rows/columns).
        """
        acc = self.new_accumulator() if out is None else out
        for entry in self.entries.values():
            for key in entry.maps:
                values = fn(entry, key)
                if values is not None:
                    self.accumulate(acc, entry, key, values)
        return acc

    def project(self, grads: Mapping[str, torch.Tensor],
                out: torch.Tensor | None = None) -> torch.Tensor:
        """``v(u, o) = g · δ(u, o)`` for every option: the hot path of ``fisher``.

        Args:
            grads: parameter name -> gradient in the parameter's stored orientation.
            out: optional accumulator from ``new_accumulator`` (added to).

        Returns:
            float64 ``[n_options + 1]``.
        """
        acc = self.new_accumulator() if out is None else out
        for name, entry in self.entries.items():
            g = grads.get(name)
            if g is None:
                continue
            g2 = entry.view(g)
            for key in entry.maps:
                d, inv = self.scaled_delta(name, key)
                # fp16 δ promotes to float32 in the product; the power-of-two rescale of the
                # row/column sums is exact
                self.accumulate(acc, entry, key, torch.mul(g2, d), inv)
        return acc

    def squared_norms(self) -> torch.Tensor:
        """‖δ(u, o)‖² per option (float64, without the discard slot)."""
        def sq(entry: ParamEntry, key: int | str) -> torch.Tensor:
            return self.delta(entry.name, key).square_()

        return self.reduce(sq)[:-1]

    def counts(self) -> torch.Tensor:
        """Number of weights each option perturbs (float64)."""
        def ones(entry: ParamEntry, key: int | str) -> torch.Tensor:
            w = entry.view(entry.param.detach())
            return torch.ones(w.shape, dtype=torch.float32)

        return self.reduce(ones)[:-1]

    def check_finite(self, values: torch.Tensor, what: str) -> None:
        """Raise ``NumericalError`` naming the first unit and option whose value is not
        finite."""
        check_finite(values, self.layout, what)


def check_finite(values, layout: OptionLayout, what: str) -> None:
    """Raise ``NumericalError`` naming the first (unit, option) of ``values`` that is not
    finite (``values``: tensor or array ``[..., n_options]``; a trailing discard slot is
    ignored)."""
    v = torch.as_tensor(values)[..., :layout.n_options]
    bad = ~torch.isfinite(v)
    if not bool(bad.any()):
        return
    idx = bad.nonzero()[0]
    j = int(idx[-1])
    value = float(v[tuple(idx.tolist())])
    raise NumericalError(f"{what}: {layout.describe(j)} is {value!r} (not finite); check the "
                         "model's weights and the calibration data (a non-finite gradient or "
                         "activation)")


#: Elements per chunk of rows quantized at once: bounds the float64 temporaries of RTN.
_CHUNK_ELEMENTS = 1 << 21


def column_tiles(entry: ParamEntry) -> list[tuple[int, int]] | None:
    """For a matrix whose units own columns: column ranges tiling it, one per unit (gaps
    between units as their own ranges) — quantization groups restart at each, as the packed
    format groups a column segment. None for row-owned matrices."""
    if entry.axis != 1:
        return None
    cols = weight_2d(entry.param, entry.transposed).shape[1]
    tiles, pos = [], 0
    for a, b in sorted({(s.start, s.stop) for _, s in entry.slices}):
        if a > pos:
            tiles.append((pos, a))
        tiles.append((a, b))
        pos = b
    if pos < cols:
        tiles.append((pos, cols))
    return tiles


def _rtn_delta_fp16(w: torch.Tensor, bits: int, group_size: int,
                    tiles: list[tuple[int, int]] | None = None) -> tuple[torch.Tensor, float]:
    """RTN (or fp16 round-trip) δ of ``w`` as scaled fp16, quantized in chunks of rows (and
    per column tile, groups restarting at each: ``column_tiles``).

    RTN groups lie inside rows, so chunks of rows give exactly the whole-matrix result while
    holding only one chunk's float64 temporaries. The power-of-two scale comes from an a
    priori bound on |δ| (min-max RTN: half the largest possible group step; fp16: 2⁻¹¹ of the
    largest weight, plus the subnormal spacing), so no second pass is needed.
    """
    from bitsack.kernels.quantizers import fake_quantize

    hi = max(float(w.max()), 0.0)
    lo = min(float(w.min()), 0.0)
    if not (math.isfinite(hi) and math.isfinite(lo)):
        raise NumericalError("perturbation: the weight holds non-finite values")
    if bits == 16:
        bound = max(hi, -lo) * 2.0 ** -11 + 2.0 ** -25
    else:
        bound = (hi - lo) / ((1 << bits) - 1) * (1 + 2.0 ** -9) / 2 + 2.0 ** -25
    s = _FP16_TOP - math.floor(math.log2(bound))
    scale = 2.0 ** s
    out = torch.empty(w.shape, dtype=torch.float16, device=w.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, w.shape[1]))
    for r in range(0, w.shape[0], step):
        chunk = w[r:r + step].float()
        if tiles:
            d = torch.cat([fake_quantize(chunk[:, a:b], bits, group_size, "rtn")
                           for a, b in tiles], dim=1).sub_(chunk)
        else:
            d = fake_quantize(chunk, bits, group_size, "rtn").sub_(chunk)
        out[r:r + step] = d.mul_(scale)
    if not bool(torch.isfinite(out).all()):  # the bound failed: never silently overflow
        raise NumericalError(f"perturbation: |δ| at {bits} bits exceeds its bound {bound:.3g}")
    return out, 1.0 / scale


def _fp16_delta(w: torch.Tensor) -> torch.Tensor:
    """``fp16(w) − w`` in float32 (exact: both are float32 numbers within 2⁻¹¹ of each other)."""
    w32 = w.float()
    return w32.half().float().sub_(w32)


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise: RSS stays high)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _to_scaled_fp16(delta: torch.Tensor) -> tuple[torch.Tensor, float]:
    """δ·2^s in fp16 with max |δ|·2^s in [2¹⁴, 2¹⁵), and 2^−s (exact rescale)."""
    top = float(delta.abs().max()) if delta.numel() else 0.0
    if not math.isfinite(top):
        raise NumericalError("perturbation: a quantized weight is not finite")
    if top == 0.0:
        return torch.zeros(delta.shape, dtype=torch.float16), 1.0
    s = _FP16_TOP - math.floor(math.log2(top))
    return (delta * (2.0 ** s)).to(torch.float16), 2.0 ** -s
