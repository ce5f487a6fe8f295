"""bench/kernels_gpu.py's random layers, built on the CPU (the benchmark itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels_gpu.py"


def test_random_layers_are_valid_packed_layers_the_reference_runs():
    from bitsack.kernels.backends import reference_output

    spec = importlib.util.spec_from_file_location("bench_kernels_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    for axis in (0, 1):
        case = mod.Case("small mixed", 96, 192, axis, (2, 3, 8))
        layer = mod.random_layer(case, "cpu")
        assert [s.bits for s in layer.segments] == [2, 3, 8]
        assert mod.bytes_per_call(layer, 1) == layer.nbytes + (96 + 192) * 4
        x = torch.randn(2, 192)
        y = layer(x)
        assert torch.allclose(y.double(), reference_output(layer, x), rtol=1e-4, atol=1e-4)
