"""The flat order of every (unit, option) pair a profile estimates.

Every estimator returns one number per option in this order, and the interaction factor ``U``
has one column per option in this order; it is also the order of the options in the problem
file (unit by unit, ``prune`` first, then ``b<k>`` by increasing k, ``b16`` last), which is
the order ``bitsack.problem/v1`` defines for ``U``'s columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from bitsack.errors import ValidationError
from bitsack.models.base import UnitSpec

#: Bit-widths the quantizers produce (16 is the untouched fp16 weight).
QUANT_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def check_bits(bits: Iterable[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated bit-widths, each in 1..8 or 16.

    Raises:
        ValidationError: an entry that is not an integer in 1..8 or 16, or an empty list.
    """
    out: set[int] = set()
    for i, b in enumerate(bits):
        if isinstance(b, bool) or not isinstance(b, int) or (b not in QUANT_BITS and b != 16):
            raise ValidationError(f"bits[{i}]", f"{b!r} is not a bit-width; valid: integers "
                                  "1..8 or 16")
        out.add(int(b))
    if not out:
        raise ValidationError("bits", "[] is empty; valid: one or more of 1..8, 16")
    return tuple(sorted(out))


def option_key(option_id: str) -> int | str:
    """``"prune"`` -> ``"prune"``, ``"b4"`` -> 4: how perturbations index an option."""
    return "prune" if option_id == "prune" else int(option_id[1:])


@dataclass(frozen=True)
class OptionLayout:
    """Units and their options in problem-file order.

    Attributes:
        units: the units, in the order given (the adapter's model order).
        option_ids: per unit, its option ids (``prune`` only for prunable units).
    """

    units: tuple[UnitSpec, ...]
    option_ids: tuple[tuple[str, ...], ...]

    @classmethod
    def build(cls, units: Sequence[UnitSpec], bits: Iterable[int],
              prune: bool = True) -> OptionLayout:
        """Options ``prune`` (prunable units, when ``prune``), ``b<k>`` for ``bits``, ``b16``.

        Raises:
            ValidationError: no units, duplicate unit ids, or bad bit-widths.
        """
        units = tuple(units)
        if not units:
            raise ValidationError("units", "[] is empty; valid: the adapter's units "
                                  "(bitsack.models.model_units)")
        seen: set[str] = set()
        for i, u in enumerate(units):
            if u.id in seen:
                raise ValidationError(f"units[{i}].id", f"{u.id!r} appears twice; unit ids "
                                      "must be unique")
            seen.add(u.id)
        bit_list = [b for b in check_bits(bits) if b != 16] + [16]
        per_unit = []
        for u in units:
            ids = (["prune"] if prune and u.prunable else []) + [f"b{b}" for b in bit_list]
            per_unit.append(tuple(ids))
        return cls(units, tuple(per_unit))

    @cached_property
    def start(self) -> tuple[int, ...]:
        """Option offsets: unit ``i`` owns flat options ``start[i]:start[i+1]``."""
        out = [0]
        for ids in self.option_ids:
            out.append(out[-1] + len(ids))
        return tuple(out)

    @property
    def n_options(self) -> int:
        return self.start[-1]

    @cached_property
    def flat(self) -> tuple[tuple[int, str], ...]:
        """``(unit index, option id)`` of every flat option."""
        return tuple((i, oid) for i, ids in enumerate(self.option_ids) for oid in ids)

    @cached_property
    def _index(self) -> dict[tuple[int, str], int]:
        return {key: j for j, key in enumerate(self.flat)}

    @cached_property
    def unit_index(self) -> dict[str, int]:
        return {u.id: i for i, u in enumerate(self.units)}

    def index(self, unit: int | str, option_id: str) -> int:
        """Flat index of ``option_id`` of ``unit`` (an index or an id); KeyError if absent."""
        ui = self.unit_index[unit] if isinstance(unit, str) else unit
        return self._index[(ui, option_id)]

    def has(self, unit: int, option_id: str) -> bool:
        return (unit, option_id) in self._index

    def describe(self, j: int) -> str:
        """``unit 'L0.attn.g1' option 'b3'`` for flat option ``j`` (for error messages)."""
        ui, oid = self.flat[j]
        return f"unit {self.units[ui].id!r} option {oid!r}"

    @cached_property
    def keys(self) -> tuple[int | str, ...]:
        """The perturbation keys in use: ``"prune"`` (if any) and the bit-widths."""
        found = {option_key(oid) for ids in self.option_ids for oid in ids}
        return tuple(sorted(found, key=lambda k: (k != "prune", k if k != "prune" else 0)))

    def subset(self, unit_ids: Iterable[str]) -> tuple[OptionLayout, list[int]]:
        """The layout restricted to ``unit_ids`` (model order kept) and the flat indices of
        its options in this layout."""
        wanted = set(unit_ids)
        missing = wanted - set(self.unit_index)
        if missing:
            raise ValidationError("units", f"{sorted(missing)[:5]} are not units of the "
                                  "profile; valid: ids from the adapter's units")
        keep = [i for i, u in enumerate(self.units) if u.id in wanted]
        sub = OptionLayout(tuple(self.units[i] for i in keep),
                           tuple(self.option_ids[i] for i in keep))
        cols = [self.start[i] + k for i in keep for k in range(len(self.option_ids[i]))]
        return sub, cols
