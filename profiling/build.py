"""Profile -> ``bitsack.problem/v1``: losses from an estimator, costs from cost models.

Costs come from the registered cost models (``bitsack.solver.costs``) applied to each unit's
slice shapes: ``memory`` gives the packed bytes exactly as the packer writes them, the
roofline (or a measured table) the latencies. Head groups carry ``q_heads`` and ``head_dim``
so the roofline can count attention FLOPs and KV-cache bytes; an embedding only ever looked
up (untied input or position embedding) is marked ``lookup_only``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bitsack.models.base import UnitSpec
from bitsack.profiling.layout import OptionLayout
from bitsack.solver.costs import CostModel, SliceShape, UnitShape, get_cost_model
from bitsack.solver.costs.base import check_resources, option_costs
from bitsack.solver.problem import (
    Interactions,
    Option,
    Problem,
    ProblemSettings,
    Resource,
    Unit,
)

INTERACTIONS_FILE = "interactions.npz"


def unit_shapes(model: torch.nn.Module, units: Sequence[UnitSpec]) -> list[UnitShape]:
    """What the cost models may know about each unit (shapes, head facts, lookup-only)."""
    from bitsack.models import get_adapter

    adapter = get_adapter(model)
    q_heads = int(adapter.heads_per_group())
    by_id = {id(p): n for n, p in model.named_parameters()}
    linear_users: set[str] = set()
    for _, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.nn.Parameter) and not isinstance(mod, torch.nn.Embedding):
            if id(w) in by_id:
                linear_users.add(by_id[id(w)])
    full = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes = []
    for u in units:
        slices = tuple(SliceShape(s.shape[0], s.shape[1], s.dim, param=s.param, start=s.start,
                                  extent=_extent(full.get(s.param), s))
                       for s in u.slices)
        extra: dict[str, Any] = {}
        if u.kind == "head_group":
            cols = sum(s.shape[1] for s in u.slices if s.dim == 1)
            extra = {"q_heads": q_heads, "head_dim": cols // q_heads if q_heads else 0}
        elif u.kind == "embedding":
            extra = {"lookup_only": all(s.param not in linear_users for s in u.slices)}
        shapes.append(UnitShape(u.id, u.kind, slices, u.layer, extra))
    return shapes


def _extent(shape: tuple[int, ...] | None, s) -> int | None:
    """The matrix's size along the slice's ``dim`` (in [out, in] orientation)."""
    if shape is None or len(shape) != 2:
        return None
    rows, cols = shape[::-1] if s.transposed else shape
    return int(rows if s.dim == 0 else cols)


def make_cost_models(names: Sequence[str],
                     args: Mapping[str, Mapping[str, Any]] | None = None) -> list[CostModel]:
    """Instantiate registered cost models by name with their keyword arguments."""
    args = args or {}
    models = [get_cost_model(n, **dict(args.get(n, {}))) for n in names]
    check_resources(models)
    return models


def build_problem(layout: OptionLayout, loss: np.ndarray, U: np.ndarray | None, *,
                  shapes: Sequence[UnitShape], group_size: int, cost_models: Sequence[CostModel],
                  name: str, metadata: Mapping[str, Any]) -> Problem:
    """The problem: one unit per layout unit, its options' losses and costs, U if any.

    Args:
        layout: units and options (flat order = ``loss`` and ``U`` columns).
        loss: ``[n_options]`` predicted loss per option.
        U: ``[N, n_options]`` interaction factor or None.
        shapes: ``unit_shapes`` of the layout's units (same order).
        group_size: quantization group size of the costs.
        cost_models: instantiated cost models.
        name: problem name.
        metadata: JSON-able metadata (recorded as given).
    """
    resources = tuple(Resource(r) for r in check_resources(cost_models))
    settings = ProblemSettings(group_size=group_size)
    units = []
    for ui, (spec, shape) in enumerate(zip(layout.units, shapes, strict=True)):
        opts = []
        for oid in layout.option_ids[ui]:
            j = layout.index(ui, oid)
            cost = option_costs(cost_models, shape, oid, settings)
            opts.append(Option(oid, float(loss[j]), cost))
        units.append(Unit(spec.id, tuple(opts), kind=spec.kind, layer=spec.layer,
                          params=int(spec.params)))
    inter = None
    if U is not None:
        U = np.ascontiguousarray(U, dtype=np.float64)
        U.setflags(write=False)
        inter = Interactions(U=U, file=INTERACTIONS_FILE)
    return Problem(name=name, units=tuple(units), resources=resources, interactions=inter,
                   metadata=dict(metadata))


def jsonable(obj: Any) -> Any:
    """Plain Python types (YAML/JSON-safe) from numpy scalars/arrays, tuples, dicts."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())  # a NumPy NaN becomes None too
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
