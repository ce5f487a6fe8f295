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
    # by hand: rows * ceil(3*cols/32)*4 + rows*(cols/64)*4
    q = 192 * (3 * 576 // 32) * 4 + 192 * 9 * 4
    kv = 2 * (64 * (3 * 576 // 32) * 4 + 64 * 9 * 4)
    o = 576 * (3 * 192 // 32) * 4 + 576 * 3 * 4
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
    with pytest.raises(ValueError, match="group_size"):
        packed_nbytes(4, 100, 4, 64)
