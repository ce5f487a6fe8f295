"""Every file of a compressed folder that changes the numbers is hashed and checked on load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bitsack.apply import ApplyConfig, compress, load_compressed, save_compressed
from bitsack.errors import FormatError
from bitsack.models import model_units
from bitsack.models.testing import tiny_model, tiny_tokenizer

G, MLP = 16, 32


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    model = tiny_model("llama", seed=0)
    model.generation_config.eos_token_id = 1
    model.generation_config.max_new_tokens = 7
    plan = {u.id: 4 for u in model_units(model, mlp_group=MLP)}
    plan["L0.attn.g0"] = 0
    compress(model, plan, config=ApplyConfig(quantizer="rtn", group_size=G, mlp_group=MLP))
    return save_compressed(model, tmp_path_factory.mktemp("ckpt") / "m",
                           tokenizer=tiny_tokenizer())


@pytest.fixture
def saved(original, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(original, copy)
    return copy


def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))


def test_every_number_file_is_listed_with_its_hash(saved):
    from bitsack.io import file_sha256

    meta = json.loads((saved / "bitsack.json").read_text())
    files = meta["files"]
    assert {"config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= set(files)
    assert "model.safetensors" not in files and "bitsack.json" not in files
    for name, entry in files.items():
        assert entry == {"sha256": file_sha256(saved / name),
                         "bytes": (saved / name).stat().st_size}
    loaded = load_compressed(saved)
    assert loaded.model.generation_config.max_new_tokens == 7
    assert loaded.tokenizer("hi")["input_ids"] == [ord("h"), ord("i")]


@pytest.mark.parametrize("field,value", [("rms_norm_eps", 1e-6 * 1000),
                                         ("rope_parameters", {"rope_theta": 1e5,
                                                              "rope_type": "default"})])
def test_an_edited_config_is_refused_naming_the_file(saved, field, value):
    _edit_json(saved / "config.json", **{field: value})
    with pytest.raises(FormatError, match=r"config\.json: SHA-256 .* changed after the save"):
        load_compressed(saved)


def test_edited_generation_config_and_tokenizer_are_refused(saved, original):
    _edit_json(saved / "generation_config.json", max_new_tokens=900)
    with pytest.raises(FormatError, match=r"generation_config\.json: SHA-256"):
        load_compressed(saved)
    shutil.copy(original / "generation_config.json", saved / "generation_config.json")
    tok = saved / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[: tok.stat().st_size // 2])  # truncated
    with pytest.raises(FormatError, match=r"tokenizer\.json: SHA-256"):
        load_compressed(saved)


def test_missing_and_added_files_are_refused(saved):
    (saved / "tokenizer.json").unlink()
    with pytest.raises(FormatError, match=r"tokenizer\.json: listed in bitsack\.json but missing"):
        load_compressed(saved)


def test_a_file_added_after_the_save_is_refused(saved):
    meta_file = saved / "bitsack.json"
    meta = json.loads(meta_file.read_text())
    del meta["files"]["generation_config.json"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=r"generation_config\.json: not listed .*added after"):
        load_compressed(saved)
    (saved / "generation_config.json").unlink()
    (saved / "README.md").write_text("notes")  # a file that changes nothing is fine
    assert load_compressed(saved).tokenizer is not None


def _as_old_folder(folder):
    meta_file = folder / "bitsack.json"
    meta = json.loads(meta_file.read_text())
    del meta["files"]
    meta_file.write_text(json.dumps(meta))


def test_folder_without_file_hashes_loads_with_a_warning(saved, original):
    _as_old_folder(saved)
    with pytest.warns(UserWarning, match="older bitsack.*unverified"):
        loaded = load_compressed(saved)
    ids = torch.arange(3, 12)[None]
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, load_compressed(original).model(ids).logits)
    assert loaded.tokenizer is not None


def test_a_broken_tokenizer_of_an_old_folder_is_a_format_error(saved):
    _as_old_folder(saved)
    tok = saved / "tokenizer.json"
    tok.write_text(tok.read_text()[:100])  # truncated: not JSON any more
    with pytest.warns(UserWarning), pytest.raises(FormatError,
                                                  match=r"the tokenizer \(.*tokenizer\.json"):
        load_compressed(saved)


def test_no_tokenizer_files_means_no_tokenizer(tmp_path):
    model = tiny_model("qwen2", seed=0)
    compress(model, {u.id: 8 for u in model_units(model, mlp_group=MLP)},
             config=ApplyConfig(quantizer="rtn", group_size=G, mlp_group=MLP))
    out = save_compressed(model, tmp_path / "m")
    assert load_compressed(out).tokenizer is None


def test_bad_files_record_is_refused(saved):
    meta_file = saved / "bitsack.json"
    meta = json.loads(meta_file.read_text())
    meta["files"]["../escape.json"] = {"sha256": "0" * 64}
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=r"files\['\.\./escape\.json'\] is not a plain file"):
        load_compressed(saved)
    meta["files"] = ["config.json"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(FormatError, match="files is list"):
        load_compressed(saved)


def test_a_v1_folder_with_fp16_zero_points_still_loads(saved, original):
    """Schema v1 stored each group's zero point as fp16; v2 packs them at the segment's
    bit-width. A v1 folder (rewritten here from a v2 one) loads to the same model."""
    from bitsack.kernels.formats import num_groups, unpack_zero
    from bitsack.kernels.io import dtype_name, load_tensors, save_tensors

    meta = json.loads((saved / "bitsack.json").read_text())
    assert meta["schema"] == "bitsack.model/v2"
    expected = {k: (tuple(v["shape"]), v["dtype"], v["sha256"])
                for k, v in meta["tensors"].items()}
    tensors, _ = load_tensors(saved / "model.safetensors", expected)
    n = 0
    for name, entry in meta["packed"].items():
        for i, spec in enumerate(entry.get("segments", [])):
            key = f"{name}.seg{i}_zero"
            if key in tensors:
                rows, cols = spec["shape"]
                tensors[key] = unpack_zero(tensors[key], spec["bits"], rows,
                                           num_groups(cols, spec["group_size"]),
                                           dtype=torch.float16)
                n += 1
    assert n
    hashes = save_tensors(saved / "model.safetensors", tensors)
    meta["schema"] = "bitsack.model/v1"
    meta["tensors"] = {k: {"shape": list(t.shape), "dtype": dtype_name(t.dtype),
                           "sha256": hashes[k]} for k, t in tensors.items()}
    (saved / "bitsack.json").write_text(json.dumps(meta, indent=2))
    old, new = load_compressed(saved).model, load_compressed(original).model
    x = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(old(x).logits, new(x).logits)
    assert sum(b.numel() * b.element_size() for n_, b in old.named_buffers()
               if n_.endswith("_zero")) == sum(
        b.numel() * b.element_size() for n_, b in new.named_buffers() if n_.endswith("_zero"))
