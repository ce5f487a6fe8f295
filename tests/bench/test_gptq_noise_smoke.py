"""bench/gptq_noise.py on a tiny model: one run per seed, cached, grouped by machine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bitsack.models.testing import ByteTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
BENCH = Path(__file__).resolve().parents[2] / "bench" / "gptq_noise.py"


def test_seeds_are_runs_of_one_config_on_this_machine(monkeypatch, tmp_path, capsys):
    from bitsack.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loading.LoadedModel(
        model=tiny_model("llama", seed=3), tokenizer=ByteTokenizer(),
        source={"kind": "test", "spec": "tiny"}))
    spec = importlib.util.spec_from_file_location("bench_gptq_noise", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = ["--config", "b3g32", "--seeds", "0,1", "--eval-windows", "2",
            "--compress-nsamples", "4", "--model", "tiny", "--runs", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res")]
    assert mod.main(args) == 0
    runs = sorted((tmp_path / "res" / "gptq_noise").glob("*.json"))
    assert [p.name.split("_")[1] for p in runs] == ["seed0", "seed1"]
    md = (tmp_path / "res" / "gptq_noise.md").read_text()
    assert md.count("| b3g32 |") == 3  # two runs and their summary row
    capsys.readouterr()
    assert mod.main(args) == 0
    assert capsys.readouterr().err.count("cached") == 2
