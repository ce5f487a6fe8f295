"""Compressed model folders: save, load, and what is in them.

A folder written by ``save_compressed`` holds

- ``model.safetensors``: the packed buffers and every other parameter;
- ``config.json``: the base architecture's config, marked so that other loaders refuse the
  folder (``model_type`` ``bitsack``, the base type beside it, ``quantization_config``;
  ``base_config`` reverses it);
- ``generation_config.json`` (when the model has one) and the tokenizer's files;
- ``bitsack.json``: schema version, plan, per-layer dims, segment layout, per-tensor shape /
  dtype / SHA-256, and under ``files`` the SHA-256 of every other file.

``load_compressed`` rebuilds the packed model and refuses a truncated file, a hash or shape
mismatch, an unknown schema version, and a changed, missing or added file among those that
change the numbers (an edited ``rms_norm_eps`` in config.json runs, silently wrong). Folders
saved before the files were hashed load with a warning. After ``import bitsack``,
``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads them too (``bitsack.hf``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsack.errors import FormatError, ModelError, ValidationError
from bitsack.io import file_sha256
from bitsack.models import get_adapter
from bitsack.models.base import LoadedModel
from bitsack.models.plumbing import PackedWeightModule, set_module, settle_packed_ties

MODEL_SCHEMA = "bitsack.model/v2"
#: Older schemas still read. v1 stored each group's zero point as fp16 (2 bytes); v2 packs the
#: zero points at the segment's bit-width (``kernels.formats.pack_zero``): v1 zeros are packed
#: on load (they are integers on the grid, so nothing changes).
READABLE_SCHEMAS = (MODEL_SCHEMA, "bitsack.model/v1")


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
    return isinstance(meta, dict) and meta.get("schema") in READABLE_SCHEMAS


#: ``model_type`` of a compressed folder's config.json. transformers (and any other loader
#: that reads config.json) refuses a model type it does not know, instead of building the base
#: architecture and initialising every packed weight at random; the base type is kept beside it.
HF_MODEL_TYPE = "bitsack"
HF_BASE_TYPE_KEY = "bitsack_base_model_type"

#: Files with their own hashes in ``bitsack.json`` (``tensors``), or that are the record itself.
_SELF_CHECKED = frozenset({"model.safetensors", "bitsack.json"})
#: The tokenizer's files, as transformers writes and reads them.
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
})
#: Files a loader reads and that change the numbers: ``load_compressed`` refuses one that
#: ``bitsack.json`` does not list (added after the save).
NUMBER_FILES = frozenset({"config.json", "generation_config.json"}) | TOKENIZER_FILES


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None,
                    extra: Mapping[str, Any] | None = None, *, force: bool = False) -> Path:
    """Write a compressed model to ``out_dir`` atomically (a finished dir replaces the old).

    Files: ``model.safetensors`` (packed buffers + every other parameter), ``config.json``
    (the base architecture, marked ``model_type: bitsack`` with ``quantization_config``),
    ``generation_config.json`` (when the model has one), the tokenizer's files, and
    ``bitsack.json`` (schema, plan, dims, packed layout, per-tensor shape / dtype / SHA-256,
    and the SHA-256 of each of the other files under ``files``).

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
        model.config.save_pretrained(tmp)
        _mark_quantized(tmp / "config.json")
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
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
            "files": _hash_files(tmp),
            "packed_bytes": sum(m.nbytes for n, m in _packed_modules(model).items()
                                if n not in tied),
            **dict(extra or {}),
        }
        (tmp / "bitsack.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _hash_files(folder: Path) -> dict[str, dict]:
    """``{name: {sha256, bytes}}`` of the folder's files other than the tensors and the record.

    Only files directly in the folder: transformers writes configs and tokenizers there.
    """
    out = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name not in _SELF_CHECKED:
            out[f.name] = {"sha256": file_sha256(f), "bytes": f.stat().st_size}
    return out


def verify_files(path: str | os.PathLike, meta: Mapping[str, Any]) -> set[str] | None:
    """Check the files ``bitsack.json`` lists under ``files`` against their SHA-256.

    Returns:
        The listed file names, or None for a folder saved before files were hashed (it loads
        with a ``UserWarning``: its config and tokenizer are unverified).

    Raises:
        FormatError: a listed file is missing or changed, or a file that changes the numbers
            (``NUMBER_FILES``) is present but not listed (added after the save); the message
            names the file.
    """
    path = Path(path)
    files = meta.get("files")
    if files is None:
        warnings.warn(f"{path}: saved by an older bitsack that did not hash config.json, "
                      "generation_config.json and the tokenizer; they are loaded unverified. "
                      "Save the model again to record their hashes.", UserWarning, stacklevel=3)
        return None
    record = path / "bitsack.json"
    if not isinstance(files, dict):
        raise FormatError(f"{record}: files is {type(files).__name__}; valid: an object "
                          "mapping file names to {sha256, bytes}")
    for name, entry in sorted(files.items()):
        if Path(name).name != name or name in ("", ".", ".."):
            raise FormatError(f"{record}: files[{name!r}] is not a plain file name in the "
                              "folder")
        want = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(want, str):
            raise FormatError(f"{record}: files[{name!r}].sha256 is {want!r}; valid: a hex "
                              "SHA-256")
        f = path / name
        if not f.is_file():
            raise FormatError(f"{f}: listed in bitsack.json but missing; restore it from the "
                              "original save")
        got = file_sha256(f)
        if got != want:
            raise FormatError(f"{f}: SHA-256 {got[:16]}… differs from {want[:16]}… recorded in "
                              "bitsack.json: the file changed after the save, and it changes "
                              "the model's numbers; restore it from the original save")
    for f in sorted(path.iterdir()):
        if f.name in NUMBER_FILES and f.name not in files:
            raise FormatError(f"{f}: not listed in bitsack.json (added after the save), and it "
                              "would change the model's numbers; remove it or save the model "
                              "again")
    return set(files)


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
    config_file = Path(path) / "config.json"
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{config_file}: cannot be read ({exc})") from None
    return base_config_from_dict(cfg, str(config_file))


def base_config_from_dict(cfg: Mapping[str, Any], where: str = "config.json"):
    """The base architecture's config from a marked config dict (``bitsack.hf.BitsackConfig``
    and ``base_config`` share this).

    Raises:
        FormatError: ``cfg`` is not a dict or names no base model type transformers knows.
    """
    from transformers import CONFIG_MAPPING

    if not isinstance(cfg, Mapping):
        raise FormatError(f"{where}: not a JSON object")
    cfg = dict(cfg)
    cfg.pop("quantization_config", None)
    base = cfg.pop(HF_BASE_TYPE_KEY, cfg.get("model_type"))
    if base == HF_MODEL_TYPE or base not in CONFIG_MAPPING:
        raise FormatError(f"{where}: {HF_BASE_TYPE_KEY} {base!r} is not a model type this "
                          "transformers knows")
    cfg["model_type"] = base
    return CONFIG_MAPPING[base].from_dict(cfg)


def bind_save(model: nn.Module) -> nn.Module:
    """Make ``model.save_pretrained(folder)`` write a compressed folder (``save_compressed``).

    transformers' own ``save_pretrained`` would write the packed buffers under names no loader
    expects, and the base config: a folder that transformers reloads with every packed weight
    initialised at random. A packed model saves the one way that round-trips.
    """
    import types

    def save_pretrained(self, save_directory, *args, **kwargs):
        if args or kwargs.get("push_to_hub"):
            raise ValidationError("save_pretrained", f"{args or kwargs!r}; a compressed model "
                                  "saves with bitsack.checkpoint.save_compressed(model, folder) "
                                  "(no positional options, no push_to_hub)")
        return save_compressed(self, save_directory, tokenizer=kwargs.get("tokenizer"),
                               force=bool(kwargs.get("force", False)))

    model.save_pretrained = types.MethodType(save_pretrained, model)
    return model


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
    if not isinstance(meta, dict) or meta.get("schema") not in READABLE_SCHEMAS:
        got = meta.get("schema") if isinstance(meta, dict) else type(meta).__name__
        raise FormatError(f"{meta_file}: schema {got!r} is not supported; "
                          f"valid: {' or '.join(map(repr, READABLE_SCHEMAS))}")
    return meta


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _load_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ModelError(f"dtype: {dtype!r} is not supported for a compressed model; valid: None or "
                     f"'auto' (as saved), {', '.join(_DTYPES)}")


def load_compressed(path: str | os.PathLike, device: str = "cpu", backend: str | None = None,
                    *, dtype: Any = None, attn_implementation: str | None = None
                    ) -> LoadedModel:
    """Rebuild a compressed model saved by ``save_compressed``.

    Args:
        path: the folder.
        device: where the model is placed.
        backend: kernel backend of the packed modules (default ``torch``).
        dtype: None or ``"auto"`` (the dtypes as saved), or float32 / float16 / bfloat16 for
            the unpacked parameters (norms, biases) and the embeddings' output; the packed
            weights are unchanged and packed layers compute in their input's dtype.
        attn_implementation: transformers attention implementation (default: as saved, so
            reloaded outputs are bit-identical).

    Returns:
        ``bitsack.models.LoadedModel`` (``source.kind == "compressed"``); ``tokenizer`` is None
        when the folder holds no tokenizer files.

    Raises:
        FormatError: missing files, unknown schema, truncated file, hash / shape mismatch, a
            changed or added config / generation config / tokenizer file, a tokenizer that
            cannot be loaded.
        ModelError: an unsupported ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    from bitsack.kernels.formats import pack_zero
    from bitsack.kernels.io import load_tensors
    from bitsack.kernels.packed import PackedEmbedding, PackedLinear, Segment

    path = Path(path)
    cast = _load_dtype(dtype)
    meta = read_meta(path)
    listed = verify_files(path, meta)
    expected = {k: (tuple(v["shape"]), v["dtype"], v["sha256"])
                for k, v in meta["tensors"].items()}
    tensors, _ = load_tensors(path / "model.safetensors", expected, device=device)
    legacy_zeros = meta["schema"] == "bitsack.model/v1"
    config = base_config(path)
    try:
        from accelerate import init_empty_weights
        ctx = init_empty_weights()
    except ImportError:  # pragma: no cover
        ctx = contextlib.nullcontext()
    kwargs = {}
    attn = attn_implementation or meta.get("attn_implementation")
    if attn:
        # same attention kernel as when saved, so reloaded outputs are bit-identical
        kwargs["attn_implementation"] = attn
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
                 for f in ("qdata", "scale", "zero", "weight", "scale_codes", "step")}
            try:
                if legacy_zeros and t["zero"] is not None:
                    t["zero"] = pack_zero(t["zero"], spec["bits"])
                segs.append(Segment(spec["axis"], spec["start"], spec["stop"], spec["bits"],
                                    spec["group_size"], tuple(spec["shape"]), **t,
                                    scale_bits=spec.get("scale_bits")))
            except ValidationError as exc:
                raise FormatError(f"{path}: module {name!r} segment {i}: {exc}") from None
        if entry["type"] == "embedding":
            mod = PackedEmbedding(entry["rows"], entry["cols"], segs,
                                  dtype=getattr(torch, entry.get("dtype", "float32")))
        else:
            bias = tensors.pop(f"{name}.bias", None) if entry["bias"] else None
            mod = PackedLinear(entry["cols"], entry["rows"], segs, bias=bias,
                               backend=backend or "cpu")
        if entry.get("wrapped"):
            parent = name.rpartition(".")[0]
            set_module(model, parent, PackedWeightModule(model.get_submodule(parent), mod))
        else:
            set_module(model, name, mod)
        built[name] = mod
    for name, entry in layout.items():
        if "tied_to" in entry:
            set_module(model, name, built[entry["tied_to"]].as_linear(backend or "cpu"))
    model.load_state_dict(tensors, strict=False, assign=True)
    # packed embeddings have no .weight to tie; their tied heads share their buffers already
    settle_packed_ties(model)
    bind_save(model)
    if _meta_tensors(model):
        # a tied weight transformers re-ties (lm_head.weight = embed.weight), nothing packed
        model.tie_weights()
    still_meta = _meta_tensors(model)
    if still_meta:
        raise FormatError(f"{path}: no saved values for {still_meta[:5]}")
    model.to(device).eval()
    if cast is not None:
        _cast_unpacked(model, cast)
    if (path / "generation_config.json").is_file():
        model.generation_config = _generation_config(path)
    model.config._name_or_path = model.name_or_path = str(path)
    model.bitsack_plan = meta.get("plan", {})
    model.bitsack_apply = meta.get("apply", {})
    tokenizer = _load_tokenizer(path, listed)
    source = {"kind": "compressed", "spec": str(path), "path": str(path),
              "model_type": meta.get("model_type"), "packed_bytes": meta.get("packed_bytes")}
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def _meta_tensors(model: nn.Module) -> list[str]:
    return [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
            if p.device.type == "meta"]


def _cast_unpacked(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters (norms, biases, unpacked matrices) to ``dtype``; packed embeddings return
    ``dtype``. Packed buffers keep their format, and buffers such as rotary frequencies stay as
    transformers built them."""
    from bitsack.kernels.packed import PackedEmbedding

    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    for mod in model.modules():
        if isinstance(mod, PackedEmbedding):
            mod.dtype = dtype
    model.config.dtype = dtype


def _generation_config(path: Path):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise FormatError(f"{path / 'generation_config.json'}: cannot be loaded ({exc})") from exc


def _load_tokenizer(path: Path, listed: set[str] | None):
    """The folder's tokenizer, None when it has no tokenizer files.

    Raises:
        FormatError: tokenizer files are there but transformers cannot load them (the message
            names them and transformers' error).
    """
    present = listed if listed is not None else {f.name for f in path.iterdir() if f.is_file()}
    names = sorted(present & TOKENIZER_FILES)
    if not names:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many kinds here; name them all one way
        raise FormatError(f"{path}: the tokenizer ({', '.join(names)}) cannot be loaded: "
                          f"{type(exc).__name__}: {exc}") from exc
