"""Unit enumeration: every quantizable weight in exactly one unit, ids, size checks, errors."""

from __future__ import annotations

import types

import pytest

from bitsack.errors import ModelError, ValidationError
from bitsack.models import get_adapter, model_units, supported_model_types
from bitsack.models.testing import TINY_ARCHS, assert_exact_cover, tiny_model


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("vocab_groups", [1, 3])
def test_units_cover_every_weight_exactly_once(arch, vocab_groups):
    model = tiny_model(arch, seed=1)
    units = model_units(model, mlp_group=32, vocab_groups=vocab_groups)
    assert_exact_cover(model, units)
    ids = [u.id for u in units]
    assert len(ids) == len(set(ids))
    assert all(u.prunable == (u.kind in ("head_group", "mlp_group")) for u in units)


def test_llama_gqa_groups_own_their_query_heads():
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    units = {u.id: u for u in model_units(model, mlp_group=32)}
    g1 = units["L0.attn.g1"]
    by_param = {s.param.split(".")[-2]: s for s in g1.slices}
    # KV head 1 serves query heads 2 and 3: q rows 32..64, k/v rows 16..32, o columns 32..64.
    assert (by_param["q_proj"].start, by_param["q_proj"].stop) == (32, 64)
    assert (by_param["k_proj"].start, by_param["k_proj"].stop) == (16, 32)
    assert (by_param["v_proj"].start, by_param["v_proj"].stop) == (16, 32)
    o = by_param["o_proj"]
    assert (o.dim, o.start, o.stop) == (1, 32, 64)
    assert [u for u in units if u.startswith("L1.attn")] == ["L1.attn.g0", "L1.attn.g1"]


def test_tied_embeddings_counted_once_untied_twice():
    tied = model_units(tiny_model("qwen2", tie_word_embeddings=True), 32)
    untied = model_units(tiny_model("llama", tie_word_embeddings=False), 32)
    assert [u.id for u in tied if u.kind == "embedding"] == ["embed"]
    assert [u.id for u in untied if u.kind == "embedding"] == ["embed", "lm_head"]
    assert all(not u.prunable for u in tied + untied if u.kind == "embedding")
    assert not [u for u in model_units(tiny_model("llama"), 32, embeddings=False)
                if u.kind == "embedding"]


def test_any_mlp_group_covers_the_model_with_a_smaller_last_block():
    # groups may be ragged (bitsack.kernels.formats), so no block size is tied to a group size
    model = tiny_model("llama", intermediate_size=96)
    for mlp_group, widths in ((64, [64, 32]), (40, [40, 40, 16])):
        units = [u for u in model_units(model, mlp_group=mlp_group) if u.layer == 0
                 and u.kind == "mlp_group"]
        assert [u.slices[0].shape[0] for u in units] == widths
        assert_exact_cover(model, model_units(model, mlp_group=mlp_group))


def test_bad_mlp_group_is_refused():
    with pytest.raises(ModelError, match=r"mlp_group: 0 must be a positive integer"):
        model_units(tiny_model("llama"), mlp_group=0)


def test_unsupported_architecture_names_it_and_supported_ones():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="bert"))
    with pytest.raises(ModelError) as info:
        get_adapter(fake)
    msg = str(info.value)
    assert "'bert'" in msg
    supported = ["gemma", "gemma2", "gemma3_text", "gpt2", "llama", "mistral", "opt", "phi3",
                 "qwen2", "qwen3"]
    for mt in supported:
        assert mt in msg
    assert supported_model_types() == supported


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_linear_modules_are_the_units_matrices(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    for i in range(len(adapter.layers())):
        prefix = adapter.layer_prefix(i)
        from_modules = {prefix + name + ".weight" for name in adapter.linear_modules(i)}
        from_units = {s.param for u in adapter.units(32, 16) if u.layer == i for s in u.slices}
        assert from_modules == from_units


def test_vocab_ranges_halve_towards_the_front():
    from bitsack.models.adapter import vocab_ranges

    assert vocab_ranges(49152, 1) == [(0, 49152)]
    assert vocab_ranges(49152, 6) == [(0, 1536), (1536, 3072), (3072, 6144), (6144, 12288),
                                      (12288, 24576), (24576, 49152)]
    assert vocab_ranges(100, 3) == [(0, 25), (25, 50), (50, 100)]  # odd sizes: floors
    with pytest.raises(ModelError, match="vocab_groups: 4 ranges .* need at least 8 rows"):
        vocab_ranges(4, 4)  # more ranges than the rows allow
    for groups in (0, 17, True):  # not a valid number of ranges at all
        with pytest.raises(ValidationError, match="vocab_groups: .*; valid: an integer 1..16"):
            vocab_ranges(8, groups)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_vocab_groups_split_only_the_token_matrices(arch):
    model = tiny_model(arch, seed=0)
    whole = model_units(model)
    split = model_units(model, vocab_groups=3)
    assert [u.id for u in whole if u.layer is not None] == \
        [u.id for u in split if u.layer is not None]
    for base in ("embed", "lm_head"):
        parts = [u for u in split if u.id.startswith(base + ".v")]
        if not any(u.id == base for u in whole):
            assert not parts
            continue
        (w,) = [u for u in whole if u.id == base]
        assert [u.id for u in parts] == [f"{base}.v{i}" for i in range(3)]
        assert sum(u.params for u in parts) == w.params
        assert all(not u.prunable and u.kind == w.kind for u in parts)
        assert parts[0].slices[0].start == 0 and \
            parts[-1].slices[0].stop == w.slices[0].shape[0]
    # GPT-2's position embedding is not indexed by token id: it stays whole
    assert ("pos_embed" in {u.id for u in split}) == (arch == "gpt2")
    with pytest.raises(ValidationError, match="vocab_groups: 0"):
        model_units(model, vocab_groups=0)
