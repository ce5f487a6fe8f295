"""Cost models: exact memory bytes, roofline behaviour, custom registration, table errors."""

import json

import pytest

from bitsack.errors import ValidationError
from bitsack.kernels.formats import packed_nbytes
from bitsack.solver.costs import (
    CostModel,
    SliceShape,
    UnitShape,
    get_cost_model,
    option_costs,
    register_cost_model,
)

# A SmolLM2 KV group: 3 q heads + 1 kv head of 64, hidden 576.
ATTN = UnitShape(
    id="L0.attn.g0", kind="head_group", layer=0,
    slices=(SliceShape(192, 576, 0), SliceShape(64, 576, 0), SliceShape(64, 576, 0),
            SliceShape(576, 192, 1)),
    extra={"q_heads": 3, "head_dim": 64},
)


def test_memory_is_sum_of_packed_slices():
    model = get_cost_model("memory")
    got = model.cost(ATTN, 3, 64)["memory_bytes"]
    # by hand: rows·ceil(3·cols/32)·4 words + rows·(cols/64)·2 scales + the 3-bit zero points
    # of the slice's rows·cols/64 groups in whole words
    q = 192 * (3 * 576 // 32) * 4 + 192 * 9 * 2 + -(-192 * 9 * 3 // 32) * 4
    kv = 2 * (64 * (3 * 576 // 32) * 4 + 64 * 9 * 2 + -(-64 * 9 * 3 // 32) * 4)
    o = 576 * (3 * 192 // 32) * 4 + 576 * 3 * 2 + -(-576 * 3 * 3 // 32) * 4
    assert got == q + kv + o
    assert model.cost(ATTN, 0, 64)["memory_bytes"] == 0
    assert model.cost(ATTN, 16, 64)["memory_bytes"] == 2 * ATTN.params


def test_memory_monotone_in_bits():
    model = get_cost_model("memory")
    sizes = [model.cost(ATTN, b, 64)["memory_bytes"] for b in (0, 1, 2, 3, 4, 8, 16)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


def test_roofline_decode_memory_bound_prefill_compute_bound():
    roof = get_cost_model("roofline", device="h200")
    d4 = roof.cost(ATTN, 4, 64)
    d16 = roof.cost(ATTN, 16, 64)
    assert d4["decode_latency_us"] < d16["decode_latency_us"]  # fewer bytes -> faster decode
    # prefill: quantized needs a dequantization pass on top of the same GEMM -> not faster
    assert d4["prefill_latency_us"] >= d16["prefill_latency_us"] * 0.999
    assert roof.cost(ATTN, 0, 64) == {"decode_latency_us": 0.0, "prefill_latency_us": 0.0}
    # a slower device is slower
    a100 = get_cost_model("roofline", device="a100").cost(ATTN, 4, 64)
    assert a100["decode_latency_us"] > d4["decode_latency_us"]


def test_roofline_rejects_unknown_device():
    with pytest.raises(ValidationError, match="device.*'tpu'.*valid"):
        get_cost_model("roofline", device="tpu")


def test_custom_cost_model_registers_and_combines():
    @register_cost_model
    class Energy(CostModel):
        name = "test-energy"
        resources = ("energy_uj",)

        def cost(self, unit, bits, group_size):
            return {"energy_uj": unit.params * bits * 1e-6}

    costs = option_costs([get_cost_model("memory"), get_cost_model("test-energy")], ATTN, 4, 64)
    assert set(costs) == {"memory_bytes", "energy_uj"}
    assert costs["energy_uj"] == pytest.approx(ATTN.params * 4e-6)
    with pytest.raises(ValidationError, match="defined by two"):
        option_costs([get_cost_model("memory"), get_cost_model("memory")], ATTN, 4, 64)


def test_unknown_cost_model_lists_valid():
    with pytest.raises(ValidationError, match="valid"):
        get_cost_model("nope")


def test_latency_table(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text(json.dumps({"decode_latency_us": {"head_group": {"4": 2.0}}}))
    table = get_cost_model("latency-table", path=path)
    assert table.cost(ATTN, 4, 64)["decode_latency_us"] == pytest.approx(ATTN.params / 1e6 * 2.0)
    with pytest.raises(ValidationError, match=r"latency_table\.decode_latency_us\.head_group\.3"):
        table.cost(ATTN, 3, 64)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValidationError, match="cannot be read"):
        get_cost_model("latency-table", path=bad)


def test_packed_nbytes_rejects_bad_group():
    with pytest.raises(ValueError, match="group_size: 0; valid: a positive integer"):
        packed_nbytes(4, 100, 4, 0)


def test_packed_nbytes_any_group_size_last_group_shorter():
    # a row of cols values at group size G holds ceil(cols / G) groups (an fp16 scale each,
    # and a 4-bit zero point in the segment's zero stream)
    assert packed_nbytes(1, 100, 4, 64) == 13 * 4 + 2 * 2 + 4
    # 3 rows: 6 zero points of 4 bits share one word
    assert packed_nbytes(3, 100, 4, 64) == 3 * (13 * 4 + 2 * 2) + 4
    # 8 rows: 16 zero points fill 2 words exactly, so 8-row segments add up
    assert packed_nbytes(16, 100, 4, 64) == 2 * packed_nbytes(8, 100, 4, 64)
    assert packed_nbytes(2, 64, 16, 5) == 2 * 2 * 64  # fp16 has no groups


@pytest.mark.parametrize("cols, option, bits_per_weight", [
    # one row of 576 (SmolLM2's hidden width): 9 groups of 64, scales 16 bits each, the 9 zero
    # points of 3 bits in one word: 3 + (144 + 32)/576
    (576, "b3g64", 3 + 176 / 576),
    (576, "b3g128", 3 + (5 * 16 + 32) / 576),  # 5 groups (128, 128, 128, 128, 64): 3.1944
    (1536, "b4g128", 4 + (12 * 16 + 64) / 1536),  # SmolLM2's MLP width: 12 groups of 128
    (576, "b3", 3 + 176 / 576),  # plain b3 = the problem's default group size (64)
    (576, "b16", 16.0),
    (576, "prune", 0.0),
])
def test_option_costs_price_each_option_with_its_own_group_size(cols, option,
                                                               bits_per_weight):
    from bitsack.solver.problem import ProblemSettings

    row = UnitShape(id="r", kind="other", slices=(SliceShape(1, cols, 0),))
    cost = option_costs([get_cost_model("memory")], row, option, ProblemSettings())
    assert 8 * cost["memory_bytes"] / cols == pytest.approx(bits_per_weight, abs=1e-12)
    assert round(3 + (5 * 16 + 32) / 576, 4) == 3.1944


def test_option_costs_default_group_and_legacy_form():
    from bitsack.solver.problem import ProblemSettings

    memory = [get_cost_model("memory")]
    wide = ProblemSettings(group_size=128)
    assert option_costs(memory, ATTN, "b3", wide) == option_costs(memory, ATTN, "b3g128", wide)
    assert option_costs(memory, ATTN, "b3", wide) != option_costs(memory, ATTN, "b3g32", wide)
    # the form callers used before option ids carried group sizes: bits + default group size
    assert option_costs(memory, ATTN, 3, 128) == option_costs(memory, ATTN, "b3", wide)
    both = [get_cost_model("memory"), get_cost_model("roofline")]
    costs = option_costs(both, ATTN, "b4g32", wide)
    assert set(costs) == {"memory_bytes", "decode_latency_us", "prefill_latency_us"}
    assert costs["decode_latency_us"] > option_costs(both, ATTN, "b4g128", wide)[
        "decode_latency_us"]  # more scale/zero bytes to read
    with pytest.raises(ValidationError, match="not an option id"):
        option_costs(memory, ATTN, "b16g64", wide)


def test_latency_table_group_size_keys(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text(json.dumps({"decode_latency_us": {"head_group": {"4": 2.0, "4g32": 2.5}}}))
    table = get_cost_model("latency-table", path=path)
    from bitsack.solver.problem import ProblemSettings

    def us(option):
        return option_costs([table], ATTN, option, ProblemSettings())["decode_latency_us"]

    assert us("b4g32") == pytest.approx(ATTN.params / 1e6 * 2.5)
    assert us("b4g128") == us("b4") == pytest.approx(ATTN.params / 1e6 * 2.0)
