"""Reading, writing and validating ``bitsack.problem/v1`` files (YAML or JSON).

The format is chosen by extension: ``.json`` is JSON, ``.yaml`` / ``.yml`` is YAML. Both hold
the same document (DESIGN.md, "The problem"). YAML is read with PyYAML's *safe* loader only
(the C one when libyaml is present), so a file can never make the loader construct an object
or run code; ``!!python/...`` tags are rejected. The low-rank interaction factor ``U`` lives in
an ``.npz`` sidecar beside the problem file, read with ``allow_pickle=False``.

Validation is complete and names the field path of every error, e.g.
``units[12].options[3].cost.memory_bytes: -5.0 is negative; valid: a finite number >= 0``.

Large instances (a 7B-shaped problem has ~18k options) are meant to be JSON: parsing is
``json.load`` plus one pass over the options with cheap type checks, well under a second.
YAML is written by a small emitter (one flow-style line per option) because PyYAML's own
representer is slow on large documents and prints options over several lines.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bitsack.errors import ValidationError
from bitsack.solver.problem import (
    CONSTRAINT_TYPES,
    SCHEMA,
    Constraint,
    Interactions,
    Option,
    Pair,
    Problem,
    Resource,
    Unit,
)

_TOP_KEYS = ("schema", "name", "resources", "units", "constraints", "interactions", "metadata")
_RESOURCE_KEYS = ("limit",)
_UNIT_KEYS = ("id", "kind", "layer", "params", "options")
_OPTION_KEYS = ("id", "loss", "cost")
_CONSTRAINT_KEYS = ("type", "units", "count")
_INTERACTION_KEYS = ("file", "pairs")
_PAIR_KEYS = ("a", "b", "value")
_VALID_OPTION_IDS = frozenset(["prune"] + [f"b{k}" for k in range(1, 17)])
_OPTION_IDS_TEXT = "'prune' or 'b1'..'b16'"

# PyYAML implements YAML 1.1, which reads ``1e3`` (no dot, or no exponent sign) as a *string*.
# Such strings are accepted as numbers so a hand-written file means what it looks like.
_YAML11_FLOAT_STRING = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


# --------------------------------------------------------------------------------------------
# public API


def load_problem(path: str | Path) -> Problem:
    """Read and validate a problem file (``.json``, ``.yaml`` or ``.yml``).

    Args:
        path: the problem file; a sidecar named in ``interactions.file`` is read relative to
            the file's folder.

    Returns:
        The validated :class:`Problem`.

    Raises:
        bitsack.errors.ValidationError: unreadable file, unknown extension, malformed document
            or any invalid field (the message names its path).
    """
    path = Path(path)
    fmt = _format_of(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValidationError("problem", f"{str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError("problem", f"{str(path)!r} cannot be read: {exc}") from exc
    data = _parse_json(text, path) if fmt == "json" else _parse_yaml(text, path)
    return problem_from_dict(data, base_dir=path.parent, default_name=path.stem)


def dump_problem(problem: Problem, path: str | Path) -> None:
    """Write ``problem`` to ``path`` (JSON or YAML by extension), atomically.

    If the problem has a low-rank factor ``U`` it is written to the sidecar named by
    ``interactions.file`` (relative to the output folder), or ``<stem>.interactions.npz`` when
    the problem has none or names a path outside the output folder. The sidecar is written
    (atomically) before the problem file, so the problem file never names a missing sidecar.

    Raises:
        bitsack.errors.ValidationError: unknown extension.
    """
    from bitsack.io import atomic_write, atomic_write_path

    path = Path(path)
    fmt = _format_of(path)
    inter = problem.interactions
    if inter is not None and inter.U is not None:
        import numpy as np

        name = _sidecar_name(inter.file, path)
        if name != inter.file:
            problem = _replace_interactions(problem, Interactions(U=inter.U, file=name,
                                                                  pairs=inter.pairs))
        U = np.ascontiguousarray(inter.U, dtype=np.float64)

        def write_npz(tmp: str) -> None:
            # np.savez appends ".npz" to a name without it; the temp name already ends in .npz
            with open(tmp, "wb") as handle:
                np.savez(handle, U=U)

        atomic_write_path(path.parent / name, write_npz)
    data = problem_to_dict(problem)
    with atomic_write(path, "w", encoding="utf-8") as handle:
        if fmt == "json":
            json.dump(data, handle, indent=1, ensure_ascii=False, allow_nan=False)
            handle.write("\n")
        else:
            handle.write(_emit_yaml(data))


def problem_to_dict(problem: Problem) -> dict[str, Any]:
    """The document of ``problem`` as plain JSON-able data (``U`` excluded: it is a sidecar)."""
    data: dict[str, Any] = {"schema": problem.schema, "name": problem.name}
    data["resources"] = {r.name: {"limit": _num(r.limit)} for r in problem.resources}
    units = []
    for unit in problem.units:
        entry: dict[str, Any] = {"id": unit.id}
        if unit.kind is not None:
            entry["kind"] = unit.kind
        if unit.layer is not None:
            entry["layer"] = unit.layer
        if unit.params is not None:
            entry["params"] = unit.params
        entry["options"] = [
            {"id": o.id, "loss": _num(o.loss), "cost": {k: _num(v) for k, v in o.cost.items()}}
            for o in unit.options
        ]
        units.append(entry)
    data["units"] = units
    if problem.constraints:
        cons = []
        for con in problem.constraints:
            item: dict[str, Any] = {"type": con.type, "units": list(con.units)}
            if con.count is not None:
                item["count"] = con.count
            cons.append(item)
        data["constraints"] = cons
    inter = problem.interactions
    if inter is not None and (inter.U is not None or inter.pairs or inter.file):
        block: dict[str, Any] = {}
        if inter.file is not None:
            block["file"] = inter.file
        if inter.pairs:
            block["pairs"] = [{"a": list(p.a), "b": list(p.b), "value": _num(p.value)}
                              for p in inter.pairs]
        data["interactions"] = block
    if problem.metadata:
        data["metadata"] = problem.metadata
    return data


def problem_from_dict(data: Any, *, base_dir: str | Path | None = None, U: Any = None,
                      default_name: str | None = None) -> Problem:
    """Validate a parsed document and build the :class:`Problem`.

    Args:
        data: the parsed YAML/JSON document.
        base_dir: folder that ``interactions.file`` is relative to (needed to read it).
        U: the low-rank factor, when the caller has it in memory already; then
            ``interactions.file`` is not read (its name is kept).
        default_name: the name when the document has none (the file's stem).

    Raises:
        bitsack.errors.ValidationError: the first invalid field, with its path.
    """
    if not isinstance(data, Mapping):
        raise ValidationError("problem", f"the document is a {type(data).__name__}; "
                              "valid: a mapping with keys " + ", ".join(_TOP_KEYS))
    _check_keys(data, _TOP_KEYS, "")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise ValidationError("schema", f"{schema!r} is not supported; valid: {SCHEMA!r}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ValidationError("name", f"{name!r} is not a non-empty string")

    resources = _parse_resources(data.get("resources"))
    res_names = {r.name for r in resources}
    units, used = _parse_units(data.get("units"), res_names)
    for res in resources:
        if res.limit is not None and res.name not in used:
            raise ValidationError(f"resources.{res.name}.limit",
                                  f"{res.limit!r} budgets a resource that no option has a "
                                  f"cost on, so it constrains nothing; valid: a budget on a "
                                  f"resource the options use ({sorted(used) or 'none'}), or "
                                  "limit: null")
    index = {u.id: i for i, u in enumerate(units)}
    constraints = _parse_constraints(data.get("constraints"), units, index)
    interactions = _parse_interactions(data.get("interactions"), units, index, base_dir, U)
    metadata = data.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise ValidationError("metadata", f"is a {type(metadata).__name__}; valid: a mapping")
    return Problem(name=name, units=units, resources=resources, constraints=constraints,
                   interactions=interactions, metadata=dict(metadata), schema=SCHEMA)


def validate_problem(problem: Problem) -> Problem:
    """Run the full file validation on a problem built in code; returns it unchanged.

    Raises:
        bitsack.errors.ValidationError: the first invalid field, with its path.
    """
    U = problem.interactions.U if problem.interactions is not None else None
    problem_from_dict(problem_to_dict(problem), U=U)
    return problem


def with_limits(problem: Problem, limits: Mapping[str, float | None]) -> Problem:
    """A copy of ``problem`` with some resource limits replaced (None removes a budget).

    Raises:
        bitsack.errors.ValidationError: an unknown resource, a negative/NaN limit, or a budget
            on a resource no option uses.
    """
    names = [r.name for r in problem.resources]
    for name, value in limits.items():
        if name not in names:
            raise ValidationError(f"budget.{name}", f"is not a resource of problem "
                                  f"{problem.name!r}; valid: {names}")
        if value is not None:
            _check_limit(value, f"budget.{name}")
    used = _used_resources(problem)
    for name, value in limits.items():
        if value is not None and name not in used:
            raise ValidationError(f"budget.{name}", f"{value!r} budgets a resource that no "
                                  f"option has a cost on; valid: one of {sorted(used)}")
    resources = tuple(
        Resource(r.name, float(limits[r.name]) if limits.get(r.name) is not None else None)
        if r.name in limits else r
        for r in problem.resources
    )
    return _replace(problem, resources=resources)


def restrict_options(problem: Problem, allowed: Mapping[str, Iterable[str]],
                     name: str | None = None) -> Problem:
    """A copy of ``problem`` where unit ``u`` keeps only the options in ``allowed[u]``.

    Units not in ``allowed`` keep all their options. The interaction factor keeps the columns
    of the surviving options (so the objective of any surviving assignment is unchanged);
    explicit pairs that name a removed option are dropped.

    Raises:
        ValidationError: a unit would be left with no option.
    """
    import dataclasses

    import numpy as np

    keep_cols: list[int] = []
    units = []
    col = 0
    for unit in problem.units:
        ok = set(allowed[unit.id]) if unit.id in allowed else None
        opts = []
        for opt in unit.options:
            if ok is None or opt.id in ok:
                opts.append(opt)
                keep_cols.append(col)
            col += 1
        if not opts:
            raise ValidationError(f"allowed[{unit.id!r}]", f"{sorted(ok or ())} leaves no "
                                  f"option; valid: a subset of {[o.id for o in unit.options]}")
        units.append(dataclasses.replace(unit, options=tuple(opts)))
    inter = problem.interactions
    if inter is not None:
        kept = {(u.id, o.id) for u in units for o in u.options}
        pairs = tuple(p for p in inter.pairs if tuple(p.a) in kept and tuple(p.b) in kept)
        U = None if inter.U is None else np.ascontiguousarray(inter.U[:, keep_cols])
        inter = Interactions(U=U, file=inter.file, pairs=pairs)
        if inter.U is None and not inter.pairs:
            inter = None
    out = dataclasses.replace(problem, name=name or problem.name, units=tuple(units),
                              interactions=inter)
    return validate_problem(out)


def without_option(problem: Problem, option_id: str, name: str | None = None) -> Problem:
    """A copy of ``problem`` where no unit offers ``option_id`` (e.g. ``"prune"``: bits only).

    Units whose only option it is keep it (nothing else could be chosen for them).
    """
    allowed = {u.id: [o.id for o in u.options if o.id != option_id] for u in problem.units
               if any(o.id == option_id for o in u.options) and len(u.options) > 1}
    return restrict_options(problem, allowed, name=name)


def with_interaction_weight(problem: Problem, weight: float) -> Problem:
    """A copy of ``problem`` whose interaction terms are multiplied by ``weight`` in [0, 1].

    ``U`` is scaled by √weight and explicit pair values by ``weight``; 0 removes the
    interactions (additive objective), 1 returns ``problem`` unchanged. When each unit's
    standalone loss is its own Fisher form (``loss_u = ½‖U_u‖²``, the ``fisher`` estimator),
    the weighted objective is ``(1 − w)·Σ loss + w·½‖Σ U‖²``: a shrinkage of the estimated
    Fisher matrix toward its block diagonal, which stays convex and keeps at least
    ``(1 − w)`` of the additive loss, so a plan cannot look free by cancelling errors in the N
    sampled directions of a rank-N factor.

    Raises:
        bitsack.errors.ValidationError: ``weight`` outside [0, 1].
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not 0.0 <= weight <= 1.0:
        raise ValidationError("interactions", f"{weight!r}; valid: a weight in [0, 1] (0 = "
                              "additive objective, 1 = the full interaction terms)")
    inter = problem.interactions
    if inter is None or weight == 1.0:
        return problem
    if weight == 0.0:
        return _replace(problem, interactions=None)
    U = None if inter.U is None else inter.U * math.sqrt(weight)
    pairs = tuple(Pair(p.a, p.b, p.value * weight) for p in inter.pairs)
    return _replace_interactions(problem, Interactions(U=U, file=inter.file, pairs=pairs))


def avg_bits_limit(problem: Problem, bits: float, resource: str = "memory_bytes") -> float:
    """The ``memory_bytes`` limit meaning ``bits`` bits per original weight, overhead included.

    ``limit = bits · Σ_u params_u / 8`` bytes (DESIGN.md): pruned weights count 0 bits, scales
    and zeros count in the packed bytes.

    Raises:
        bitsack.errors.ValidationError: ``bits`` not a finite positive number, a unit without
            ``params``, or the problem has no ``memory_bytes`` resource.
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits) \
            or bits <= 0:
        raise ValidationError("avg_bits", f"{bits!r} is not a positive finite number of bits "
                              "per weight")
    if resource not in {r.name for r in problem.resources}:
        raise ValidationError("avg_bits", f"needs a {resource!r} resource; problem "
                              f"{problem.name!r} has {[r.name for r in problem.resources]}")
    missing = [i for i, u in enumerate(problem.units) if not u.params]
    if missing:
        i = missing[0]
        raise ValidationError(f"units[{i}].params", f"{problem.units[i].params!r} on unit "
                              f"{problem.units[i].id!r} ({len(missing)} unit(s) lack params); "
                              "an avg-bits budget needs every unit's weight count (> 0)")
    return float(bits) * problem.total_params / 8.0


# --------------------------------------------------------------------------------------------
# parsing and validation


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ValidationError("problem", f"{str(path)!r} has extension {suffix!r}; "
                          "valid: .json, .yaml, .yml")


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError("problem", f"{str(path)!r} is not valid JSON: {exc}") from None


def _parse_yaml(text: str, path: Path) -> Any:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a *safe* loader, never yaml.Loader
    except yaml.YAMLError as exc:
        raise ValidationError("problem", f"{str(path)!r} is not valid (safe) YAML: "
                              f"{str(exc).splitlines()[0]} {_yaml_mark(exc)}") from None


def _yaml_mark(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f"(line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _check_keys(obj: Mapping, valid: tuple[str, ...], path: str) -> None:
    for key in obj:
        if key not in valid:
            where = f"{path}.{key}" if path else str(key)
            raise ValidationError(where, f"unknown key {key!r}; valid keys here: "
                                  + ", ".join(valid))


def _as_number(value: Any, path: str) -> float:
    """``value`` as a float; bools and non-numeric strings are errors."""
    if isinstance(value, bool):
        raise ValidationError(path, f"{value!r} is a boolean; valid: a number")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _YAML11_FLOAT_STRING.match(value):
        return float(value)
    raise ValidationError(path, f"{value!r} is not a number")


def _check_limit(value: Any, path: str) -> float:
    limit = _as_number(value, path)
    if not math.isfinite(limit):
        raise ValidationError(path, f"{limit!r} is not finite; valid: a number >= 0, or null "
                              "for no budget")
    if limit < 0:
        raise ValidationError(path, f"{limit!r} is negative; valid: a number >= 0, or null for "
                              "no budget")
    return limit


def _parse_resources(raw: Any) -> tuple[Resource, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ValidationError("resources", f"is a {type(raw).__name__}; valid: a mapping "
                              "resource name -> {limit: number or null}")
    out = []
    for name, spec in raw.items():
        path = f"resources.{name}"
        if not isinstance(name, str) or not name:
            raise ValidationError(path, f"{name!r} is not a non-empty resource name")
        if spec is None:
            spec = {}
        if not isinstance(spec, Mapping):
            raise ValidationError(path, f"{spec!r} is not a mapping; valid: {{limit: number}}")
        _check_keys(spec, _RESOURCE_KEYS, path)
        limit = spec.get("limit")
        out.append(Resource(name, None if limit is None else _check_limit(limit,
                                                                          f"{path}.limit")))
    return tuple(out)


def _parse_units(raw: Any, res_names: set[str]) -> tuple[tuple[Unit, ...], set[str]]:
    if not isinstance(raw, list) or not raw:
        raise ValidationError("units", f"{_short(raw)} is not a non-empty list of units")
    units: list[Unit] = []
    seen: dict[str, int] = {}
    used: set[str] = set()
    unit_keys = frozenset(_UNIT_KEYS)
    option_keys = frozenset(_OPTION_KEYS)
    isfinite = math.isfinite
    for i, u in enumerate(raw):
        upath = f"units[{i}]"
        if not isinstance(u, Mapping):
            raise ValidationError(upath, f"{_short(u)} is not a mapping")
        if not unit_keys.issuperset(u):
            _check_keys(u, _UNIT_KEYS, upath)
        uid = u.get("id")
        if not isinstance(uid, str) or not uid:
            raise ValidationError(f"{upath}.id", f"{uid!r} is not a non-empty string")
        if uid in seen:
            raise ValidationError(f"{upath}.id", f"{uid!r} duplicates units[{seen[uid]}].id; "
                                  "unit ids must be unique")
        seen[uid] = i
        kind = u.get("kind")
        if kind is not None and (not isinstance(kind, str) or not kind):
            raise ValidationError(f"{upath}.kind", f"{kind!r} is not a non-empty string; "
                                  "usual kinds: head_group, mlp_group, embedding, other")
        layer = u.get("layer")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                                  or layer < 0):
            raise ValidationError(f"{upath}.layer", f"{layer!r} is not an integer >= 0")
        params = u.get("params")
        if params is not None and (isinstance(params, bool) or not isinstance(params, int)
                                   or params < 0):
            raise ValidationError(f"{upath}.params", f"{params!r} is not an integer >= 0")
        raw_opts = u.get("options")
        if not isinstance(raw_opts, list) or not raw_opts:
            raise ValidationError(f"{upath}.options", f"{_short(raw_opts)} on unit {uid!r}: a "
                                  "unit needs a non-empty list of options")
        options = []
        opt_seen: set[str] = set()
        for j, o in enumerate(raw_opts):
            if not isinstance(o, Mapping):
                raise ValidationError(f"{upath}.options[{j}]", f"{_short(o)} is not a mapping")
            if not option_keys.issuperset(o):
                _check_keys(o, _OPTION_KEYS, f"{upath}.options[{j}]")
            oid = o.get("id")
            if oid not in _VALID_OPTION_IDS:
                raise ValidationError(f"{upath}.options[{j}].id",
                                      f"{oid!r} is not an option id; valid: {_OPTION_IDS_TEXT}")
            if oid in opt_seen:
                raise ValidationError(f"{upath}.options[{j}].id", f"{oid!r} appears twice in "
                                      f"unit {uid!r}; option ids must be unique per unit")
            opt_seen.add(oid)
            loss = o.get("loss")
            if type(loss) is float or type(loss) is int:  # fast path for the common case
                loss = float(loss)
            else:
                loss = _as_number(loss, f"{upath}.options[{j}].loss")
            if not isfinite(loss):
                raise ValidationError(f"{upath}.options[{j}].loss",
                                      f"{loss!r} is not finite; valid: a finite number")
            raw_cost = o.get("cost")
            cost: dict[str, float] = {}
            if raw_cost is not None:
                if not isinstance(raw_cost, Mapping):
                    raise ValidationError(f"{upath}.options[{j}].cost", f"{_short(raw_cost)} "
                                          "is not a mapping resource -> number")
                for rname, value in raw_cost.items():
                    if type(value) is float or type(value) is int:
                        value = float(value)
                    else:
                        value = _as_number(value, f"{upath}.options[{j}].cost.{rname}")
                    if not (value >= 0 and isfinite(value)):
                        what = "is negative" if value < 0 else "is not finite"
                        raise ValidationError(f"{upath}.options[{j}].cost.{rname}",
                                              f"{value!r} {what}; valid: a finite number >= 0")
                    if rname not in res_names:
                        raise ValidationError(f"{upath}.options[{j}].cost.{rname}",
                                              f"{rname!r} is not a declared resource; declare "
                                              f"it under resources (declared: "
                                              f"{sorted(res_names)})")
                    if value:
                        used.add(rname)
                    cost[rname] = value
            options.append(Option(oid, loss, cost))
        units.append(Unit(id=uid, options=tuple(options), kind=kind, layer=layer,
                          params=params))
    return tuple(units), used


def _unit_list(raw: Any, path: str, index: dict[str, int]) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise ValidationError(path, f"{_short(raw)} is not a non-empty list of unit ids")
    seen: set[str] = set()
    for k, uid in enumerate(raw):
        if not isinstance(uid, str) or uid not in index:
            raise ValidationError(f"{path}[{k}]", f"{uid!r} is not a unit of this problem; "
                                  "valid: the ids listed under units")
        if uid in seen:
            raise ValidationError(f"{path}[{k}]", f"{uid!r} is listed twice")
        seen.add(uid)
    return tuple(raw)


def _parse_constraints(raw: Any, units: tuple[Unit, ...],
                       index: dict[str, int]) -> tuple[Constraint, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValidationError("constraints", f"{_short(raw)} is not a list")
    out = []
    for i, c in enumerate(raw):
        path = f"constraints[{i}]"
        if not isinstance(c, Mapping):
            raise ValidationError(path, f"{_short(c)} is not a mapping")
        _check_keys(c, _CONSTRAINT_KEYS, path)
        ctype = c.get("type")
        if ctype not in CONSTRAINT_TYPES:
            raise ValidationError(f"{path}.type", f"{ctype!r} is not a constraint type; "
                                  f"valid: {', '.join(CONSTRAINT_TYPES)}")
        ids = _unit_list(c.get("units"), f"{path}.units", index)
        members = [units[index[u]] for u in ids]
        count = c.get("count")
        if ctype == "min_kept":
            keepable = sum(any(not o.is_prune for o in m.options) for m in members)
            if isinstance(count, bool) or not isinstance(count, int) or \
                    not 0 <= count <= keepable:
                raise ValidationError(f"{path}.count", f"{count!r} is out of range; valid: an "
                                      f"integer from 0 to {keepable} (the listed units that "
                                      "have a kept option)")
        elif count is not None:
            raise ValidationError(f"{path}.count", f"{count!r} is only meaningful for min_kept; "
                                  f"remove it from this {ctype} constraint")
        if ctype == "same_option":
            common = set.intersection(*({o.id for o in m.options} for m in members))
            if not common:
                raise ValidationError(f"{path}.units", "these units share no option id, so "
                                      "same_option cannot hold; valid: units with a common "
                                      "option")
        elif ctype == "same_bits" and not all(any(o.is_prune for o in m.options)
                                              for m in members):
            bit_sets = [{o.bits for o in m.options if not o.is_prune} for m in members
                        if not any(o.is_prune for o in m.options)]
            if not set.intersection(*bit_sets):
                raise ValidationError(f"{path}.units", "the units that cannot be pruned share "
                                      "no bit-width, so same_bits cannot hold; valid: units "
                                      "with a common bit-width")
        out.append(Constraint(type=ctype, units=ids, count=count))
    return tuple(out)


def _parse_interactions(raw: Any, units: tuple[Unit, ...], index: dict[str, int],
                        base_dir: str | Path | None, U: Any) -> Interactions | None:
    n_options = sum(len(u.options) for u in units)
    if raw is None:
        if U is not None:  # built in code: the factor has no file yet (dump names one)
            return Interactions(U=_check_factor(U, n_options, "interactions.U"))
        return None
    if not isinstance(raw, Mapping):
        raise ValidationError("interactions", f"{_short(raw)} is not a mapping")
    _check_keys(raw, _INTERACTION_KEYS, "interactions")
    pairs = _parse_pairs(raw.get("pairs"), units, index)
    file = raw.get("file")
    if file is None:
        U = None if U is None else _check_factor(U, n_options, "interactions.U")
        return Interactions(U=U, file=None, pairs=pairs)
    if not isinstance(file, str) or not file:
        raise ValidationError("interactions.file", f"{file!r} is not a file name")
    if U is None:
        U = _read_sidecar(file, base_dir)
    U = _check_factor(U, n_options, f"interactions.file ({file})")
    return Interactions(U=U, file=file, pairs=pairs)


def _parse_pairs(raw: Any, units: tuple[Unit, ...], index: dict[str, int]) -> tuple[Pair, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValidationError("interactions.pairs", f"{_short(raw)} is not a list")
    out = []
    for i, p in enumerate(raw):
        path = f"interactions.pairs[{i}]"
        if not isinstance(p, Mapping):
            raise ValidationError(path, f"{_short(p)} is not a mapping")
        _check_keys(p, _PAIR_KEYS, path)
        ends = []
        for end in ("a", "b"):
            ref = p.get(end)
            epath = f"{path}.{end}"
            if not (isinstance(ref, list) and len(ref) == 2 and all(isinstance(x, str)
                                                                     for x in ref)):
                raise ValidationError(epath, f"{_short(ref)} is not [unit id, option id]")
            uid, oid = ref
            if uid not in index:
                raise ValidationError(epath, f"unit {uid!r} is not a unit of this problem")
            if oid not in {o.id for o in units[index[uid]].options}:
                raise ValidationError(epath, f"option {oid!r} is not an option of unit {uid!r}; "
                                      f"valid: {[o.id for o in units[index[uid]].options]}")
            ends.append((uid, oid))
        if ends[0][0] == ends[1][0]:
            raise ValidationError(path, f"a and b are both options of unit {ends[0][0]!r}; an "
                                  "interaction couples two different units")
        value = _as_number(p.get("value"), f"{path}.value")
        if not math.isfinite(value):
            raise ValidationError(f"{path}.value", f"{value!r} is not finite")
        out.append(Pair(a=ends[0], b=ends[1], value=value))
    return tuple(out)


def _read_sidecar(file: str, base_dir: str | Path | None) -> Any:
    import numpy as np

    if base_dir is None:
        raise ValidationError("interactions.file", f"{file!r} cannot be located: the problem "
                              "was not read from a file; pass U explicitly")
    path = Path(base_dir) / file
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "U" not in npz.files:
                raise ValidationError("interactions.file", f"{file!r} has arrays {npz.files}; "
                                      "valid: an .npz with an array named 'U'")
            return npz["U"]
    except FileNotFoundError:
        raise ValidationError("interactions.file", f"{file!r} does not exist next to the "
                              f"problem (looked for {str(path)!r})") from None
    except ValidationError:
        raise
    except Exception as exc:  # zip errors, object arrays refused by allow_pickle=False, ...
        raise ValidationError("interactions.file", f"{file!r} cannot be read as an .npz of "
                              f"numbers: {exc}") from None


def _check_factor(U: Any, n_options: int, path: str):
    import numpy as np

    arr = np.asarray(U)
    if arr.dtype.kind not in "iuf":
        raise ValidationError(path, f"U has dtype {arr.dtype}; valid: a real numeric array")
    if arr.ndim != 2 or arr.shape[1] != n_options:
        raise ValidationError(path, f"U has shape {list(arr.shape)}; valid: [N, {n_options}] "
                              f"(N factors x the problem's {n_options} options in file order)")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        value = float(arr[tuple(bad)])
        raise ValidationError(path, f"U[{bad[0]}, {bad[1]}] = {value!r} is not finite")
    arr.setflags(write=False)
    return arr


def _used_resources(problem: Problem) -> set[str]:
    return {name for u in problem.units for o in u.options for name, v in o.cost.items() if v}


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _replace(problem: Problem, **changes: Any) -> Problem:
    import dataclasses

    return dataclasses.replace(problem, **changes)


def _replace_interactions(problem: Problem, inter: Interactions) -> Problem:
    return _replace(problem, interactions=inter)


def _sidecar_name(current: str | None, out: Path) -> str:
    """The sidecar name to write beside ``out``: keep a plain relative name, else a default."""
    if current:
        p = Path(current)
        if not p.is_absolute() and ".." not in p.parts:
            return current
    return f"{out.stem}.interactions.npz"


# --------------------------------------------------------------------------------------------
# writing


def _num(value: float | None) -> float | int | None:
    """Integral floats below 2**53 as ints (readable ``800`` rather than ``800.0``)."""
    if value is None:
        return None
    value = float(value)
    if math.isfinite(value) and value == int(value) and abs(value) < 2**53:
        return int(value)
    return value


_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]*$")
_YAML_RESERVED = frozenset(
    "y n yes no on off true false null ~".split()
)


# Printable, but folded or stripped inside a quoted scalar: NEL, LS, PS (line breaks) and BOM.
_YAML_ESCAPE_ALWAYS = frozenset((0x85, 0x2028, 0x2029, 0xFEFF))


def _yaml_str(text: str) -> str:
    """A YAML scalar that reads back as exactly ``text`` (plain when safe, else quoted)."""
    if _PLAIN.match(text) and text.lower() not in _YAML_RESERVED:
        return text
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif (0x20 <= code <= 0x7E or 0xA0 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD
              or 0x10000 <= code <= 0x10FFFF) and code not in _YAML_ESCAPE_ALWAYS:
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:  # pragma: no cover - printable check above covers the astral planes
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _yaml_num(value: float | int | None) -> str:
    """A number PyYAML (YAML 1.1) reads back as the same number."""
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    if "e" in text:
        mantissa, exp = text.split("e")
        if "." not in mantissa:
            mantissa += ".0"
        if exp[0] not in "+-":
            exp = "+" + exp
        text = f"{mantissa}e{exp}"
    return text


def _emit_yaml(data: dict[str, Any]) -> str:
    """The document as YAML: block style at the top, one flow-style line per option."""
    import yaml

    s, n = _yaml_str, _yaml_num
    lines = [f"schema: {s(data['schema'])}", f"name: {s(data['name'])}"]
    resources = data.get("resources") or {}
    if resources:
        lines.append("resources:")
        for name, spec in resources.items():
            lines.append(f"  {s(name)}: {{limit: {n(spec['limit'])}}}")
    else:
        lines.append("resources: {}")
    lines.append("units:")
    for unit in data["units"]:
        lines.append(f"  - id: {s(unit['id'])}")
        for key in ("kind", "layer", "params"):
            if key in unit:
                val = unit[key]
                lines.append(f"    {key}: {s(val) if isinstance(val, str) else n(val)}")
        lines.append("    options:")
        for opt in unit["options"]:
            cost = ", ".join(f"{s(k)}: {n(v)}" for k, v in opt["cost"].items())
            lines.append(f"      - {{id: {opt['id']}, loss: {n(opt['loss'])}, cost: {{{cost}}}}}")
    if data.get("constraints"):
        lines.append("constraints:")
        for con in data["constraints"]:
            units = ", ".join(s(u) for u in con["units"])
            count = f", count: {con['count']}" if "count" in con else ""
            lines.append(f"  - {{type: {con['type']}, units: [{units}]{count}}}")
    if "interactions" in data:
        inter = data["interactions"]
        lines.append("interactions:")
        if "file" in inter:
            lines.append(f"  file: {s(inter['file'])}")
        if "pairs" in inter:
            lines.append("  pairs:")
            for p in inter["pairs"]:
                a = f"[{s(p['a'][0])}, {s(p['a'][1])}]"
                b = f"[{s(p['b'][0])}, {s(p['b'][1])}]"
                lines.append(f"    - {{a: {a}, b: {b}, value: {n(p['value'])}}}")
    if data.get("metadata"):
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        meta = yaml.dump({"metadata": data["metadata"]}, Dumper=dumper, sort_keys=False,
                         default_flow_style=False, allow_unicode=True, width=100)
        lines.append(meta.rstrip("\n"))
    return "\n".join(lines) + "\n"
