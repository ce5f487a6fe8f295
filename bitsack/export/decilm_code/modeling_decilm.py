"""A transformers model for the DeciLM / Nemotron-NAS layout of a pruned model exported by
bitsack (``configuration_decilm.py`` beside it).

transformers has no DeciLM model of its own; this one lets a folder written by
``bitsack export --format compressed-tensors`` run there with ``trust_remote_code=True``,
decompressed (``CompressedTensorsConfig(dequantize=True)``) or from a dense state dict. It is
bitsack's own code: a Llama decoder (RMSNorm, rotary embeddings, grouped-query attention,
gated MLP) whose layers take their sizes from ``block_configs`` and skip their no-op parts,
as vLLM's ``DeciLMForCausalLM`` does. Forward only computes logits (and the loss when given
``labels``); it keeps no KV cache, so ``generate`` recomputes the whole prefix at each step
(``use_cache=False``): serve with vLLM, check with this.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_decilm import DeciLMConfig


class DeciLMRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rope_frequencies(config: DeciLMConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary embedding and its attention factor."""
    rope = dict(getattr(config, "rope_parameters", None) or
                getattr(config, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        exps = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        return 1.0 / theta ** exps, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, factor = ROPE_INIT_FUNCTIONS[kind](config, None)
    return inv_freq.float(), float(factor)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DeciLMAttention(nn.Module):
    def __init__(self, config: DeciLMConfig, kv_heads: int):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = kv_heads
        self.head_dim = config.head_dim
        # as vLLM reads them: o_proj's bias is attention_bias, q/k/v's qkv_bias if given
        h, bias = config.hidden_size, bool(getattr(config, "attention_bias", False))
        qkv = bool(getattr(config, "qkv_bias", bias))
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=qkv)
        self.k_proj = nn.Linear(h, kv_heads * self.head_dim, bias=qkv)
        self.v_proj = nn.Linear(h, kv_heads * self.head_dim, bias=qkv)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class DeciLMMLP(nn.Module):
    def __init__(self, config: DeciLMConfig, width: int):
        super().__init__()
        h, bias = config.hidden_size, bool(getattr(config, "mlp_bias", False))
        self.gate_proj = nn.Linear(h, width, bias=bias)
        self.up_proj = nn.Linear(h, width, bias=bias)
        self.down_proj = nn.Linear(width, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DeciLMDecoderLayer(nn.Module):
    """A Llama layer whose attention and MLP each may be a no-op (no tensors, no norm)."""

    def __init__(self, config: DeciLMConfig, i: int):
        super().__init__()
        kv, width = config.layer_sizes(i)
        if kv:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.self_attn = DeciLMAttention(config, kv)
        if width:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size,
                                                          config.rms_norm_eps)
            self.mlp = DeciLMMLP(config, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        if hasattr(self, "self_attn"):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        if hasattr(self, "mlp"):
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["DeciLMDecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = float(getattr(self.config, "initializer_range", 0.02))
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, DeciLMRMSNorm):
            nn.init.ones_(module.weight)


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DeciLMDecoderLayer(config, i)
                                     for i in range(config.num_hidden_layers)])
        self.norm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        t = input_ids.shape[1]
        # computed here, not held in a buffer: from_pretrained builds the model on the meta
        # device and leaves non-persistent buffers uninitialised
        inv_freq, factor = _rope_frequencies(self.config, self.config.head_dim)
        angles = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq.cpu()).to(x.device)
        angles = torch.cat((angles, angles), dim=-1)
        cos = (angles.cos() * factor).to(x.dtype)
        sin = (angles.sin() * factor).to(x.dtype)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            # every position also sees itself: a padding row with no key left gives NaN in
            # some torch versions, and NaN values poison later layers even at weight 0
            own = torch.eye(t, dtype=torch.bool, device=x.device)
            mask = (causal[None, None] & attention_mask.bool()[:, None, None, :]) | own
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    # transformers 5 maps a tied parameter to its source; 4.x lists the tied ones
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"} \
        if int(transformers.__version__.split(".")[0]) >= 5 else ["lm_head.weight"]

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor,
                                      attention_mask: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        logits = self.lm_head(self.model(input_ids, attention_mask))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
