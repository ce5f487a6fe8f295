"""Compressed folders in transformers: ``AutoConfig`` and ``AutoModelForCausalLM``.

After ``import bitsack``::

    model = transformers.AutoModelForCausalLM.from_pretrained("out/model")  # packed, pruned
    config = transformers.AutoConfig.from_pretrained("out/model")           # BitsackConfig

A folder's config.json says ``model_type: "bitsack"``. ``BitsackConfig`` is registered for it
in ``AutoConfig``, and ``BitsackForCausalLM`` for that config in ``AutoModelForCausalLM``
(``bitsack.hf_hooks`` does both when transformers' auto modules load). ``BitsackForCausalLM``
is a loader, not a model: its ``from_pretrained`` is ``bitsack.checkpoint.load_compressed``,
the one loader of the format (it checks every hash, replays the pruned shapes, builds the
packed layers) and returns the base architecture's own class (``LlamaForCausalLM``, ...) with
packed layers in place, so ``generate``, ``tie_weights`` and tools built on transformers work
unchanged. Without bitsack, transformers refuses the folder ("model type bitsack is not
recognized").

Why not transformers' quantizer hooks (``register_quantizer`` / ``HfQuantizer``) for the
loading itself: they run inside ``PreTrainedModel.from_pretrained`` after the model is built
from the config at full size, so they would have to replay the surgery and swap in packed
modules before transformers' own weight loading, tie logic and dtype casts run over buffers
they do not expect (uint32 words, fp16 scales), and the per-tensor and per-file hashes would
not be checked — a second, partial loader for one format. A quantizer is registered for
``quant_method: bitsack`` nevertheless, only to refuse the one route that bypasses the auto
classes (``bitsack.hf_quantizer``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers.configuration_utils import PreTrainedConfig

from bitsack.errors import ModelError

MODEL_TYPE = "bitsack"  # == bitsack.checkpoint.HF_MODEL_TYPE (kept free of torch here)

#: config keys that may differ between a folder's config.json and the config transformers
#: hands to ``from_pretrained`` without changing the numbers (``dtype`` and the attention
#: implementation are loading options, honoured separately).
_LOADING_KEYS = frozenset({"_name_or_path", "dtype", "torch_dtype", "transformers_version",
                           "_attn_implementation_internal", "_attn_implementation_autoset",
                           "_commit_hash", "attn_implementation"})
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")
#: ``from_pretrained`` arguments that do not apply to a bitsack folder and change nothing.
_IGNORED_KWARGS = frozenset({"trust_remote_code", "_from_auto", "_from_pipeline",
                             "adapter_kwargs", "low_cpu_mem_usage", "use_safetensors",
                             "code_revision", "_commit_hash", "weights_only",
                             "key_mapping", "offload_state_dict"})
#: ``from_pretrained`` arguments accepted only at their "nothing" value.
_MUST_BE_NONE = ("quantization_config", "gguf_file", "state_dict", "tp_plan", "max_memory",
                 "offload_folder")


class BitsackConfig(PreTrainedConfig):
    """The config of a bitsack folder as transformers reads it (``model_type: bitsack``).

    Holds every key of the folder's config.json: the base architecture's fields, the base type
    under ``bitsack_base_model_type`` and ``quantization_config``. ``base_config()`` gives the
    base architecture's config, which the loaded model carries as ``model.config``.
    """

    model_type = MODEL_TYPE

    def base_config(self):
        """The base architecture's transformers config (e.g. a ``LlamaConfig``).

        Raises:
            FormatError: the config names no base model type transformers knows.
        """
        from bitsack.models.checkpoint import base_config_from_dict

        return base_config_from_dict(self.to_dict(), f"{self.name_or_path or 'config'}")


class BitsackForCausalLM:
    """``AutoModelForCausalLM``'s entry for ``BitsackConfig``: loads a folder with
    ``bitsack.checkpoint.load_compressed`` and returns that model (the base architecture's
    class with packed layers). There is nothing to build from a config alone."""

    config_class = BitsackConfig

    def __init__(self, *args: Any, **kwargs: Any):
        raise ModelError("BitsackForCausalLM: a bitsack model cannot be built from a config "
                         "(its weights are the packed tensors of a folder); valid: "
                         "AutoModelForCausalLM.from_pretrained(folder)")

    @classmethod
    def _from_config(cls, config: Any, **kwargs: Any):
        cls()  # raises: explains that a folder is needed

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        config: BitsackConfig | None = None, **kwargs: Any):
        """Load a bitsack folder (local, or a hub repository) as its packed model.

        Args:
            pretrained_model_name_or_path: a folder written by ``save_compressed``, or a hub
                repository id holding one.
            *model_args: not supported (a bitsack model is built from its folder).
            config: None, or the folder's own ``BitsackConfig`` (as ``AutoModelForCausalLM``
                passes it); a config whose fields differ is refused — the folder's hashes
                cover its config, and a changed one changes the numbers.
            **kwargs: ``dtype`` / ``torch_dtype`` (None, "auto", float32, float16, bfloat16),
                ``device_map`` (None, a device, ``{"": device}`` or "auto" = one GPU if there
                is one), ``attn_implementation``, ``output_loading_info``, ``subfolder`` and
                the hub options (``revision``, ``cache_dir``, ``token``,
                ``local_files_only``, ``force_download``, ``proxies``). Options that do not
                apply to a bitsack folder (``trust_remote_code``, ``low_cpu_mem_usage``, ...)
                are ignored; any other is refused.

        Returns:
            The model (``model.config`` is the base architecture's config), or ``(model,
            loading_info)`` with ``output_loading_info=True``.

        Raises:
            ModelError: an unsupported option, a changed config, a folder that cannot be found.
            FormatError: the folder fails a check of ``load_compressed``.
        """
        from bitsack.models.checkpoint import load_compressed

        if model_args:
            raise ModelError(f"from_pretrained: positional model arguments {model_args!r} are "
                             "not supported for a bitsack folder; valid: none")
        hub = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
        folder = _resolve_folder(pretrained_model_name_or_path, kwargs.pop("subfolder", None),
                                 hub)
        dtype = kwargs.pop("dtype", None)
        torch_dtype = kwargs.pop("torch_dtype", None)
        if dtype is None:
            dtype = torch_dtype
        device = _device(kwargs.pop("device_map", None))
        attn = kwargs.pop("attn_implementation", None)
        info = kwargs.pop("output_loading_info", False)
        for name in _MUST_BE_NONE:
            if kwargs.pop(name, None) is not None:
                raise ModelError(f"from_pretrained: {name} does not apply to a bitsack folder "
                                 "(its weights are already packed); valid: None")
        unknown = sorted(k for k in kwargs if k not in _IGNORED_KWARGS)
        if unknown:
            raise ModelError(f"from_pretrained: {unknown} are not options for a bitsack folder; "
                             "valid: dtype, device_map, attn_implementation, "
                             f"output_loading_info, subfolder, {', '.join(_HUB_KWARGS)}")
        if config is not None:
            attn = attn or getattr(config, "_attn_implementation_internal", None)
            _check_same_config(config, folder)
        model = load_compressed(folder, device=device, dtype=dtype,
                                attn_implementation=attn).model
        model.config._name_or_path = model.name_or_path = os.fspath(pretrained_model_name_or_path)
        if info:
            return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                           "error_msgs": []}
        return model


def _resolve_folder(name: str | os.PathLike, subfolder: str | None, hub: dict) -> Path:
    """A local folder as is; a hub repository id downloaded (or found in the cache)."""
    local = Path(name)
    if local.is_dir():
        return local / subfolder if subfolder else local
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(str(name), allow_patterns=[f"{subfolder}/*"] if subfolder
                                 else None, **hub)
    except Exception as exc:  # the hub client raises many kinds; one message for all
        raise ModelError(f"model: {os.fspath(name)!r} is neither a local folder nor a hub "
                         f"repository that can be fetched ({type(exc).__name__}: {exc})") from exc
    return Path(root) / subfolder if subfolder else Path(root)


def _device(device_map: Any) -> str:
    """One device from transformers' ``device_map`` (bitsack models live on one device)."""
    import torch

    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if device_map is None:
        return "cpu"
    if device_map == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return f"cuda:{device_map}"
    if isinstance(device_map, (str, torch.device)):
        try:
            return str(torch.device(device_map))
        except RuntimeError:
            pass
    raise ModelError(f"device_map: {device_map!r} is not supported for a bitsack folder; valid: "
                     "None, 'auto', a device ('cpu', 'cuda:0', 0) or {'': device} (the model is "
                     "placed on one device)")


def _check_same_config(config: Any, folder: Path) -> None:
    """Refuse a ``config`` whose fields differ from the folder's config.json."""
    if not isinstance(config, PreTrainedConfig):
        raise ModelError(f"config: {type(config).__name__} is not a transformers config; valid: "
                         "None or the folder's BitsackConfig")
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # load_compressed names the missing or broken file
    given = config.to_dict()
    ours = type(config).from_dict(saved).to_dict() if isinstance(config, BitsackConfig) else saved
    changed = sorted(k for k in set(given) | set(ours)
                     if k not in _LOADING_KEYS and given.get(k) != ours.get(k))
    if changed:
        detail = ", ".join(f"{k}={given.get(k)!r} (saved {ours.get(k)!r})" for k in changed[:4])
        raise ModelError(f"config: {detail} differ from {folder / 'config.json'}; a compressed "
                         "model runs with the config it was saved with; valid: no config "
                         "overrides")


def register_config() -> None:
    """``AutoConfig`` knows model type ``bitsack`` (idempotent)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    CONFIG_MAPPING.register(MODEL_TYPE, BitsackConfig, exist_ok=True)


def register_model() -> None:
    """``AutoModelForCausalLM`` loads ``BitsackConfig`` folders (idempotent)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING.register(BitsackConfig, BitsackForCausalLM, exist_ok=True)
