"""The problem a bitsack solver answers: schema ``bitsack.problem/v1`` as frozen dataclasses.

A problem is a multiple-choice knapsack. Every *unit* (an attention head group, a block of MLP
channels, an embedding) takes exactly one of its *options* (``prune``, ``b<k>``: keep at k bits
with the problem's default group size, or ``b<k>g<G>``: k bits, G columns per group). Each
option has a predicted ``loss`` (increase of the model's global loss, nats/token) and a
``cost`` per resource. Resources carry limits (budgets). Optional ``interactions`` couple the
options of different units. ``settings`` (``ProblemSettings``) say what a plain ``b<k>``
means and how units were cut. See ``solver/__init__.py`` for the math model and
``solver/schema.py`` for reading, writing and validating files.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
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

#: Bit-widths the kernels pack natively (others are valid in a problem; see ``OPTION_BITS``).
PACKABLE_BITS = (1, 2, 3, 4, 8, 16)

#: Bit-widths an option id may name: 1..8 (packed bit streams) and 16 (fp16, untouched).
OPTION_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)

#: Explicit group sizes an option id may name (``b<k>g<G>``): powers of two, 8..1024.
GROUP_SIZES = tuple(1 << k for k in range(3, 11))

#: Quantizers a problem's settings may name (None: not recorded).
QUANTIZERS = ("rtn", "gptq")

#: Human-readable grammar of option ids, for error messages.
OPTION_ID_GRAMMAR = ("'prune', 'b<k>' (k in 1..8 or 16: k bits at the problem's default group "
                     "size) or 'b<k>g<G>' (k in 1..8, G a power of two in 8..1024)")

_OPTION_ID = re.compile(r"^(?:prune|b([1-8]|16)|b([1-8])g([1-9][0-9]{0,3}))$")


@dataclass(frozen=True)
class OptionSpec:
    """What an option id means: ``bits`` (0 = prune) and an explicit ``group_size``.

    ``group_size`` is None for ``prune``, for ``b16`` (untouched fp16 weights have no groups)
    and for a plain ``b<k>`` (the problem's default, ``ProblemSettings.group_size``).
    """

    bits: int
    group_size: int | None = None

    @property
    def is_prune(self) -> bool:
        return self.bits == 0

    @property
    def id(self) -> str:
        """The canonical option id (``option_id(bits, group_size)``)."""
        return option_id(self.bits, self.group_size)


def parse_option(option_id: str) -> OptionSpec:
    """Parse an option id: ``prune``, ``b<k>`` or ``b<k>g<G>``.

    Raises:
        ValueError: not an option id (the message gives the grammar). ``bitsack.errors``
            ``ValidationError`` is a ``ValueError``; the schema names the field.
    """
    spec = _parse_option(option_id) if isinstance(option_id, str) else None
    if spec is None:
        from bitsack.errors import ValidationError

        raise ValidationError("option", f"{_short_repr(option_id)} is not an option id; "
                              f"valid: {OPTION_ID_GRAMMAR}")
    return spec


@functools.lru_cache(maxsize=4096)
def _parse_option(option_id: str) -> OptionSpec | None:
    match = _OPTION_ID.match(option_id)
    if match is None or (match.group(3) is not None
                         and int(match.group(3)) not in GROUP_SIZES):
        return None
    if match.group(1) is not None:
        return OptionSpec(int(match.group(1)))
    if match.group(2) is not None:
        return OptionSpec(int(match.group(2)), int(match.group(3)))
    return OptionSpec(0)


def option_id(bits: int, group_size: int | None = None) -> str:
    """The option id of ``bits`` (0 = prune) at ``group_size`` (None = the default): the
    inverse of :func:`parse_option`.

    Raises:
        ValueError: bits not in 0..8 or 16, a group size on prune or 16 bits, or a group
            size that is not a power of two in 8..1024.
    """
    from bitsack.errors import ValidationError

    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (0,) + OPTION_BITS:
        raise ValidationError("bits", f"{bits!r}; valid: 0 (prune), 1..8 or 16")
    if group_size is None:
        return "prune" if bits == 0 else f"b{bits}"
    if bits in (0, 16):
        raise ValidationError("group_size", f"{group_size!r} given for "
                              f"{'prune' if bits == 0 else '16 bits'}, which has no groups; "
                              "valid: None")
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValidationError("group_size", f"{group_size!r}; valid: a power of two in "
                              "8..1024")
    return f"b{bits}g{group_size}"


def option_bits(option_id: str) -> int:
    """Bits of an option id: ``prune`` -> 0, ``b<k>`` / ``b<k>g<G>`` -> k.

    Raises:
        ValueError: not an option id (see :func:`parse_option`).
    """
    return parse_option(option_id).bits


@dataclass(frozen=True)
class ProblemSettings:
    """How the problem's options are realised: typed, schema-checked, one default each.

    Attributes:
        group_size: the quantization group size (columns per fp16 scale/zero pair along the
            input dimension) that a plain ``b<k>`` option means.
        mlp_group: MLP channels per ``mlp_group`` unit.
        quantizer: the quantizer the losses were estimated for (``rtn`` / ``gptq``), or
            None when not recorded.
    """

    group_size: int = 64
    mlp_group: int = 128
    quantizer: str | None = None

    def __post_init__(self) -> None:
        from bitsack.errors import ValidationError

        for name in ("group_size", "mlp_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not \
                    1 <= value <= MAX_SETTING:
                raise ValidationError(f"settings.{name}", f"{_short_repr(value)} is not a "
                                      f"positive integer; valid: 1..{MAX_SETTING}")
        if self.quantizer is not None and self.quantizer not in QUANTIZERS:
            raise ValidationError("settings.quantizer", f"{_short_repr(self.quantizer)}; "
                                  f"valid: {', '.join(QUANTIZERS)} or null")

    def group_size_of(self, option: str | OptionSpec) -> int | None:
        """The group size an option is quantized with: its explicit ``g<G>``, else
        ``group_size``; None for ``prune`` and ``b16`` (no groups)."""
        spec = parse_option(option) if isinstance(option, str) else option
        if spec.bits in (0, 16):
            return None
        return spec.group_size if spec.group_size is not None else self.group_size

    def to_dict(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "mlp_group": self.mlp_group,
                "quantizer": self.quantizer}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | None) -> ProblemSettings:
        """Settings of an older problem that carried them in ``metadata`` (else defaults).

        Raises:
            bitsack.errors.ValidationError: a metadata value that is not a valid setting.
        """
        from bitsack.errors import ValidationError

        kwargs = {k: metadata[k] for k in SETTINGS_KEYS
                  if metadata and metadata.get(k) is not None}
        try:
            return cls(**kwargs)
        except ValidationError as exc:  # name where the value came from
            raise ValidationError(exc.path.replace("settings.", "metadata."),
                                  str(exc).split(": ", 1)[1]) from None


#: Keys of ``ProblemSettings`` (the ``settings`` mapping of a problem file).
SETTINGS_KEYS = ("group_size", "mlp_group", "quantizer")

#: Upper bound of integer settings (a group wider than a million columns means a typo).
MAX_SETTING = 1 << 20


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, str) or len(value) < 4 * limit \
        else repr(value[: 4 * limit])
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Option:
    """One choice for a unit: ``prune`` or ``b<k>``, with its predicted loss and its costs."""

    id: str
    loss: float
    cost: dict[str, float] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        """0 for ``prune``, k for ``b<k>`` and ``b<k>g<G>``."""
        return parse_option(self.id).bits

    @property
    def spec(self) -> OptionSpec:
        """Bits and explicit group size of the id (``parse_option``)."""
        return parse_option(self.id)

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
    #: Never None once built: None (the default) takes the settings an older problem kept
    #: in ``metadata`` (``group_size``, ``mlp_group``, ``quantizer``), else the defaults.
    settings: ProblemSettings | None = None

    __hash__ = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.settings is None:
            object.__setattr__(self, "settings", ProblemSettings.from_metadata(self.metadata))

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

    def derived(self, key: str, compute: Callable[[Problem], Any]) -> Any:
        """``compute(self)``, computed once per problem and kept on it under ``key``: what
        other modules derive from a problem (the constraint structure, bitsack's own bounds).
        Not a field, so equality and ``dataclasses.replace`` copies are unaffected."""
        cache = self.__dict__.setdefault("_derived", {})
        if key not in cache:
            cache[key] = compute(self)
        return cache[key]
