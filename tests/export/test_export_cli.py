"""``bitsack export``: JSON summary, refusals as one error line with exit status 1."""

from __future__ import annotations

import json

from export_helpers import make_folder

from bitsack.cli import main


def test_cli_exports_both_formats_with_a_json_summary(tmp_path, capsys, tokenizer_gguf):
    src = make_folder(tmp_path / "c")
    rc = main(["export", str(src), "--format", "gguf", "--out", str(tmp_path / "g"),
               "--tokenizer-gguf", str(tokenizer_gguf), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["format"] == "gguf" and out["layout"]["architecture"] == "llama"
    assert out["files"]["model.gguf"] == (tmp_path / "g" / "model.gguf").stat().st_size
    assert out["total_bytes"] == sum(out["files"].values())
    assert out["type_counts"] == {"F32": 5, "Q4_1": 16}
    assert {t["name"]: t["type"] for t in out["tensors"]}["blk.0.attn_q.weight"] == "Q4_1"
    manifest = json.loads((tmp_path / "g" / "bitsack_export.json").read_text())
    assert manifest["format"] == "gguf" and manifest["source_packed_bytes"] > 0

    rc = main(["export", str(src), "--format", "compressed-tensors", "--out",
               str(tmp_path / "ct")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "compressed-tensors export of" in text and "model.safetensors" in text


def test_cli_refusals_exit_1_with_one_line(tmp_path, capsys, tokenizer_gguf):
    # a pruned model with a sliding window: vLLM's DeciLM attends to the whole context
    src = make_folder(tmp_path / "c", dict(pruned=("L1.attn.g0",)), arch="mistral")
    rc = main(["export", str(src), "--format", "compressed-tensors", "--out",
               str(tmp_path / "ct")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith("bitsack export: error: sliding_window: 8: ")
    rc = main(["export", str(src), "--format", "compressed-tensors", "--out",
               str(tmp_path / "ct"), "--tokenizer-gguf", str(tokenizer_gguf)])
    assert rc == 1 and "--tokenizer-gguf" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists()
