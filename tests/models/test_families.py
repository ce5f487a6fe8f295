"""The model families beyond Llama/GPT-2/OPT, end to end on tiny random models: Qwen3 (q/k
norms, sliding layers), Mistral (sliding window), Gemma (scaled embedding), Gemma 2 (soft-caps,
pre/post norms), Gemma 3 text (q/k norms, sliding/global layers with two rotary bases) and
Phi-3 (fused qkv_proj and gate_up_proj). Surgery, units and the layer-by-layer walk are also
covered for every family by the parametrized tests of test_model_surgery / test_model_units."""

from __future__ import annotations

import copy
import random
import types

import pytest
import torch

from bitsack.apply import ApplyConfig, compress, load_compressed, save_compressed
from bitsack.errors import ModelError
from bitsack.models import get_adapter, model_units
from bitsack.models.testing import TINY_ARCHS, tiny_model, tiny_tokenizer
from bitsack.plan import matrix_segments, normalize_plan

G, MLP = 16, 32
NEW = ("qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _tokens(n=4, seqlen=20, seed=1):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _plan(units, seed):
    rng = random.Random(seed)
    plan = {u.id: rng.choice((0, 2, 3, 4, 8, 16)) if u.prunable else rng.choice((3, 4, 8))
            for u in units}
    plan["L0.attn.g0"] = 0  # a pruned head group and a pruned MLP block, whatever the seed
    plan["L1.mlp.c1"] = 0
    return plan


def _memory_cost(units, plan):
    from bitsack.solver.costs import SliceShape, UnitShape, get_cost_model

    mem = get_cost_model("memory")
    return sum(mem.cost(UnitShape(u.id, u.kind, tuple(SliceShape(s.shape[0], s.shape[1], s.dim)
                                                      for s in u.slices), u.layer),
                        plan[u.id], G)["memory_bytes"] for u in units)


def test_phi3_units_own_three_row_ranges_of_the_fused_matrices():
    model = tiny_model("phi3")
    units = {u.id: u for u in model_units(model, mlp_group=MLP)}
    qkv = [(s.start, s.stop) for s in units["L0.attn.g1"].slices if "qkv" in s.param]
    # 4 query heads of 16 on 2 KV heads: q rows 0..64, k rows 64..96, v rows 96..128
    assert qkv == [(32, 64), (64 + 16, 64 + 32), (96 + 16, 96 + 32)]
    gate_up = [(s.start, s.stop) for s in units["L0.mlp.c1"].slices if "gate_up" in s.param]
    assert gate_up == [(32, 64), (96 + 32, 96 + 64)]
    # a mixed plan: every range of a matrix gets its owner's bits, and the ranges tile it
    plan = normalize_plan({"L0.attn.g0": 4, "L0.attn.g1": 2, "L0.mlp.c0": 3, "L0.mlp.c1": 8,
                           "L0.mlp.c2": 3}, G)
    segs = matrix_segments([units[u] for u in plan], plan)
    got = [(s.start, s.stop, s.bits) for s in segs["model.layers.0.self_attn.qkv_proj"]]
    assert got == [(0, 32, 4), (32, 64, 2), (64, 80, 4), (80, 96, 2), (96, 112, 4),
                   (112, 128, 2)]
    got = [(s.start, s.stop, s.bits) for s in segs["model.layers.0.mlp.gate_up_proj"]]
    # gate rows of c2 and up rows of c0 meet at 96 with one choice: rows merge into a segment
    assert got == [(0, 32, 3), (32, 64, 8), (64, 128, 3), (128, 160, 8), (160, 192, 3)]


def _compress_save_load(tmp_path, arch, tied, quantizer, seed=0):
    model = tiny_model(arch, seed=seed, num_hidden_layers=3, tie_word_embeddings=tied)
    units = model_units(model, mlp_group=MLP)
    plan = _plan(units, seed)
    x = _tokens()
    res = compress(model, plan, x, ApplyConfig(quantizer=quantizer, group_size=G,
                                               mlp_group=MLP, batch_size=2))
    out = save_compressed(model, tmp_path / "m", tokenizer=tiny_tokenizer())
    return model, units, plan, res, out, x


@pytest.mark.parametrize("arch,tied,quantizer",
                         [(a, t, "rtn") for a in NEW for t in (True, False)]
                         + [(a, a != "phi3", "gptq") for a in NEW])
def test_compress_save_load_is_bit_identical(tmp_path, arch, tied, quantizer):
    from transformers import AutoModelForCausalLM

    from bitsack.kernels.packed import PackedLinear

    model, units, plan, res, out, x = _compress_save_load(tmp_path, arch, tied, quantizer)
    assert res.packed_bytes == _memory_cost(units, plan)
    adapter = get_adapter(model)
    structural = [u.id for u in units if u.layer is not None]
    assert len(adapter.units(MLP, embeddings=False)) == len(structural) - sum(
        plan[u] == 0 for u in structural)  # pruned units are gone
    head = model.get_output_embeddings()
    assert isinstance(head, PackedLinear)
    emb = model.get_input_embeddings()
    emb = getattr(emb, "packed", emb)  # Gemma's scaled embedding keeps its own forward
    shares = emb.seg0_qdata is head.seg0_qdata
    assert shares == tied  # a tied head stays one table with the embedding
    with torch.no_grad():
        want = model(x).logits
        for loaded in (load_compressed(out).model, AutoModelForCausalLM.from_pretrained(out)):
            assert torch.equal(loaded(x).logits, want)
            loaded.tie_weights()
            gen = loaded.generate(x[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=2)
            assert torch.equal(gen, model.generate(x[:1, :6], max_new_tokens=4,
                                                   do_sample=False, pad_token_id=2))


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("tied", [True, False])
def test_fp16_packing_keeps_the_function(arch, tied):
    """Every unit packed at 16 bits (fp16 segments, packed embedding and head): a lost
    embedding scale, norm, soft-cap or tie would show far above fp16 rounding."""
    if arch == "gpt2" and not tied:
        pytest.skip("GPT-2's head is always tied in transformers")
    model = tiny_model(arch, seed=2, tie_word_embeddings=tied)
    ref = tiny_model(arch, seed=2, tie_word_embeddings=tied)
    compress(model, {u.id: 16 for u in model_units(model, mlp_group=MLP)},
             config=ApplyConfig(quantizer="rtn", group_size=G, mlp_group=MLP))
    assert not isinstance(model.get_input_embeddings(), torch.nn.Embedding)  # packed
    x = _tokens(n=2)
    with torch.no_grad():
        got, want = model(x).logits, ref(x).logits
    assert (got - want).abs().max() < 0.02 * want.std()


@pytest.mark.parametrize("arch", NEW)
def test_profile_solve_compress_evaluate(tmp_path, arch):
    """The whole bitsack flow on each family: Fisher profile -> solve at 5 bits/weight ->
    GPTQ -> save -> transformers loads it -> perplexity equal to the in-memory model's."""
    from transformers import AutoModelForCausalLM

    from bitsack.evaluate import perplexity
    from bitsack.plan import plan_from_solution
    from bitsack.profiling import profile
    from bitsack.solver import solve
    from bitsack.solver.schema import avg_bits_limit, with_limits

    model = tiny_model(arch, seed=3)
    units = model_units(model, mlp_group=MLP)
    calib = _tokens(n=4, seqlen=24, seed=4)
    problem = profile(model, units, calib, bits=(2, 4), group_size=G, progress=False,
                      metadata={"mlp_group": MLP}).problem
    solution = solve(with_limits(problem, {"memory_bytes": avg_bits_limit(problem, 5.0)}),
                     "greedy")
    assert solution.status in ("optimal", "feasible")
    plan = plan_from_solution(problem, solution)
    res = compress(model, plan, calib, ApplyConfig(quantizer="gptq", group_size=G,
                                                   mlp_group=MLP, batch_size=2))
    assert res.packed_bytes <= avg_bits_limit(problem, 5.0)
    out = save_compressed(model, tmp_path / "m", tokenizer=tiny_tokenizer())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    text = _tokens(n=1, seqlen=64, seed=5)
    a = perplexity(model, text, seqlen=16, progress=False)
    b = perplexity(loaded, text, seqlen=16, progress=False)
    assert a == b and 1 < a.ppl < float("inf")


def test_multimodal_gemma3_is_refused_with_a_pointer_to_its_text_model():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="gemma3"))
    with pytest.raises(ModelError, match=r"'gemma3' is not supported \(.*'gemma3_text'.*"
                                         r"supported architectures: gemma, gemma2, gemma3_text"):
        get_adapter(fake)


def test_phi3_pruned_layer_reads_its_own_head_counts():
    from bitsack.models import prune
    from bitsack.models.adapter import LayerConfig

    model = tiny_model("phi3", seed=0)
    prune(model, ["L0.attn.g1"], mlp_group=MLP)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.config, LayerConfig)
    assert attn.config.num_attention_heads == 2 and attn.config.num_key_value_heads == 1
    assert model.model.layers[1].self_attn.config is model.config
    # later changes of the model's config still reach the pruned layer
    model.set_attn_implementation("sdpa")
    assert attn.config._attn_implementation == "sdpa"
    # a copy keeps the view on its own copy of the config, and the same function
    twin = copy.deepcopy(model)
    assert twin.model.layers[0].self_attn.config.base is twin.config
    x = _tokens(n=1)
    with torch.no_grad():
        assert torch.equal(twin(x).logits, model(x).logits)
