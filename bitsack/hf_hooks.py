"""Register bitsack's folder format with transformers when transformers' auto classes load.

Standard library only: ``import bitsack`` installs these hooks and stays light (no torch, no
transformers). Each watched transformers module gets its bitsack registration right after it
finishes executing, or at once when it was imported before bitsack:

  - ``transformers.models.auto.configuration_auto``: ``AutoConfig`` knows model type
    ``bitsack`` (``bitsack.hf.BitsackConfig``);
  - ``transformers.models.auto.modeling_auto``: ``AutoModelForCausalLM`` builds it
    (``bitsack.hf.BitsackForCausalLM``, i.e. ``bitsack.checkpoint.load_compressed``);
  - ``transformers.quantizers.auto``: ``quant_method: bitsack`` is known, so that loading a
    folder through a concrete class (``LlamaForCausalLM.from_pretrained``) is refused
    (``bitsack.hf_quantizer``).

Hooking those modules rather than ``transformers`` itself costs nothing extra: transformers
imports them lazily, on first use of an auto class, and they import torch anyway.

A registration that fails (a transformers version with another API) never breaks importing
transformers; it warns, and ``bitsack.checkpoint.load_compressed`` still loads the folder.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings
from collections.abc import Callable

# transformers module -> (bitsack module, its registration function)
WATCHED: dict[str, tuple[str, str]] = {
    "transformers.models.auto.configuration_auto": ("bitsack.hf", "register_config"),
    "transformers.models.auto.modeling_auto": ("bitsack.hf", "register_model"),
    "transformers.quantizers.auto": ("bitsack.hf_quantizer", "register_quantizer"),
}


def _register(watched: str) -> None:
    module, func = WATCHED[watched]
    try:
        getattr(importlib.import_module(module), func)()
    except Exception as exc:  # never break the import of transformers
        warnings.warn(f"bitsack could not register with {watched} ({type(exc).__name__}: "
                      f"{exc}); load compressed folders with "
                      "bitsack.checkpoint.load_compressed", RuntimeWarning, stacklevel=2)


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps a module's own loader: execute the module, then run its registration."""

    def __init__(self, inner: importlib.abc.Loader, callback: Callable[[], None]):
        self._inner = inner
        self._callback = callback

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        # the module sees its own loader, as if bitsack were not there
        module.__spec__.loader = self._inner
        module.__loader__ = self._inner
        self._inner.exec_module(module)
        self._callback()


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched module it asks the other finders, then wraps the
    loader they return so that the registration runs once the module has executed."""

    def __init__(self, names: set[str]):
        self._names = set(names)
        self._lock = threading.Lock()

    def find_spec(self, fullname, path=None, target=None):
        with self._lock:
            if fullname not in self._names:
                return None
            self._names.discard(fullname)
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader, lambda: _register(fullname))
        return spec


_installed = False


def install() -> None:
    """Register now for watched modules already imported; hook the others (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    pending = set()
    for name in WATCHED:
        if name in sys.modules:
            _register(name)
        else:
            pending.add(name)
    if pending:
        sys.meta_path.insert(0, _PostImportFinder(pending))
