"""Apply a plan (the stage between the solver and the kernels), in three modules:

- ``bitsack.plan``: what every unit becomes (``Choice``), from a solution or by hand, and the
  packed segments of every matrix;
- ``bitsack.compress``: surgery + quantization (RTN, or sequential GPTQ on the layer engine)
  + packing;
- ``bitsack.checkpoint``: compressed model folders (save, load, hashes, the marker that makes
  other loaders refuse them).

This module re-exports their public names.
"""

from bitsack.checkpoint import (
    MODEL_SCHEMA,
    base_config,
    cache_dequantized,
    is_model_dir,
    load_compressed,
    read_meta,
    save_compressed,
)
from bitsack.compress import ApplyConfig, CompressResult, compress
from bitsack.plan import Choice, normalize_plan, plan_from_solution

__all__ = [
    "MODEL_SCHEMA",
    "ApplyConfig",
    "Choice",
    "CompressResult",
    "base_config",
    "cache_dequantized",
    "compress",
    "is_model_dir",
    "load_compressed",
    "normalize_plan",
    "plan_from_solution",
    "read_meta",
    "save_compressed",
]
