"""compressed-tensors export of a pruned model (DeciLM / Nemotron-NAS layout, for vLLM):
compressed-tensors decompresses it to bitsack's weights with the documented zero-padding, the
config gives every layer the sizes of its tensors under vLLM's rules, and the shipped model
code runs it in transformers with bitsack's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from export_helpers import fp16_reference, make_folder
from safetensors import safe_open

from bitsack.apply import load_compressed
from bitsack.export import ExportError, export_model
from bitsack.export.common import GridMatrix
from bitsack.kernels.packed import PackedLinear

ct = pytest.importorskip("compressed_tensors")

#: layer 1: one of two KV groups and its whole MLP pruned; layer 2: all heads pruned;
#: layer 3: one MLP block of three pruned (96 -> 64 channels, written 256 wide)
PRUNED = ("L1.attn.g0", "L1.mlp.c0", "L1.mlp.c1", "L1.mlp.c2", "L2.attn.g0", "L2.attn.g1",
          "L3.mlp.c1")
LEAVES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def _tensors(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _dense(folder, scale_dtype=torch.float32):
    """The export as a dense state dict, every quantized module decompressed by
    compressed-tensors with its own scheme."""
    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationConfig

    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(cfg)
    scheme = {t: s for s in qc.config_groups.values() for t in s.targets}
    tensors = _tensors(folder)
    out = {}
    for key, value in tensors.items():
        if key.endswith(".weight_packed"):
            name = key[: -len(".weight_packed")]
            sd = {leaf: tensors[f"{name}.{leaf}"] for leaf in LEAVES}
            sd["weight_scale"] = sd["weight_scale"].to(scale_dtype)
            out[f"{name}.weight"] = PackedQuantizationCompressor.decompress(
                sd, scheme[name])["weight"].float()
        elif not key.endswith(LEAVES[1:]):
            out[key] = value.float()
    return out


def _ffn_width(ffn_mult, hidden):
    """vLLM's reading of ``ffn_mult`` (nemotron_nas.py): int(2·m·h/3) up to a multiple of 256."""
    w = int(2 * ffn_mult * hidden / 3)
    return w if w % 256 == 0 else w + 256 - w % 256


def _padded(w, rows=None, cols=None):
    """``w`` placed at row positions ``rows`` / column positions ``cols`` of zeros."""
    r, c = rows if rows is not None else (np.arange(w.shape[0]), w.shape[0]), \
        cols if cols is not None else (np.arange(w.shape[1]), w.shape[1])
    out = torch.zeros(r[1], c[1])
    out[np.ix_(r[0], c[0])] = w
    return out


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_compressed_tensors_decompresses_to_bitsacks_weights_zero_padded(tmp_path, quantizer):
    src = make_folder(tmp_path / "c", dict(attn="b2g32", mlp="b4g32", embed="b16", head="b8g32",
                                           pruned=PRUNED), quantizer=quantizer,
                      num_hidden_layers=4)
    res = export_model(src, tmp_path / "ct", "compressed-tensors")
    cfg = json.loads((res.out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert {(res.out / f).is_file() for f in ("configuration_decilm.py", "modeling_decilm.py")} \
        == {True}
    model = load_compressed(src).model
    base = model.config
    d, h, hidden = base.head_dim, cfg["num_attention_heads"], base.hidden_size
    r = base.num_attention_heads // base.num_key_value_heads
    assert (h, cfg["head_dim"]) == (4, d)  # the widest layer keeps both groups: no extra heads
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    dense = _dense(res.out)
    seen = set()
    for i, block in enumerate(cfg["block_configs"]):
        pre = f"model.layers.{i}."
        kept_kv = model.model.layers[i].self_attn.k_proj.out_features // d \
            if f"{pre}self_attn.k_proj" in packed else 0
        attn = block["attention"]
        assert attn["no_op"] == (kept_kv == 0)
        if not attn["no_op"]:
            n = attn["n_heads_in_group"]
            kv = h // n  # vLLM: num_kv_heads = num_attention_heads // n_heads_in_group
            assert h % n == 0 and n >= r and kv >= kept_kv
            q_rows = np.concatenate([np.arange(d) + (g * n + j) * d
                                     for g in range(kept_kv) for j in range(r)])
            want = {
                "q_proj": dict(rows=(q_rows, h * d)),
                "k_proj": dict(rows=(np.arange(kept_kv * d), kv * d)),
                "v_proj": dict(rows=(np.arange(kept_kv * d), kv * d)),
                "o_proj": dict(cols=(q_rows, h * d)),
            }
            for part, where in want.items():
                name = pre + "self_attn." + part
                ref = _padded(packed[name].dequantize(torch.float32), **where)
                assert torch.equal(dense[name + ".weight"], ref), name
                seen.add(name)
        else:
            assert not any(k.startswith(pre + "self_attn.") or k == pre + "input_layernorm.weight"
                           for k in dense)
        ffn = block["ffn"]
        width = dict(model.model.layers[i].mlp.named_modules()).get("gate_proj")
        kept_w = width.out_features if width is not None else 0
        assert ffn["no_op"] == (kept_w == 0)
        if not ffn["no_op"]:
            w = _ffn_width(ffn["ffn_mult"], hidden)
            assert ffn["ffn_mult"] == round(ffn["ffn_mult"], 6) and w >= kept_w
            for part in ("gate_proj", "up_proj", "down_proj"):
                name = pre + "mlp." + part
                ref = packed[name].dequantize(torch.float32)
                ref = _padded(ref, cols=(np.arange(kept_w), w)) if part == "down_proj" else \
                    _padded(ref, rows=(np.arange(kept_w), w))
                assert torch.equal(dense[name + ".weight"], ref), name
                seen.add(name)
        else:
            assert not any(k.startswith(pre + "mlp.") or
                           k == pre + "post_attention_layernorm.weight" for k in dense)
    assert seen == {n for n in packed if n.startswith("model.layers.")}
    assert res.layout["kind"] == "pruned" and res.layout["kv_heads_kept"] == [2, 1, 0, 2]
    assert res.layout["ffn_width_kept"] == [96, 0, 96, 64]
    assert any(n.startswith("DeciLM layout") and "bytes of zero rows" in n for n in res.notes)


@pytest.mark.parametrize("arch,pruned,zero_attention,dims", [
    ("llama", PRUNED, [], {}),
    ("llama", ("L0.attn.g0", "L0.attn.g1"), [0], {}),
    ("qwen2", PRUNED, [], {}),  # q/k/v biases
    ("llama", ("L0.attn.g0", "L0.attn.g1", "L1.attn.g1"), [0],
     dict(attention_bias=True, mlp_bias=True)),  # biases everywhere, and a zero attention's
    ("llama", PRUNED, [], dict(rope_parameters={  # Llama-3's scaled RoPE
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    # attention and MLP pruned whole but their output biases kept: zero parts adding them
    ("llama", ("L0.attn.g0", "L0.attn.g1", "L0.mlp.c0", "L0.mlp.c1", "L0.mlp.c2",
               "L1.attn.g0", "L1.attn.g1"), [0, 1], dict(attention_bias=True, mlp_bias=True)),
])
def test_the_shipped_model_code_runs_the_export_with_bitsacks_logits(tmp_path, arch, pruned,
                                                                      zero_attention, dims):
    from transformers import AutoConfig, AutoModelForCausalLM, CompressedTensorsConfig

    src = make_folder(tmp_path / "c", dict(attn="b4g32", mlp="b4g32", embed="b16", head="b16",
                                           pruned=pruned), arch=arch, num_hidden_layers=4,
                      **dims)
    res = export_model(src, tmp_path / "ct", "compressed-tensors")
    assert res.layout["zero_attention_layers"] == zero_attention
    assert any("zero attention" in n for n in res.notes) == bool(zero_attention)
    cfg = AutoConfig.from_pretrained(res.out, trust_remote_code=True)
    hf = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True, dtype=torch.float32)
    loaded_keys = hf.load_state_dict(_dense(res.out), strict=False)
    tied = cfg.tie_word_embeddings  # the export leaves lm_head to the embedding
    assert loaded_keys.unexpected_keys == []
    assert loaded_keys.missing_keys == (["lm_head.weight"] if tied else [])
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tied
    own = load_compressed(src).model
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = own(x).logits
        got = hf.eval()(x).logits  # decompressed with fp32 scales: bitsack's weights exactly
        assert torch.allclose(got, want, rtol=0, atol=1e-5)
        # transformers' own loading path (compressed-tensors decompresses at load; one scheme)
        loaded = AutoModelForCausalLM.from_pretrained(
            res.out, trust_remote_code=True, dtype=torch.float32,
            quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
        ref = fp16_reference(own)(x).logits
        assert torch.allclose(loaded(x).logits, ref, rtol=0, atol=1e-5)
        # padding: a mask over the second half changes nothing in the first; a sequence
        # left-padded by 3 tokens gives its own logits (RoPE sees relative positions only)
        mask = torch.ones_like(x)
        mask[:, 8:] = 0
        assert torch.allclose(hf(x, attention_mask=mask).logits[:, :8], got[:, :8], atol=1e-5)
        mask = torch.ones_like(x)
        mask[0, :3] = 0
        padded = hf(x, attention_mask=mask).logits
        alone = hf(x[:1, 3:]).logits
        assert torch.isfinite(padded).all()
        assert torch.allclose(padded[0, 3:], alone[0], atol=1e-4)
    if zero_attention:
        q = _tensors(res.out)["model.layers.0.self_attn.q_proj.weight"]
        assert q.dtype == torch.float16 and not q.any()


def test_generation_runs_without_a_cache(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    src = make_folder(tmp_path / "c", dict(embed="b16", head="b16", pruned=PRUNED),
                      num_hidden_layers=4)
    out = export_model(src, tmp_path / "ct", "compressed-tensors").out
    hf = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(out, trust_remote_code=True), trust_remote_code=True,
        dtype=torch.float32)
    hf.load_state_dict(_dense(out))
    x = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        seq = hf.eval().generate(x, max_new_tokens=3, do_sample=False, pad_token_id=0)
        step = hf(seq[:, :-1]).logits.argmax(-1)[:, 4:]
    assert seq.shape == (1, 8) and torch.equal(step, seq[:, 5:])  # greedy = argmax each step


def test_groups_that_would_split_are_refused_naming_the_module():
    m = GridMatrix("model.layers.0.self_attn.o_proj", 4, 32, np.zeros((2, 64), np.uint8),
                   np.ones((2, 2), np.float16), np.zeros((2, 2), np.float16))
    assert m.spread_columns(np.r_[np.arange(32), np.arange(64, 96)], 128).groups == 4
    with pytest.raises(ExportError, match="o_proj: its groups of 32 columns cannot move whole"):
        m.spread_columns(np.r_[np.arange(32), np.arange(48, 80)], 128)


def test_a_sliding_window_is_refused(tmp_path):
    src = make_folder(tmp_path / "c", dict(embed="b16", head="b16", pruned=("L1.attn.g0",)),
                      arch="mistral")
    with pytest.raises(ExportError, match="sliding_window: 8: vLLM's DeciLM attends"):
        export_model(src, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_a_pruned_export_is_deterministic(tmp_path):
    src = make_folder(tmp_path / "c", dict(pruned=PRUNED), num_hidden_layers=4)
    a = export_model(src, tmp_path / "a", "compressed-tensors").out
    b = export_model(src, tmp_path / "b", "compressed-tensors").out
    for f in ("model.safetensors", "config.json", "modeling_decilm.py"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_the_shipped_code_and_the_solver_agree_on_the_mlp_multiple():
    # the shipped file imports no bitsack, so the 256 lives in both places
    from bitsack.export.decilm import ffn_mult_for
    from bitsack.export.decilm_code.configuration_decilm import (
        FFN_MULTIPLE,
        intermediate_size_of,
    )
    from bitsack.kernels.formats import DECILM_FFN_MULTIPLE

    assert FFN_MULTIPLE == DECILM_FFN_MULTIPLE == 256
    for hidden in (64, 576, 4096, 8192):
        for width in (256, 1536, 11008 + 256 - 11008 % 256, 28672):
            assert intermediate_size_of(ffn_mult_for(width, hidden), hidden) == width
            assert _ffn_width(ffn_mult_for(width, hidden), hidden) == width
