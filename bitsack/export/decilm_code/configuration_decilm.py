"""DeciLM / Nemotron-NAS configuration of a pruned model exported by bitsack.

Written next to config.json by ``bitsack export --format compressed-tensors`` (the folder's
``auto_map`` names it), so that ``trust_remote_code`` readers — vLLM's ``DeciLMForCausalLM``,
transformers with ``modeling_decilm.py`` — find each layer's sizes. It is bitsack's own code
and imports only transformers.

``block_configs`` holds one entry per layer, in the published Nemotron-NAS schema:

- ``attention``: ``no_op`` (the layer has no attention: no tensors, no input norm) or
  ``n_heads_in_group`` (query heads per KV head: the layer has
  ``num_attention_heads // n_heads_in_group`` KV heads; ``num_attention_heads`` is the same
  in every layer);
- ``ffn``: ``no_op`` (no MLP, no post-attention norm) or ``ffn_mult``, from which the MLP
  width is ``int(2 · ffn_mult · hidden_size / 3)`` rounded up to a multiple of 256
  (``intermediate_size_of``).

Each section is an attribute view holding exactly the keys written (``hasattr`` is True only
for them, as vLLM's loader expects).
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

#: MLP widths of the Nemotron-NAS convention are multiples of this.
FFN_MULTIPLE = 256


def intermediate_size_of(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width a Nemotron-NAS ``ffn_mult`` stands for."""
    width = int(2 * ffn_mult * hidden_size / 3)
    return -(-width // FFN_MULTIPLE) * FFN_MULTIPLE


class SubblockConfig:
    """One section (``attention`` or ``ffn``) of a layer's block config: attributes are the
    keys given."""

    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class BlockConfig:
    """A layer's ``attention`` and ``ffn`` sections."""

    def __init__(self, attention: dict[str, Any], ffn: dict[str, Any]):
        self.attention = SubblockConfig(attention)
        self.ffn = SubblockConfig(ffn)

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}


class DeciLMConfig(LlamaConfig):
    """A Llama configuration with per-layer attention and MLP sizes (``block_configs``)."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs: list[Any] | None = None, **kwargs: Any):
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b)
                              for b in block_configs or []]
        super().__init__(**kwargs)

    def layer_sizes(self, i: int) -> tuple[int, int]:
        """(KV heads, MLP width) of layer ``i``; 0 where that part is a no-op."""
        block = self.block_configs[i]
        kv = 0 if block.attention.no_op else \
            self.num_attention_heads // block.attention.n_heads_in_group
        ffn = 0 if block.ffn.no_op else \
            intermediate_size_of(block.ffn.ffn_mult, self.hidden_size)
        return kv, ffn

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out
