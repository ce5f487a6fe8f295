"""transformers loads bitsack folders after ``import bitsack`` — and refuses them without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bitsack.apply import ApplyConfig, compress, load_compressed, save_compressed
from bitsack.errors import ModelError
from bitsack.models import model_units
from bitsack.models.testing import tiny_model, tiny_tokenizer

G, MLP = 16, 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_compressed):
    """Saved folders: (arch, tied, pruned) -> path."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for arch, tied in (("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False)):
        for pruned in (False, True):
            model = tiny_compressed(arch, pruned, tie_word_embeddings=tied)
            out[arch, tied, pruned] = save_compressed(
                model, root / f"{arch}-{tied}-{pruned}", tokenizer=tiny_tokenizer())
    return out


def _ids(n=2, seqlen=11, seed=0):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,tied,pruned", [("llama", False, False), ("llama", True, True),
                                              ("qwen2", True, False), ("qwen2", False, True),
                                              ("qwen2", True, True)])
def test_auto_classes_build_the_packed_model(folders, arch, tied, pruned, one_thread):
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitsack.hf import BitsackConfig
    from bitsack.kernels.packed import PackedEmbedding, PackedLinear

    path = folders[arch, tied, pruned]
    config = AutoConfig.from_pretrained(path)
    assert isinstance(config, BitsackConfig)
    assert config.base_config().model_type == arch
    model = AutoModelForCausalLM.from_pretrained(path)
    ref = load_compressed(path).model
    assert type(model) is type(ref) and type(model).__name__.endswith("ForCausalLM")
    assert isinstance(model.model.embed_tokens, PackedEmbedding)
    assert isinstance(model.model.layers[0].self_attn.q_proj, PackedLinear)
    # pruned shapes: layer 0 keeps one of its two KV groups (2 query heads of 16)
    assert model.model.layers[0].self_attn.q_proj.out_features == (32 if pruned else 64)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    # lm-eval's HFLM calls tie_weights(); a packed tied head shares the embedding's buffers
    model.tie_weights()
    if tied:
        assert model.lm_head.seg0_qdata is model.model.embed_tokens.seg0_qdata
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        assert torch.equal(model.generate(ids[:1], **kw), ref.generate(ids[:1], **kw))
    assert model.name_or_path == str(path)


def test_tie_weights_on_a_freshly_compressed_tied_model(tiny_compressed, one_thread):
    model = tiny_compressed("qwen2", pruned=True, tie_word_embeddings=True)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        model.tie_weights()
        assert torch.equal(model(ids).logits, before)


def test_unpacked_tied_embedding_is_still_tied_on_load(tmp_path, one_thread):
    # the plan leaves the tied embedding dense: transformers' own tie must survive the round trip
    model = tiny_model("qwen2", seed=1, tie_word_embeddings=True)
    plan = {u.id: 4 for u in model_units(model, mlp_group=MLP) if u.kind != "embedding"}
    compress(model, plan, config=ApplyConfig(quantizer="rtn", group_size=G, mlp_group=MLP))
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(save_compressed(model, tmp_path / "m"))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    loaded.tie_weights()
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, model(_ids()).logits)


def test_loading_options(folders, monkeypatch, one_thread):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = folders["llama", False, True]
    ids = _ids()
    ref = load_compressed(path).model
    with torch.no_grad():
        want = ref(ids).logits
    half = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu")
    assert half.model.norm.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = half(ids).logits
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype="auto",
                                                       device_map={"": "cpu"},
                                                       output_loading_info=True,
                                                       trust_remote_code=True)
    assert info["missing_keys"] == [] and model.dtype == torch.float32
    sdpa = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    # the folder's config, passed back explicitly, is accepted; a changed one is not
    config = AutoConfig.from_pretrained(path)
    AutoModelForCausalLM.from_pretrained(path, config=config)
    with pytest.raises(ModelError, match=r"config: rms_norm_eps=0\.5 \(saved 1e-06\)"):
        AutoModelForCausalLM.from_pretrained(path, rms_norm_eps=0.5)
    with pytest.raises(ModelError, match=r"device_map: \{'model': 0\}.*valid"):
        AutoModelForCausalLM.from_pretrained(path, device_map={"model": 0})
    with pytest.raises(ModelError, match=r"\['load_in_8bit'\] are not options"):
        AutoModelForCausalLM.from_pretrained(path, load_in_8bit=True)
    with pytest.raises(ModelError, match="dtype: torch.int8"):
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.int8)
    with pytest.raises(ModelError, match="from a config"):
        AutoModelForCausalLM.from_config(config)


def test_hub_repository_is_fetched_then_loaded(folders, monkeypatch, one_thread):
    import huggingface_hub

    from bitsack.hf import BitsackForCausalLM

    calls = []

    def fake_download(repo_id, allow_patterns=None, **hub):
        calls.append((repo_id, allow_patterns, hub))
        return str(folders["qwen2", True, True].parent)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    sub = folders["qwen2", True, True].name
    model = BitsackForCausalLM.from_pretrained("someone/tiny-bitsack", subfolder=sub,
                                               revision="abc123", local_files_only=True)
    assert calls == [("someone/tiny-bitsack", [f"{sub}/*"],
                      {"revision": "abc123", "local_files_only": True})]
    assert model.config.model_type == "qwen2"

    def offline(repo_id, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelError, match="neither a local folder nor a hub repository.*network"):
        BitsackForCausalLM.from_pretrained("someone/missing")


def test_a_concrete_model_class_is_refused(folders):
    from transformers import LlamaForCausalLM

    with pytest.raises(ModelError, match="quant_method: 'bitsack'.*AutoModelForCausalLM"):
        LlamaForCausalLM.from_pretrained(folders["llama", False, True])


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300)


_LOAD = """
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained({path!r})
    print(type(m).__name__, float(m(torch.arange(3, 9)[None]).logits.abs().sum()))
"""


@pytest.mark.parametrize("order", ["bitsack_first", "transformers_first"])
def test_registration_in_a_fresh_interpreter(folders, order):
    path = str(folders["qwen2", True, True])
    with torch.no_grad():
        want = float(load_compressed(path).model(torch.arange(3, 9)[None]).logits.abs().sum())
    if order == "bitsack_first":  # registered when transformers' auto modules load
        code = "import bitsack\n" + textwrap.dedent(_LOAD).format(path=path)
    else:  # transformers' auto classes already loaded: registered by import bitsack
        code = ("import transformers.models.auto.modeling_auto, transformers.quantizers.auto\n"
                "import bitsack\n" + textwrap.dedent(_LOAD).format(path=path))
    out = _run(code)
    assert out.returncode == 0, out.stderr
    name, total = out.stdout.split()
    assert name == "Qwen2ForCausalLM" and float(total) == pytest.approx(want, rel=1e-6)


def test_without_bitsack_transformers_refuses(folders):
    path = str(folders["llama", False, True])
    code = f"""
        import sys
        sys.modules["bitsack"] = None  # bitsack cannot be imported
        from transformers import AutoConfig, AutoModelForCausalLM
        for load in (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained):
            try:
                load({path!r})
            except ValueError as exc:
                print("refused:", "bitsack" in str(exc))
            else:
                print("loaded")
    """
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["refused: True", "refused: True"]


def test_a_failed_registration_warns_and_leaves_transformers_usable(monkeypatch):
    from bitsack import hf_hooks

    monkeypatch.setitem(hf_hooks.WATCHED, "transformers.fake", ("bitsack.hf", "no_such_fn"))
    with pytest.warns(RuntimeWarning, match="could not register with transformers.fake"):
        hf_hooks._register("transformers.fake")


def test_old_folder_loads_with_a_warning(folders, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    old = tmp_path / "old"
    shutil.copytree(folders["llama", True, False], old)
    meta = json.loads((old / "bitsack.json").read_text())
    del meta["files"]
    (old / "bitsack.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="older bitsack.*unverified"):
        model = AutoModelForCausalLM.from_pretrained(old)
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits,
                           load_compressed(folders["llama", True, False]).model(_ids()).logits)


@pytest.mark.parametrize("tied", [True, False])
def test_auto_classes_load_an_embedding_in_token_id_ranges(tmp_path, tied, one_thread):
    # --vocab-groups: the embedding (and an untied head) packed as row segments of their own
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", seed=1, tie_word_embeddings=tied)
    units = model_units(model, mlp_group=MLP, vocab_groups=3)
    plan = {u.id: (2, 3, 4, 8)[i % 4] for i, u in enumerate(units)}
    compress(model, plan, config=ApplyConfig(quantizer="rtn", group_size=G, mlp_group=MLP))
    path = save_compressed(model, tmp_path / "v", tokenizer=tiny_tokenizer())
    loaded = AutoModelForCausalLM.from_pretrained(path)
    emb = loaded.model.embed_tokens
    assert [(s.start, s.stop, s.bits) for s in emb.segments] == \
        [(0, 32, plan["embed.v0"]), (32, 64, plan["embed.v1"]), (64, 128, plan["embed.v2"])]
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
