"""Outputs never destroy what was there, and other loaders refuse a compressed folder."""

import json
import os

import pytest

from bitsack.apply import ApplyConfig, compress, is_model_dir, save_compressed
from bitsack.errors import ValidationError
from bitsack.models import model_units
from bitsack.models.testing import tiny_model

G, MLP = 16, 32


def _compressed():
    model = tiny_model("llama", seed=0)
    plan = {u.id: 4 for u in model_units(model, mlp_group=MLP)}
    compress(model, plan, config=ApplyConfig(quantizer="rtn", group_size=G, mlp_group=MLP))
    return model


def test_save_refuses_a_non_empty_foreign_folder(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("precious")
    with pytest.raises(ValidationError, match="--out.*non-empty folder.*--force"):
        save_compressed(_compressed(), project)
    assert (project / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_save_refuses_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValidationError, match="not a folder"):
        save_compressed(_compressed(), target)
    assert target.read_text() == "x"


def test_force_replaces_and_an_earlier_model_is_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    save_compressed(_compressed(), out, force=True)
    assert is_model_dir(out) and not (out / "old.txt").exists()
    save_compressed(_compressed(), out)  # an earlier bitsack model folder: replaced
    assert is_model_dir(out)


def test_empty_folder_is_accepted_with_an_ordinary_mode(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    save_compressed(_compressed(), out)
    mask = os.umask(0)
    os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "m"
    # a process id that cannot be alive: above the kernel's pid_max
    stale = tmp_path / f".m.bitsack-tmp-{2**22 + 7}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 100)
    live = tmp_path / f".m.bitsack-tmp-{os.getppid()}-abc"
    live.mkdir()
    unrelated = tmp_path / ".other.bitsack-tmp-1-x"
    unrelated.mkdir()
    save_compressed(_compressed(), out)
    assert not stale.exists()
    assert live.exists() and unrelated.exists()


def test_transformers_refuses_a_compressed_folder(tmp_path):
    import subprocess
    import sys

    out = save_compressed(_compressed(), tmp_path / "c")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "bitsack"
    assert cfg["quantization_config"]["quant_method"] == "bitsack"
    # without bitsack (here: it cannot be imported) transformers refuses the folder; with it,
    # transformers loads the real packed model (tests/test_hf.py)
    code = ("import sys; sys.modules['bitsack'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "ValueError" in proc.stderr and "bitsack" in proc.stderr


def test_compress_cli_refuses_before_any_work(tmp_path, monkeypatch, capsys):
    from bitsack.cli import main

    project = tmp_path / "project"
    project.mkdir()
    (project / "keep.txt").write_text("precious")

    def never(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr("bitsack.models.loading.load_model", never)
    code = main(["compress", "--model", "x", "--problem", "p.yaml", "--solution", "s.json",
                 "--out", str(project)])
    assert code == 1
    assert "--force" in capsys.readouterr().err
    assert (project / "keep.txt").read_text() == "precious"


def test_run_refuses_a_foreign_folder(tmp_path):
    from bitsack.pipeline import RunConfig, run

    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(ValidationError, match="run directory"):
        run(RunConfig(avg_bits=3.5, out=str(tmp_path)))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_save_pretrained_of_a_packed_model_writes_a_compressed_folder(tmp_path):
    import torch

    from bitsack.apply import load_compressed

    model = _compressed()
    model.save_pretrained(tmp_path / "sp")
    assert is_model_dir(tmp_path / "sp")
    x = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    reloaded = load_compressed(tmp_path / "sp").model
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
    reloaded.save_pretrained(tmp_path / "again")  # a loaded one saves the same way
    assert is_model_dir(tmp_path / "again")
    with pytest.raises(ValidationError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
