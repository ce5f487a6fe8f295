"""Pruning surgery, permutation and dims records against masked / original references."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from bitsack.errors import ModelError
from bitsack.models import apply_dims, get_adapter, model_units, permute_units, prune
from bitsack.models.adapter import PrunedBlock
from bitsack.models.testing import TINY_ARCHS, assert_exact_cover, tiny_model

MLP_GROUP, GROUP_SIZE = 32, 16
ARCHS = TINY_ARCHS


def masked_reference(model, unit_ids):
    """A copy of ``model`` with the units' output columns (o_proj / down / fc2 ...) zeroed.

    Zeroing the columns a unit contributes to the residual removes exactly that unit's effect,
    which is what physical pruning must reproduce.
    """
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    units = {u.id: u for u in model_units(model, MLP_GROUP, GROUP_SIZE)}
    with torch.no_grad():
        for uid in unit_ids:
            for s in units[uid].slices:
                if s.dim != 1:
                    continue
                w = params[s.param]
                view = w.T if s.transposed else w
                view[:, s.start:s.stop] = 0
    return ref


def pick_units(model, seed):
    """A seeded prune set: all of layer 0's attention, all of layer 1's MLP, half the rest."""
    units = [u.id for u in model_units(model, MLP_GROUP, GROUP_SIZE) if u.prunable]
    chosen = {u for u in units if u.startswith("L0.attn") or u.startswith("L1.mlp")}
    rng = random.Random(seed)
    rest = [u for u in units if u not in chosen]
    chosen |= set(rng.sample(rest, len(rest) // 2))
    return sorted(chosen)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_equals_masked_reference(arch):
    model = tiny_model(arch, seed=3, dtype=torch.float64, num_hidden_layers=3)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    chosen = pick_units(model, seed=1)
    ref = masked_reference(model, chosen)
    before = logits(model, ids)
    result = prune(model, chosen, mlp_group=MLP_GROUP)
    after = logits(model, ids)
    torch.testing.assert_close(after, logits(ref, ids), rtol=0, atol=1e-10)
    assert (after - before).abs().max() > 1e-3  # the pruned units mattered
    # All-pruned sub-blocks became PrunedBlocks; weights got physically smaller.
    adapter = get_adapter(model)
    assert result.params_after < result.params_before
    assert result.params_after == adapter.quantizable_params()
    assert not any(n.startswith("self_attn") or n.startswith("attn")
                   for n in adapter.linear_modules(0))
    assert any(isinstance(m, PrunedBlock) for m in adapter.layers()[1].modules())
    json.dumps(result.dims)  # JSON-able
    assert result.dims["layers"][0]["attn_groups"] == []
    assert result.dims["layers"][1]["mlp_width"] == 0
    # The remaining units still cover every remaining weight exactly once, under their old ids.
    remaining = model_units(model, MLP_GROUP, GROUP_SIZE)
    assert_exact_cover(model, remaining)
    original = {u.id for u in model_units(ref, MLP_GROUP, GROUP_SIZE)}
    assert {u.id for u in remaining} == original - set(chosen)


@pytest.mark.parametrize("arch,attn", [(a, "eager") for a in ARCHS] + [("llama", "sdpa")])
def test_pruned_model_generates_like_masked_reference(arch, attn):
    model = tiny_model(arch, seed=4, dtype=torch.float64, num_hidden_layers=3,
                       attn_implementation=attn)
    chosen = pick_units(model, seed=2)
    ref = masked_reference(model, chosen)
    prune(model, chosen, mlp_group=MLP_GROUP)
    prompt = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        got = model.generate(prompt, **kw)
        want = ref.generate(prompt, **kw)
    assert torch.equal(got.sequences, want.sequences)
    # Scores go through the KV cache: equal scores mean cached positions stayed right even
    # with layer 0's attention fully pruned.
    for a, b in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_all_units_of_every_layer_pruned_leaves_embeddings_path():
    model = tiny_model("llama", seed=5, dtype=torch.float64)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    everything = [u.id for u in model_units(model, MLP_GROUP, GROUP_SIZE) if u.prunable]
    prune(model, everything, mlp_group=MLP_GROUP)
    adapter = get_adapter(model)
    emb = model.model.embed_tokens(ids)
    torch.testing.assert_close(logits(model, ids), adapter.final_logits(emb), rtol=0, atol=1e-12)
    assert adapter.quantizable_params() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_permute_units_preserves_function_and_ids(arch):
    model = tiny_model(arch, seed=6, dtype=torch.float64)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    units_before = {u.id: u.params for u in model_units(model, MLP_GROUP, GROUP_SIZE)}
    rng = random.Random(0)
    order = [u for u in units_before if u.startswith("L")]
    rng.shuffle(order)
    dims = permute_units(model, order, mlp_group=MLP_GROUP)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-10)
    assert dims != get_adapter(tiny_model(arch)).dims()  # something really moved
    units_after = model_units(model, MLP_GROUP, GROUP_SIZE)
    assert {u.id: u.params for u in units_after} == units_before
    assert_exact_cover(model, units_after)
    # Each layer's units now sit in the requested relative order.
    for layer in range(2):
        for kind in ("attn", "mlp"):
            want = [u for u in order if u.startswith(f"L{layer}.{kind}")]
            got = [u.id for u in units_after if u.id.startswith(f"L{layer}.{kind}")]
            assert got == want


def test_permute_then_prune_equals_masked_reference():
    model = tiny_model("llama", seed=7, dtype=torch.float64, num_hidden_layers=3)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    chosen = pick_units(model, seed=3)
    ref = masked_reference(model, chosen)
    order = [u.id for u in model_units(model, MLP_GROUP, GROUP_SIZE) if u.prunable][::-1]
    permute_units(model, order, mlp_group=MLP_GROUP)
    prune(model, chosen, mlp_group=MLP_GROUP)
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=0, atol=1e-10)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("meta", [False, True])
def test_apply_dims_and_state_dict_rebuild_pruned_model(arch, meta):
    model = tiny_model(arch, seed=8, dtype=torch.float64, num_hidden_layers=3)
    order = [u.id for u in model_units(model, MLP_GROUP, GROUP_SIZE) if u.prunable]
    random.Random(1).shuffle(order)
    permute_units(model, order, mlp_group=MLP_GROUP)
    result = prune(model, pick_units(model, seed=4), mlp_group=MLP_GROUP)
    dims = json.loads(json.dumps(result.dims))
    state = model.state_dict()
    if meta:
        with torch.device("meta"):
            fresh = tiny_model(arch, seed=99, dtype=torch.float64, num_hidden_layers=3)
    else:
        fresh = tiny_model(arch, seed=99, dtype=torch.float64, num_hidden_layers=3)
    apply_dims(fresh, dims)
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=meta)
    assert not unexpected
    # Only non-persistent buffers may be absent from a state dict.
    assert set(missing) <= {n for n, _ in fresh.named_buffers()}
    if meta:
        fresh.tie_weights()
        for name, buf in model.named_buffers():
            mod_name, _, attr = name.rpartition(".")
            fresh.get_submodule(mod_name).register_buffer(attr, buf.clone(), persistent=False)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)
    assert get_adapter(fresh).dims() == result.dims


def test_apply_dims_rejects_bad_records():
    model = tiny_model("llama")
    dims = prune(tiny_model("llama"), ["L0.attn.g1"], mlp_group=MLP_GROUP).dims
    with pytest.raises(ModelError, match="dims.schema"):
        apply_dims(model, {**dims, "schema": "nope"})
    with pytest.raises(ModelError, match="dims.model_type"):
        apply_dims(tiny_model("opt"), dims)
    bad = copy.deepcopy(dims)
    bad["layers"][1]["attn_groups"] = [0, 7]
    with pytest.raises(ModelError, match=r"dims.layers\[1\].attn_groups"):
        apply_dims(model, bad)
    prune(model, ["L1.mlp.c0"], mlp_group=MLP_GROUP)
    with pytest.raises(ModelError, match="already pruned"):
        apply_dims(model, dims)


def test_prune_rejects_unknown_or_non_structural_ids():
    model = tiny_model("llama")
    with pytest.raises(ModelError, match="'embed' is not a prunable unit"):
        prune(model, ["embed"])
    with pytest.raises(ModelError, match="layer 9"):
        prune(model, ["L9.attn.g0"])
    with pytest.raises(ModelError, match="L0.attn.g5"):
        prune(model, ["L0.attn.g5"])
    prune(model, ["L0.attn.g1"], mlp_group=MLP_GROUP)
    with pytest.raises(ModelError, match="not a head group"):  # already gone
        prune(model, ["L0.attn.g1"], mlp_group=MLP_GROUP)


def test_permute_requires_a_full_permutation_per_layer():
    model = tiny_model("llama")
    with pytest.raises(ModelError, match="exactly once"):
        permute_units(model, ["L0.attn.g1"], mlp_group=MLP_GROUP)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_by_layer_equals_full_forward(arch):
    model = tiny_model(arch, seed=9, dtype=torch.float64)
    prune(model, pick_units(model, seed=5), mlp_group=MLP_GROUP)
    adapter = get_adapter(model)
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(0))
    inputs = adapter.capture_layer_inputs(ids)
    hidden = inputs.hidden
    for i in range(len(adapter.layers())):
        hidden = adapter.run_layer(i, hidden, inputs.kwargs)
    torch.testing.assert_close(adapter.final_logits(hidden), logits(model, ids), rtol=0,
                               atol=1e-12)
    assert type(adapter.layers()[0]).__name__ != "_Catcher"  # the catcher was removed
