"""Every CUDA source compiles with NVRTC (no GPU needed); RawModule loads where a GPU is."""

from __future__ import annotations

import pytest

from bitsack.kernels.cuda_build import (
    compile_ptx,
    get_function,
    kernel_names,
    load_source,
    nvrtc_available,
    sources,
)

needs_nvrtc = pytest.mark.skipif(not nvrtc_available(), reason="NVRTC not installed")


def test_sources_listed_and_self_contained():
    assert sources() == ["dequant.cu", "gemv.cu"]
    for name in sources():
        text = load_source(name)
        assert "#include" not in text  # local includes inlined, no CUDA headers needed
        assert "bs_extract" in text


@needs_nvrtc
@pytest.mark.parametrize("name", ["gemv.cu", "dequant.cu"])
def test_nvrtc_compiles(name):
    ptx, lowered = compile_ptx(name)
    assert set(lowered) == set(kernel_names(name))
    for mangled in lowered.values():
        assert f".entry {mangled}" in ptx
    # nothing spills to local memory (the per-warp accumulators stay in registers)
    assert "ld.local" not in ptx


@pytest.mark.gpu
def test_raw_module_loads_on_gpu():
    from bitsack.kernels.backends import get_backend

    if not get_backend("cupy").is_available():
        pytest.skip("no CUDA device / CuPy")
    for name in sources():
        for k in kernel_names(name):
            assert get_function(name, k) is not None
