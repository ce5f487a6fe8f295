"""Validating a problem document and building the :class:`Problem` from it.

Validation is complete and names the field path of every error, e.g.
``units[12].options[3].cost.memory_bytes: -5.0 is negative; valid: a finite number >= 0``.
Values from the file are quoted through ``short_repr`` (bounded, whatever their size).
Numbers must lie in the problem's numerically safe range (``bitsack.solver.numeric``).
``interactions.file`` is read by ``bitsack.solver.sidecar`` (confined to the problem file's
folder, the factor's header checked before its data is read).

Large instances (a 7B-shaped problem has ~18k options) are meant to be JSON: parsing is
``json.loads`` plus one pass over the options with cheap type checks, well under a second.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bitsack.errors import ValidationError
from bitsack.solver.bounded import short_repr
from bitsack.solver.numeric import check_limit_value, check_ranges
from bitsack.solver.problem import (
    CONSTRAINT_TYPES,
    OPTION_ID_GRAMMAR,
    SCHEMA,
    SETTINGS_KEYS,
    Constraint,
    Interactions,
    Option,
    Pair,
    Problem,
    ProblemSettings,
    Resource,
    Unit,
    parse_option,
)
from bitsack.solver.sidecar import check_factor, file_label, read_sidecar

TOP_KEYS = ("schema", "name", "settings", "resources", "units", "constraints", "interactions",
            "metadata")
_RESOURCE_KEYS = ("limit",)
_UNIT_KEYS = ("id", "kind", "layer", "params", "options")
_OPTION_KEYS = ("id", "loss", "cost")
_CONSTRAINT_KEYS = ("type", "units", "count")
_INTERACTION_KEYS = ("file", "pairs")
_PAIR_KEYS = ("a", "b", "value")


# PyYAML implements YAML 1.1, which reads ``1e3`` (no dot, or no exponent sign) as a *string*.
# Such strings are accepted as numbers so a hand-written file means what it looks like.
#: Largest ``layer`` / ``params`` (2^53: every integer up to it is exact as a float).
MAX_COUNT = 2**53

#: Integers below this convert to float without overflow (larger ones go the slow path).
_BIG = 2**1000

_s = short_repr  # every value from a file is quoted through it (bounded, whatever its size)

_YAML11_FLOAT_STRING = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def problem_from_dict(data: Any, *, base_dir: str | Path | None = None, U: Any = None,
                      default_name: str | None = None) -> Problem:
    """Validate a parsed document and build the :class:`Problem`.

    Args:
        data: the parsed YAML/JSON document.
        base_dir: folder that ``interactions.file`` is relative to (needed to read it); the
            sidecar must lie inside it.
        U: the low-rank factor, when the caller has it in memory already; then
            ``interactions.file`` is not read (its name is kept).
        default_name: the name when the document has none (the file's stem).

    Raises:
        bitsack.errors.ValidationError: the first invalid field, with its path.
    """
    if not isinstance(data, Mapping):
        raise ValidationError("problem", f"the document is a {type(data).__name__}; "
                              "valid: a mapping with keys " + ", ".join(TOP_KEYS))
    _check_keys(data, TOP_KEYS, "")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise ValidationError("schema", f"{_s(schema)} is not supported; valid: "
                              f"{SCHEMA!r}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ValidationError("name", f"{_s(name)} is not a non-empty string")
    metadata = data.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise ValidationError("metadata", f"is a {type(metadata).__name__}; valid: a mapping")
    settings = _parse_settings(data.get("settings"), metadata)

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
    check_ranges(units, [r.name for r in resources],
                 pairs=interactions.pairs if interactions is not None else (),
                 U=interactions.U if interactions is not None else None,
                 u_path=file_label(interactions.file)
                 if interactions is not None and interactions.file else "interactions.U")
    return Problem(name=name, units=units, resources=resources, constraints=constraints,
                   interactions=interactions, metadata=dict(metadata), schema=SCHEMA,
                   settings=settings)


def validate_problem(problem: Problem) -> Problem:
    """Run the full file validation on a problem built in code; returns it unchanged.

    Raises:
        bitsack.errors.ValidationError: the first invalid field, with its path.
    """
    from bitsack.solver.document import problem_to_dict

    U = problem.interactions.U if problem.interactions is not None else None
    problem_from_dict(problem_to_dict(problem), U=U)
    return problem


def as_number(value: Any, path: str) -> float:
    """``value`` as a float; bools and non-numeric strings are errors."""
    if isinstance(value, bool):
        raise ValidationError(path, f"{value!r} is a boolean; valid: a number")
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an int beyond float range
            raise ValidationError(path, f"{_s(value)} is too large; valid: a finite "
                                  "number") from None
    if isinstance(value, str) and len(value) < 64 and _YAML11_FLOAT_STRING.match(value):
        return float(value)
    raise ValidationError(path, f"{_s(value)} is not a number")


def check_limit(value: Any, path: str) -> float:
    """A resource limit: a finite number in [0, ``MAX_MAGNITUDE``].

    Raises:
        ValidationError: naming ``path``.
    """
    return check_limit_value(as_number(value, path), path, "null")


def _parse_settings(raw: Any, metadata: Mapping[str, Any]) -> ProblemSettings:
    if raw is None:
        return ProblemSettings.from_metadata(metadata)
    if not isinstance(raw, Mapping):
        raise ValidationError("settings", f"{_s(raw)} is not a mapping; valid keys: "
                              + ", ".join(SETTINGS_KEYS))
    _check_keys(raw, SETTINGS_KEYS, "settings")
    return ProblemSettings(**{k: v for k, v in raw.items() if v is not None
                              or k == "quantizer"})


def _check_keys(obj: Mapping, valid: tuple[str, ...], path: str) -> None:
    for key in obj:
        if key not in valid:
            name = str(key) if len(str(key)) <= 60 else _s(key)
            where = f"{path}.{name}" if path else name
            raise ValidationError(where, f"unknown key {_s(key)}; valid keys here: "
                                  + ", ".join(valid))


def _mappings(raw: Any, name: str, keys: tuple[str, ...]) -> Iterator[tuple[str, Mapping]]:
    """``(path, entry)`` for each entry of the optional list ``name`` (None: none), after
    checking that it is a list of mappings with known keys."""
    if raw is None:
        return
    if not isinstance(raw, list):
        raise ValidationError(name, f"{_s(raw)} is not a list")
    for i, entry in enumerate(raw):
        path = f"{name}[{i}]"
        if not isinstance(entry, Mapping):
            raise ValidationError(path, f"{_s(entry)} is not a mapping")
        _check_keys(entry, keys, path)
        yield path, entry


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
            raise ValidationError(path, f"{_s(name)} is not a non-empty resource name")
        if spec is None:
            spec = {}
        if not isinstance(spec, Mapping):
            raise ValidationError(path, f"{_s(spec)} is not a mapping; valid: {{limit: number}}")
        _check_keys(spec, _RESOURCE_KEYS, path)
        limit = spec.get("limit")
        out.append(Resource(name, None if limit is None else check_limit(limit,
                                                                          f"{path}.limit")))
    return tuple(out)


def _parse_units(raw: Any, res_names: set[str]) -> tuple[tuple[Unit, ...], set[str]]:
    if not isinstance(raw, list) or not raw:
        raise ValidationError("units", f"{_s(raw)} is not a non-empty list of units")
    units: list[Unit] = []
    seen: dict[str, int] = {}
    used: set[str] = set()
    unit_keys = frozenset(_UNIT_KEYS)
    option_keys = frozenset(_OPTION_KEYS)
    isfinite = math.isfinite
    for i, u in enumerate(raw):
        upath = f"units[{i}]"
        if not isinstance(u, Mapping):
            raise ValidationError(upath, f"{_s(u)} is not a mapping")
        if not unit_keys.issuperset(u):
            _check_keys(u, _UNIT_KEYS, upath)
        uid = u.get("id")
        if not isinstance(uid, str) or not uid:
            raise ValidationError(f"{upath}.id", f"{_s(uid)} is not a non-empty string")
        if uid in seen:
            raise ValidationError(f"{upath}.id", f"{_s(uid)} duplicates units[{seen[uid]}].id; "
                                  "unit ids must be unique")
        seen[uid] = i
        kind = u.get("kind")
        if kind is not None and (not isinstance(kind, str) or not kind):
            raise ValidationError(f"{upath}.kind", f"{_s(kind)} is not a non-empty string; "
                                  "usual kinds: head_group, mlp_group, embedding, other")
        layer = u.get("layer")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                                  or not 0 <= layer <= MAX_COUNT):
            raise ValidationError(f"{upath}.layer", f"{_s(layer)} is not an integer in "
                                  f"0..{MAX_COUNT}")
        params = u.get("params")
        if params is not None and (isinstance(params, bool) or not isinstance(params, int)
                                   or not 0 <= params <= MAX_COUNT):
            raise ValidationError(f"{upath}.params", f"{_s(params)} is not an integer in "
                                  f"0..{MAX_COUNT}")
        raw_opts = u.get("options")
        if not isinstance(raw_opts, list) or not raw_opts:
            raise ValidationError(f"{upath}.options", f"{_s(raw_opts)} on unit {_s(uid)}: a "
                                  "unit needs a non-empty list of options")
        options = []
        opt_seen: set[str] = set()
        for j, o in enumerate(raw_opts):
            if not isinstance(o, Mapping):
                raise ValidationError(f"{upath}.options[{j}]", f"{_s(o)} is not a mapping")
            if not option_keys.issuperset(o):
                _check_keys(o, _OPTION_KEYS, f"{upath}.options[{j}]")
            oid = o.get("id")
            try:
                parse_option(oid)
            except ValueError:
                raise ValidationError(f"{upath}.options[{j}].id", f"{_s(oid)} is not "
                                      f"an option id; valid: {OPTION_ID_GRAMMAR}") from None
            if oid in opt_seen:
                raise ValidationError(f"{upath}.options[{j}].id", f"{_s(oid)} appears twice in "
                                      f"unit {_s(uid)}; option ids must be unique per unit")
            opt_seen.add(oid)
            loss = o.get("loss")
            if type(loss) is float or (type(loss) is int and -_BIG < loss < _BIG):
                loss = float(loss)  # fast path for the common case
            else:
                loss = as_number(loss, f"{upath}.options[{j}].loss")
            if not isfinite(loss):
                raise ValidationError(f"{upath}.options[{j}].loss",
                                      f"{loss!r} is not finite; valid: a finite number")
            raw_cost = o.get("cost")
            cost: dict[str, float] = {}
            if raw_cost is not None:
                if not isinstance(raw_cost, Mapping):
                    raise ValidationError(f"{upath}.options[{j}].cost", f"{_s(raw_cost)} "
                                          "is not a mapping resource -> number")
                for rname, value in raw_cost.items():
                    if type(value) is float or (type(value) is int and -_BIG < value < _BIG):
                        value = float(value)
                    else:
                        value = as_number(value, f"{upath}.options[{j}].cost.{rname}")
                    if not (value >= 0 and isfinite(value)):
                        what = "is negative" if value < 0 else "is not finite"
                        raise ValidationError(f"{upath}.options[{j}].cost.{rname}",
                                              f"{value!r} {what}; valid: a finite number >= 0")
                    if rname not in res_names:
                        raise ValidationError(f"{upath}.options[{j}].cost.{rname}",
                                              f"{_s(rname)} is not a declared resource; declare "
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
        raise ValidationError(path, f"{_s(raw)} is not a non-empty list of unit ids")
    seen: set[str] = set()
    for k, uid in enumerate(raw):
        if not isinstance(uid, str) or uid not in index:
            raise ValidationError(f"{path}[{k}]", f"{_s(uid)} is not a unit of this problem; "
                                  "valid: the ids listed under units")
        if uid in seen:
            raise ValidationError(f"{path}[{k}]", f"{_s(uid)} is listed twice")
        seen.add(uid)
    return tuple(raw)


def _parse_constraints(raw: Any, units: tuple[Unit, ...],
                       index: dict[str, int]) -> tuple[Constraint, ...]:
    out = []
    for path, c in _mappings(raw, "constraints", _CONSTRAINT_KEYS):
        ctype = c.get("type")
        if ctype not in CONSTRAINT_TYPES:
            raise ValidationError(f"{path}.type", f"{_s(ctype)} is not a constraint type; "
                                  f"valid: {', '.join(CONSTRAINT_TYPES)}")
        ids = _unit_list(c.get("units"), f"{path}.units", index)
        members = [units[index[u]] for u in ids]
        count = c.get("count")
        if ctype == "min_kept":
            keepable = sum(any(not o.is_prune for o in m.options) for m in members)
            if isinstance(count, bool) or not isinstance(count, int) or \
                    not 0 <= count <= keepable:
                raise ValidationError(f"{path}.count", f"{_s(count)} is out of range; valid: an "
                                      f"integer from 0 to {keepable} (the listed units that "
                                      "have a kept option)")
        elif count is not None:
            raise ValidationError(f"{path}.count", f"{_s(count)} is only meaningful for min_kept; "
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
            return Interactions(U=check_factor(U, n_options, "interactions.U"))
        return None
    if not isinstance(raw, Mapping):
        raise ValidationError("interactions", f"{_s(raw)} is not a mapping")
    _check_keys(raw, _INTERACTION_KEYS, "interactions")
    pairs = _parse_pairs(raw.get("pairs"), units, index)
    file = raw.get("file")
    if file is None:
        U = None if U is None else check_factor(U, n_options, "interactions.U")
        return Interactions(U=U, file=None, pairs=pairs)
    if not isinstance(file, str) or not file:
        raise ValidationError("interactions.file", f"{_s(file)} is not a file name")
    if U is None:
        U = read_sidecar(file, base_dir, n_options)
    U = check_factor(U, n_options, file_label(file))
    return Interactions(U=U, file=file, pairs=pairs)


def _parse_pairs(raw: Any, units: tuple[Unit, ...], index: dict[str, int]) -> tuple[Pair, ...]:
    out = []
    for path, p in _mappings(raw, "interactions.pairs", _PAIR_KEYS):
        ends = []
        for end in ("a", "b"):
            ref = p.get(end)
            epath = f"{path}.{end}"
            if not (isinstance(ref, list) and len(ref) == 2 and all(isinstance(x, str)
                                                                     for x in ref)):
                raise ValidationError(epath, f"{_s(ref)} is not [unit id, option id]")
            uid, oid = ref
            if uid not in index:
                raise ValidationError(epath, f"unit {_s(uid)} is not a unit of this problem")
            if oid not in {o.id for o in units[index[uid]].options}:
                raise ValidationError(epath, f"option {_s(oid)} is not an option of unit "
                                      f"{_s(uid)}; valid: "
                                      f"{[o.id for o in units[index[uid]].options]}")
            ends.append((uid, oid))
        if ends[0][0] == ends[1][0]:
            raise ValidationError(path, f"a and b are both options of unit {_s(ends[0][0])}; an "
                                  "interaction couples two different units")
        value = as_number(p.get("value"), f"{path}.value")
        if not math.isfinite(value):
            raise ValidationError(f"{path}.value", f"{value!r} is not finite")
        out.append(Pair(a=ends[0], b=ends[1], value=value))
    return tuple(out)
