"""Runtime verification of packed layers against the float64 reference, within computed bounds.

``Verifier`` hooks a seeded sample of a model's ``PackedLinear`` modules. For the first few
calls of each (during evaluation, on real activations), it recomputes the output with the
``reference`` backend (NumPy unpack, float64 matmul: the executable spec) and the a priori
error bound of the module's own backend (``bitsack.kernels.bounds``), and records the largest
``|y − y_ref| / bound`` ratio. A ratio above 1 means the kernel broke its guarantee.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class VerifyReport:
    """What verification saw: per module, the largest observed/bound ratio."""

    checked_calls: int = 0
    checked_outputs: int = 0
    max_ratio: float = 0.0
    worst_module: str | None = None
    per_module: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.max_ratio <= 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"checked_calls": self.checked_calls, "checked_outputs": self.checked_outputs,
                "max_observed_over_bound": self.max_ratio, "worst_module": self.worst_module,
                "ok": self.ok, "per_module": self.per_module}


class Verifier:
    """Context manager: check ``sample`` packed modules for ``calls`` calls each.

    Args:
        model: a model with ``PackedLinear`` modules.
        sample: how many modules to check (seeded choice); None = all.
        calls: calls checked per module.
        max_rows: rows of the activation checked per call (the float64 reference is slow).
        seed: the sample's seed.
    """

    def __init__(self, model, sample: int | None = 8, calls: int = 1, max_rows: int = 64,
                 seed: int = 0):
        from bitsack.kernels.packed import PackedLinear

        mods = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]
        if sample is not None and sample < len(mods):
            mods = sorted(random.Random(seed).sample(mods, sample), key=lambda nm: nm[0])
        self.modules = mods
        self.calls = calls
        self.max_rows = max_rows
        self.report = VerifyReport()
        self._count: dict[str, int] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str, module, args, output) -> None:
        from bitsack.kernels.backends import reference_output
        from bitsack.kernels.bounds import layer_error_bound

        if self._count.get(name, 0) >= self.calls:
            return
        self._count[name] = self._count.get(name, 0) + 1
        x = args[0].detach()
        x2 = x.reshape(-1, x.shape[-1])[: self.max_rows]
        y = output.detach().reshape(-1, output.shape[-1])[: self.max_rows]
        ref = reference_output(module, x2)
        bound = layer_error_bound(module, x2, y_ref=ref).to(torch.float64)
        err = (y.to(torch.float64).cpu() - ref).abs()
        # bound == 0 only where the reference is exactly representable and must be hit exactly
        ratio_t = torch.where(bound > 0, err / bound.clamp_min(torch.finfo(torch.float64).tiny),
                              torch.where(err > 0, torch.inf, 0.0))
        ratio = float(ratio_t.max()) if ratio_t.numel() else 0.0
        rep = self.report
        rep.checked_calls += 1
        rep.checked_outputs += int(err.numel())
        rep.per_module[name] = max(rep.per_module.get(name, 0.0), ratio)
        if ratio >= rep.max_ratio:
            rep.max_ratio = ratio
            rep.worst_module = name

    def __enter__(self) -> Verifier:
        for name, mod in self.modules:
            self._handles.append(mod.register_forward_hook(
                lambda m, a, o, name=name: self._hook(name, m, a, o)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
