"""Compressed model folders: save, load, and what is in them.

``save_compressed`` writes ``model.safetensors`` (packed buffers + every other parameter),
``bitsack.json`` (schema version, plan, per-layer dims, segment layout, per-tensor SHA-256) and
the base ``config.json`` — marked so that other loaders refuse the folder (``model_type``
``bitsack``, ``quantization_config``) — and the tokenizer. ``load_compressed`` rebuilds the
packed model and refuses a truncated file, a hash mismatch, a wrong shape or an unknown schema
version.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsack.errors import FormatError, ValidationError
from bitsack.models import get_adapter
from bitsack.models.base import LoadedModel
from bitsack.models.plumbing import PackedWeightModule, set_module

MODEL_SCHEMA = "bitsack.model/v1"


# ------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------

def _packed_modules(model: nn.Module) -> dict[str, nn.Module]:
    from bitsack.kernels.packed import PackedEmbedding, PackedLinear

    return {n: m for n, m in model.named_modules()
            if isinstance(m, (PackedLinear, PackedEmbedding))}


def _describe_packed(model: nn.Module) -> dict[str, dict]:
    from bitsack.kernels.packed import PackedEmbedding

    mods = _packed_modules(model)
    # a tied lm_head shares its segment buffers with the embedding: record it as a tie
    owner: dict[int, str] = {}
    out: dict[str, dict] = {}
    for name, mod in mods.items():
        first = next(iter(mod.buffers()), None)
        key = None if first is None else first.data_ptr()
        entry = {
            "type": "embedding" if isinstance(mod, PackedEmbedding) else "linear",
            "rows": mod.num_embeddings if isinstance(mod, PackedEmbedding) else mod.out_features,
            "cols": mod.embedding_dim if isinstance(mod, PackedEmbedding) else mod.in_features,
            "segments": mod.layout(),
            "bias": getattr(mod, "bias", None) is not None,
            "dtype": str(getattr(mod, "dtype", torch.float32)).replace("torch.", ""),
        }
        parent = name.rpartition(".")[0]
        if parent and isinstance(model.get_submodule(parent), PackedWeightModule):
            entry["wrapped"] = True
        if key is not None and key in owner and entry["type"] == "linear":
            entry["tied_to"] = owner[key]
        elif key is not None:
            owner[key] = name
        out[name] = entry
    return out


def cache_dequantized(model: nn.Module, enabled: bool = True) -> int:
    """Let every packed module keep its dequantized weight (CPU inference speed).

    The cached weight is exactly what each forward would dequantize, so outputs are unchanged;
    memory grows by one float copy per packed matrix. Returns the number of modules set.
    """
    n = 0
    for mod in model.modules():
        if hasattr(mod, "cache_weight"):
            mod.cache_weight = enabled
            n += 1
    return n


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a bitsack compressed model (its ``bitsack.json`` says so)."""
    try:
        meta = json.loads((Path(path) / "bitsack.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("schema") == MODEL_SCHEMA


#: ``model_type`` of a compressed folder's config.json. transformers (and any other loader
#: that reads config.json) refuses a model type it does not know, instead of building the base
#: architecture and initialising every packed weight at random; the base type is kept beside it.
HF_MODEL_TYPE = "bitsack"
HF_BASE_TYPE_KEY = "bitsack_base_model_type"


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None,
                    extra: Mapping[str, Any] | None = None, *, force: bool = False) -> Path:
    """Write a compressed model to ``out_dir`` atomically (a finished dir replaces the old).

    Files: ``model.safetensors`` (packed buffers + every other parameter), ``bitsack.json``
    (schema, plan, dims, packed layout, per-tensor shape / dtype / SHA-256), ``config.json``
    (the base architecture, with ``quantization_config.quant_method = "bitsack"``) and the
    tokenizer's files.

    ``out_dir`` may be new, empty, or a previous bitsack model folder; any other existing
    folder is refused (``force`` replaces it). Temporary folders a killed save left beside
    ``out_dir`` are removed first.

    Raises:
        ValidationError: ``out_dir`` is a file or a non-empty folder of something else.
    """
    from bitsack.io import check_output_dir, remove_stale_siblings, replace_dir, temp_sibling
    from bitsack.kernels.io import dtype_name, save_tensors

    out = Path(out_dir)
    check_output_dir(out, what="bitsack model folder", is_ours=is_model_dir, force=force)
    remove_stale_siblings(out)
    adapter = get_adapter(model)
    layout = _describe_packed(model)
    tied = {n for n, e in layout.items() if "tied_to" in e}
    state = {k: v for k, v in model.state_dict(keep_vars=False).items()
             if not any(k.startswith(t + ".") for t in tied)}
    # transformers' own tie (lm_head.weight is embed.weight) when nothing was packed there
    state = _dedupe_ties(model, state)
    tmp = temp_sibling(out, "tmp")
    try:
        hashes = save_tensors(tmp / "model.safetensors", state)
        meta = {
            "schema": MODEL_SCHEMA,
            "model_type": model.config.model_type,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "plan": getattr(model, "bitsack_plan", {}),
            "apply": getattr(model, "bitsack_apply", {}),
            "dims": adapter.dims(),
            "packed": layout,
            "tensors": {k: {"shape": list(v.shape), "dtype": dtype_name(v.dtype),
                            "sha256": hashes[k]} for k, v in state.items()},
            "packed_bytes": sum(m.nbytes for n, m in _packed_modules(model).items()
                                if n not in tied),
            **dict(extra or {}),
        }
        model.config.save_pretrained(tmp)
        _mark_quantized(tmp / "config.json")
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        (tmp / "bitsack.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _mark_quantized(config_file: Path) -> None:
    """Rewrite a saved config.json so that no loader mistakes the folder for its base model.

    ``model_type`` becomes ``bitsack`` (the base type moves to ``bitsack_base_model_type``) and
    ``quantization_config`` says how the weights are stored; ``base_config`` reverses it.
    """
    cfg = json.loads(config_file.read_text())
    cfg[HF_BASE_TYPE_KEY] = cfg["model_type"]
    cfg["model_type"] = HF_MODEL_TYPE
    cfg["quantization_config"] = {"quant_method": HF_MODEL_TYPE, "format": MODEL_SCHEMA,
                                  "metadata": "bitsack.json"}
    config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def base_config(path: str | os.PathLike):
    """The base architecture's transformers config of a compressed folder (see
    ``_mark_quantized``).

    Raises:
        FormatError: config.json is missing, unreadable, or names no known base model type.
    """
    from transformers import CONFIG_MAPPING

    config_file = Path(path) / "config.json"
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{config_file}: cannot be read ({exc})") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{config_file}: not a JSON object")
    cfg.pop("quantization_config", None)
    base = cfg.pop(HF_BASE_TYPE_KEY, cfg.get("model_type"))
    cfg["model_type"] = base
    if base not in CONFIG_MAPPING:
        raise FormatError(f"{config_file}: {HF_BASE_TYPE_KEY} {base!r} is not a model type "
                          "this transformers knows")
    return CONFIG_MAPPING[base].from_dict(cfg)


def _dedupe_ties(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen and v.shape == state[seen[ptr]].shape and \
                k.endswith(".weight"):
            continue  # transformers re-ties these on load
        if ptr is not None:
            seen[ptr] = k
        out[k] = v
    return out


def read_meta(path: str | os.PathLike) -> dict:
    """``bitsack.json`` of a compressed model dir, schema-checked."""
    path = Path(path)
    meta_file = path / "bitsack.json"
    if not meta_file.is_file():
        raise FormatError(f"{path}: no bitsack.json (not a compressed bitsack model)")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{meta_file}: not valid JSON ({exc})") from None
    if meta.get("schema") != MODEL_SCHEMA:
        raise FormatError(f"{meta_file}: schema {meta.get('schema')!r} is not supported; "
                          f"valid: {MODEL_SCHEMA!r}")
    return meta


def load_compressed(path: str | os.PathLike, device: str = "cpu", backend: str | None = None):
    """Rebuild a compressed model saved by ``save_compressed``.

    Returns:
        ``bitsack.models.LoadedModel`` (``source.kind == "compressed"``).

    Raises:
        FormatError: missing files, unknown schema, truncated file, hash / shape mismatch.
    """
    from transformers import AutoModelForCausalLM

    from bitsack.kernels.io import load_tensors
    from bitsack.kernels.packed import PackedEmbedding, PackedLinear, Segment

    path = Path(path)
    meta = read_meta(path)
    expected = {k: (tuple(v["shape"]), v["dtype"], v["sha256"])
                for k, v in meta["tensors"].items()}
    tensors, _ = load_tensors(path / "model.safetensors", expected, device=device)
    config = base_config(path)
    try:
        from accelerate import init_empty_weights
        ctx = init_empty_weights()
    except ImportError:  # pragma: no cover
        ctx = contextlib.nullcontext()
    kwargs = {}
    if meta.get("attn_implementation"):
        # same attention kernel as when saved, so reloaded outputs are bit-identical
        kwargs["attn_implementation"] = meta["attn_implementation"]
    with ctx:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    get_adapter(model).apply_dims(meta["dims"])
    layout = meta["packed"]
    built: dict[str, nn.Module] = {}
    for name, entry in layout.items():
        if "tied_to" in entry:
            continue
        segs = []
        for i, spec in enumerate(entry["segments"]):
            t = {f: tensors.pop(f"{name}.seg{i}_{f}", None)
                 for f in ("qdata", "scale", "zero", "weight")}
            try:
                segs.append(Segment(spec["axis"], spec["start"], spec["stop"], spec["bits"],
                                    spec["group_size"], tuple(spec["shape"]), **t))
            except ValidationError as exc:
                raise FormatError(f"{path}: module {name!r} segment {i}: {exc}") from None
        if entry["type"] == "embedding":
            mod = PackedEmbedding(entry["rows"], entry["cols"], segs,
                                  dtype=getattr(torch, entry.get("dtype", "float32")))
        else:
            bias = tensors.pop(f"{name}.bias", None) if entry["bias"] else None
            mod = PackedLinear(entry["cols"], entry["rows"], segs, bias=bias,
                               backend=backend or "torch")
        if entry.get("wrapped"):
            parent = name.rpartition(".")[0]
            set_module(model, parent, PackedWeightModule(model.get_submodule(parent), mod))
        else:
            set_module(model, name, mod)
        built[name] = mod
    for name, entry in layout.items():
        if "tied_to" in entry:
            set_module(model, name, built[entry["tied_to"]].as_linear(backend or "torch"))
    missing, _ = model.load_state_dict(tensors, strict=False, assign=True), None
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
                  if p.device.type == "meta"]
    if still_meta:
        # a tied weight transformers would re-tie (lm_head.weight = embed.weight)
        model.tie_weights()
        still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise FormatError(f"{path}: no saved values for {still_meta[:5]}")
    del missing
    model.to(device).eval()
    model.bitsack_plan = meta.get("plan", {})
    model.bitsack_apply = meta.get("apply", {})
    tokenizer = None
    with contextlib.suppress(Exception):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path)
    source = {"kind": "compressed", "spec": str(path), "path": str(path),
              "model_type": meta.get("model_type"), "packed_bytes": meta.get("packed_bytes")}
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)
