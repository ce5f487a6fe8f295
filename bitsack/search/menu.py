"""The option menu of a measured search: which choices a unit may take, in order of cost.

The default menu (issue #13, after EXL2's mixed group sizes): bits {2, 3, 4} × group size
{32, 64, 128}, 8 bits at the default group size, fp16, and prune. Ordered by nominal bits per
weight (``bits + (16 + bits)/G``: an fp16 scale and a ``bits``-bit zero point per group),
the menu steps are 2g128 2.14 < 2g64 2.28 < 2g32 2.56 < 3g128 3.15 < 3g64 3.30 < 3g32 3.59
< 4g128 4.16 < 4g64 4.31 < 4g32 4.63 < 8g64 8.38 < 16, so one step up or down is a small
change of bytes: a plan can
trade 3g128 units against 3g32 or 4g128 units without any unit falling to 2 bits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bitsack.errors import ValidationError
from bitsack.plan import FP16, Choice, nominal_bits, parse_choice

#: The default menu of ``bitsack run --method search`` (prune is a separate switch).
DEFAULT_MENU = ("b2g128", "b2g64", "b2g32", "b3g128", "b3g64", "b3g32", "b4g128", "b4g64",
                "b4g32", "b8g64", "b16")


@dataclass(frozen=True)
class Menu:
    """Kept choices in increasing order of bytes (``steps``), and whether prune is offered.
    ``scale_bits``: the choices' scales are S-bit codes (``nominal_bits``), which can change
    the order (3g16 costs 3.63 bits/weight with 6-bit codes, below 4g128's 4.14; 4.19 with
    fp16 scales, above 4.16)."""

    steps: tuple[Choice, ...]
    prune: bool = False
    scale_bits: int | None = None

    @classmethod
    def parse(cls, options: Iterable[str], default_group_size: int = 64,
              prune: bool = False, scale_bits: int | None = None) -> Menu:
        """A menu from option ids (``b3g64``, ``b16``, …; ``prune`` sets ``prune``), in the
        order of their nominal bits with ``scale_bits``.

        Raises:
            ValidationError: an unknown id, a duplicate, or no kept choice.
        """
        steps: list[Choice] = []
        for i, oid in enumerate(options):
            if oid == "prune":
                prune = True
                continue
            c = parse_choice(oid, default_group_size, f"menu[{i}]")
            if c in steps:
                raise ValidationError(f"menu[{i}]", f"{oid!r} appears twice")
            steps.append(c)
        if not steps:
            raise ValidationError("menu", "no kept option; valid: one or more of b<k>g<G>, b16")
        steps.sort(key=lambda c: (nominal_bits(c, scale_bits), c.bits))
        return cls(tuple(steps), prune, scale_bits)

    def nominal_bits(self, choice: Choice) -> float:
        """``choice``'s nominal bits per weight with this menu's scales."""
        return nominal_bits(choice, self.scale_bits)

    @property
    def option_ids(self) -> tuple[str, ...]:
        return (("prune",) if self.prune else ()) + tuple(c.option_id for c in self.steps)

    def index(self, choice: Choice) -> int:
        try:
            return self.steps.index(choice)
        except ValueError:
            raise ValidationError("choice", f"{choice} is not on the menu "
                                  f"{[c.option_id for c in self.steps]}") from None

    def step(self, choice: Choice, direction: int) -> Choice | None:
        """The choice ``direction`` steps up (+) or down (−) the menu; None past either end.
        A pruned unit steps up to the smallest choice and cannot step down."""
        if choice.pruned:
            return self.steps[0] if direction > 0 else None
        j = self.index(choice) + direction
        return self.steps[j] if 0 <= j < len(self.steps) else None

    def window(self, center: Choice, steps: int) -> Menu:
        """The choices within ``steps`` menu steps of ``center`` (the ones a search from
        ``center`` can reach in that many moves of a unit)."""
        j = self.index(center)
        return Menu(self.steps[max(0, j - steps):j + steps + 1], self.prune, self.scale_bits)

    def quantized(self) -> tuple[Choice, ...]:
        """The choices a quantizer must produce (everything but fp16)."""
        return tuple(c for c in self.steps if c != FP16)


def uniform_candidates(menu: Menu, fits: Sequence[bool]) -> list[Choice]:
    """The menu's choices whose uniform plan fits (``fits[i]`` for ``menu.steps[i]``), most
    bytes first: the uniform configurations worth measuring."""
    return [c for c, ok in sorted(zip(menu.steps, fits, strict=True),
                                  key=lambda t: -menu.nominal_bits(t[0])) if ok]
