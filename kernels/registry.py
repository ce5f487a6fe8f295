"""The kernel-backend registry: a dict plus a decorator, apart from the backends themselves.

``bitsack.kernels.backends`` registers its backends here when it is imported (packed modules
import it when their backend is set); ``bitsack.kernels.bounds`` looks a backend's numerics up
here without importing the backends (which import the bounds): no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bitsack.errors import ValidationError

__all__ = ["available_backends", "get_backend", "register_backend"]

_BACKENDS: dict[str, Any] = {}


def register_backend(cls: Callable[[], Any]) -> Callable[[], Any]:
    """Class decorator: register an instance under its ``name``."""
    obj = cls()
    _BACKENDS[obj.name] = obj
    return cls


def get_backend(name: str) -> Any:
    """The backend registered as ``name`` (a ``bitsack.kernels.backends.KernelBackend``)."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValidationError("backend", f"{name!r} is unknown; valid: "
                              f"{', '.join(sorted(_BACKENDS))}") from None


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine."""
    return [n for n, b in sorted(_BACKENDS.items()) if b.is_available()]
