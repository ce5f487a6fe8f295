"""The budget of a solve: one typed value, one parser, one resolver, the same in every command.

A :class:`Budget` is what the user asked for on top of the problem file's own limits:

- ``avg_bits``: bits per *original* weight, overhead (scales, zeros) included, pruned weights
  0. It is sugar for ``memory_bytes``: ``limit = avg_bits · Σ_u params_u / 8`` bytes
  (DESIGN.md). Giving it together with a ``memory_bytes`` limit is refused (two answers to one
  question);
- ``limits``: resource -> limit; ``None`` removes that resource's limit (``--budget
  decode_latency_us=none``).

Resources the budget does not name keep the limits the problem file sets. ``Budget.parse``
reads the command-line form (``--avg-bits B``, ``--budget RESOURCE=VALUE``); ``Budget.apply``
returns the problem with the budget in force; ``Budget.limits`` the limits it sets.

Ranges: ``avg_bits`` in (0, 16] (16 is an untouched fp16 weight), a limit a finite number in
[0, 1e150] (``bitsack.solver.numeric.MAX_MAGNITUDE``) or none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bitsack.errors import ValidationError
from bitsack.solver.bounded import short_repr
from bitsack.solver.numeric import check_limit_value
from bitsack.solver.problem import Problem

#: Largest ``avg_bits``: every weight kept at 16 bits.
MAX_AVG_BITS = 16.0

#: What ``--budget RESOURCE=VALUE`` accepts as "no limit".
_NONE_WORDS = ("none", "null")


@dataclass(frozen=True)
class Budget:
    """Budgets on top of a problem's own limits (see the module docstring).

    Attributes:
        avg_bits: bits per original weight (sugar for a ``memory_bytes`` limit), or None.
        limits: resource -> limit; None removes that resource's limit.

    Raises:
        bitsack.errors.ValidationError: (on construction) a value out of range, or
            ``avg_bits`` together with a ``memory_bytes`` entry.
    """

    avg_bits: float | None = None
    limits: dict[str, float | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.avg_bits is not None:
            object.__setattr__(self, "avg_bits", _check_avg_bits(self.avg_bits))
        if not isinstance(self.limits, Mapping):
            raise ValidationError("--budget", f"{short_repr(self.limits)} is not a mapping "
                                  "resource -> limit")
        clean: dict[str, float | None] = {}
        for name, value in self.limits.items():
            if not isinstance(name, str) or not name:
                raise ValidationError("--budget", f"{short_repr(name)} is not a resource name")
            clean[name] = None if value is None else _check_value(value, name)
        object.__setattr__(self, "limits", clean)
        if self.avg_bits is not None and "memory_bytes" in clean:
            raise ValidationError("--avg-bits", "and --budget memory_bytes both set the memory "
                                  "budget (avg_bits means memory_bytes = avg_bits · Σ params / "
                                  "8); valid: give one of them")

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def parse(cls, avg_bits: float | str | None = None, items: Iterable[str] = ()) -> Budget:
        """The budget of ``--avg-bits`` and ``--budget RESOURCE=VALUE`` items.

        ``VALUE`` is a number or ``none`` (remove that resource's limit).

        Raises:
            bitsack.errors.ValidationError: an item that is not RESOURCE=VALUE, a resource
                given twice, a value that is not a number in range, or avg-bits together with
                a memory_bytes budget; the message names the flag.
        """
        limits: dict[str, float | None] = {}
        for item in items:
            if not isinstance(item, str):
                raise ValidationError("--budget", f"{short_repr(item)} is not RESOURCE=VALUE")
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or not name:
                raise ValidationError("--budget", f"{short_repr(item)} is not RESOURCE=VALUE "
                                      "(e.g. memory_bytes=6e7 or decode_latency_us=none)")
            if name in limits:
                raise ValidationError("--budget", f"{short_repr(name)} is set twice; valid: "
                                      "each resource once")
            text = value.strip()
            if text.lower() in _NONE_WORDS:
                limits[name] = None
                continue
            try:
                number = float(text)
            except ValueError:
                raise ValidationError(f"--budget {short_repr(name)}", f"{short_repr(text)} is "
                                      "not a number; valid: a number >= 0 or 'none'") from None
            limits[name] = _check_value(number, name)
        if isinstance(avg_bits, str):
            try:
                avg_bits = float(avg_bits)
            except ValueError:
                raise ValidationError("--avg-bits", f"{short_repr(avg_bits)} is not a number; "
                                      f"valid: bits per weight in (0, {MAX_AVG_BITS:g}]") \
                    from None
        return cls(avg_bits=avg_bits, limits=limits)

    @property
    def empty(self) -> bool:
        """True when the budget changes nothing (the problem's own limits hold)."""
        return self.avg_bits is None and not self.limits

    def resolve(self, problem: Problem) -> dict[str, float | None]:
        """The limits this budget sets on ``problem``: ``limits`` plus ``avg_bits`` turned
        into ``memory_bytes`` bytes.

        Raises:
            bitsack.errors.ValidationError: avg_bits on a problem without a ``memory_bytes``
                resource or without every unit's ``params``.
        """
        from bitsack.solver.transforms import avg_bits_limit

        out = dict(self.limits)
        if self.avg_bits is not None:
            out["memory_bytes"] = avg_bits_limit(problem, self.avg_bits)
        return out

    def limits_of(self, problem: Problem) -> dict[str, float]:
        """Every limit in force once the budget is applied: resource -> limit (resources
        without a limit left out), as ``Problem.limits`` of ``apply(problem)``."""
        return self.apply(problem).limits

    def apply(self, problem: Problem) -> Problem:
        """``problem`` with this budget in force (``problem`` itself when it is empty).

        Raises:
            bitsack.errors.ValidationError: an unknown resource (the valid ones listed), a
                budget on a resource no option uses, or avg_bits without ``memory_bytes`` /
                ``params``.
        """
        from bitsack.solver.transforms import with_limits

        if self.empty:
            return problem
        return with_limits(problem, self.resolve(problem))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for reports and run configs)."""
        return {"avg_bits": self.avg_bits, "limits": dict(self.limits)}


def _check_avg_bits(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError("--avg-bits", f"{short_repr(value)} is not a number; valid: bits "
                              f"per weight in (0, {MAX_AVG_BITS:g}]")
    bits = float(value)
    if not (math.isfinite(bits) and 0.0 < bits <= MAX_AVG_BITS):
        raise ValidationError("--avg-bits", f"{bits!r} is out of range; valid: bits per weight "
                              f"in (0, {MAX_AVG_BITS:g}] (overhead included; 16 = untouched)")
    return bits


def _check_value(value: Any, name: str) -> float:
    path = f"--budget {short_repr(name) if len(name) > 60 else name}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(path, f"{short_repr(value)} is not a number; valid: a number "
                              ">= 0 or 'none'")
    return check_limit_value(float(value), path, "'none'")
