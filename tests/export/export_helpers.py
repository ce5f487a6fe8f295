"""Helpers of the export tests: tiny compressed folders and a tiny tokenizer GGUF."""

from __future__ import annotations

from pathlib import Path

from bitsack.apply import ApplyConfig, compress, save_compressed
from bitsack.models import model_units
from bitsack.models.testing import tiny_model

MLP = 32


def plan_for(model, attn="b4g32", mlp="b4g32", embed="b4g32", head=None, pruned=()):
    """A per-matrix-uniform plan: every attention unit ``attn``, every MLP block ``mlp``,
    the embedding ``embed`` and an untied lm_head ``head`` (default ``embed``); units in
    ``pruned`` are pruned."""
    plan = {}
    for u in model_units(model, mlp_group=MLP):
        if u.id in pruned:
            plan[u.id] = "prune"
        elif u.id == "embed":
            plan[u.id] = embed
        elif u.id == "lm_head":
            plan[u.id] = head or embed
        elif ".attn." in u.id:
            plan[u.id] = attn
        else:
            plan[u.id] = mlp
    return plan


def make_folder(path: Path, plan_kwargs=None, arch="llama", seed=0, quantizer="rtn",
                scale_bits=None, grid="hmse", **dims) -> Path:
    """Compress a tiny random ``arch`` model with ``plan_for(**plan_kwargs)`` and save it."""
    model = tiny_model(arch, seed=seed, **dims)
    plan = plan_for(model, **(plan_kwargs or {}))
    calib = None
    if quantizer == "gptq":
        import torch

        calib = torch.randint(0, model.config.vocab_size, (4, 32),
                              generator=torch.Generator().manual_seed(seed))
    compress(model, plan, calib, ApplyConfig(quantizer=quantizer, group_size=32, mlp_group=MLP,
                                             batch_size=4, scale_bits=scale_bits,
                                             grid=grid))
    return save_compressed(model, path)


def write_tokenizer_gguf(path: Path, n_vocab: int) -> Path:
    """A GGUF holding only a SentencePiece-style vocabulary of ``n_vocab`` tokens: <unk>, <s>,
    </s> and byte tokens <0x00>.. (enough for llama.cpp to load a tiny model)."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(n_vocab - 3)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
        [gguf.TokenType.BYTE] * (n_vocab - 3)
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def patch_tiny_run(monkeypatch, tmp_path: Path, **dims) -> tuple[Path, Path]:
    """``load_model`` returns a fresh (identical) tiny Llama of ``dims`` each call (a run
    consumes it); returns (calibration, evaluation) text files for ``bitsack.pipeline.run``."""
    from bitsack.models import loading
    from bitsack.models.testing import ByteTokenizer

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loading.LoadedModel(
        model=tiny_model("llama", seed=3, **dims), tokenizer=ByteTokenizer(),
        source={"kind": "test", "spec": "tiny"}))
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    ev = tmp_path / "eval.txt"
    ev.write_text("Pack my box with five dozen liquor jugs, said the sphinx. " * 30)
    return calib, ev


def fp16_reference(model):
    """bitsack's model with every packed linear replaced by a dense one of its weights
    rounded once to fp16 — what compressed-tensors' fp16-scale dequantization gives."""
    import torch

    from bitsack.kernels.packed import PackedLinear

    for name, mod in [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]:
        lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(mod.dequantize(torch.float32).half().float())
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.float())
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    return model
