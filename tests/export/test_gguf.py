"""GGUF export, as a ladder: ggml blocks hold bitsack's grid (gguf-py dequantizes them to the
stated values), the file reads back tensor by tensor, transformers runs a bits-only export,
pruned models become arch ``deci`` — and llama.cpp itself (slow) runs one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_helpers import make_folder, plan_for, write_tokenizer_gguf

from bitsack.apply import load_compressed
from bitsack.export import ExportError, export_model
from bitsack.export.common import GridMatrix
from bitsack.export.gguf import (
    ZERO_FFN_WIDTH,
    encode,
    encode_q4_1,
    encode_q5_1,
    encode_q8_0,
    rope_permutation,
)
from bitsack.kernels.packed import PackedLinear

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402


def _grid(bits, rows=6, cols=128, g=32, seed=0, zero=None):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, (rows, cols), dtype=np.uint8)
    scale = rng.uniform(1e-3, 0.05, (rows, -(-cols // g))).astype(np.float16)
    z = rng.integers(0, 1 << bits, scale.shape) if zero is None else np.full(scale.shape, zero)
    return GridMatrix("m", bits, g, codes, scale, z.astype(np.float16))


def _read(enc):
    qtype = gguf.GGMLQuantizationType[enc.type]
    return dequantize(enc.data, qtype)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_q4_1_holds_the_grid_up_to_the_rounding_of_its_offset(bits, g):
    m = _grid(bits, g=g, seed=bits)
    enc = encode_q4_1(m)
    got = _read(enc)
    # what Q4_1 stores: x = d·q + m with d = s and m = fp16(−s·z), computed in fp32
    gi = m.group_index()
    s = m.scale.astype(np.float32)[:, gi]
    off = (-(m.scale.astype(np.float64) * m.zero.astype(np.float64))).astype(np.float16)
    assert np.array_equal(got, s * m.codes.astype(np.float32) + off.astype(np.float32)[:, gi])
    # and the stated bound against bitsack's weights: |Δ| ≤ 2⁻¹¹·|s·z| (+ the fp32 add)
    exact = m.dequantize()
    sz = (m.scale.astype(np.float64) * m.zero.astype(np.float64))[:, gi]
    bound = 2.0**-11 * sz + 2.0**-24 * np.abs(exact) + 2.0**-24 * sz
    assert np.all(np.abs(got.astype(np.float64) - exact) <= bound)
    assert enc.max_error <= 2.0**-11 * sz.max()
    assert enc.data.shape == (m.shape[0], m.shape[1] // 32 * 20)


def test_q4_1_is_exact_when_the_offset_is_an_fp16_number():
    m = _grid(4, zero=0)
    assert np.array_equal(_read(encode_q4_1(m)), m.dequantize())
    assert encode_q4_1(m).max_error == 0.0


def test_q5_1_stores_the_fifth_bit():
    m = _grid(5, seed=5)
    got = _read(encode_q5_1(m))
    gi = m.group_index()
    off = (-(m.scale.astype(np.float64) * m.zero.astype(np.float64))).astype(np.float16)
    want = m.scale.astype(np.float32)[:, gi] * m.codes.astype(np.float32) + \
        off.astype(np.float32)[:, gi]
    assert np.array_equal(got, want)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7])
def test_q8_0_is_exact_up_to_seven_bits(bits):
    m = _grid(bits, seed=bits)
    enc = encode_q8_0(m)
    assert np.array_equal(_read(enc), m.dequantize())
    assert enc.rerounded_blocks == 0 and enc.max_error == 0.0


def test_q8_0_of_eight_bits_is_exact_where_codes_fit_and_bounded_elsewhere():
    m = _grid(8, rows=8, seed=8)
    m.codes[:4] = np.clip(m.codes[:4], 100, 150)  # rows 0-3: within ±127 of any zero ≥ 23
    m.zero[:4] = 128
    enc = encode_q8_0(m)
    got = _read(enc).reshape(8, -1, 32)
    exact = m.dequantize().reshape(8, -1, 32)
    assert np.array_equal(got[:4], exact[:4])
    fits = (np.abs(m.codes.reshape(8, -1, 32).astype(int) -
                   m.zero.astype(int)[:, np.arange(4)][:, :, None]).max(-1) <= 127)
    assert enc.rerounded_blocks == int((~fits).sum()) > 0
    # a re-rounded block: d = smallest fp16 ≥ max|w|/127, error ≤ d/2
    d = np.frombuffer(enc.data.reshape(8, -1, 34)[:, :, :2].tobytes(), np.float16)
    d = d.reshape(8, -1).astype(np.float64)
    err = np.abs(got.astype(np.float64) - exact).max(-1)
    assert np.all(err[~fits] <= d[~fits] / 2 * (1 + 2**-20))
    assert np.all(np.abs(exact).max(-1)[~fits] <= 127 * d[~fits])
    assert enc.max_error == pytest.approx(float(err.max()))


def test_block_types_refuse_what_they_cannot_hold():
    with pytest.raises(ExportError, match="m: no ggml type holds 4-bit groups of 16 on "
                       "128-wide rows exactly; valid: groups and rows of whole blocks of 32"):
        encode(_grid(4, g=16))
    with pytest.raises(ExportError, match="no ggml type holds 8-bit groups of 16 on 128-wide"):
        encode(_grid(8, g=16))
    with pytest.raises(ExportError, match="no ggml type holds 8-bit groups of 32 on 40-wide"):
        encode(_grid(8, cols=40, g=32))
    # the encoders refuse on their own too, called directly
    with pytest.raises(ExportError, match="8-bit group size 16 is not a multiple of 32; Q8_0"):
        encode_q8_0(_grid(8, g=16))
    with pytest.raises(ExportError, match="40 columns are not a multiple of 32"):
        encode_q8_0(_grid(8, cols=40, g=32))


def test_rope_permutation_interleaves_the_two_halves_of_each_head():
    idx = rope_permutation(8, 4)
    # head 0 rows (0,1 | 2,3) -> (0,2,1,3); head 1 likewise
    assert idx.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(ExportError):
        rope_permutation(8, 3)


def _fields(path):
    r = gguf.GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def _dequantized(tensor):
    return dequantize(tensor.data, tensor.tensor_type).reshape(
        [int(x) for x in reversed(tensor.shape)])


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def _expected(module, name, head_dim):
    """The values the GGUF tensor ``name`` should dequantize to (rows of q/k permuted)."""
    w = module.dequantize(torch.float32).numpy()
    if name.endswith(("attn_q.weight", "attn_k.weight")):
        w = w[rope_permutation(w.shape[0], head_dim)]
    return w


def test_reader_reads_back_every_tensor(tmp_path, tokenizer_gguf):
    # Q4_1 (4-bit), Q4_0 (2-bit embedding), Q8_0 (8-bit MLP), F16 (16-bit lm_head)
    src = make_folder(tmp_path / "c", dict(attn="b4g32", mlp="b8g32", embed="b2g64",
                                           head="b16"))
    res = export_model(src, tmp_path / "g", "gguf", tokenizer_gguf=tokenizer_gguf)
    reader, tensors = _fields(res.out / "model.gguf")
    model = load_compressed(src).model
    cfg = model.config
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == cfg.num_hidden_layers
    assert _field(reader, "llama.attention.head_count") == cfg.num_attention_heads
    assert _field(reader, "llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert _field(reader, "llama.feed_forward_length") == cfg.intermediate_size
    assert _field(reader, "llama.rope.dimension_count") == cfg.head_dim
    tok = gguf.GGUFReader(tokenizer_gguf)
    assert _field(reader, "tokenizer.ggml.tokens") == _field(tok, "tokenizer.ggml.tokens")
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    names = {"token_embd.weight": "model.embed_tokens", "output.weight": "lm_head"}
    for i in range(cfg.num_hidden_layers):
        for gname, hname in (("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                             ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                             ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                             ("ffn_down", "mlp.down_proj")):
            names[f"blk.{i}.{gname}.weight"] = f"model.layers.{i}.{hname}"
    norms = {"output_norm.weight": "model.norm.weight"}
    for i in range(cfg.num_hidden_layers):
        norms[f"blk.{i}.attn_norm.weight"] = f"model.layers.{i}.input_layernorm.weight"
        norms[f"blk.{i}.ffn_norm.weight"] = f"model.layers.{i}.post_attention_layernorm.weight"
    assert set(tensors) == set(names) | set(norms)
    types = {t.name: t.type for t in res.tensors}
    state = model.state_dict()
    for gname, key in norms.items():
        assert tensors[gname].tensor_type.name == "F32"
        assert np.array_equal(_dequantized(tensors[gname]), state[key].numpy())
    for gname, mname in names.items():
        t = tensors[gname]
        assert t.tensor_type.name == types[gname]
        module = model.get_submodule(mname)
        bits = module.segments[0].bits
        assert types[gname] == {2: "Q4_0", 4: "Q4_1", 8: "Q8_0", 16: "F16"}[bits], gname
        got = _dequantized(t)
        want = _expected(module, gname, cfg.head_dim)
        assert got.shape == want.shape, gname
        if bits in (2, 16):  # F16, Q4_0: exact
            assert np.array_equal(got, want), gname
        elif bits <= 4:  # only m's fp16 rounding
            packed = module.segments[0]
            sz = float((packed.scale.double() * packed.zeros(torch.float64)).abs().max())
            assert np.abs(got - want).max() <= 2.0**-11 * sz * (1 + 2**-10), gname
        else:  # 8-bit: a re-rounded block moves by at most d/2, d ≤ s·255/127 (rounded up)
            s = float(module.segments[0].scale.float().max())
            assert np.abs(got - want).max() <= s * 255 / 127 / 2 * (1 + 2**-10), gname
    assert sum(t.nbytes for t in res.tensors) < res.files["model.gguf"]
    assert any(n.startswith("Q8_0") for n in res.notes)


def _replace_linears(model, weights):
    """Replace every packed linear of a bitsack model with a dense one of ``weights[name]``."""
    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]:
        lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=False)
        with torch.no_grad():
            lin.weight.copy_(weights[name])
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, lin)
    return model


def test_transformers_runs_a_bits_only_export(tmp_path, tokenizer_gguf):
    from transformers import AutoModelForCausalLM

    src = make_folder(tmp_path / "c", dict(attn="b4g32", mlp="b2g32", embed="b16",
                                           head="b3g64"), quantizer="gptq")
    res = export_model(src, tmp_path / "g", "gguf", tokenizer_gguf=tokenizer_gguf)
    hf = AutoModelForCausalLM.from_pretrained(res.out, gguf_file="model.gguf",
                                              dtype=torch.float32)
    own = load_compressed(src).model
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    weights = {}
    for name, mod in own.named_modules():
        if not isinstance(mod, PackedLinear):
            continue
        w = hf.get_submodule(name).weight.detach()
        ref = mod.dequantize()
        seg = mod.segments[0]
        # transformers un-permutes q/k and dequantizes through gguf-py: bitsack's weights up
        # to the fp16 rounding of Q4_1's offset (F16 for the 16-bit embedding: exact)
        sz = float((seg.scale.double() * seg.zeros(torch.float64)).abs().max()) \
            if seg.bits < 16 else 0
        assert float((w - ref).abs().max()) <= 2.0**-11 * sz * (1 + 2**-10), name
        weights[name] = w
    with torch.no_grad():
        got = hf(x).logits
        want = _replace_linears(own, weights)(x).logits  # bitsack's model, the file's weights
    assert torch.allclose(got, want, rtol=0, atol=1e-5)


def test_a_pruned_model_becomes_arch_deci(tmp_path, tokenizer_gguf):
    # layer 1: one of two head groups and its whole MLP pruned -> zero FFN;
    # layer 2: all heads and all MLP -> an empty layer; layer 3: attention-free
    pruned = ("L1.attn.g0", "L1.mlp.c0", "L1.mlp.c1", "L1.mlp.c2",
              "L2.attn.g0", "L2.attn.g1", "L2.mlp.c0", "L2.mlp.c1", "L2.mlp.c2",
              "L3.attn.g0", "L3.attn.g1", "L0.mlp.c1")
    src = make_folder(tmp_path / "c", dict(pruned=pruned), num_hidden_layers=4)
    res = export_model(src, tmp_path / "g", "gguf", tokenizer_gguf=tokenizer_gguf)
    reader, tensors = _fields(res.out / "model.gguf")
    assert _field(reader, "general.architecture") == "deci"
    assert _field(reader, "deci.attention.head_count") == [4, 2, 0, 0]
    assert _field(reader, "deci.attention.head_count_kv") == [2, 1, 0, 0]
    assert _field(reader, "deci.feed_forward_length") == [64, ZERO_FFN_WIDTH, 0, 96]
    assert _field(reader, "deci.attention.key_length") == 16
    assert res.layout["kind"] == "pruned"
    present = {n.split(".")[1] + "." + n.split(".")[2] for n in tensors if n.startswith("blk.")}
    assert {p for p in present if p.startswith("2.")} == set()
    assert {p for p in present if p.startswith("3.")} == {"3.ffn_norm", "3.ffn_gate",
                                                          "3.ffn_up", "3.ffn_down"}
    for part in ("ffn_gate", "ffn_up", "ffn_down"):
        t = tensors[f"blk.1.{part}.weight"]
        assert t.tensor_type.name == "F16" and not _dequantized(t).any()
    assert _dequantized(tensors["blk.1.attn_q.weight"]).shape == (32, 64)
    assert _dequantized(tensors["blk.0.ffn_down.weight"]).shape == (64, 64)
    model = load_compressed(src).model
    got = _dequantized(tensors["blk.1.attn_k.weight"])
    want = _expected(model.get_submodule("model.layers.1.self_attn.k_proj"), "attn_k.weight", 16)
    assert np.abs(got - want).max() <= 1e-3
    assert any("zero FFN" in n for n in res.notes)


def test_layer_zero_without_heads_is_refused(tmp_path, tokenizer_gguf):
    src = make_folder(tmp_path / "c", dict(pruned=("L0.attn.g0", "L0.attn.g1")))
    with pytest.raises(ExportError, match="layer 0: has no attention heads left"):
        export_model(src, tmp_path / "g", "gguf", tokenizer_gguf=tokenizer_gguf)


def test_refusals(tmp_path, tokenizer_gguf):
    g16 = make_folder(tmp_path / "g16", dict(attn="b4g16", mlp="b4g32", embed="b16"))
    with pytest.raises(ExportError, match=r"self_attn\.q_proj: no ggml type holds 4-bit "
                       "groups of 16"):
        export_model(g16, tmp_path / "o1", "gguf", tokenizer_gguf=tokenizer_gguf)
    ok = make_folder(tmp_path / "ok")
    with pytest.raises(ExportError, match="tokenizer_gguf: not given"):
        export_model(ok, tmp_path / "o2", "gguf")
    small = write_tokenizer_gguf(tmp_path / "small.gguf", 100)
    with pytest.raises(ExportError, match="has 100 tokens, the model's embedding 128 rows"):
        export_model(ok, tmp_path / "o3", "gguf", tokenizer_gguf=small)
    qwen = make_folder(tmp_path / "qwen", arch="qwen2")
    with pytest.raises(ExportError, match="'qwen2' has no GGUF export"):
        export_model(qwen, tmp_path / "o4", "gguf", tokenizer_gguf=tokenizer_gguf)
    for k in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / k).exists()


def test_mixed_matrix_is_refused(tmp_path, tokenizer_gguf):
    from bitsack.apply import ApplyConfig, compress, save_compressed
    from bitsack.models.testing import tiny_model

    model = tiny_model("llama")
    plan = plan_for(model)
    plan["L1.mlp.c2"] = "b8g32"
    compress(model, plan, config=ApplyConfig(quantizer="rtn", group_size=32, mlp_group=32))
    src = save_compressed(model, tmp_path / "c")
    with pytest.raises(ExportError, match=r"model\.layers\.1\.mlp\.\w+_proj: mixes .*8-bit g32"):
        export_model(src, tmp_path / "g", "gguf", tokenizer_gguf=tokenizer_gguf)


def test_export_is_deterministic(tmp_path, tokenizer_gguf):
    src = make_folder(tmp_path / "c", dict(mlp="b8g32"))
    a = export_model(src, tmp_path / "a", "gguf", tokenizer_gguf=tokenizer_gguf)
    b = export_model(src, tmp_path / "b", "gguf", tokenizer_gguf=tokenizer_gguf)
    assert (a.out / "model.gguf").read_bytes() == (b.out / "model.gguf").read_bytes()


def test_a_short_last_group_maps_block_by_block(tmp_path, tokenizer_gguf):
    # hidden 96 at group size 64: v_proj rows hold groups of 64 and 32 columns; o_proj is two
    # 32-column segments (one per head group), each one short group: a grid of group size 32
    src = make_folder(tmp_path / "c", dict(attn="b4g64", embed="b16"), hidden_size=96)
    model = load_compressed(src).model
    res = export_model(src, tmp_path / "g", "gguf", tokenizer_gguf=tokenizer_gguf)
    _, tensors = _fields(res.out / "model.gguf")
    for gname, mname, groups in (("attn_v", "v_proj", [64, 32]),
                                 ("attn_output", "o_proj", [32, 32])):
        mod = model.get_submodule(f"model.layers.0.self_attn.{mname}")
        got = _dequantized(tensors[f"blk.0.{gname}.weight"])
        g = np.repeat(np.arange(len(groups)), groups)
        s = torch.cat([x.scale for x in mod.segments], 1).double()
        z = torch.cat([x.zeros(torch.float64) for x in mod.segments], 1).double()
        q = torch.cat([x.codes() for x in mod.segments], 1).numpy().astype(np.float32)
        off = (-(s * z)).numpy().astype(np.float16).astype(np.float32)[:, g]
        want = s.numpy().astype(np.float32)[:, g] * q + off
        assert np.array_equal(got, want), gname
