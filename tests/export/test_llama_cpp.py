"""llama.cpp runs bitsack's GGUF exports (slow: builds llama-cpp-python from its sdist once,
cached in ``.cache/llama-cpp``; needs the embedded SmolLM2-135M and WikiText-2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bitsack.export import export_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SEQLEN, WINDOWS = 512, 2

#: Pruned units of the deci case: layer 3 loses one of its 3 head groups, layer 5 all of
#: them (attention-free), layer 7 its whole MLP while keeping attention (the zero-FFN
#: workaround), layer 9 four of its twelve MLP blocks, layer 11 everything.
PRUNED = (["L3.attn.g1", "L5.attn.g0", "L5.attn.g1", "L5.attn.g2", "L9.mlp.c0", "L9.mlp.c3",
           "L9.mlp.c6", "L9.mlp.c11", "L11.attn.g0", "L11.attn.g1", "L11.attn.g2"]
          + [f"L7.mlp.c{i}" for i in range(12)] + [f"L11.mlp.c{i}" for i in range(12)])


@pytest.fixture(scope="module")
def site():
    from bitsack.export.llama_cpp import ensure_llama_cpp

    return ensure_llama_cpp(REPO / ".cache" / "llama-cpp")


def test_llama_cpp_runs_tiny_exports_and_needs_the_zero_ffn(tmp_path, site, tokenizer_gguf,
                                                          monkeypatch):
    from export_helpers import make_folder

    import bitsack.export.gguf as export_gguf
    from bitsack.apply import load_compressed
    from bitsack.evaluate import perplexity
    from bitsack.export.llama_cpp import gguf_perplexity

    tokens = torch.randint(0, 128, (1, 4 * 64), generator=torch.Generator().manual_seed(1))
    windows = tokens[0].reshape(4, 64).numpy()
    # layer 1: one head group kept, MLP gone (zero FFN); layer 2: attention-free
    pruned = ("L1.attn.g0", "L1.mlp.c0", "L1.mlp.c1", "L1.mlp.c2", "L2.attn.g0", "L2.attn.g1",
              "L0.mlp.c1")
    ratios = {}
    for name, kw in (("llama", {}), ("deci", {"pruned": pruned})):
        src = make_folder(tmp_path / name, kw, num_hidden_layers=3, init_std=0.05)
        res = export_model(src, tmp_path / f"{name}.g", "gguf", tokenizer_gguf=tokenizer_gguf)
        assert res.layout["architecture"] == name
        own = perplexity(load_compressed(src).model, tokens, 64, progress=False).ppl
        got = gguf_perplexity(res.out / "model.gguf", windows, site).ppl
        ratios[name] = got / own - 1
        assert abs(ratios[name]) < 0.01, (name, got, own)
    # without the workaround (n_ff = 0 in layer 1) llama.cpp loses layer 1's attention output
    monkeypatch.setattr(export_gguf, "ZERO_FFN_WIDTH", 0)
    res = export_model(tmp_path / "deci", tmp_path / "bare.g", "gguf",
                       tokenizer_gguf=tokenizer_gguf)
    assert res.layout["n_ff"][1] == 0
    own = perplexity(load_compressed(tmp_path / "deci").model, tokens, 64, progress=False).ppl
    bare = gguf_perplexity(res.out / "model.gguf", windows, site).ppl
    assert abs(bare / own - 1) > 10 * abs(ratios["deci"])


def test_llama_cpp_runs_k_quants(tmp_path, site, tokenizer_gguf):
    """Q2_K, Q3_K, Q4_0 and exact Q8_0 tensors of symmetric grids (rows of whole super-blocks):
    llama.cpp's perplexity is bitsack's own within 1 % (it multiplies against 8-bit
    activations)."""
    from export_helpers import make_folder

    from bitsack.apply import load_compressed
    from bitsack.evaluate import perplexity
    from bitsack.export.llama_cpp import gguf_perplexity

    tokens = torch.randint(0, 128, (1, 4 * 64), generator=torch.Generator().manual_seed(1))
    windows = tokens[0].reshape(4, 64).numpy()
    src = make_folder(tmp_path / "k", dict(attn="b3g32", mlp="b2g32", embed="b8g32",
                                           head="b4g32"), scale_bits=4, grid="sym-mse",
                      hidden_size=256, head_dim=64, intermediate_size=512, init_std=0.05)
    res = export_model(src, tmp_path / "k.g", "gguf", tokenizer_gguf=tokenizer_gguf)
    assert {"Q2_K", "Q3_K", "Q4_0", "Q8_0"} <= set(res.type_counts())
    own = perplexity(load_compressed(src).model, tokens, 64, progress=False).ppl
    got = gguf_perplexity(res.out / "model.gguf", windows, site).ppl
    assert abs(got / own - 1) < 0.01, (got, own)


@pytest.fixture(scope="module")
def smollm2():
    from bitsack.data import eval_tokens
    from bitsack.models.loading import load_model

    lm = load_model("default", progress=False)
    tokens = eval_tokens("wikitext2", lm.tokenizer)
    return lm, tokens


@pytest.mark.parametrize("pruned", [True, False], ids=["deci", "llama"])
def test_llama_cpp_perplexity_matches_bitsacks(tmp_path, site, smollm2, pruned):
    from bitsack.apply import ApplyConfig, cache_dequantized, compress, save_compressed
    from bitsack.evaluate import perplexity
    from bitsack.export.llama_cpp import gguf_perplexity
    from bitsack.models import model_units
    from bitsack.models.loading import load_model

    lm = load_model("default", progress=False)
    _, tokens = smollm2
    units = model_units(lm.model, mlp_group=128)
    plan = {u.id: "prune" if pruned and u.id in PRUNED else "b4g64" for u in units}
    compress(lm.model, plan, config=ApplyConfig(quantizer="rtn", group_size=64, mlp_group=128))
    src = save_compressed(lm.model, tmp_path / "c", tokenizer=lm.tokenizer,
                          extra={"base_model": lm.source})
    res = export_model(src, tmp_path / "g", "gguf")
    assert res.layout["architecture"] == ("deci" if pruned else "llama")
    if pruned:
        assert res.layout["n_head"][5] == 0 and res.layout["n_ff"][7] == 32
        assert res.layout["n_head"][11] == 0 and res.layout["n_ff"][11] == 0
    cache_dequantized(lm.model)
    with torch.no_grad():
        own = perplexity(lm.model, tokens, SEQLEN, windows=WINDOWS, progress=False)
    windows = tokens[0, : SEQLEN * WINDOWS].reshape(WINDOWS, SEQLEN).numpy()
    got = gguf_perplexity(res.out / "model.gguf", windows, site, threads=2)
    assert got.n_vocab == lm.model.config.vocab_size
    # llama.cpp runs Q4_1 against activations rounded to 8 bits (Q8_1): close, not equal
    assert abs(got.ppl / own.ppl - 1) < 0.01, (got.ppl, own.ppl)
