"""Apply: plans become pruned, packed models whose bytes match the plan, and reload exactly."""

import json
import random

import pytest
import torch

from bitsack.apply import (
    ApplyConfig,
    Choice,
    compress,
    load_compressed,
    normalize_plan,
    plan_from_solution,
    save_compressed,
)
from bitsack.errors import FormatError, ValidationError
from bitsack.models import model_units
from bitsack.models.testing import tiny_model
from bitsack.solver.costs import SliceShape, UnitShape, get_cost_model

G, MLP = 16, 32


def _random_plan(units, seed=0, bits=(0, 2, 3, 4, 8, 16)):
    rng = random.Random(seed)
    return {u.id: rng.choice(bits) if u.prunable else rng.choice([b for b in bits if b])
            for u in units}


def _tokens(n=4, seqlen=24, seed=1):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _memory_cost(units, plan):
    mem = get_cost_model("memory")
    total = 0.0
    for u in units:
        shape = UnitShape(u.id, u.kind, tuple(SliceShape(s.shape[0], s.shape[1], s.dim)
                                              for s in u.slices), u.layer)
        total += mem.cost(shape, plan[u.id], G)["memory_bytes"]
    return total


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt", "gemma", "phi3"])
@pytest.mark.parametrize("vocab_groups", [1, 4])
def test_packed_bytes_equal_the_plans_memory_cost(arch, vocab_groups):
    # random options per unit, the embedding (and an untied head) in token-id ranges or whole
    model = tiny_model(arch, seed=0)
    units = model_units(model, mlp_group=MLP, vocab_groups=vocab_groups)
    plan = _random_plan(units)
    res = compress(model, plan, config=ApplyConfig(quantizer="rtn", group_size=G, mlp_group=MLP))
    assert res.packed_bytes == _memory_cost(units, plan)
    assert res.untouched == ()


@pytest.mark.parametrize("arch,quantizer,vocab_groups", [
    ("llama", "rtn", 1), ("llama", "gptq", 1), ("qwen2", "gptq", 1), ("gpt2", "rtn", 1),
    ("opt", "rtn", 1), ("llama", "gptq", 3), ("gemma", "rtn", 3), ("gpt2", "gptq", 3)])
def test_reload_is_bit_identical(tmp_path, arch, quantizer, vocab_groups):
    model = tiny_model(arch, seed=0)
    plan = _random_plan(model_units(model, mlp_group=MLP, vocab_groups=vocab_groups), seed=3)
    x = _tokens()
    compress(model, plan, x, ApplyConfig(quantizer=quantizer, group_size=G, mlp_group=MLP,
                                         batch_size=2))
    with torch.no_grad():
        out = model(x).logits
    save_compressed(model, tmp_path / "c")
    loaded = load_compressed(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, out)
    assert loaded.source["kind"] == "compressed"
    meta = json.loads((tmp_path / "c" / "bitsack.json").read_text())
    assert meta["plan"] == {uid: normalize_plan({uid: b}, G)[uid].option_id
                            for uid, b in plan.items()}


def test_all_16_bits_is_the_fp16_model():
    model = tiny_model("llama", seed=0)
    ref = tiny_model("llama", seed=0)
    plan = {u.id: 16 for u in model_units(model, mlp_group=MLP)}
    compress(model, plan, config=ApplyConfig(quantizer="rtn", group_size=G, mlp_group=MLP))
    for p in ref.parameters():  # what the packed model computes: fp16-rounded weights
        if p.dim() == 2:
            p.data = p.data.half().float()
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)


def test_pruning_only_matches_surgery():
    from bitsack.models import prune

    model = tiny_model("llama", seed=0)
    units = model_units(model, mlp_group=MLP)
    pruned = [u.id for u in units if u.prunable][::2]
    plan = {u.id: 0 if u.id in pruned else 16 for u in units}
    ref = tiny_model("llama", seed=0)
    prune(ref, pruned, mlp_group=MLP)
    for p in ref.parameters():
        if p.dim() == 2:
            p.data = p.data.half().float()
    compress(model, plan, config=ApplyConfig(quantizer="rtn", group_size=G, mlp_group=MLP))
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)


def test_sequential_gptq_beats_rtn():
    x = _tokens(n=8, seqlen=32)
    errs = {}
    for quantizer in ("rtn", "gptq"):
        model = tiny_model("llama", seed=0)
        ref = tiny_model("llama", seed=0)
        plan = {u.id: 3 for u in model_units(model, mlp_group=MLP)}
        compress(model, plan, x, ApplyConfig(quantizer=quantizer, group_size=G, mlp_group=MLP))
        with torch.no_grad():
            errs[quantizer] = float((model(x).logits - ref(x).logits).pow(2).mean())
    assert errs["gptq"] < errs["rtn"]


def test_compress_is_deterministic():
    outs = []
    x = _tokens()
    for _ in range(2):
        model = tiny_model("qwen2", seed=0)
        plan = _random_plan(model_units(model, mlp_group=MLP))
        compress(model, plan, x, ApplyConfig(group_size=G, mlp_group=MLP, batch_size=2))
        with torch.no_grad():
            outs.append(model(x).logits)
    assert torch.equal(outs[0], outs[1])


def test_missing_units_stay_untouched():
    model = tiny_model("llama", seed=0)
    units = model_units(model, mlp_group=MLP)
    plan = {u.id: 4 for u in units if u.kind != "embedding"}
    res = compress(model, plan, config=ApplyConfig(quantizer="rtn", group_size=G, mlp_group=MLP))
    assert set(res.untouched) == {u.id for u in units if u.kind == "embedding"}
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)


def test_plan_errors_name_the_unit():
    model = tiny_model("llama", seed=0)
    with pytest.raises(ValidationError, match=r"plan\.L9\.attn\.g0"):
        compress(model, {"L9.attn.g0": 4}, config=ApplyConfig(quantizer="rtn", group_size=G,
                                                              mlp_group=MLP))
    with pytest.raises(ValidationError, match=r"plan\.embed.*cannot be pruned"):
        compress(model, {"embed": 0}, config=ApplyConfig(quantizer="rtn", group_size=G,
                                                         mlp_group=MLP))
    with pytest.raises(ValidationError, match=r"plan\.L0\.attn\.g0.*5 bits"):
        compress(model, {"L0.attn.g0": 5}, config=ApplyConfig(quantizer="rtn", group_size=G,
                                                              mlp_group=MLP))
    with pytest.raises(ValidationError, match="calib_tokens"):
        compress(model, {"L0.attn.g0": 4}, config=ApplyConfig(group_size=G, mlp_group=MLP))
    with pytest.raises(ValidationError, match="quantizer"):
        ApplyConfig(quantizer="awq")


@pytest.fixture
def saved(tmp_path):
    model = tiny_model("llama", seed=0)
    plan = _random_plan(model_units(model, mlp_group=MLP))
    compress(model, plan, config=ApplyConfig(quantizer="rtn", group_size=G, mlp_group=MLP))
    return save_compressed(model, tmp_path / "c")


def test_load_refuses_truncated_file(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated|bytes"):
        load_compressed(saved)


def test_load_refuses_hash_mismatch(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="SHA-256"):
        load_compressed(saved)


def test_load_refuses_unknown_schema_and_wrong_shape(saved):
    meta_file = saved / "bitsack.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "schema": "bitsack.model/v9"}))
    with pytest.raises(FormatError, match="v9"):
        load_compressed(saved)
    name = next(iter(meta["tensors"]))
    meta["tensors"][name]["shape"] = [1, 2, 3]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="shape"):
        load_compressed(saved)


def test_failed_save_keeps_the_old_dir(saved, monkeypatch):
    before = (saved / "bitsack.json").read_text()
    model = tiny_model("llama", seed=1)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("bitsack.kernels.io.save_tensors", boom)
    with pytest.raises(OSError):
        save_compressed(model, saved)
    assert (saved / "bitsack.json").read_text() == before
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]


def test_plan_from_solution():
    from bitsack.solver.problem import Option, Problem, Unit
    from bitsack.solver.solution import Certificate, Solution

    prob = Problem(name="p", units=(Unit("a", (Option("prune", 1.0), Option("b4", 0.1))),))
    cert = Certificate(None, None, None, None, {}, {}, 0.0, "x", "0", {}, 0.0)
    sol = Solution("p", "optimal", {"a": "b4"}, 0.1, cert)
    assert plan_from_solution(prob, sol) == {"a": Choice(4, 64)}
    with pytest.raises(ValidationError, match="infeasible"):
        plan_from_solution(prob, Solution("p", "infeasible", {}, None, cert))


def test_true_sequential_stages_follow_the_data_flow():
    from bitsack.engine import LayerEngine
    from bitsack.models import get_adapter

    model = tiny_model("llama", seed=0)
    adapter = get_adapter(model)
    engine = LayerEngine(model, _tokens(n=2), batch_size=2)
    todo = {f"model.layers.0.{k}": m for k, m in adapter.linear_modules(0).items()}
    stages = [[n.split(".")[-1] for n in s] for s in engine.stages(todo)]
    assert stages == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"],
                      ["down_proj"]]


def test_adjacent_units_merge_only_where_the_bytes_add_up():
    """A segment's zero points are one bit stream in whole words: adjacent units of one
    choice share a segment only when the first one's zero points fill whole words."""
    from bitsack.kernels.formats import packed_nbytes
    from bitsack.models.base import Slice, UnitSpec
    from bitsack.plan import matrix_segments, parse_choice

    def units(rows, n, dim=0, other=64):
        out = []
        for i in range(n):
            a, b = i * rows, (i + 1) * rows
            shape = (rows, other) if dim == 0 else (other, rows)
            out.append(UnitSpec(f"u{i}", "head_group", 0,
                                (Slice("m.weight", dim, a, b, shape),), True))
        return out

    b3 = parse_choice("b3g64", 64)
    # 3 rows × 1 group × 3 bits = 9 bits: not whole words, so three segments
    few = units(3, 3)
    assert [(s.start, s.stop) for s in matrix_segments(few, {u.id: b3 for u in few})["m"]] \
        == [(0, 3), (3, 6), (6, 9)]
    # 32 rows: 96 bits = 3 words, so one segment of the same bytes
    many = units(32, 3)
    (seg,) = matrix_segments(many, {u.id: b3 for u in many})["m"]
    assert (seg.start, seg.stop) == (0, 96)
    assert packed_nbytes(96, 64, 3, 64) == 3 * packed_nbytes(32, 64, 3, 64)
    # columns: 64 columns of 32 rows at g64 = 32 zero points of 3 bits = 3 words: merged;
    # of 8 rows, 24 bits: not
    cols = units(64, 2, dim=1, other=32)
    assert len(matrix_segments(cols, {u.id: b3 for u in cols})["m"]) == 1
    cols = units(64, 2, dim=1, other=8)
    assert len(matrix_segments(cols, {u.id: b3 for u in cols})["m"]) == 2
