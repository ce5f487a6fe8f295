"""A :class:`Problem` as its plain document (the mapping a ``.json`` / ``.yaml`` file holds).

The inverse is ``bitsack.solver.validate.problem_from_dict``, which checks every field.
"""

from __future__ import annotations

import math
from typing import Any

from bitsack.solver.problem import Problem


def problem_to_dict(problem: Problem) -> dict[str, Any]:
    """The document of ``problem`` as plain JSON-able data (``U`` excluded: it is a sidecar)."""
    data: dict[str, Any] = {"schema": problem.schema, "name": problem.name}
    data["settings"] = problem.settings.to_dict()
    data["resources"] = {r.name: {"limit": num(r.limit)} for r in problem.resources}
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
            {"id": o.id, "loss": num(o.loss), "cost": {k: num(v) for k, v in o.cost.items()}}
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
            block["pairs"] = [{"a": list(p.a), "b": list(p.b), "value": num(p.value)}
                              for p in inter.pairs]
        data["interactions"] = block
    if problem.metadata:
        data["metadata"] = problem.metadata
    return data


def num(value: float | None) -> float | int | None:
    """Integral floats below 2**53 as ints (readable ``800`` rather than ``800.0``)."""
    if value is None:
        return None
    value = float(value)
    if math.isfinite(value) and value == int(value) and abs(value) < 2**53:
        return int(value)
    return value
