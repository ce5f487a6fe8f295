"""Target formats: the options a file format can store, the constraints it imposes, its bytes.

bitsack's own folder (format ``bitsack``) stores any mix of options inside a weight matrix:
units (head groups, MLP blocks) are packed as segments of their own. Serving engines store
**one type per tensor**, and so do bitsack's exports (``bitsack.export``). For a target
format ``compressed-tensors`` or ``gguf``, a problem (or a search menu) is *retargeted*:

1. **Matrix groups.** Units that share a weight matrix (a ``SliceShape.param``), taken
   transitively, form a group: for a Llama layer, its head groups (q/k/v rows, o columns) and
   its MLP blocks (gate/up rows, down columns); an embedding stands alone. Derived from the
   slices, not from names.
2. **Options** (``target_options``): a unit keeps the options the format stores
   (``refusal``) and that no other stored option *dominates*: B dominates A when B has at
   least A's bits, groups at least as fine (fp16: finest), and no more bytes in the format
   on every unit of the group (quantization error does not grow with bits or finer groups).
   Every unit of a group gets the same options. What each format stores:

   - ``compressed-tensors``: bits 1–8 (``pack-quantized``) with a group size dividing every
     row and every column slice of a unit, and 16 (fp16). Embeddings are written fp16 at any
     option, so only ``b16`` is left there. Pruning, exported in vLLM's DeciLM layout
     (``bitsack.export.decilm``), where the model's MLP width is a multiple of 256
     (``prune_refusal``): otherwise that layout pads every MLP of a pruned model, bytes no
     unit's price can carry.
   - ``gguf``: every option some ggml type holds exactly (``kernels.formats.gguf_type``:
     min-max grids with fp16 scales 1–3 bits as Q4_0, 4 as Q4_1, 5 as Q5_1, 6–8 as Q8_0 (8
     re-rounded); symmetric grids 4 / 5 bits as Q4_0 / Q5_0 and, with scale codes on rows of
     whole 256-weight super-blocks, 2 bits as Q2_K, 3 as Q3_K, 6 as Q6_K), 16 as F16, and
     pruning (arch ``deci``); group sizes must divide every column slice. Dominated: e.g.
     1–3 bits of a min-max grid (Q4_0 at 4 bits' bytes of a symmetric one), 6–7 bits (Q8_0
     at 8 bits') and groups coarser than the finest stored (every block has its own scales,
     so the group size does not change the bytes).

3. **Constraints** (``target_constraints``), per group of two or more units: ``same_option``
   (without pruning), or with pruning ``same_bits`` — a pruned unit leaves the tensor (GGUF's
   ``deci`` and vLLM's DeciLM size each layer), the kept ones share a bit-width, and step 2
   leaves one group size per bit-width, so they share one type. compressed-tensors allows that
   only for MLP blocks of whole multiples of 256 channels: DeciLM fixes the query-head count
   and rounds MLP widths up to 256, so a head group pruned alone, or a narrower block, would be
   zero-padded back, bytes its price does not carry; its head groups (and narrower blocks) are
   pruned all together or not at all (``same_option``). With pruning, at least one head group
   of the first layer is kept (``min_kept``): llama.cpp reads the head size from layer 0, and
   vLLM's DeciLM needs an attention before the first MLP (the export would add a zero one).
4. **Bytes**: ``MemoryModel(format=...)`` (``bitsack.solver.costs.memory``), the exact tensor
   bytes the export writes for the units' weights; the sum over a plan that meets the
   constraints is those tensors' size in the file. Not counted (as in bitsack's own format):
   norms, biases, weights outside every unit, file headers, the zero FFN of 32 channels
   that a gguf ``deci`` layer gets when its whole MLP is pruned but its attention kept, and
   the zero parts a compressed-tensors DeciLM export writes for a part pruned whole that
   keeps an output bias (models with o_proj / down_proj biases).

``retarget(problem, fmt)`` applies 2–4 to a problem (the losses are the format-free ones: a
format changes what is stored, not how a grid perturbs the model); a problem carries the
geometry it needs in ``metadata.geometry`` (``geometry_metadata``, written by ``profile``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bitsack.errors import ValidationError
from bitsack.kernels.formats import DECILM_FFN_MULTIPLE, GGUF_BLOCK, TARGET_FORMATS, gguf_type
from bitsack.solver.costs.base import SliceShape, UnitShape
from bitsack.solver.costs.memory import MemoryModel, check_format, type_cols, unit_nbytes
from bitsack.solver.problem import Constraint, Problem, ProblemSettings, parse_option

__all__ = ["TARGET_FORMATS", "check_format", "geometry_metadata", "matrix_groups", "refusal",
           "retarget", "shapes_from_metadata", "target_constraints", "target_menu",
           "target_options", "with_scale_bits"]


def prune_refusal(fmt: str, shapes: Sequence[UnitShape] = ()) -> str | None:
    """Why ``fmt`` cannot hold a plan that prunes units of the model of ``shapes``, or None
    when it can (compressed-tensors: MLP widths must be multiples of 256, see step 2)."""
    if check_format(fmt) != "compressed-tensors":
        return None
    for u in shapes:
        if u.kind == "mlp_group":
            width = u.slices[0].matrix[u.slices[0].dim]
            if width % DECILM_FFN_MULTIPLE:
                return (f"its {width}-wide MLPs are no multiple of {DECILM_FFN_MULTIPLE}: the "
                        "DeciLM layout of a pruned compressed-tensors export pads every MLP "
                        "to one, bytes no unit's price carries")
    return None


def stores_pruned(fmt: str, shapes: Sequence[UnitShape] = ()) -> bool:
    """Whether ``fmt`` can hold a plan that prunes units (of the model of ``shapes``)."""
    return prune_refusal(fmt, shapes) is None


def refusal(fmt: str, unit: UnitShape, option: str, settings: ProblemSettings,
            scale_bits: int | None = None, symmetric: bool = False) -> str | None:
    """Why ``fmt`` cannot store ``unit`` at ``option``, or None when it can.

    ``settings.group_size`` is what a plain ``b<k>`` means; ``scale_bits`` and ``symmetric``
    describe the grid (they open GGUF types: ``kernels.formats.gguf_type``).
    """
    check_format(fmt)
    spec = parse_option(option)
    if fmt == "bitsack" or spec.bits == 16:
        return None
    if spec.bits == 0:
        return prune_refusal(fmt, [unit])
    g = settings.group_size_of(spec)
    if fmt == "compressed-tensors" and unit.kind == "embedding":
        return None  # written fp16 (priced so); dominated by b16
    for s in unit.slices:
        rows, cols = s.matrix
        if fmt == "gguf":
            if cols % GGUF_BLOCK:
                return f"{cols}-wide rows are not whole ggml blocks of {GGUF_BLOCK}"
            try:
                gguf_type(spec.bits, g, scale_bits, symmetric, type_cols(s))
            except ValidationError as exc:
                return str(exc).removeprefix("grid: ")
        elif cols % g:
            return f"group size {g} does not divide {cols}-wide rows"
        if s.dim == 1 and s.width % g:
            return (f"group size {g} does not divide the unit's {s.width} columns (the "
                    "matrix's groups would not be one grid)")
    return None


def matrix_groups(shapes: Sequence[UnitShape]) -> list[list[str]]:
    """Unit ids grouped by shared weight matrices (transitively), in model order; units whose
    slices name no matrix stand alone."""
    parent = list(range(len(shapes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, shape in enumerate(shapes):
        for s in shape.slices:
            if s.param is None:
                continue
            j = owner.setdefault(s.param, i)
            parent[find(i)] = find(j)
    groups: dict[int, list[str]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(find(i), []).append(shape.id)
    return list(groups.values())


def _rank(option: str, settings: ProblemSettings) -> tuple[int, int]:
    """(bits, group size) for dominance: fp16 counts as the finest group (0)."""
    spec = parse_option(option)
    return spec.bits, settings.group_size_of(spec) or 0


def _undominated(fmt: str, members: Sequence[UnitShape], options: Sequence[str],
                 settings: ProblemSettings, grid: tuple[int | None, bool] = (None, False)
                 ) -> dict[str, str]:
    """Option -> the option that dominates it on every unit of ``members``, for the
    dominated ones among ``options`` (of twins that dominate each other, the first listed
    stays)."""
    if fmt == "bitsack":
        return {}
    rank = {o: _rank(o, settings) for o in options}
    cost = {o: [unit_nbytes(fmt, u, *rank[o], *grid) for u in members] for o in options}

    def dominates(b: str, a: str) -> bool:
        (bb, gb), (ba, ga) = rank[b], rank[a]
        if b == a or 0 in (ba, bb):  # prune is its own thing
            return False
        finer = gb == 0 or (ga != 0 and gb <= ga)
        return bb >= ba and finer and all(x <= y for x, y in zip(cost[b], cost[a], strict=True))

    out = {}
    for i, a in enumerate(options):
        by = next((b for j, b in enumerate(options)
                   if dominates(b, a) and (not dominates(a, b) or j < i)), None)
        if by is not None:
            out[a] = by
    for a in out:  # name a survivor: dominance is transitive
        while out[a] in out:
            out[a] = out[out[a]]
    return out


def _restrict(fmt: str, members: Sequence[UnitShape], options: Sequence[str],
              settings: ProblemSettings, grid: tuple[int | None, bool] = (None, False),
              model: Sequence[UnitShape] = ()) -> tuple[tuple[str, ...], dict[str, str]]:
    """The options ``fmt`` stores on every unit of ``members`` and none dominates, and why
    each other one is left out; ``grid``: (scale bits, symmetric); ``model``: every unit of
    the model (whether it can be pruned at all: ``prune_refusal``)."""
    why: dict[str, str] = {}
    stored = []
    for o in options:
        reason = next(((u.id, r) for u in members
                       if (r := refusal(fmt, u, o, settings, *grid))), None)
        if reason is None and o == "prune" and (r := prune_refusal(fmt, model)):
            reason = ("model", r)
        if reason is None:
            stored.append(o)
        else:
            why[o] = f"{reason[0]}: {reason[1]}"
    beaten = _undominated(fmt, members, stored, settings, grid)
    for o, by in beaten.items():
        why[o] = f"dominated by {by} (at least as many bits, groups as fine, no more bytes)"
    return tuple(o for o in stored if o not in beaten), why


def target_options(fmt: str, shapes: Sequence[UnitShape],
                   options: Mapping[str, Sequence[str]],
                   settings: ProblemSettings | int = 64,
                   left_out: dict[str, str] | None = None, scale_bits: int | None = None,
                   symmetric: bool = False) -> dict[str, tuple[str, ...]]:
    """Unit id -> the options of ``options[unit]`` that ``fmt`` stores and no other dominates,
    the same for every unit of a matrix group (module docstring, step 2; order kept).

    ``left_out``, when given, is filled with option id -> why it was left out (one reason
    per option, from the first group that left it out). ``scale_bits``, ``symmetric``: the
    grid the options will be quantized on (``refusal``).

    Raises:
        ValidationError: a group left with no option (names the unit and why).
    """
    check_format(fmt)
    if not isinstance(settings, ProblemSettings):
        settings = ProblemSettings(group_size=settings)
    if fmt == "bitsack":
        return {u: tuple(o) for u, o in options.items()}
    by_id = {s.id: s for s in shapes}
    missing = [u for u in options if u not in by_id]
    if missing:
        raise ValidationError("shapes", f"no shape for units {missing[:5]}; a target format "
                              "needs every unit's slices")
    out: dict[str, tuple[str, ...]] = {}
    for group in matrix_groups([by_id[u] for u in options]):
        members = [by_id[u] for u in group]
        common = [o for o in options[group[0]] if all(o in options[u] for u in group)]
        kept, why = _restrict(fmt, members, common, settings, (scale_bits, symmetric),
                              list(shapes))
        if not kept:
            detail = "; ".join(f"{o}: {r}" for o, r in why.items()) or "no option in common"
            raise ValidationError(f"units.{group[0]}", f"{fmt} can store none of its options "
                                  f"{list(options[group[0]])} ({detail}); valid: an option "
                                  f"the format stores (see bitsack.solver.costs.formats)")
        if left_out is not None:
            for o, r in why.items():
                left_out.setdefault(o, r)
        for u in group:
            out[u] = kept
    return out


def target_menu(fmt: str, shapes: Sequence[UnitShape], options: Sequence[str],
                settings: ProblemSettings | int = 64,
                left_out: dict[str, str] | None = None, scale_bits: int | None = None,
                symmetric: bool = False) -> tuple[str, ...]:
    """The menu choices (one list for every unit) ``fmt`` stores on every unit, minus those
    another choice dominates on every unit (order kept); ``left_out``, ``scale_bits`` and
    ``symmetric`` as in ``target_options``.

    Raises:
        ValidationError: no choice is left (names the refusals).
    """
    check_format(fmt)
    if not isinstance(settings, ProblemSettings):
        settings = ProblemSettings(group_size=settings)
    if fmt == "bitsack":
        return tuple(options)
    kept, why = _restrict(fmt, shapes, options, settings, (scale_bits, symmetric), shapes)
    if not kept:
        detail = "; ".join(f"{o}: {r}" for o, r in why.items())
        raise ValidationError("menu", f"{fmt} stores none of {list(options)} ({detail}); "
                              "valid: options the format stores")
    if left_out is not None:
        left_out.update(why)
    return kept


def target_constraints(fmt: str, shapes: Sequence[UnitShape],
                       options: Mapping[str, Sequence[str]],
                       settings: ProblemSettings | int = 64) -> tuple[Constraint, ...]:
    """The constraints that make a plan storable in ``fmt`` (module docstring, step 3), for
    units offered ``options`` (unit id -> option ids; only these units are constrained)."""
    check_format(fmt)
    if fmt == "bitsack":
        return ()
    if not isinstance(settings, ProblemSettings):
        settings = ProblemSettings(group_size=settings)
    present = [s for s in shapes if s.id in options]
    by_id = {s.id: s for s in present}
    out: list[Constraint] = []
    for group in matrix_groups(present):
        if len(group) < 2:
            continue
        offered = {o for u in group for o in options[u]}
        kept = [parse_option(o) for o in offered if o != "prune"]
        one_type_per_bits = len({s.bits for s in kept}) == \
            len({(s.bits, settings.group_size_of(s)) for s in kept})
        partial = fmt == "gguf" or all(_whole_ffn_blocks(by_id[u]) for u in group)
        kind = "same_bits" if "prune" in offered and one_type_per_bits and partial \
            else "same_option"
        out.append(Constraint(kind, tuple(group)))
    if fmt in ("gguf", "compressed-tensors"):
        heads = [s for s in present if s.kind == "head_group" and s.layer is not None]
        first = min((s.layer for s in heads), default=None)
        layer0 = tuple(s.id for s in heads if s.layer == first)
        if layer0 and any("prune" in options[u] for u in layer0):
            out.append(Constraint("min_kept", layer0, count=1))
    return tuple(out)


def _whole_ffn_blocks(unit: UnitShape) -> bool:
    """Whether ``unit`` is an MLP block of whole multiples of 256 channels (a DeciLM export
    prunes it without padding)."""
    return unit.kind == "mlp_group" and all(s.width % DECILM_FFN_MULTIPLE == 0
                                            for s in unit.slices)


# ---- problems ---------------------------------------------------------------------------


def geometry_metadata(shapes: Sequence[UnitShape]) -> dict[str, Any]:
    """The units' slices as problem metadata (what ``retarget`` needs later), one line each:
    ``{"matrices": ["<param> <rows> <cols>", ...], "slices": {unit: ["<matrix index> <dim>
    <start> <stop>", ...]}}``."""
    index: dict[str, int] = {}
    matrices: list[str] = []
    slices: dict[str, list[str]] = {}
    for shape in shapes:
        rows = []
        for s in shape.slices:
            if s.param is None or any(c.isspace() for c in s.param):
                raise ValidationError(f"shapes.{shape.id}", f"slice matrix {s.param!r}; valid: "
                                      "a parameter name without spaces")
            if s.param not in index:
                index[s.param] = len(matrices)
                matrices.append(f"{s.param} {s.matrix[0]} {s.matrix[1]}")
            rows.append(f"{index[s.param]} {s.dim} {s.start} {s.stop}")
        slices[shape.id] = rows
    return {"matrices": matrices, "slices": slices}


def shapes_from_metadata(problem: Problem) -> list[UnitShape]:
    """The units' shapes recorded by ``geometry_metadata`` in ``problem.metadata.geometry``.

    Raises:
        ValidationError: no geometry, or one that does not describe the problem's units.
    """
    geo = problem.metadata.get("geometry")
    if not isinstance(geo, Mapping) or "matrices" not in geo or "slices" not in geo:
        raise ValidationError("metadata.geometry", f"problem {problem.name!r} records no unit "
                              "geometry, so it cannot be retargeted to a file format; valid: "
                              "a problem written by `bitsack profile` (any format)")
    try:
        matrices = []
        for line in geo["matrices"]:
            param, rows, cols = str(line).split()
            matrices.append((param, int(rows), int(cols)))
        out = []
        for unit in problem.units:
            slices = []
            for line in geo["slices"][unit.id]:
                m, dim, start, stop = (int(x) for x in str(line).split())
                param, rows, cols = matrices[m]
                if dim not in (0, 1) or not 0 <= start < stop <= (rows, cols)[dim] or m < 0:
                    raise ValueError(f"slice {line!r} of {param}")
                shape = (stop - start, cols) if dim == 0 else (rows, stop - start)
                slices.append(SliceShape(*shape, dim=dim, param=param, start=start,
                                         extent=(rows, cols)[dim]))
            out.append(UnitShape(unit.id, unit.kind or "other", tuple(slices), unit.layer))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ValidationError("metadata.geometry", f"does not describe the problem's units "
                              f"({type(exc).__name__}: {exc}); valid: what `bitsack profile` "
                              "writes") from None
    return out


def retarget(problem: Problem, fmt: str,
             shapes: Sequence[UnitShape] | None = None, scale_bits: int | None = None,
             symmetric: bool = False) -> Problem:
    """``problem`` for target format ``fmt``: options restricted, ``memory_bytes`` in the
    format's bytes, its constraints added, ``metadata.format`` set (module docstring).

    ``shapes`` default to the problem's recorded geometry. Budgets are not touched: apply
    them after (an ``avg_bits`` budget means the same limit in every format). A problem
    already built for ``fmt`` is returned as it is.

    Raises:
        ValidationError: an unknown format, a problem already built for another format, no
            geometry, or a unit the format cannot store at any of its options.
    """
    from bitsack.solver.transforms import restrict_options

    check_format(fmt)
    current = problem.metadata.get("format", "bitsack")
    if current == fmt:
        return problem
    if current != "bitsack":
        raise ValidationError("format", f"{fmt!r}: problem {problem.name!r} was built for "
                              f"{current!r} (its options and costs are that format's); "
                              f"valid: {current!r}, or a problem profiled for 'bitsack'")
    shapes = list(shapes) if shapes is not None else shapes_from_metadata(problem)
    settings = problem.settings
    offered = {u.id: [o.id for o in u.options] for u in problem.units}
    left_out: dict[str, str] = {}
    allowed = target_options(fmt, shapes, offered, settings, left_out, scale_bits, symmetric)
    out = restrict_options(problem, allowed)
    constraints = out.constraints + target_constraints(fmt, shapes, allowed, settings)
    meta: dict[str, Any] = {"format": fmt}
    if symmetric and fmt == "gguf":
        meta["symmetric"] = True
    if left_out:
        meta["format_left_out"] = dict(sorted(left_out.items()))
    out = _repriced(out, shapes, MemoryModel(fmt, scale_bits, symmetric), constraints, meta)
    if scale_bits is None and "scale_bits" in out.metadata:  # priced with fp16 scales now
        import dataclasses

        out = dataclasses.replace(out, metadata={k: v for k, v in out.metadata.items()
                                                 if k != "scale_bits"})
    elif scale_bits is not None:
        import dataclasses

        out = dataclasses.replace(out, metadata={**out.metadata, "scale_bits": scale_bits})
    return out


def with_scale_bits(problem: Problem, scale_bits: int | None,
                    shapes: Sequence[UnitShape] | None = None) -> Problem:
    """``problem`` (format ``bitsack``) with ``memory_bytes`` priced for S-bit scale codes
    (``scale_bits``), or for fp16 scales (None; a problem already priced so is returned as it
    is). The losses stay the profile's: sensitivities are estimated on the fp16-scale grid, so
    one profile serves both.

    Raises:
        ValidationError: a problem built for another format, or no geometry.
    """
    if scale_bits is None and problem.metadata.get("scale_bits") is None:
        return problem
    current = problem.metadata.get("format", "bitsack")
    # refuses compressed-tensors
    model = MemoryModel(current, scale_bits, bool(problem.metadata.get("symmetric")))
    shapes = list(shapes) if shapes is not None else shapes_from_metadata(problem)
    out = _repriced(problem, shapes, model, problem.constraints, {"scale_bits": scale_bits})
    if scale_bits is None:  # fp16 scales: the metadata as a problem priced so has it
        import dataclasses

        meta = {k: v for k, v in out.metadata.items() if k != "scale_bits"}
        out = dataclasses.replace(out, metadata=meta)
    return out


def _repriced(problem: Problem, shapes: Sequence[UnitShape], model: MemoryModel,
              constraints, meta: Mapping[str, Any]) -> Problem:
    """``problem`` with every option's ``memory_bytes`` (if priced) from ``model``, the
    given constraints, ``meta`` merged into its metadata and the memory model described."""
    import dataclasses

    from bitsack.solver.validate import validate_problem

    by_id = {s.id: s for s in shapes}
    settings = problem.settings
    priced = "memory_bytes" in {r.name for r in problem.resources}
    units = []
    for unit in problem.units:
        opts = unit.options
        if priced:
            shape = by_id[unit.id]
            opts = tuple(
                type(o)(o.id, o.loss, {**o.cost, "memory_bytes": float(model.cost(
                    shape, o.bits, settings.group_size_of(o.spec) or 1)["memory_bytes"])})
                for o in unit.options)
        units.append(type(unit)(unit.id, opts, kind=unit.kind, layer=unit.layer,
                                params=unit.params))
    out_meta = {**problem.metadata, **meta}
    if isinstance(out_meta.get("cost_models"), list):
        out_meta["cost_models"] = [model.describe() if isinstance(m, Mapping)
                                   and m.get("name") == "memory" else m
                                   for m in out_meta["cost_models"]]
    return validate_problem(dataclasses.replace(problem, units=tuple(units),
                                                constraints=constraints, metadata=out_meta))
