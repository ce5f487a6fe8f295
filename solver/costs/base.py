"""The cost-model protocol and its registry (a dict and a decorator; no package walking)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bitsack.errors import ValidationError

if TYPE_CHECKING:
    from bitsack.solver.problem import ProblemSettings


@dataclass(frozen=True)
class SliceShape:
    """One weight slice of a unit: ``rows × cols`` in [out, in] orientation.

    ``dim`` says how the unit owns it: 0 = a range of output rows (full input width),
    1 = a range of input columns (full output height). Quantization groups run along columns.

    Where it lies in its matrix (what a per-tensor target format needs, see
    ``bitsack.solver.costs.formats``): ``param`` names the matrix (units that share a
    ``param`` share a tensor), ``start`` is the slice's first row (``dim`` 0) or column
    (``dim`` 1), ``extent`` the matrix's size along ``dim`` (None: the slice is the whole
    matrix along ``dim``).
    """

    rows: int
    cols: int
    dim: int = 0
    param: str | None = None
    start: int = 0
    extent: int | None = None

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def width(self) -> int:
        """The slice's size along ``dim``."""
        return self.rows if self.dim == 0 else self.cols

    @property
    def stop(self) -> int:
        return self.start + self.width

    @property
    def matrix(self) -> tuple[int, int]:
        """(rows, cols) of the whole matrix the slice belongs to."""
        extent = self.width if self.extent is None else self.extent
        return (extent, self.cols) if self.dim == 0 else (self.rows, extent)


@dataclass(frozen=True)
class UnitShape:
    """What a cost model may know about a unit: its kind, layer and weight slices.

    ``extra`` carries architecture facts a cost model may use (e.g. ``q_heads``, ``head_dim``
    for attention FLOPs); adapters fill it, cost models must tolerate it missing.
    """

    id: str
    kind: str
    slices: tuple[SliceShape, ...]
    layer: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(s.numel for s in self.slices)


class CostModel:
    """Base class of cost models. Subclasses set ``name`` and ``resources`` and implement
    ``cost(unit, bits, group_size)``; ``bits == 0`` means the unit is pruned, and
    ``group_size`` is the option's own (explicit ``g<G>`` or the problem's default; see
    ``option_costs``, which resolves an option id to both)."""

    name: str = ""
    resources: tuple[str, ...] = ()

    def cost(self, unit: UnitShape, bits: int, group_size: int) -> dict[str, float]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-able description recorded in the problem's metadata."""
        return {"name": self.name, "resources": list(self.resources)}


_COST_MODELS: dict[str, type[CostModel]] = {}


def register_cost_model(cls: type[CostModel]) -> type[CostModel]:
    """Class decorator: make a cost model available by its ``name``."""
    if not cls.name:
        raise ValidationError("cost_model.name", "is empty; a registered cost model needs a name")
    _COST_MODELS[cls.name] = cls
    return cls


def cost_model_names() -> list[str]:
    return sorted(_COST_MODELS)


def get_cost_model(name: str, **kwargs: Any) -> CostModel:
    """Instantiate cost model ``name`` with its keyword arguments."""
    if name not in _COST_MODELS:
        raise ValidationError("cost_model", f"{name!r} is not a cost model; "
                              f"valid: {cost_model_names()}")
    return _COST_MODELS[name](**kwargs)


def option_costs(models: Sequence[CostModel], unit: UnitShape, option: str | int,
                 settings: ProblemSettings | int) -> dict[str, float]:
    """Costs of one option of ``unit`` under several cost models, each option priced with its
    own group size.

    Args:
        models: cost models whose resources do not overlap.
        unit: the unit's shapes.
        option: an option id (``prune``, ``b<k>``, ``b<k>g<G>``). For callers written before
            option ids carried group sizes, an int is read as the bit-width (0 = prune).
        settings: the problem's settings; ``settings.group_size`` is what a plain ``b<k>``
            means. An int is read as that default group size.

    Returns:
        resource -> cost.

    Raises:
        bitsack.errors.ValidationError: an invalid option id or settings, or a resource
            defined by two models.
    """
    from bitsack.solver.problem import ProblemSettings, option_id, parse_option

    if not isinstance(settings, ProblemSettings):
        settings = ProblemSettings(group_size=settings)
    if not isinstance(option, str):
        option = option_id(option)
    spec = parse_option(option)
    # prune and b16 have no groups; the size functions ignore the group size for them
    group_size = settings.group_size_of(spec) or settings.group_size
    out: dict[str, float] = {}
    for model in models:
        for res, value in model.cost(unit, spec.bits, group_size).items():
            if res in out:
                raise ValidationError("cost_models", f"resource {res!r} is defined by two cost "
                                      "models; each resource needs exactly one")
            out[res] = float(value)
    return out


def check_resources(models: Iterable[CostModel]) -> list[str]:
    """All resources the models define, in order; raises on a duplicate."""
    seen: list[str] = []
    for model in models:
        for res in model.resources:
            if res in seen:
                raise ValidationError("cost_models", f"resource {res!r} is defined twice")
            seen.append(res)
    return seen
