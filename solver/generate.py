"""Model-shaped synthetic problem instances, seeded, for benchmarks, tests and the demo.

A generated instance has the shape of a Llama-family decoder: per layer ``kv_groups`` head
groups (a KV head group with its ``q_per_kv`` query heads: rows of q/k/v, columns of o_proj)
and ``mlp_groups`` blocks of ``mlp_block`` MLP channels (rows of gate/up, columns of down).

Costs are real, not invented:

- ``memory_bytes`` is the packed size from the format's own size function
  (``bitsack.kernels.formats.packed_nbytes`` through the ``memory`` cost model) over each
  unit's actual slice shapes, so a budget means bytes on disk;
- ``decode_latency_us`` / ``prefill_latency_us`` come from the ``roofline`` cost model on an
  H200 (bytes moved / bandwidth vs FLOPs / peak, per unit).

Losses are synthetic but shaped like measured sensitivities: for a kept option at b bits the
loss falls roughly as ``4^{-b}`` (quantization noise power halves per bit, and the loss is
quadratic in it); pruning costs far more than 2 bits for most units but is cheap for a few
(log-normal spread); a per-layer factor (U-shaped over depth: first and last layers matter
more) and a per-unit log-normal factor spread them, and a unit's loss scales with its weight
count. The total at uniform 4 bits is normalized to ``LOSS_AT_4BIT`` nats.

``rank > 0`` adds a low-rank factor ``U`` [rank, n_options]: each unit has a direction
(shared within its layer plus noise, so interactions are mostly positive: errors compound),
each option's column is that direction times ``sqrt(2 · loss)`` (the Fisher shape, where
``½‖U_i‖²`` is the standalone loss), b16 columns are zero, and the whole factor is rescaled so
that at uniform 4 bits the interaction term is ``INTERACTION_FRACTION`` of the standalone
loss.

``tightness`` ∈ (0, 1] places every budget between the least and the most any assignment can
use: ``limit = min + tightness · (max − min)`` (memory limits floored to whole bytes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from bitsack.errors import ValidationError
from bitsack.solver.problem import (
    OPTION_ID_GRAMMAR,
    Constraint,
    Interactions,
    Option,
    Problem,
    ProblemSettings,
    Resource,
    Unit,
    parse_option,
)

#: Total standalone loss (nats/token) of the uniform 4-bit plan of a generated instance.
LOSS_AT_4BIT = 0.05
#: Interaction term at uniform 4 bits, as a fraction of the standalone loss (rank > 0).
INTERACTION_FRACTION = 0.15

#: Named shapes. ``llama-2-7b``: 32 layers, hidden 4096, 32 heads of 128 grouped 4 per unit
#: (8 units per layer, MHA so 4 KV heads per group), 11008 MLP channels = 86 blocks of 128.
#: ``smollm2-135m``: 30 layers, hidden 576, 9 query / 3 KV heads of 64, MLP 1536 = 12 x 128,
#: groups of 64. ``tiny``: small enough for brute force (6 units x 6 options).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(layers=32, kv_groups=8, mlp_groups=86, hidden=4096, head_dim=128,
                       q_per_kv=4, kv_per_group=4, mlp_block=128, group_size=128),
    "smollm2-135m": dict(layers=30, kv_groups=3, mlp_groups=12, hidden=576, head_dim=64,
                         q_per_kv=3, kv_per_group=1, mlp_block=128, group_size=64),
    "tiny": dict(layers=2, kv_groups=1, mlp_groups=2, hidden=256, head_dim=64, q_per_kv=2,
                 kv_per_group=1, mlp_block=128, group_size=64),
}

_SUPPORTED_RESOURCES = ("memory_bytes", "decode_latency_us", "prefill_latency_us")


def generate_problem(
    *,
    layers: int = 32,
    kv_groups: int = 8,
    mlp_groups: int = 86,
    options: Sequence[str] = ("prune", "b2", "b3", "b4", "b8", "b16"),
    resources: Sequence[str] = ("memory_bytes", "decode_latency_us"),
    tightness: float = 0.5,
    rank: int = 0,
    seed: int = 0,
    hidden: int = 4096,
    head_dim: int = 128,
    q_per_kv: int = 4,
    mlp_block: int = 128,
    group_size: int = 128,
    name: str | None = None,
    kv_per_group: int = 1,
    min_kept_heads: int = 0,
) -> Problem:
    """A model-shaped instance (see the module docstring for how each number is made).

    Args:
        layers, kv_groups, mlp_groups: units per layer: head groups and MLP blocks.
        options: option ids of every unit (``prune`` and/or ``b<k>``).
        resources: budgeted resources; any of memory_bytes, decode_latency_us,
            prefill_latency_us.
        tightness: where each limit lies between the least and most usage, in (0, 1].
        rank: rows of the low-rank interaction factor U (0 = additive).
        seed: the only source of randomness.
        hidden, head_dim, q_per_kv, mlp_block: the shapes of the slices.
        group_size: the default quantization group (``settings.group_size``: what a
            plain ``b<k>`` means); a row of width w holds ceil(w / group_size) groups.
        name: the problem's name (default describes the shape).
        kv_per_group: KV heads per head-group unit (1 for GQA groups; 4 for Llama-2-7B's MHA
            heads grouped 4 per unit).
        min_kept_heads: if > 0, a ``min_kept`` constraint per layer over its head groups.

    Raises:
        bitsack.errors.ValidationError: a shape or option that makes no sense, naming it.
    """
    from bitsack.solver.costs import SliceShape, UnitShape, get_cost_model, option_costs
    from bitsack.solver.feasibility import max_cost_per_resource, min_cost_per_resource
    from bitsack.solver.schema import validate_problem

    _check_args(locals())
    rng = np.random.default_rng(seed)
    options = tuple(options)
    settings = ProblemSettings(group_size=group_size, mlp_group=mlp_block)
    bits = [parse_option(o).bits for o in options]
    # a finer group quantizes better: the loss of b<k>g<G> scales as (G / default)^(1/4)
    group_factor = np.array([(settings.group_size_of(o) or group_size) / group_size
                             for o in options]) ** 0.25

    qd, kvd = q_per_kv * head_dim, kv_per_group * head_dim
    attn = UnitShape(id="attn", kind="head_group", slices=(
        SliceShape(qd, hidden, 0), SliceShape(kvd, hidden, 0), SliceShape(kvd, hidden, 0),
        SliceShape(hidden, qd, 1)), extra={"q_heads": q_per_kv, "head_dim": head_dim})
    mlp = UnitShape(id="mlp", kind="mlp_group", slices=(
        SliceShape(mlp_block, hidden, 0), SliceShape(mlp_block, hidden, 0),
        SliceShape(hidden, mlp_block, 1)))
    models = [get_cost_model("memory")] if "memory_bytes" in resources else []
    if {"decode_latency_us", "prefill_latency_us"} & set(resources):
        models.append(get_cost_model("roofline", device="h200"))
    costs = {}
    for shape in (attn, mlp):
        per_option = {}
        for o in options:
            merged = option_costs(models, shape, o, settings)
            per_option[o] = {r: float(merged[r]) for r in resources}
        costs[shape.kind] = per_option

    # losses: per layer (U-shaped over depth) x per unit (log-normal) x params share
    depth = np.linspace(-1.0, 1.0, layers)
    layer_factor = (1.0 + 1.5 * depth**2) * np.exp(rng.normal(0.0, 0.3, layers))
    kinds = ["head_group"] * kv_groups + ["mlp_group"] * mlp_groups
    params = {"head_group": attn.params, "mlp_group": mlp.params}
    n_units = layers * len(kinds)
    unit_factor = np.exp(rng.normal(0.0, 0.6, n_units))
    prune_factor = np.exp(rng.normal(0.0, 1.2, n_units))
    option_noise = np.exp(rng.normal(0.0, 0.1, (n_units, len(options))))
    base = np.empty(n_units)
    for li in range(layers):
        for k, kind in enumerate(kinds):
            i = li * len(kinds) + k
            base[i] = layer_factor[li] * unit_factor[i] * params[kind]
    base *= LOSS_AT_4BIT / float(np.sum(base * 4.0**-4))
    loss = np.empty((n_units, len(options)))
    kept_cols = [j for j, b in enumerate(bits) if b > 0]
    for j, b in enumerate(bits):
        if b > 0:
            loss[:, j] = base * 4.0 ** (-b) * group_factor[j] * option_noise[:, j]
    if kept_cols:
        # keep losses decreasing in bits (and in finer groups) despite the noise
        order = sorted(kept_cols, key=lambda j: (bits[j], -group_factor[j]))
        loss[:, order] = np.maximum.accumulate(loss[:, order][:, ::-1], axis=1)[:, ::-1]
    for j, b in enumerate(bits):
        if b == 0:
            # pruning ~ the loss of a 1-bit quantization, spread wide: most units much worse
            # than 2 bits, a few nearly free (the redundant heads/channels pruning finds)
            loss[:, j] = base * 0.25 * prune_factor
    units = []
    for li in range(layers):
        for k, kind in enumerate(kinds):
            i = li * len(kinds) + k
            uid = f"L{li}.attn.g{k}" if kind == "head_group" else \
                f"L{li}.mlp.c{k - kv_groups}"
            opts = tuple(Option(o, float(loss[i, j]), dict(costs[kind][o]))
                         for j, o in enumerate(options))
            units.append(Unit(id=uid, options=opts, kind=kind, layer=li, params=params[kind]))
    constraints = ()
    if min_kept_heads:
        constraints = tuple(
            Constraint("min_kept", tuple(f"L{li}.attn.g{k}" for k in range(kv_groups)),
                       min_kept_heads) for li in range(layers))

    interactions = None
    if rank > 0:
        interactions = Interactions(U=_factor(rng, loss, bits, layers, len(kinds), rank),
                                    file=None)
    meta = {"generator": "bitsack.solver.generate", "seed": seed, "tightness": tightness,
            "rank": rank, "shape": {"layers": layers, "kv_groups": kv_groups,
                                    "mlp_groups": mlp_groups, "hidden": hidden,
                                    "head_dim": head_dim, "q_per_kv": q_per_kv,
                                    "kv_per_group": kv_per_group, "mlp_block": mlp_block,
                                    "group_size": group_size},
            "cost_models": [m.describe() for m in models]}
    name = name or (f"synthetic-L{layers}-kv{kv_groups}-mlp{mlp_groups}-r{rank}-s{seed}")
    problem = Problem(name=name, units=tuple(units),
                      resources=tuple(Resource(r) for r in resources),
                      constraints=constraints, interactions=interactions, metadata=meta,
                      settings=settings)
    limits = []
    for r in resources:
        lo = min_cost_per_resource(problem, r)
        hi = max_cost_per_resource(problem, r)
        limit = lo + tightness * (hi - lo)
        if r == "memory_bytes":
            limit = float(math.floor(limit))
        limits.append(Resource(r, limit))
    problem = Problem(name=name, units=tuple(units), resources=tuple(limits),
                      constraints=constraints, interactions=interactions, metadata=meta,
                      settings=settings)
    return validate_problem(problem)


def _factor(rng: np.random.Generator, loss: np.ndarray, bits: list[int], layers: int,
            per_layer: int, rank: int) -> np.ndarray:
    n_units, n_opts = loss.shape
    shared = rng.normal(size=(layers, rank))
    direction = np.repeat(shared, per_layer, axis=0) * 0.6 + rng.normal(size=(n_units, rank))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    prune_dir = rng.normal(size=(n_units, rank))
    prune_dir /= np.linalg.norm(prune_dir, axis=1, keepdims=True)
    cols = np.empty((n_units, n_opts, rank))
    for j, b in enumerate(bits):
        d = prune_dir * 0.5 + direction * 0.5 if b == 0 else direction
        d = d / np.linalg.norm(d, axis=1, keepdims=True)
        cols[:, j, :] = d * np.sqrt(2.0 * loss[:, j])[:, None]
        if b == 16:
            cols[:, j, :] = 0.0
    U = cols.reshape(n_units * n_opts, rank).T.copy()
    # rescale so the interaction at uniform 4 bits (or the middle option) is a set fraction
    ref = bits.index(4) if 4 in bits else n_opts // 2
    chosen = np.arange(n_units) * n_opts + ref
    c = U[:, chosen]
    tot = c.sum(axis=1)
    inter = 0.5 * (float(tot @ tot) - float(np.sum(c * c)))
    standalone = float(loss[:, ref].sum())
    if abs(inter) > 0:
        U *= math.sqrt(INTERACTION_FRACTION * standalone / abs(inter))
    return U


#: Inclusive ranges of the generator's integer arguments (a 70B model is well inside).
ARG_RANGES: dict[str, tuple[int, int]] = {
    "layers": (1, 1024), "kv_groups": (0, 1024), "mlp_groups": (0, 4096),
    "hidden": (1, 1 << 17), "head_dim": (1, 4096), "q_per_kv": (1, 1024),
    "mlp_block": (1, 1 << 17), "group_size": (1, 1 << 20), "kv_per_group": (1, 1024),
    "rank": (0, 4096), "seed": (0, 2**63 - 1), "min_kept_heads": (0, 1024),
}
#: Most options of a generated instance, and most entries of its factor U.
MAX_OPTIONS = 2_000_000
MAX_FACTOR_ENTRIES = 1 << 27


def _check_args(args: dict[str, Any]) -> None:
    for key, (lo, hi) in ARG_RANGES.items():
        value = args[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValidationError(key, f"{value!r} is out of range; valid: an integer in "
                                  f"{lo}..{hi}")
    if args["kv_groups"] + args["mlp_groups"] < 1:
        raise ValidationError("kv_groups", "a layer needs at least one unit")
    n_options = args["layers"] * (args["kv_groups"] + args["mlp_groups"]) \
        * len(list(args["options"]))
    if n_options > MAX_OPTIONS:
        raise ValidationError("layers", f"the shape makes {n_options} options; valid: at most "
                              f"{MAX_OPTIONS}")
    if args["rank"] * n_options > MAX_FACTOR_ENTRIES:
        raise ValidationError("rank", f"{args['rank']} x {n_options} options is a factor of "
                              f"{args['rank'] * n_options} entries; valid: at most "
                              f"{MAX_FACTOR_ENTRIES}")
    if args["min_kept_heads"] > args["kv_groups"]:
        raise ValidationError("min_kept_heads", f"{args['min_kept_heads']} exceeds kv_groups = "
                              f"{args['kv_groups']}")
    t = args["tightness"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
        raise ValidationError("tightness", f"{t!r} is out of range; valid: (0, 1]")
    opts = list(args["options"])
    if not opts or len(set(opts)) != len(opts):
        raise ValidationError("options", f"{opts!r}: valid: a non-empty list of distinct ids")
    for o in opts:
        try:
            parse_option(o)
        except ValueError:
            raise ValidationError("options", f"{o!r} is not an option id; valid: "
                                  f"{OPTION_ID_GRAMMAR}") from None
    res = list(args["resources"])
    for r in res:
        if r not in _SUPPORTED_RESOURCES:
            raise ValidationError("resources", f"{r!r} has no cost model here; valid: "
                                  f"{list(_SUPPORTED_RESOURCES)}")
    if len(set(res)) != len(res):
        raise ValidationError("resources", f"{res!r} lists a resource twice")

