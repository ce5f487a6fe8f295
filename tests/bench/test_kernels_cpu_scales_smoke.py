"""bench/kernels_cpu_scales.py on one small shape: a table of paired timings, written whole."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels_cpu_scales.py"


def test_paired_table(tmp_path, monkeypatch):
    from bitsack.kernels.backends import CpuBackend

    if CpuBackend.native() is None:
        pytest.skip("C++ kernels not built here")
    monkeypatch.syspath_prepend(str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_kcs", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "BITS", (3,))
    monkeypatch.setattr(mod, "copy_bandwidth", lambda: 1e9)
    out = tmp_path / "kcs.md"
    assert mod.main(["--shapes", "8x512", "--rounds", "1", "--out", str(out)]) == 0
    md = out.read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 8×512 |")]
    assert len(rows) == len(mod.GROUPS) * len(mod.BATCHES)
    # codes are fewer bytes than fp16 scales at every group size of this shape
    assert all(int(r.split("|")[-3].replace(",", "")) > int(r.split("|")[-2].replace(",", ""))
               for r in rows)
    assert "Summary: decode" in md and "kernels_cpu_scales.py --shapes 8x512" in md
    sys.modules.pop("kernels_cpu", None)
