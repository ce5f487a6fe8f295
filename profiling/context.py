"""What an estimator reads (``Context``, ``EstimatorOptions``) and what it returns (``Estimate``).

The estimators themselves, and their formulas, are in ``bitsack.profiling.estimators``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from bitsack.errors import ValidationError
from bitsack.profiling.capture import LABEL_SOURCES, ResourceMeter, input_hessians
from bitsack.profiling.distributed import Dist
from bitsack.profiling.layout import OptionLayout
from bitsack.profiling.perturb import Perturbations

__all__ = ["FIRST_ORDER_MODES", "Context", "Estimate", "EstimatorOptions"]

FIRST_ORDER_MODES = ("off", "significant", "on")


@dataclass(frozen=True)
class EstimatorOptions:
    """Knobs of the estimators (defaults are the measured-best choices, bench/profiling_bench.py).

    Attributes:
        fisher_labels: ``sampled`` (labels drawn from the model: Gauss-Newton Fisher) or
            ``data`` (empirical Fisher).
        fisher_draws: label draws per sequence (each one backward; sampled labels only).
        fisher_chunks: gradients per sequence and draw: positions split into this many
            contiguous chunks (1 = per-sequence gradients; more = finer, one backward each).
        first_order: ``off`` | ``significant`` (keep ``mean v`` where ``|mean| > z·stderr``)
            | ``on``.
        first_order_z: z of the significance test.
        hutchinson_probes: Rademacher probes per sequence.
        hutchinson_samples: sequences used by ``hutchinson`` (the first ones).
        holdout: sequences held out (the last ones) for ``measured`` inside ``calibrated``
            when no separate held-out tokens are given; None = a quarter, at least 1.
        measure_units: unit ids ``measured`` evaluates (None: all, or ``measure_fraction``).
        measure_fraction: seeded fraction of units ``measured`` evaluates.
        calibrate_base: the cheap estimator ``calibrated`` rescales.
        calibrate_fraction: fraction of units measured to fit the calibration (stratified by
            kind, at least ``calibrate_min_units`` per kind).
        calibrate_min_units: see above.
        batch_size: sequences per forward pass (layerwise, measured, Hessians).
        diag: also compute ``fisher-diag`` rows during a ``fisher`` pass (bench).
    """

    fisher_labels: str = "sampled"
    fisher_draws: int = 1
    fisher_chunks: int = 1
    first_order: str = "off"
    first_order_z: float = 3.0
    hutchinson_probes: int = 4
    hutchinson_samples: int = 8
    holdout: int | None = None
    measure_units: tuple[str, ...] | None = None
    measure_fraction: float | None = None
    calibrate_base: str = "fisher"
    calibrate_fraction: float = 0.1
    calibrate_min_units: int = 6
    batch_size: int = 8
    diag: bool = False

    def __post_init__(self) -> None:
        if self.fisher_labels not in LABEL_SOURCES:
            raise ValidationError("fisher_labels", f"{self.fisher_labels!r}; valid: "
                                  f"{', '.join(LABEL_SOURCES)}")
        for name in ("fisher_draws", "fisher_chunks", "hutchinson_probes",
                     "hutchinson_samples", "batch_size", "calibrate_min_units"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValidationError(name, f"{v!r}; valid: a positive integer")
        if self.fisher_labels == "data" and self.fisher_draws != 1:
            raise ValidationError("fisher_draws", f"{self.fisher_draws} with data labels; "
                                  "valid: 1 (data labels are fixed; draws apply to sampled)")
        if self.first_order not in FIRST_ORDER_MODES:
            raise ValidationError("first_order", f"{self.first_order!r}; valid: "
                                  f"{', '.join(FIRST_ORDER_MODES)}")
        if not (self.first_order_z > 0 and math.isfinite(self.first_order_z)):
            raise ValidationError("first_order_z", f"{self.first_order_z!r}; valid: > 0")
        for name in ("measure_fraction", "calibrate_fraction"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise ValidationError(name, f"{v!r}; valid: a fraction in (0, 1]")
        if self.holdout is not None and (isinstance(self.holdout, bool)
                                         or not isinstance(self.holdout, int)
                                         or self.holdout < 1):
            raise ValidationError("holdout", f"{self.holdout!r}; valid: a positive integer")
        if self.calibrate_base in ("measured", "calibrated"):
            raise ValidationError("calibrate_base", f"{self.calibrate_base!r}; valid: a cheap "
                                  "estimator (fisher, fisher-diag, hutchinson, layerwise)")

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.fisher_labels,) * self.fisher_draws


@dataclass(frozen=True, eq=False)
class Estimate:
    """An estimator's answer over ``layout`` (flat option order).

    Attributes:
        layout: the units and options estimated (a subset for ``measured`` on a subset).
        loss: ``[n_options]`` predicted loss increase, nats/token (``layerwise``: squared
            activation error per token).
        U: ``[N, n_options]`` interaction factor, or None (additive estimators).
        info: JSON-able facts (rows, label source, fit, ...).
    """

    layout: OptionLayout
    loss: np.ndarray
    U: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """Everything an estimator reads. ``tokens`` are the gradient/statistics sequences
    (global, unsharded); ``holdout`` the sequences ``measured`` uses (None: ``tokens``)."""

    model: torch.nn.Module
    layout: OptionLayout
    tokens: torch.Tensor
    group_size: int
    quantizer: str = "rtn"
    options: EstimatorOptions = field(default_factory=EstimatorOptions)
    holdout: torch.Tensor | None = None
    seed: int = 0
    dist: Dist = field(default_factory=Dist)
    progress: bool = False
    meter: ResourceMeter = field(default_factory=ResourceMeter)

    def local(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        """This rank's shard of ``tokens`` and the global index of its first sequence."""
        r = self.dist.shard(tokens.shape[0])
        return tokens[r.start:r.stop], r.start

    @property
    def perturbations_ready(self) -> bool:
        """Whether the δ's were computed (cheap estimators like ``measured`` may not)."""
        return "perturbations" in self.__dict__

    @cached_property
    def perturbations(self) -> Perturbations:
        pert = Perturbations(self.model, self.layout, self.group_size, self.quantizer)
        with self.meter.phase("quantize"), self._bar(len(pert.entries), "quantize") as bar:
            hess = None
            if self.quantizer == "gptq":
                hess = self._gptq_hessians
            pert.compute(hessians=hess, progress=bar.update)
        return pert

    def _gptq_hessians(self):
        local, _ = self.local(self.tokens)
        names = set(Perturbations(self.model, self.layout, self.group_size).entries)
        for name, hess in input_hessians(self.model, local, names, self.options.batch_size,
                                         dist=self.dist):
            yield name, hess.matrix()

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not (self.progress and self.dist.is_main),
                    leave=False, dynamic_ncols=True)
