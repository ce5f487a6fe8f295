"""compressed-tensors export: the library itself reads back bitsack's weights, transformers runs
them, and what the format cannot hold is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from export_helpers import fp16_reference, make_folder
from safetensors import safe_open

from bitsack.apply import load_compressed
from bitsack.errors import ValidationError
from bitsack.export import ExportError, export_model
from bitsack.export.common import GridMatrix
from bitsack.export.compressed_tensors import grid_tensors
from bitsack.kernels.packed import PackedEmbedding, PackedLinear

ct = pytest.importorskip("compressed_tensors")


def _tensors(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _schemes(folder):
    """module name -> the QuantizationScheme compressed-tensors itself matches to it."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_targets

    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(cfg)
    out = {}
    for scheme in qc.config_groups.values():
        for target in scheme.targets:
            assert match_targets(target, torch.nn.Linear(1, 1), scheme.targets)
            out[target] = scheme
    return qc, out


def _packed(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def _decompress(tensors, name, scheme, scale_dtype):
    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor,
    )

    sd = {leaf: tensors[f"{name}.{leaf}"] for leaf in
          ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
    sd["weight_scale"] = sd["weight_scale"].to(scale_dtype)
    return PackedQuantizationCompressor.decompress(sd, scheme)["weight"]


@pytest.mark.parametrize("arch,quantizer", [("llama", "rtn"), ("llama", "gptq"),
                                            ("qwen2", "rtn")])
def test_compressed_tensors_decompresses_bitsacks_weights(tmp_path, arch, quantizer):
    # two schemes (attention 2-bit g32, MLP 8-bit g32) and a 4-bit g64 lm_head where untied
    src = make_folder(tmp_path / "c", dict(attn="b2g32", mlp="b8g32", embed="b16",
                                           head="b4g64"), arch=arch, quantizer=quantizer)
    res = export_model(src, tmp_path / "ct", "compressed-tensors")
    qc, schemes = _schemes(res.out)
    assert qc.format == "pack-quantized" and qc.quantization_status == "compressed"
    model = load_compressed(src).model
    tensors = _tensors(res.out)
    packed = _packed(model)
    quantized = {n for n, m in packed.items() if m.segments[0].bits != 16}
    tied = model.config.tie_word_embeddings
    assert set(schemes) == quantized - {"lm_head"}  # vLLM quantizes no lm_head
    for name in schemes:
        ref = packed[name].dequantize(torch.float32)
        exact = _decompress(tensors, name, schemes[name], torch.float32)
        assert torch.equal(exact, ref), name  # fp32 scales: bitsack's weights bit for bit
        half = _decompress(tensors, name, schemes[name], torch.float16)
        assert torch.equal(half, ref.half()), name  # fp16 scales: one rounding, as documented
        seg = packed[name].segments[0]
        assert schemes[name].weights.num_bits == seg.bits
        assert schemes[name].weights.group_size == seg.group_size
    # 16-bit and dense parts are stored as they are
    emb = model.get_submodule("model.embed_tokens")
    want = emb.dequantize(torch.float16) if isinstance(emb, PackedEmbedding) else emb.weight
    assert torch.equal(tensors["model.embed_tokens.weight"].to(want.dtype), want)
    assert ("lm_head.weight" in tensors) == (not tied)
    if not tied:
        head = packed["lm_head"].dequantize(torch.float32)
        assert torch.equal(tensors["lm_head.weight"], head.half())
    assert sorted(n.split(":")[0] for n in res.notes) == \
        ["config dtype float32 -> float16"] + ([] if tied else ["lm_head"])
    assert json.loads((res.out / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_double_quantized_scales_export_exactly(tmp_path, quantizer):
    """A folder with 4-bit scale codes: its fp16 expansion is exact, so the export (fp16
    scales) decompresses to bitsack's weights bit for bit, like any other folder."""
    src = make_folder(tmp_path / "c", dict(attn="b3g32", mlp="b4g32", embed="b16"),
                      quantizer=quantizer, scale_bits=4)
    model = load_compressed(src).model
    packed = _packed(model)
    assert {m.segments[0].scale_bits for m in packed.values() if m.segments[0].bits < 16} == {4}
    res = export_model(src, tmp_path / "ct", "compressed-tensors")
    _, schemes = _schemes(res.out)
    tensors = _tensors(res.out)
    for name in schemes:
        ref = packed[name].dequantize(torch.float32)
        assert torch.equal(_decompress(tensors, name, schemes[name], torch.float16).float(),
                           ref.half().float()), name
        assert torch.equal(_decompress(tensors, name, schemes[name], torch.float32), ref), name


def test_packed_words_are_bitsacks_own(tmp_path):
    src = make_folder(tmp_path / "c", dict(attn="b3g32", mlp="b4g32", embed="b16"))
    res = export_model(src, tmp_path / "ct", "compressed-tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    model = load_compressed(src).model
    tensors = _tensors(res.out)
    for name, mod in _packed(model).items():
        (seg,) = mod.segments
        if seg.bits == 16:
            continue
        if seg.axis == 0:  # one row segment: the words are the stored words
            assert torch.equal(tensors[f"{name}.weight_packed"],
                               seg.qdata.view(torch.int32)), name
        zp = unpack_from_int32(tensors[f"{name}.weight_zero_point"], seg.bits,
                               torch.Size(seg.scale.shape), packed_dim=0)
        assert torch.equal(zp.to(torch.int64), seg.zeros(torch.int64) - (1 << seg.bits - 1))
        assert torch.equal(tensors[f"{name}.weight_scale"], seg.scale)
        assert tensors[f"{name}.weight_shape"].tolist() == [mod.out_features, mod.in_features]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_loads_a_single_scheme_export(tmp_path, arch):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src = make_folder(tmp_path / "c", dict(attn="b4g32", mlp="b4g32", embed="b16",
                                           head="b4g32"), arch=arch)
    res = export_model(src, tmp_path / "ct", "compressed-tensors")
    assert res.layout["schemes"] == {"int4-g32": len(_schemes(res.out)[1])}
    # transformers' default path cannot size asymmetric zero points (llm-compressor#1618);
    # dequantize=True decompresses every weight with compressed-tensors at load
    hf = AutoModelForCausalLM.from_pretrained(
        res.out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    bitsack_model = load_compressed(src).model
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        own = bitsack_model(x).logits
        for name, mod in _packed(bitsack_model).items():
            w = hf.get_submodule(name).weight
            assert torch.equal(w, mod.dequantize().half().float()), name
            # each weight moved by one fp16 rounding at most
            assert bool((w - mod.dequantize()).abs().le(mod.dequantize().abs() * 2**-11).all())
        got = hf(x).logits
        ref = fp16_reference(bitsack_model)(x).logits
    assert torch.allclose(got, ref, rtol=0, atol=1e-5)
    assert (got - own).abs().max() > 0  # the rounding is real, and small:
    assert (got - own).abs().max() < 1e-2 * own.abs().max()


def test_a_packed_embedding_is_written_dense_fp16_with_a_note(tmp_path):
    src = make_folder(tmp_path / "c", dict(embed="b4g32", head="b4g32"))
    res = export_model(src, tmp_path / "ct", "compressed-tensors")
    model = load_compressed(src).model
    tensors = _tensors(res.out)
    for name in ("model.embed_tokens", "lm_head"):
        w = model.get_submodule(name).dequantize(torch.float32)
        assert torch.equal(tensors[f"{name}.weight"], w.half())
        assert f"{name}.weight_packed" not in tensors
        assert any(n.startswith(name + ":") for n in res.notes)
    assert len(res.notes) == 3  # embedding, lm_head, dtype


def test_a_matrix_that_mixes_bit_widths_is_refused(tmp_path):
    from export_helpers import plan_for

    from bitsack.apply import ApplyConfig, compress, save_compressed
    from bitsack.models.testing import tiny_model

    model = tiny_model("llama")
    plan = plan_for(model)
    plan["L0.attn.g1"] = "b2g32"
    compress(model, plan, config=ApplyConfig(quantizer="rtn", group_size=32, mlp_group=32))
    src = save_compressed(model, tmp_path / "c")
    with pytest.raises(ExportError) as err:
        export_model(src, tmp_path / "ct", "compressed-tensors")
    msg = str(err.value)
    assert "model.layers.0.self_attn" in msg and "4-bit g32" in msg and "2-bit g32" in msg
    assert "same_bits" in msg
    assert not (tmp_path / "ct").exists()


def test_a_group_that_does_not_divide_the_row_is_refused():
    m = GridMatrix("x", 4, 32, np.zeros((2, 48), np.uint8), np.ones((2, 2), np.float16),
                   np.zeros((2, 2), np.float16))
    with pytest.raises(ExportError, match="does not divide its 48 columns"):
        grid_tensors(m)


def test_other_architectures_are_refused(tmp_path):
    src = make_folder(tmp_path / "c", dict(attn="b4g16", mlp="b4g16", embed="b16"),
                      arch="gpt2")
    with pytest.raises(ExportError, match="'gpt2' cannot be exported"):
        export_model(src, tmp_path / "ct", "compressed-tensors")


def test_output_folder_safety_and_determinism(tmp_path):
    src = make_folder(tmp_path / "c")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValidationError, match="--out"):
        export_model(src, other, "compressed-tensors")
    assert (other / "keep.txt").read_text() == "mine"
    a = export_model(src, tmp_path / "a", "compressed-tensors")
    first = (a.out / "model.safetensors").read_bytes()
    again = export_model(src, tmp_path / "a", "compressed-tensors")  # an earlier export: ok
    assert (again.out / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in a.out.iterdir()) == sorted(a.files)
    assert a.files["model.safetensors"] == len(first)
    forced = export_model(src, other, "compressed-tensors", force=True)
    assert not (forced.out / "keep.txt").exists()
    with pytest.raises(ValidationError, match="tokenizer_gguf: is not an option"):
        export_model(src, tmp_path / "b", "compressed-tensors", tokenizer_gguf="x")
    with pytest.raises(ValidationError, match="valid: compressed-tensors, gguf"):
        export_model(src, tmp_path / "b", "onnx")


def test_a_short_last_group_is_refused_naming_the_module(tmp_path):
    # hidden 96 at group size 64: q/k/v rows hold groups of 64 and 32 columns
    src = make_folder(tmp_path / "c", dict(attn="b4g64", embed="b16"), hidden_size=96)
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.[qkv]_proj: group "
                       "size 64 does not divide its 96 columns"):
        export_model(src, tmp_path / "ct", "compressed-tensors")


def test_column_segments_with_short_groups_are_one_grid(tmp_path):
    # MLP blocks of 32 channels at group size 64: down_proj is three 32-column segments, each
    # one short group: one grid of group size 32, read back exactly
    src = make_folder(tmp_path / "c", dict(mlp="b4g64", embed="b16"))
    model = load_compressed(src).model
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    assert [s.shape[1] for s in down.segments] == [32, 32, 32]
    res = export_model(src, tmp_path / "ct", "compressed-tensors")
    _, schemes = _schemes(res.out)
    name = "model.layers.0.mlp.down_proj"
    assert schemes[name].weights.group_size == 32
    assert schemes["model.layers.0.mlp.up_proj"].weights.group_size == 64
    got = _decompress(_tensors(res.out), name, schemes[name], torch.float32)
    assert torch.equal(got, down.dequantize())
