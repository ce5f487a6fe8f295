"""The problem a bitsack solver answers: schema ``bitsack.problem/v1`` as frozen dataclasses.

A problem is a multiple-choice knapsack. Every *unit* (an attention head group, a block of MLP
channels, an embedding) takes exactly one of its *options* (``prune`` or ``b<k>``: keep at k
bits). Each option has a predicted ``loss`` (increase of the model's global loss, nats/token)
and a ``cost`` per resource. Resources carry limits (budgets). Optional ``interactions`` couple
the options of different units. See ``solver/__init__.py`` for the math model and
``solver/schema.py`` for reading, writing and validating files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is light, but keep the dataclasses importable on their own
    import numpy as np

SCHEMA = "bitsack.problem/v1"

#: Standard resource names (any other name is allowed; cost models may define more).
STANDARD_RESOURCES = ("memory_bytes", "decode_latency_us", "prefill_latency_us")

#: Unit kinds the model adapters emit (free-form strings are accepted too).
UNIT_KINDS = ("head_group", "mlp_group", "embedding", "other")

#: Constraint types: tie units' options, tie kept units' bit-widths, keep at least k of a group.
CONSTRAINT_TYPES = ("same_option", "same_bits", "min_kept")

#: Bit-widths the packed format can store (others are valid in a problem, not packable).
PACKABLE_BITS = (1, 2, 3, 4, 8, 16)

_OPTION_ID = re.compile(r"^(prune|b([1-9]|1[0-6]))$")


def option_bits(option_id: str) -> int:
    """Bits of an option id: ``prune`` -> 0, ``b<k>`` -> k (1..16).

    Raises:
        ValueError: ``option_id`` is neither ``prune`` nor ``b1``..``b16``.
    """
    match = _OPTION_ID.match(option_id)
    if not match:
        raise ValueError(f"{option_id!r} is not an option id; valid: 'prune' or 'b1'..'b16'")
    return 0 if option_id == "prune" else int(match.group(2))


@dataclass(frozen=True)
class Option:
    """One choice for a unit: ``prune`` or ``b<k>``, with its predicted loss and its costs."""

    id: str
    loss: float
    cost: dict[str, float] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        """0 for ``prune``, k for ``b<k>``."""
        return option_bits(self.id)

    @property
    def is_prune(self) -> bool:
        return self.id == "prune"


@dataclass(frozen=True)
class Unit:
    """One decision: a prunable / quantizable structure of the model and its options."""

    id: str
    options: tuple[Option, ...]
    kind: str | None = None
    layer: int | None = None
    params: int | None = None

    def option(self, option_id: str) -> Option:
        for opt in self.options:
            if opt.id == option_id:
                return opt
        raise KeyError(f"unit {self.id!r} has no option {option_id!r}; "
                       f"it has {[o.id for o in self.options]}")


@dataclass(frozen=True)
class Resource:
    """A budgeted resource. ``limit`` None means tracked but unbounded."""

    name: str
    limit: float | None = None


@dataclass(frozen=True)
class Constraint:
    """A side constraint over units.

    ``same_option``: all listed units take the same option id.
    ``same_bits``: all *kept* listed units share one bit-width (pruned ones are free).
    ``min_kept``: at least ``count`` of the listed units are not pruned.
    """

    type: str
    units: tuple[str, ...]
    count: int | None = None


@dataclass(frozen=True)
class Pair:
    """An explicit interaction term between option ``a`` and option ``b`` of two units."""

    a: tuple[str, str]
    b: tuple[str, str]
    value: float


@dataclass(frozen=True, eq=False)
class Interactions:
    """Couplings between options of different units.

    ``U`` has shape [N, total options in file order]; the interaction of options i and j of two
    different units is ``U[:, i] @ U[:, j]``. ``file`` is the sidecar it came from (relative to
    the problem file) so a dump writes it back under the same name.
    """

    U: np.ndarray | None = None
    file: str | None = None
    pairs: tuple[Pair, ...] = ()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Interactions):
            return NotImplemented
        import numpy as np

        same_u = (self.U is None and other.U is None) or (
            self.U is not None and other.U is not None
            and self.U.shape == other.U.shape and bool(np.array_equal(self.U, other.U))
        )
        return same_u and self.file == other.file and self.pairs == other.pairs

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, eq=False)
class ProblemArrays:
    """Flat array view of a problem, options in file order (what the backends build from).

    Attributes:
        loss: [n_options] float64 standalone losses.
        cost: resource -> [n_options] float64 costs (missing cost = 0).
        unit_of: [n_options] int index of each option's unit.
        start: [n_units + 1] option offsets: unit u owns options start[u]:start[u+1].
        bits: [n_options] int bits of each option (0 = prune).
    """

    loss: np.ndarray
    cost: dict[str, np.ndarray]
    unit_of: np.ndarray
    start: np.ndarray
    bits: np.ndarray


@dataclass(frozen=True, eq=True)
class Problem:
    """A multiple-choice knapsack instance, schema ``bitsack.problem/v1``."""

    name: str
    units: tuple[Unit, ...]
    resources: tuple[Resource, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    interactions: Interactions | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    __hash__ = None  # type: ignore[assignment]

    @property
    def n_options(self) -> int:
        return sum(len(u.options) for u in self.units)

    def resource(self, name: str) -> Resource:
        for res in self.resources:
            if res.name == name:
                return res
        raise KeyError(name)

    @property
    def limits(self) -> dict[str, float]:
        """Resource -> limit, for the resources that have one."""
        return {r.name: r.limit for r in self.resources if r.limit is not None}

    @cached_property
    def unit_index(self) -> dict[str, int]:
        return {u.id: i for i, u in enumerate(self.units)}

    @cached_property
    def arrays(self) -> ProblemArrays:
        import numpy as np

        n = self.n_options
        loss = np.empty(n, dtype=np.float64)
        unit_of = np.empty(n, dtype=np.int64)
        bits = np.empty(n, dtype=np.int64)
        start = np.zeros(len(self.units) + 1, dtype=np.int64)
        names = [r.name for r in self.resources]
        cost = {name: np.zeros(n, dtype=np.float64) for name in names}
        k = 0
        for ui, unit in enumerate(self.units):
            start[ui] = k
            for opt in unit.options:
                loss[k] = opt.loss
                unit_of[k] = ui
                bits[k] = opt.bits
                for name, value in opt.cost.items():
                    if name in cost:
                        cost[name][k] = value
                k += 1
        start[-1] = k
        return ProblemArrays(loss=loss, cost=cost, unit_of=unit_of, start=start, bits=bits)

    def option_index(self, unit_id: str, option_id: str) -> int:
        """Flat index (file order) of option ``option_id`` of unit ``unit_id``."""
        ui = self.unit_index[unit_id]
        unit = self.units[ui]
        for j, opt in enumerate(unit.options):
            if opt.id == option_id:
                return int(self.arrays.start[ui]) + j
        raise KeyError(f"unit {unit_id!r} has no option {option_id!r}")

    @property
    def total_params(self) -> int:
        """Σ params over units (needed for avg-bits budgets)."""
        return sum(u.params or 0 for u in self.units)
