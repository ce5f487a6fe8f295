"""bitsack.profiling: global-loss sensitivity of every unit and option -> a solver problem.

Public API (torch loads on first use, so ``import bitsack.profiling`` stays light)::

    from bitsack.profiling import profile, write_profile, EstimatorOptions
    result = profile(model, units, calib_tokens, estimator="fisher", bits=(2, 3, 4))
    write_profile(result, "out/profile")     # problem.yaml, interactions.npz, profile.json

Estimators (``ESTIMATORS``, registered with ``register_estimator``): ``fisher`` (default),
``fisher-diag``, ``hutchinson``, ``layerwise``, ``measured``, ``calibrated``; their formulas
are in ``bitsack.profiling.estimators``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ESTIMATORS",
    "EstimatorOptions",
    "ProfileResult",
    "estimator_names",
    "profile",
    "register_estimator",
    "write_profile",
]

_LAZY = {
    "ESTIMATORS": "bitsack.profiling.estimators",
    "EstimatorOptions": "bitsack.profiling.estimators",
    "register_estimator": "bitsack.profiling.estimators",
    "ProfileResult": "bitsack.profiling.run",
    "profile": "bitsack.profiling.run",
    "write_profile": "bitsack.profiling.run",
}

#: Names of the built-in estimators (without importing torch).
BUILTIN_ESTIMATORS = ("fisher", "fisher-diag", "hutchinson", "layerwise", "measured",
                      "calibrated")


def estimator_names() -> list[str]:
    """Registered estimator names, sorted."""
    from bitsack.profiling.estimators import ESTIMATORS

    return sorted(ESTIMATORS)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bitsack.profiling' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
