"""Apply a plan (the stage between the solver and the kernels): prune (real surgery), quantize
(RTN or sequential GPTQ), pack. ``bitsack.plan`` says what each unit becomes;
``bitsack.checkpoint`` saves and loads the result (re-exported here).

``compress`` runs in this order:

1. surgery: pruned head groups and MLP blocks leave the matrices (``bitsack.models.prune``);
2. permutation: inside each layer, units are reordered by their choice (bits, group size) so
   every matrix has one contiguous segment per choice (function preserving);
3. input embeddings (untied, and position embeddings) are quantized with RTN first, so the
   calibration inputs of layer 0 are what the compressed model computes;
4. the decoder layers, one at a time on the layer engine (``bitsack.engine``: one layer on the
   device at a time, so a model larger than memory can be compressed): with ``gptq`` each
   layer is quantized on inputs produced by the *already compressed* layers before it, and
   inside a layer stage by stage ("true sequential": q/k/v, then o, then gate/up, then down —
   found generically as linears that read the same input tensor), so error propagation is
   compensated rather than ignored (Frantar et al. 2022);
5. the lm_head (tied or not) with GPTQ on the final hidden states (RTN with ``rtn``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bitsack.errors import ValidationError
from bitsack.kernels.formats import SUPER_COLS
from bitsack.models import get_adapter
from bitsack.models.plumbing import (
    PackedWeightModule,
    bias_of,
    dense_weight,
    output_name,
    set_module,
    settle_packed_ties,
    tied_pairs,
)
from bitsack.plan import Choice, SegmentPlan, matrix_segments, module_name, normalize_plan

QUANTIZERS = ("rtn", "gptq")


@dataclass(frozen=True)
class ApplyConfig:
    """How a plan is applied.

    Attributes:
        quantizer: ``gptq`` (needs calibration tokens) or ``rtn``.
        group_size: the group size of plan entries that give only bits (``b<k>``, an int).
        mlp_group: MLP channels per unit (as profiled).
        damp: GPTQ damping, a fraction of mean(diag H).
        act_order: GPTQ column order by decreasing diag H (static groups).
        true_sequential: quantize a layer's linears stage by stage (see module docstring).
        batch_size: calibration sequences per forward through a layer.
        backend: kernel backend of the packed modules (``cpu``, ``torch``, ``reference``,
            ``cupy``).
        device: compute device of the layer engine (default: where the model is).
        scale_bits: None (fp16 scales) or S: every quantized segment stores its scales as
            S-bit codes times an fp16 step per 256 columns (``kernels.formats``).
        grid: how each group's scale and zero are chosen (``bitsack.kernels.grid.GRIDS``):
            ``"hmse"`` (default: the group's range shrunk to the smallest squared error,
            each column's error weighted as GPTQ's loss weighs it), ``"mse"`` (unweighted)
            or ``"minmax"`` (its whole range; what bitsack did before 2026-12-04).
        vocab_groups: how many token-id row ranges the plan's embedding units are
            (``embed.v0`` …; ``bitsack.models.adapter.vocab_ranges``); None: read from the
            plan's ids, which needs every range named (a plan naming ``embed.v0`` and
            ``embed.v1`` of six could not be told from a split in two).
    """

    quantizer: str = "gptq"
    group_size: int = 64
    mlp_group: int = 128
    damp: float = 0.01
    act_order: bool = True
    true_sequential: bool = True
    batch_size: int = 8
    backend: str = "cpu"
    device: str | None = None
    scale_bits: int | None = None
    vocab_groups: int | None = None
    grid: str = "hmse"

    def __post_init__(self) -> None:
        from bitsack.kernels.formats import check_grid, check_scale_bits
        from bitsack.plan import check_vocab_groups

        check_scale_bits(self.scale_bits)
        check_grid(self.grid)
        if self.vocab_groups is not None:  # None: read from the plan
            check_vocab_groups(self.vocab_groups)
        if self.quantizer not in QUANTIZERS:
            raise ValidationError("quantizer", f"{self.quantizer!r}; valid: {list(QUANTIZERS)}")
        if self.batch_size < 1:
            raise ValidationError("batch_size", f"{self.batch_size}; valid: a positive integer")


@dataclass(frozen=True)
class CompressResult:
    """A compressed model and what was done to it.

    Attributes:
        model: the compressed model (packed modules in place of the quantized linears).
        plan: unit id -> choice as applied.
        dims: per-layer dims record after surgery and permutation.
        packed_bytes: bytes of the packed weights of the planned units (equals the plan's
            ``memory_bytes`` usage).
        untouched: unit ids the plan did not name (left dense).
        report: timings, GPTQ losses per matrix, damping escalations.
    """

    model: Any
    plan: dict[str, Choice]
    dims: dict
    packed_bytes: int
    untouched: tuple[str, ...]
    report: dict = field(default_factory=dict)


_VOCAB_ID = re.compile(r"^(embed|lm_head)\.v(\d+)$")


def plan_vocab_groups(plan: Mapping[str, Any], declared: int | None = None) -> int:
    """How many row-range units the plan's vocabulary matrices are split into
    (``bitsack.models.adapter.vocab_units``). ``declared`` (a run's ``vocab_groups``): checked
    against the ids — a plan may name only some of its ranges then. None: read from the ids,
    N when the plan names ``embed.v0`` … ``embed.v<N−1>`` (and/or ``lm_head.v…``), 1 when it
    names none.

    Raises:
        ValidationError: with ``declared``, an id ``.v<i>`` with i ≥ N or a whole-matrix id
            beside N > 1; without, ``.v<i>`` ids that are not one consecutive 0..N−1 per
            matrix, that differ in N between the embedding and the lm_head, or mixed with
            ``embed``.
    """
    seen: dict[str, set[int]] = {}
    for uid in plan:
        m = _VOCAB_ID.match(uid)
        if m:
            seen.setdefault(m.group(1), set()).add(int(m.group(2)))
    if declared is None:  # read from the ids: every range named, the same N per matrix
        if not seen:
            return 1
        counts = {name: len(idx) for name, idx in seen.items()}
        if len(set(counts.values())) > 1 or any(idx != set(range(len(idx)))
                                                for idx in seen.values()):
            raise ValidationError("plan.embed.v*", f"row-range units {sorted(seen.items())}; "
                                  "valid: exactly v0 … v<N−1>, the same N for embed and "
                                  "lm_head (or ApplyConfig.vocab_groups for a partial plan)")
        declared = next(iter(counts.values()))
    for name, idx in seen.items():
        if declared == 1 or max(idx) >= declared:
            raise ValidationError(f"plan.{name}.v*", f"row-range units {sorted(idx)} with "
                                  f"vocab_groups={declared}; valid: ids v0 … v{declared - 1} "
                                  "(vocab_groups > 1)")
    whole = [name for name in ("embed", "lm_head") if name in plan]
    if declared > 1 and whole:
        raise ValidationError(f"plan.{whole[0]}", f"a whole-matrix id with vocab_groups="
                              f"{declared}; valid: {whole[0]}.v0 … {whole[0]}.v{declared - 1}")
    return declared


def check_plan(units, plan: Mapping[str, Choice], mlp_group: int) -> None:
    """Every planned unit exists and can take its choice.

    Raises:
        ValidationError: an unknown unit, a prune of an unprunable unit, bits without a
            packed layout.
    """
    from bitsack.kernels.formats import PACKABLE_BITS

    by_id = {u.id: u for u in units}
    for uid, choice in sorted(plan.items()):
        if uid not in by_id:
            raise ValidationError(f"plan.{uid}", f"is not a unit of this model (with "
                                  f"mlp_group={mlp_group}); e.g. {units[0].id!r}")
        if choice.pruned and not by_id[uid].prunable:
            raise ValidationError(f"plan.{uid}", "0 (prune) for a unit that cannot be pruned; "
                                  f"valid: bits in {list(PACKABLE_BITS)}")
        if not choice.pruned and choice.bits not in PACKABLE_BITS:
            raise ValidationError(f"plan.{uid}", f"{choice.bits} bits has no packed layout; "
                                  f"valid: 0 (prune) or {list(PACKABLE_BITS)}")


def compress(model: nn.Module, plan: Mapping[str, Any], calib_tokens: torch.Tensor | None = None,
             config: ApplyConfig | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> CompressResult:
    """Prune, quantize and pack ``model`` in place according to ``plan``.

    Args:
        model: a transformers causal LM of a supported architecture (unpruned).
        plan: unit id -> option id (``prune``, ``b4``, ``b3g128``), bits (0 = prune) or
            ``Choice``; plain bits use ``config.group_size``.
        calib_tokens: ``[n, seqlen]`` calibration token ids (needed for ``gptq``).
        config: how to apply (quantizer, default group size, ...).
        progress: optional callback ``(stage, done, total)``.

    Returns:
        The compressed model and its record.

    Raises:
        ValidationError: a plan entry names an unknown unit, prunes an unprunable one, or has
            no packed layout; gptq without calibration tokens.
    """
    cfg = config or ApplyConfig()
    if cfg.quantizer == "gptq" and calib_tokens is None:
        raise ValidationError("calib_tokens", "None; gptq needs calibration tokens [n, seqlen] "
                              "(or use quantizer='rtn')")
    t0 = time.perf_counter()
    prep = _prepare(model, plan, cfg)
    adapter, plan, specs = prep.adapter, prep.plan, prep.specs
    report: dict[str, Any] = {"config": cfg.__dict__.copy(), "gptq": {}, "timings_s": {}}
    tick = progress or (lambda stage, done, total: None)
    report["timings_s"]["surgery"] = time.perf_counter() - t0
    embed_names = prep.embed_names
    packed_bytes = 0

    # 3. embeddings first (tied ones wait for the lm_head)
    tied = tied_pairs(model)
    head_names = set(tied) | {output_name(model)}
    t1 = time.perf_counter()
    for name in sorted(embed_names - head_names):
        packed_bytes += _replace_embedding(model, name, specs[name], cfg)
    report["timings_s"]["embeddings"] = time.perf_counter() - t1

    # 4. layers
    t2 = time.perf_counter()
    n_layers = len(adapter.layers())
    engine = None
    if cfg.quantizer == "gptq":
        from bitsack.engine import LayerEngine

        engine = LayerEngine(model, calib_tokens, batch_size=cfg.batch_size,
                             device=cfg.device)
    for i in range(n_layers):
        prefix = adapter.layer_prefix(i)
        linears = {prefix + rel: mod for rel, mod in adapter.linear_modules(i).items()}
        todo = {name: mod for name, mod in linears.items() if name in specs}
        if engine is None:
            for name, mod in todo.items():
                packed = quantize_linear(mod, specs[name], None, cfg)
                set_module(model, name, packed)
                packed_bytes += packed.nbytes
        else:
            stages = engine.stages(todo) if cfg.true_sequential else [list(todo)]
            for stage in stages:
                hessians = engine.hessians({n: todo[n] for n in stage})
                for name in stage:
                    packed = quantize_linear(todo[name], specs[name], hessians[name], cfg,
                                             report["gptq"], name)
                    set_module(model, name, packed)
                    packed_bytes += packed.nbytes
            engine.advance()
        tick("layers", i + 1, n_layers)
    report["timings_s"]["layers"] = time.perf_counter() - t2

    # 5. lm_head (and a tied embedding with it)
    t3 = time.perf_counter()
    for name in sorted(embed_names & head_names):
        packed_bytes += _replace_head(model, engine, name, tied.get(name), specs[name], cfg,
                                      report)
    report["timings_s"]["head"] = time.perf_counter() - t3
    report["timings_s"]["total"] = time.perf_counter() - t0
    if engine is not None:
        report["peak_device_bytes"] = engine.peak_device_bytes
    settle_packed_ties(model)  # tie_weights() must not look for a packed embedding's .weight
    _bind_save(model)
    model.bitsack_plan = {uid: c.option_id for uid, c in plan.items()}
    model.bitsack_apply = {"quantizer": cfg.quantizer, "group_size": cfg.group_size,
                           "mlp_group": cfg.mlp_group, "grid": cfg.grid,
                           **({"vocab_groups": prep.vocab} if prep.vocab > 1 else {})}
    return CompressResult(model=model, plan=dict(plan), dims=adapter.dims(),
                          packed_bytes=int(packed_bytes), untouched=prep.untouched,
                          report=report)


@dataclass(frozen=True)
class _Prepared:
    adapter: Any
    plan: dict[str, Choice]
    original: dict[str, dict[str, list]]  # unit -> module -> its slices before surgery
    specs: dict[str, list[SegmentPlan]]  # module name -> segments after surgery/permutation
    current: dict[str, dict[str, list]]  # unit -> module -> its slices now (same order)
    embed_names: set[str]
    untouched: tuple[str, ...]
    vocab: int  # token-id row ranges of the embedding units (vocab_groups)


def _prepare(model: nn.Module, plan: Mapping[str, Any], cfg: ApplyConfig) -> _Prepared:
    """Check the plan, prune, and order each layer's units by choice so that every matrix
    has one contiguous segment per choice (function preserving)."""
    adapter = get_adapter(model)
    plan = normalize_plan(plan, cfg.group_size)
    vocab = plan_vocab_groups(plan, cfg.vocab_groups)
    units = adapter.units(mlp_group=cfg.mlp_group, embeddings=True, vocab_groups=vocab)
    check_plan(units, plan, cfg.mlp_group)
    original = {u.id: _by_module(u) for u in units}
    pruned = [uid for uid, c in plan.items() if c.pruned]
    if pruned:
        adapter.prune(pruned, mlp_group=cfg.mlp_group)
    structural = adapter.units(mlp_group=cfg.mlp_group, embeddings=False)
    fp16 = Choice(16)
    order = sorted(structural, key=lambda u: (u.layer, u.kind,
                                              _order_key(plan.get(u.id, fp16))))
    if order:
        adapter.permute_units([u.id for u in order], mlp_group=cfg.mlp_group)
    units_now = adapter.units(mlp_group=cfg.mlp_group, embeddings=True, vocab_groups=vocab)
    # a unit the plan leaves out but whose matrix it packs (a partial plan of an embedding's
    # token-id ranges) is packed in fp16 there: a packed matrix is tiled by its segments
    touched = {module_name(s.param) for u in units_now if u.id in plan for s in u.slices}
    for u in units_now:
        if u.id not in plan and any(module_name(s.param) in touched for s in u.slices):
            plan[u.id] = fp16
    planned = [u for u in units_now if u.id in plan]
    return _Prepared(
        adapter=adapter, plan=plan, original=original,
        specs=matrix_segments(planned, plan, cfg.scale_bits),
        current={u.id: _by_module(u) for u in planned},
        embed_names={module_name(s.param) for u in planned if u.layer is None
                     for s in u.slices},
        untouched=tuple(u.id for u in units if u.id not in plan), vocab=vocab)


def _by_module(unit) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in unit.slices:  # a fused matrix (GPT-2's c_attn) holds several slices of a unit
        out.setdefault(module_name(s.param), []).append(s)
    return out


def assemble(model: nn.Module, plan: Mapping[str, Any],
             part: Callable[[str, Choice, int, int, int], Any],
             config: ApplyConfig | None = None) -> CompressResult:
    """Pack ``model`` from quantized parts made elsewhere (e.g. a search's variant store).

    Surgery and permutation as in ``compress``; then every segment of every planned matrix is
    the concatenation, in the segment's order, of ``part(module, choice, dim, start, stop)``
    over its units — a ``QuantizedTensor`` (fp16 tensor for 16 bits) of the unit's slice at
    its *original* position ``start:stop`` along ``dim``, grouped inside the slice for column
    slices. Nothing is quantized here.
    """
    from bitsack.kernels.packed import PackedEmbedding, PackedLinear

    cfg = config or ApplyConfig(quantizer="rtn")
    prep = _prepare(model, plan, cfg)
    tied = tied_pairs(model)
    packed_bytes = 0
    for name, segs in prep.specs.items():
        here = sorted((s.start, uid, k) for uid, per in prep.current.items()
                      for k, s in enumerate(per.get(name, ())))
        parts = []
        for seg in segs:
            pieces = []
            for start, uid, k in here:
                if seg.start <= start < seg.stop:
                    orig = prep.original[uid][name][k]
                    pieces.append(part(name, prep.plan[uid], orig.dim, orig.start, orig.stop))
            parts.append(_concat(pieces, seg.axis))
        mod = model.get_submodule(name)
        if isinstance(mod, nn.Embedding):
            packed = PackedEmbedding(mod.weight.shape[0], mod.weight.shape[1],
                                     _row_segments(segs, parts),
                                     dtype=mod.weight.dtype)
            set_module(model, name, packed if type(mod) is nn.Embedding
                       else PackedWeightModule(mod, packed))
            if name in tied:
                set_module(model, tied[name], packed.as_linear(cfg.backend))
        else:
            packed = PackedLinear.from_quantized(parts, segs[0].axis, bias=bias_of(mod),
                                                 backend=cfg.backend)
            set_module(model, name, packed)
        packed_bytes += packed.nbytes
    settle_packed_ties(model)  # tie_weights() must not look for a packed embedding's .weight
    _bind_save(model)
    model.bitsack_plan = {uid: c.option_id for uid, c in prep.plan.items()}
    model.bitsack_apply = {"quantizer": "assembled", "group_size": cfg.group_size,
                           "mlp_group": cfg.mlp_group, "grid": cfg.grid,
                           **({"vocab_groups": prep.vocab} if prep.vocab > 1 else {})}
    return CompressResult(model=model, plan=dict(prep.plan), dims=prep.adapter.dims(),
                          packed_bytes=int(packed_bytes), untouched=prep.untouched,
                          report={"config": cfg.__dict__.copy()})


def _bind_save(model: nn.Module) -> None:
    from bitsack.models.checkpoint import bind_save

    bind_save(model)  # save_pretrained writes a compressed folder, never a broken HF one


def _concat(pieces: list, axis: int):
    """One part from unit pieces laid end to end along ``axis`` (same bits and groups)."""
    from bitsack.kernels.quantizers import QuantizedTensor

    if len(pieces) == 1:
        return pieces[0]
    if isinstance(pieces[0], torch.Tensor):
        return torch.cat(pieces, dim=axis)
    q = pieces[0]
    step = None
    if q.scale_bits is not None:  # super-blocks restart in each piece
        if axis == 1 and any(p.shape[1] % SUPER_COLS for p in pieces[:-1]):
            raise ValidationError("scale_bits", "column pieces of double-quantized scales "
                                  f"{[p.shape[1] for p in pieces]} wide; valid: multiples of "
                                  f"{SUPER_COLS} columns (but the last)")
        step = torch.cat([p.step for p in pieces], dim=axis)
    return QuantizedTensor(torch.cat([p.codes for p in pieces], dim=axis),
                           torch.cat([p.scale for p in pieces], dim=axis),
                           torch.cat([p.zero for p in pieces], dim=axis), q.bits, q.group_size,
                           q.scale_bits, step)


def _order_key(choice: Choice) -> tuple[int, int]:
    # higher precision first; within one bit-width, larger groups first
    return (-choice.bits, -(choice.group_size or 0))


def _pieces(weight: torch.Tensor, segs: list[SegmentPlan]):
    for s in segs:
        yield s, (weight[s.start:s.stop] if s.axis == 0 else weight[:, s.start:s.stop])


def _row_segments(segs: list[SegmentPlan], parts: list) -> list:
    """Row segments of an embedding from its parts (``QuantizedTensor``s, fp16 tensors)."""
    from bitsack.kernels.packed import Segment

    return [Segment.from_fp16(p, 0, s.start) if isinstance(p, torch.Tensor)
            else Segment.from_quantized(p, 0, s.start) for s, p in zip(segs, parts, strict=True)]


def rtn_parts(weight: torch.Tensor, segs: list[SegmentPlan],
              scale_bits: int | None = None, grid: str = "minmax") -> list:
    """RTN-quantized (or fp16) parts of ``weight`` along its segments."""
    from bitsack.kernels.quantizers import rtn_quantize

    return [piece.to(torch.float16) if s.bits == 16 else
            rtn_quantize(piece, s.bits, s.group_size, scale_bits, grid)
            for s, piece in _pieces(weight, segs)]


def gptq_parts(weight: torch.Tensor, segs: list[SegmentPlan], hessian, cfg: ApplyConfig):
    """GPTQ-quantized (or fp16) parts of ``weight`` along its segments, and GPTQ's result."""
    from bitsack.kernels.quantizers import GPTQ, SegmentSpec

    specs = [SegmentSpec(s.axis, s.start, s.stop, s.bits, s.group_size or weight.shape[1],
                         cfg.scale_bits if s.bits != 16 else None, cfg.grid) for s in segs]
    res = GPTQ.from_hessian(hessian).quantize_segments(weight, specs, damp=cfg.damp,
                                                      act_order=cfg.act_order)
    return list(res.parts), res


def quantize_linear(mod: nn.Module, segs: list[SegmentPlan], hessian, cfg: ApplyConfig,
                    report: dict | None = None, name: str = ""):
    """A ``PackedLinear`` of ``mod`` quantized along ``segs`` — GPTQ with ``hessian`` (a
    ``bitsack.kernels.hessian.Hessian``), RTN without."""
    from bitsack.kernels.packed import PackedLinear

    weight = dense_weight(mod)
    if hessian is None or all(s.bits == 16 for s in segs):  # nothing for GPTQ to do
        parts = rtn_parts(weight, segs, cfg.scale_bits, cfg.grid)
    else:
        parts, res = gptq_parts(weight, segs, hessian, cfg)
        if report is not None:
            report[name] = {"loss": res.loss, "damp": res.damp}
    return PackedLinear.from_quantized(parts, segs[0].axis, bias=bias_of(mod),
                                       backend=cfg.backend)


def _replace_embedding(model: nn.Module, name: str, segs: list[SegmentPlan],
                       cfg: ApplyConfig) -> int:
    """An input embedding (or an outside projection such as OPT's project_in), RTN."""
    from bitsack.kernels.packed import PackedEmbedding

    mod = model.get_submodule(name)
    if not isinstance(mod, nn.Embedding):  # a projection outside the layers: RTN
        packed = quantize_linear(mod, segs, None, cfg)
        set_module(model, name, packed)
        return packed.nbytes
    weight = mod.weight.detach().float()
    parts = rtn_parts(weight, segs, cfg.scale_bits, cfg.grid)  # row ranges (vocab_groups), or one
    packed = PackedEmbedding(weight.shape[0], weight.shape[1], _row_segments(segs, parts),
                             dtype=mod.weight.dtype)
    if type(mod) is nn.Embedding:
        set_module(model, name, packed)
    else:
        set_module(model, name, PackedWeightModule(mod, packed))
    return packed.nbytes


def _replace_head(model: nn.Module, engine, name: str, head_name: str | None,
                  segs: list[SegmentPlan], cfg: ApplyConfig, report: dict) -> int:
    """Quantize an lm_head (``name`` a Linear) or a tied embedding (``name`` the embedding,
    ``head_name`` its lm_head) — GPTQ on the final hidden states when ``engine`` is given."""
    from bitsack.kernels.packed import PackedEmbedding, PackedLinear

    mod = model.get_submodule(name)
    head = model.get_submodule(head_name) if head_name else mod
    weight = mod.weight.detach().float()
    if engine is None or all(s.bits == 16 for s in segs):
        parts = rtn_parts(weight, segs, cfg.scale_bits, cfg.grid)
    else:
        parts, res = gptq_parts(weight, segs, engine.head_hessian(head), cfg)
        report["gptq"][head_name or name] = {"loss": res.loss, "damp": res.damp}
    if head_name:
        packed = PackedEmbedding(weight.shape[0], weight.shape[1], _row_segments(segs, parts),
                                 dtype=mod.weight.dtype)
        # an embedding with its own forward (Gemma's scaled one) keeps it
        set_module(model, name, packed if type(mod) is nn.Embedding
                   else PackedWeightModule(mod, packed))
        set_module(model, head_name, packed.as_linear(cfg.backend))
    else:
        packed = PackedLinear.from_quantized(parts, 0, bias=bias_of(mod), backend=cfg.backend)
        set_module(model, name, packed)
    return packed.nbytes


# the checkpoint and plan names callers of this stage use (one import for a whole apply)
from bitsack.checkpoint import (  # noqa: E402
    MODEL_SCHEMA,
    base_config,
    cache_dequantized,
    is_model_dir,
    load_compressed,
    read_meta,
    save_compressed,
)
from bitsack.plan import plan_from_solution  # noqa: E402

__all__ = [
    "MODEL_SCHEMA",
    "ApplyConfig",
    "Choice",
    "CompressResult",
    "assemble",
    "base_config",
    "cache_dequantized",
    "compress",
    "is_model_dir",
    "load_compressed",
    "normalize_plan",
    "plan_from_solution",
    "read_meta",
    "save_compressed",
]
