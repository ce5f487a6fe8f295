"""transformers' quantizer registry learns ``quant_method: bitsack`` — to refuse, not to load.

``AutoModelForCausalLM`` loads a bitsack folder through ``bitsack.hf``. A concrete class
(``LlamaForCausalLM.from_pretrained(folder)``) bypasses the auto classes: transformers only
warns that config.json's model type differs, builds the full-size base model, and — with
``quant_method: bitsack`` unknown — only warns again and initialises every packed weight at
random. With this quantizer registered, transformers asks it to validate the environment
before it builds anything, and it refuses with the way that works.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from bitsack.errors import ModelError

QUANT_METHOD = "bitsack"


class BitsackQuantizationConfig(QuantizationConfigMixin):
    """``quantization_config`` of a bitsack folder's config.json (``format``: the folder
    schema; ``metadata``: the file with the layout and hashes)."""

    def __init__(self, format: str | None = None, metadata: str | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.metadata = metadata


class BitsackHfQuantizer(HfQuantizer):
    """Refuses loading a bitsack folder through a concrete model class (see module doc)."""

    requires_calibration = False

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        raise ModelError(
            "quantization_config.quant_method: 'bitsack' — this folder holds bitsack's packed, "
            "possibly pruned weights, which a concrete model class cannot build (it would start "
            "from random weights); valid: transformers.AutoModelForCausalLM.from_pretrained("
            "folder) after `import bitsack`, or bitsack.checkpoint.load_compressed(folder)")

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        self.validate_environment()

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> None:
        self.validate_environment()

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def register_quantizer() -> None:
    """transformers knows ``quant_method: bitsack`` (idempotent)."""
    from transformers.quantizers import auto

    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = BitsackQuantizationConfig
    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = BitsackHfQuantizer
