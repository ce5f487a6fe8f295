"""bitsack: joint structural pruning and mixed-precision quantization of causal LMs.

The choice of prune / keep-at-b-bits for every structure of a model is solved as one
multiple-choice knapsack over the model's global loss, with a certificate of optimality.

``bitsack.compress(model, avg_bits=3.5)`` and ``bitsack.load(folder)`` are the Python API
(``bitsack.api``). Importing ``bitsack`` is cheap: torch, CuPy and OR-Tools load only when a
stage needs them.
It also teaches transformers to load compressed folders
(``AutoModelForCausalLM.from_pretrained(folder)``), registering when transformers' auto
classes load (``bitsack.hf_hooks``).
"""

from typing import Any

from bitsack import hf_hooks as _hf_hooks

__version__ = "0.1.0"

__all__ = ["__version__", "compress", "load"]

_hf_hooks.install()


def __getattr__(name: str) -> Any:
    # the notebook API (bitsack.api) loads on first use: `import bitsack` stays light
    if name in ("compress", "load", "Compressed"):
        from bitsack import api

        return getattr(api, name)
    raise AttributeError(f"module 'bitsack' has no attribute {name!r}")
