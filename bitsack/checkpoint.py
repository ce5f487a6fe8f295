"""Compressed model folders (the implementation lives in ``bitsack.models.checkpoint``, beside
the model loaders that read them): ``save_compressed``, ``load_compressed`` and what a folder
holds."""

from bitsack.models.checkpoint import (
    HF_BASE_TYPE_KEY,
    HF_MODEL_TYPE,
    MODEL_SCHEMA,
    NUMBER_FILES,
    TOKENIZER_FILES,
    base_config,
    base_config_from_dict,
    cache_dequantized,
    is_model_dir,
    load_compressed,
    read_meta,
    save_compressed,
    verify_files,
)

__all__ = [
    "HF_BASE_TYPE_KEY",
    "HF_MODEL_TYPE",
    "MODEL_SCHEMA",
    "NUMBER_FILES",
    "TOKENIZER_FILES",
    "base_config",
    "base_config_from_dict",
    "cache_dequantized",
    "is_model_dir",
    "load_compressed",
    "read_meta",
    "save_compressed",
    "verify_files",
]
