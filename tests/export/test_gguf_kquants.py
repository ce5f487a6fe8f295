"""GGUF's cheaper types: Q4_0 / Q5_0 and the K-quants Q2_K, Q3_K, Q6_K hold bitsack's grids
exactly (read back through gguf-py's own dequantizers to the bit), the type table the solver
prices with is the one the exporter writes, and a plan made for ``--format gguf`` on a
symmetric grid with scale codes exports K-quants with the certified bytes and runs in
transformers' GGUF loader."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from bitsack.errors import ValidationError
from bitsack.export import export_model
from bitsack.export.common import ExportError, GridMatrix
from bitsack.export.ggml_blocks import (
    _Q2_K,
    _Q3_K,
    _Q4_0,
    _Q4_1,
    _Q5_0,
    _Q5_1,
    _Q6_K,
    _Q8_0,
    encode,
    encode_q3_k,
)
from bitsack.kernels.formats import GGUF_BLOCK_BYTES, GGUF_TYPES, gguf_type
from bitsack.kernels.grid import rtn_quantize


def _matrix(bits, g, scale_bits, grid, rows=4, cols=512, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0, :7] = torch.tensor([0.4, -0.3, 0.0, 1e-4, -1e-4, 0.2, -0.2])  # outliers, zeros
    qt = rtn_quantize(w, bits, g, scale_bits, grid)
    return GridMatrix("m", bits, g, qt.codes.numpy(), qt.scale.numpy(), qt.zero.numpy(),
                      scale_bits, None if qt.step is None else qt.step.numpy())


def test_block_dtypes_are_the_sizes_the_solver_prices():
    dtypes = {"Q4_0": _Q4_0, "Q4_1": _Q4_1, "Q5_0": _Q5_0, "Q5_1": _Q5_1, "Q8_0": _Q8_0,
              "Q2_K": _Q2_K, "Q3_K": _Q3_K, "Q6_K": _Q6_K}
    assert {k: np.dtype(v).itemsize for k, v in dtypes.items()} == GGUF_BLOCK_BYTES
    assert set(dtypes) == set(GGUF_TYPES)


# (type, bits, group size, scale bits, grid): each type, reached by the table
EXACT = [("Q4_0", 3, 32, None, "minmax"), ("Q4_0", 1, 64, 6, "mse"),
         ("Q4_0", 4, 64, None, "sym"), ("Q5_0", 5, 32, None, "sym-mse"),
         ("Q8_0", 7, 32, None, "minmax"), ("Q8_0", 8, 32, 6, "sym"),
         ("Q2_K", 2, 16, 4, "sym"), ("Q2_K", 2, 64, 4, "sym-mse"), ("Q2_K", 1, 32, 3, "sym"),
         ("Q3_K", 3, 16, 5, "sym"), ("Q3_K", 3, 32, 5, "sym-mse"),
         ("Q3_K", 2, 16, 5, "minmax"), ("Q6_K", 6, 16, 6, "sym"),
         ("Q6_K", 6, 256, 6, "sym-mse"), ("Q6_K", 4, 16, 6, "mse")]


@pytest.mark.parametrize("kind,bits,g,scale_bits,grid", EXACT)
def test_every_type_reads_back_as_bitsacks_weights_to_the_bit(kind, bits, g, scale_bits, grid):
    m = _matrix(bits, g, scale_bits, grid)
    sym = grid.startswith("sym")
    enc = encode(m, sym)
    assert enc.type == kind == gguf_type(bits, g, scale_bits, sym, m.shape[1])
    assert enc.max_error == 0.0 and enc.rerounded_blocks == 0
    block, nbytes = GGUF_TYPES[kind]
    assert enc.data.nbytes == m.shape[0] * m.shape[1] // block * nbytes
    back = dequantize(enc.data, gguf.GGMLQuantizationType[kind]).reshape(m.shape)
    assert np.array_equal(back.astype(np.float32), m.dequantize())


def test_the_type_table():
    # fp16 scales, min-max grids: what any folder gets
    assert [gguf_type(b) for b in range(1, 9)] == ["Q4_0"] * 3 + ["Q4_1", "Q5_1"] + \
        ["Q8_0"] * 3
    # symmetric grids with 4-bit scale codes on rows of whole super-blocks
    assert [gguf_type(b, 16, 4, True, 512) for b in range(1, 7)] == \
        ["Q2_K", "Q2_K", "Q3_K", "Q6_K", "Q6_K", "Q6_K"]
    for bits in (7, 8):  # Q8_0's blocks of 32 cannot hold groups of 16: refused, not re-rounded
        with pytest.raises(ValidationError, match=f"no ggml type holds {bits}-bit groups of 16"):
            gguf_type(bits, 16, 4, True, 512)
    assert [gguf_type(b, 32, 4, True, 512) for b in range(2, 7)] == \
        ["Q2_K", "Q3_K", "Q4_0", "Q5_0", "Q6_K"]
    # Q3_K's signed 6-bit sub-block scales hold 5-bit codes, Q2_K's 4-bit ones
    assert gguf_type(3, 32, 6, True, 512) == "Q4_0" and gguf_type(2, 32, 5, True, 512) == "Q3_K"
    # a row of 576 (SmolLM2's hidden size) is no whole super-block: legacy types only
    assert gguf_type(3, 32, 4, True, 576) == "Q4_0"
    # fp16 scales have no super-block scale: no K-quant
    assert gguf_type(2, 32, None, True, 512) == "Q4_0"
    with pytest.raises(ValidationError, match="bits"):
        gguf_type(9)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
@pytest.mark.parametrize("scale_bits", [None, 4])
def test_a_symmetric_grid_fixes_the_zero_and_keeps_the_half_step_bound(bits, scale_bits):
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(bits)) * 0.1
    qt = rtn_quantize(w, bits, 32, scale_bits, "sym")
    assert bool((qt.zero == 2 ** (bits - 1)).all())
    s = qt.scale.float().repeat_interleave(32, dim=1)
    assert bool(((qt.dequantize() - w).abs() <= s / 2 * (1 + 1e-6)).all())
    if scale_bits is not None:
        qt.scale_codes()  # every scale is k·step exactly


def test_k_quants_refuse_what_they_cannot_hold():
    m = _matrix(3, 16, 6, "sym")  # 6-bit scale codes: some exceed Q3_K's 31
    with pytest.raises(ExportError, match="k·step for an integer k in 1..31"):
        encode_q3_k(m)
    asym = _matrix(3, 16, 5, "minmax")
    with pytest.raises(ExportError, match="records a symmetric grid"):
        encode(asym, sym=True)
    with pytest.raises(ExportError, match="span"):
        encode_q3_k(asym)  # min-max 3-bit codes leave −4..3
    # 288-wide rows are no whole super-block, and groups of 16 no whole block of 32
    with pytest.raises(ExportError, match="no ggml type holds 2-bit groups of 16 on 288-wide"):
        encode(_matrix(2, 16, 4, "sym", cols=288), sym=True)


# ---- a plan made for GGUF's K-quants, end to end --------------------------------------------

WIDE = dict(hidden_size=256, head_dim=64, intermediate_size=512)
MLP = 256


@pytest.fixture
def wide(monkeypatch, tmp_path, one_thread):
    """A tiny Llama whose rows are whole super-blocks, and run inputs."""
    from export_helpers import patch_tiny_run

    return patch_tiny_run(monkeypatch, tmp_path, **WIDE)


@pytest.mark.parametrize("method", ["uniform", "search"])
def test_a_k_quant_plan_exports_its_certified_bytes_and_runs_in_transformers(
        wide, tmp_path, tokenizer_gguf, method):
    from transformers import AutoModelForCausalLM

    from bitsack.checkpoint import load_compressed
    from bitsack.kernels.packed import PackedLinear
    from bitsack.pipeline import RunConfig, run

    calib, ev = wide
    out = tmp_path / "run"
    s = run(RunConfig(model="tiny", out=str(out), calib=str(calib), eval=str(ev),
                      method=method, format="gguf", grid="sym-mse", scale_bits=4,
                      search_budget=60.0, search_k=4,
                      quantizer="rtn", avg_bits=3.0, group_size=32, mlp_group=MLP,
                      menu=("b2g32", "b3g32", "b4g32", "b8g32", "b16"), eval_seqlen=32,
                      eval_windows=1, compress_nsamples=4, compress_seqlen=24,
                      screen=(4, 24), select=(4, 24), holdout=(4, 24)))
    plan = json.loads((out / "solution.json").read_text())["assignment"]
    usage = s.certificate["usage"]["memory_bytes"]
    res = export_model(out / "model", tmp_path / "g", "gguf", tokenizer_gguf=tokenizer_gguf)
    packed = json.loads((out / "model" / "bitsack.json").read_text())["packed"]
    assert sum(t.nbytes for t in res.tensors if t.source in packed) == usage
    types = {t.type for t in res.tensors if t.source in packed}
    assert types & {"Q2_K", "Q3_K"}, (types, set(plan.values()))
    # gguf-py reads every K-quant back as bitsack's weights; transformers runs the file
    hf = AutoModelForCausalLM.from_pretrained(res.out, gguf_file="model.gguf",
                                              dtype=torch.float32)
    own = load_compressed(out / "model").model
    for name, mod in own.named_modules():
        if isinstance(mod, PackedLinear):
            assert torch.equal(hf.get_submodule(name).weight.detach(), mod.dequantize()), name
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, own(x).logits, rtol=0, atol=1e-4)
