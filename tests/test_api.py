"""The notebook API: ``bitsack.compress`` on an in-memory model and on a spec, ``bitsack.load``,
and the README example (run as written, on a tiny model)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bitsack
from bitsack.errors import ValidationError
from bitsack.models.testing import ByteTokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def texts(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    ev = tmp_path / "eval.txt"
    ev.write_text("Pack my box with five dozen liquor jugs, said the sphinx. " * 30)
    return dict(calib=str(calib), eval=str(ev), group_size=16, mlp_group=32,
                compress_nsamples=4, compress_seqlen=24, eval_seqlen=32, eval_windows=2,
                menu=("b2g32", "b3g32", "b4g32", "b16"))


def test_compress_an_in_memory_model_and_load_it_back(tmp_path, texts):
    model = tiny_model("llama", seed=3)
    res = bitsack.compress(model, tokenizer=ByteTokenizer(), avg_bits=4.0, method="uniform",
                           out=tmp_path / "run", **texts)
    assert set(res.plan.values()) == {"b3g32"}  # the largest uniform option within 4 bits
    assert res.summary.bits_per_weight <= 4.0 + 1e-9
    loaded = bitsack.load(tmp_path / "run" / "model")
    x = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, res.model(x).logits)
    assert loaded.bitsack_plan == res.plan


def test_an_in_memory_model_needs_its_tokenizer():
    with pytest.raises(ValidationError, match="tokenizer"):
        bitsack.compress(tiny_model("llama"), avg_bits=4.0)


def test_the_api_keeps_import_bitsack_light():
    code = "import sys, bitsack; print(bitsack.compress.__module__); " \
           "print([m for m in ('torch', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0] == "bitsack.api" and out[1] == "[]"


def test_readme_example_runs(tmp_path, monkeypatch, texts):
    """The README's Python block, with the model load swapped for a tiny one."""
    from bitsack.models import loading

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(import bitsack\n.*?)```", readme, re.S)
    assert block, "README has no ```python block starting with `import bitsack`"

    def fake(*args, **kwargs):
        return loading.LoadedModel(model=tiny_model("llama", seed=3), tokenizer=ByteTokenizer(),
                                   source={"kind": "test", "spec": "tiny"})

    monkeypatch.setattr(loading, "load_model", fake)
    monkeypatch.chdir(tmp_path)
    # the README's budget and method, with this test's small data settings
    code = block.group(1).replace("avg_bits=3.5,", "avg_bits=4.0, **SETTINGS,")
    scope = {"SETTINGS": {**texts, "search_budget": 40.0, "screen": (4, 24),
                          "select": (4, 24), "holdout": (4, 24), "search_k": 2}}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["result"].summary.bits_per_weight <= 4.0 + 1e-9
