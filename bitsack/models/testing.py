"""Tiny random models and a byte tokenizer, for tests (every helper's tests may use them).

A random model is for checking that code runs and that transformations preserve functions;
its perplexity is near the vocabulary size and says nothing about quality.
"""

from __future__ import annotations

from typing import Any

import torch

from bitsack.errors import ModelError

TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3",
              "gpt2", "opt")

# Small enough to run in milliseconds, with GQA (4 query heads on 2 KV heads) for the Llama
# family and head_dim 16, so group sizes 8 and 16 fit every slice. Sliding windows of 8 tokens
# (Mistral; Qwen3 from layer 1; Gemma 2 / 3 every other layer) are shorter than the test
# sequences, so a layer that got the wrong mask would show.
_LLAMA_LIKE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                   max_position_embeddings=256)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(_LLAMA_LIKE, tie_word_embeddings=False),
    "qwen2": dict(_LLAMA_LIKE, tie_word_embeddings=True),
    "qwen3": dict(_LLAMA_LIKE, tie_word_embeddings=True, use_sliding_window=True,
                  sliding_window=8, max_window_layers=1),
    "mistral": dict(_LLAMA_LIKE, sliding_window=8, tie_word_embeddings=False),
    "gemma": dict(_LLAMA_LIKE, tie_word_embeddings=True),
    "gemma2": dict(_LLAMA_LIKE, sliding_window=8, query_pre_attn_scalar=16,
                   tie_word_embeddings=True),
    "gemma3_text": dict(_LLAMA_LIKE, sliding_window=8, sliding_window_pattern=2,
                        query_pre_attn_scalar=16, final_logit_softcapping=30.0,
                        tie_word_embeddings=True),
    "phi3": dict(_LLAMA_LIKE, pad_token_id=None, bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=False),
    "gpt2": dict(n_embd=64, n_head=4, n_inner=96, n_layer=2, vocab_size=128, n_positions=256,
                 tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    "opt": dict(hidden_size=64, num_attention_heads=4, ffn_dim=96, num_hidden_layers=2,
                vocab_size=128, max_position_embeddings=256, word_embed_proj_dim=64,
                tie_word_embeddings=True),
}


def tiny_config(arch: str, **dims: Any):
    """A transformers config for a tiny ``arch`` model; ``dims`` override the defaults."""
    import transformers

    if arch not in _DEFAULTS:
        raise ModelError(f"arch: {arch!r} is not a tiny test architecture; valid: "
                         f"{', '.join(TINY_ARCHS)}")
    kwargs = {**_DEFAULTS[arch], **dims}
    return transformers.AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str, seed: int = 0, *, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "eager", init_std: float = 0.1, **dims: Any):
    """A random tiny causal LM of architecture ``arch`` (one of ``TINY_ARCHS``).

    Every parameter, biases and norm weights included, is drawn from a seeded normal
    distribution (norm weights around 1), so bugs that lose a bias or a norm show up as output
    differences. The model is in eval mode.

    Args:
        arch: one of ``TINY_ARCHS``.
        seed: seed of the weights.
        dtype: parameter dtype (``torch.float64`` makes equivalence tests exact to ~1e-12).
        attn_implementation: transformers attention implementation ("eager" or "sdpa").
        init_std: standard deviation of the weights.
        **dims: config overrides, e.g. ``num_hidden_layers=3``.
    """
    import transformers

    config = tiny_config(arch, **dims)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation=attn_implementation, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if p.ndim == 1 and "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight",
                                                                  "ln_f.weight")):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(init_std * noise)
    return model.eval()


def tiny_tokenizer(vocab_size: int = 128):
    """A real transformers tokenizer (fast, ``tokenizers`` backend) of one id per character:
    ASCII character ``c`` is id ``ord(c) % vocab_size``; ids 0/1/2 are unk/eos/pad.

    For tests that save, load and hash a tokenizer's files like a real model's.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {(chr(i) if 32 <= i < 127 else f"<{i}>"): i for i in range(min(vocab_size, 128))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<0>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<0>", eos_token="<1>",
                                   pad_token="<2>")


class ByteTokenizer:
    """A tokenizer-free stand-in: UTF-8 bytes folded into ``vocab_size`` ids.

    Callable like a transformers tokenizer (``tok(text)["input_ids"]``), with ``decode``.
    """

    def __init__(self, vocab_size: int = 128):
        self.vocab_size = vocab_size
        self.eos_token_id = 0
        self.pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def decode(self, ids, **kwargs: Any) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def unit_coverage(model, units) -> dict[str, torch.Tensor]:
    """How many unit slices cover each element of each 2-D parameter (stored orientation).

    Raises:
        AssertionError: a slice names a parameter that is not 2-D or has a wrong shape.
    """
    counts = {name: torch.zeros(p.shape, dtype=torch.int32)
              for name, p in model.named_parameters() if p.ndim == 2}
    for u in units:
        for s in u.slices:
            if s.param not in counts:
                raise AssertionError(f"{u.id}: {s.param} is not a 2-D parameter")
            view = counts[s.param].T if s.transposed else counts[s.param]
            idx = [slice(None), slice(None)]
            idx[s.dim] = slice(s.start, s.stop)
            region = view[tuple(idx)]
            if tuple(region.shape) != s.shape:
                raise AssertionError(f"{u.id}: slice {s} selects {tuple(region.shape)}")
            region += 1
    return counts


def assert_exact_cover(model, units) -> None:
    """Assert every element of every 2-D parameter lies in exactly one unit slice."""
    counts = unit_coverage(model, units)
    for name, c in counts.items():
        if c.numel() and (int(c.min()) != 1 or int(c.max()) != 1):
            raise AssertionError(f"{name}: covered {int(c.min())}..{int(c.max())} times")
    total = sum(c.numel() for c in counts.values())
    if sum(u.params for u in units) != total:
        raise AssertionError(f"units own {sum(u.params for u in units)} weights, model has {total}")
