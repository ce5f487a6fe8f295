"""A compressed model loaded on the GPU runs on the CuPy kernels and matches the CPU path.

Skipped without a CUDA device and CuPy (``-m gpu``); ``bench/gpu_model.py`` runs the same check
on SmolLM2-135M with timings.
"""

from __future__ import annotations

import pytest
import torch

from bitsack.apply import load_compressed, save_compressed
from bitsack.kernels.backends import get_backend
from bitsack.kernels.packed import PackedEmbedding, PackedLinear
from bitsack.models.testing import tiny_tokenizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not get_backend("cupy").is_available(),
                                 reason="no CUDA device / CuPy")]


@pytest.mark.parametrize("arch,scale_bits,pruned", [("llama", None, False), ("llama", 6, True),
                                                    ("qwen2", 6, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_model_matches_the_cpu(tmp_path, tiny_compressed, arch, scale_bits, pruned, dtype):
    model = tiny_compressed(arch, pruned, scale_bits=scale_bits, tie_word_embeddings=True)
    path = save_compressed(model, tmp_path / "m", tokenizer=tiny_tokenizer())
    cpu = load_compressed(path).model.eval()
    gpu = load_compressed(path, device="cuda", backend="cupy", dtype=dtype).model.eval()
    packed = [m for m in gpu.modules() if isinstance(m, (PackedLinear, PackedEmbedding))]
    assert packed and all(m.backend == "cupy" for m in packed if isinstance(m, PackedLinear))
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = cpu(ids).logits.double()
        for n in (1, 24):  # the GEMV (one position per row) and the dequantize + GEMM path
            got = gpu(ids[:, :n].cuda()).logits.double().cpu()
            tol = (1e-4 if dtype == torch.float32 else 3e-2) * (1 + ref.abs().max())
            err = (got - ref[:, :n]).abs().max()
            assert err <= tol, (n, float(err), float(tol))
        if dtype == torch.float32:
            kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=2)
            assert torch.equal(gpu.generate(ids[:1].cuda(), **kw).cpu(),
                               cpu.generate(ids[:1], **kw))
