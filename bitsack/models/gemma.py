"""Adapter for Gemma, Gemma 2 and Gemma 3 (text): the Llama geometry with Gemma's extras.

The units and surgery are Llama's (``q/k/v/o_proj``, ``gate/up/down_proj`` under
``model.layers.{i}``). What differs, and where it is handled:

  - the word embedding is scaled by ``sqrt(hidden_size)`` inside its own ``forward``
    (``Gemma*ScaledWordEmbedding``, an ``nn.Embedding`` subclass): a packed one keeps that
    forward through ``PackedWeightModule``, tied or not;
  - Gemma 2 / 3 soft-cap the final logits (``final_logit_softcapping``): ``final_logits``
    applies it as ``Gemma*ForCausalLM.forward`` does; attention soft-capping
    (``attn_logit_softcapping``) lives inside the attention modules and needs nothing;
  - the extra norms around attention and MLP (Gemma 2 / 3 pre/post-feedforward norms) and
    Gemma 3's per-head q/k norms are not units and are unaffected by pruning: a fully pruned
    attention or MLP outputs zeros, and RMS-normalising zeros gives zeros, exactly like the
    masked model;
  - sliding-window and global layers (and Gemma 3's two rotary embeddings) get their own call
    arguments (``LayerInputs``).

Gemma 3's multimodal model (``model_type`` ``gemma3``) is not supported; its text model
(``gemma3_text``, ``Gemma3ForCausalLM``) is.
"""

from __future__ import annotations

import torch

from bitsack.models.llama import LlamaAdapter
from bitsack.models.registry import register_adapter


@register_adapter("gemma", "gemma2", "gemma3_text")
class GemmaAdapter(LlamaAdapter):
    """Units and surgery for ``GemmaForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``."""

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().final_logits(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
