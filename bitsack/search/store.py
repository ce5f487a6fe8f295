"""A variant store: every weight matrix of a model quantized once at every option of a menu.

A plan is then *stitched* — each unit's rows or columns copied from the variant of its choice —
and measured, without running GPTQ inside the search (EvoPress keeps such a database of
compressed layers; Sieberling et al. 2025).

How the variants are made: one sequential GPTQ walk of the model on the layer engine
(``bitsack.engine``), exactly as ``bitsack.compress`` applies a *uniform* plan (the
``incumbent`` choice everywhere: true-sequential stages, Hessians from the already-quantized
layers before), except that at every matrix GPTQ also quantizes the matrix at every other menu
choice with the same Hessian. So the stored variants of the incumbent *are* the uniform
compressed model, and every other variant is what GPTQ makes of that matrix in the uniform
model's context (EvoPress' ``calibration_bitwidth``: Hessians from a model already quantized
at the target level rather than from the full-precision one).

Stitching is exact per matrix where units own rows (q/k/v head groups, gate/up channels,
embeddings: GPTQ treats rows independently) and approximate where units own columns (o_proj,
down_proj: GPTQ's error compensation crosses column ranges) and wherever the upstream layers of
a plan differ from the uniform model the Hessians came from. The search therefore re-measures
its final plan after the real sequential apply.

On disk (``root``): one safetensors file per layer (packed codes, scales, zeros of every
variant) and ``store.json`` naming what was built, so an interrupted build resumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitsack.errors import FormatError, ValidationError
from bitsack.models import get_adapter
from bitsack.models.plumbing import dense_weight, is_conv1d, output_name, tied_pairs
from bitsack.plan import FP16, Choice
from bitsack.search.menu import Menu

STORE_SCHEMA = "bitsack.store/v1"


@dataclass(frozen=True)
class StoreConfig:
    """How variants are quantized (the same knobs as ``bitsack.compress.ApplyConfig``)."""

    quantizer: str = "gptq"
    damp: float = 0.01
    act_order: bool = True
    batch_size: int = 8
    true_sequential: bool = True


def write_weight(mod: nn.Module, weight: torch.Tensor) -> None:
    """Overwrite a linear's weight with ``weight`` (``[out, in]``, any float dtype)."""
    target = mod.weight
    w = weight.t() if is_conv1d(mod) else weight
    with torch.no_grad():
        target.data.copy_(w.to(dtype=target.dtype, device=target.device))


def quantize_choices(weight: torch.Tensor, hessian, choices: Iterable[Choice],
                     cfg: StoreConfig) -> dict[Choice, Any]:
    """``weight`` ([out, in] float32) quantized at each choice: a ``QuantizedTensor`` per
    choice (fp16 weights for ``b16``). GPTQ with ``hessian`` (a ``Hessian``), RTN without.

    GPTQ treats rows independently, so all choices of a matrix are one GPTQ run over the
    choices' copies stacked along the rows (one Cholesky, one column loop), split into
    chunks that bound the float64 working set.
    """
    from bitsack.kernels.quantizers import GPTQ, rtn_quantize

    choices = list(choices)
    out: dict[Choice, Any] = {}
    quant = [c for c in choices if c != FP16]
    if FP16 in choices:
        out[FP16] = weight.to(torch.float16)
    if hessian is None or cfg.quantizer == "rtn":
        for c in quant:
            out[c] = rtn_quantize(weight, c.bits, c.group_size)
        return out
    gptq = GPTQ.from_hessian(hessian.matrix(), nsamples=hessian.n)
    rows, cols = weight.shape
    if not hasattr(gptq, "quantize_segments"):  # until segment GPTQ lands: one call a choice
        for c in quant:
            out[c] = gptq.quantize(weight, c.bits, c.group_size, damp=cfg.damp,
                                   act_order=cfg.act_order).to_quantized()
        return out
    from bitsack.kernels.quantizers import SegmentSpec

    per_call = max(1, (1 << 24) // max(1, rows * cols))  # ≈128 MiB of float64 per copy set
    for k in range(0, len(quant), per_call):
        batch = quant[k:k + per_call]
        stacked = weight.repeat(len(batch), 1)
        specs = [SegmentSpec(0, j * rows, (j + 1) * rows, c.bits, c.group_size)
                 for j, c in enumerate(batch)]
        res = gptq.quantize_segments(stacked, specs, damp=cfg.damp, act_order=cfg.act_order)
        out.update(zip(batch, res.parts, strict=True))
    return out


def _dequant(v: Any) -> torch.Tensor:
    from bitsack.kernels.quantizers import QuantizedTensor

    if isinstance(v, QuantizedTensor):
        return v.dequantize(torch.float32)
    return v.to(torch.float32)


class VariantStore:
    """Quantized variants per (matrix, choice); see module docstring.

    Attributes:
        menu: the choices stored.
        incumbent: the uniform choice whose sequential walk made the Hessians.
        variants: module name -> choice -> ``QuantizedTensor`` (fp16 tensor for ``b16``).
        tied: embedding module name -> head module name, for tied weights (stored once,
            under the embedding's name).
    """

    def __init__(self, menu: Menu, incumbent: Choice, root: Path | None = None):
        self.menu = menu
        self.incumbent = incumbent
        self.root = Path(root) if root is not None else None
        self.variants: dict[str, dict[Choice, Any]] = {}
        self.tied: dict[str, str] = {}
        self._dense: dict[tuple[str, Choice], torch.Tensor] = {}

    # ---- reading ----------------------------------------------------------------------
    def dense(self, name: str, choice: Choice) -> torch.Tensor:
        """The variant ``choice`` of module ``name`` dequantized, float32 ``[out, in]``
        (zeros for prune); cached while the store lives."""
        key = (name, choice)
        if key not in self._dense:
            if choice.pruned:
                ref = next(iter(self.variants[name].values()))
                self._dense[key] = torch.zeros(tuple(ref.shape), dtype=torch.float32)
            else:
                if choice not in self.variants.get(name, {}):
                    raise ValidationError("choice", f"{choice} of {name!r} is not in the store "
                                          f"(menu {list(self.menu.option_ids)})")
                self._dense[key] = _dequant(self.variants[name][choice])
        return self._dense[key]

    def nbytes(self) -> int:
        """Bytes held by the quantized variants (codes as uint8, scales, zeros)."""
        total = 0
        for per in self.variants.values():
            for v in per.values():
                ts = [v] if isinstance(v, torch.Tensor) else [v.codes, v.scale, v.zero]
                total += sum(t.numel() * t.element_size() for t in ts)
        return total

    # ---- building ---------------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, menu: Menu, incumbent: Choice,
              calib_tokens: torch.Tensor | None, cfg: StoreConfig | None = None,
              root: str | os.PathLike | None = None, *, key: Any = None,
              progress: Callable[[int, int], None] | None = None) -> VariantStore:
        """Quantize every linear of ``model`` at every menu choice (see module docstring).

        ``model`` is left as the uniform ``incumbent`` plan would make it (dense weights
        holding the incumbent's dequantized values), which is where a search starts.

        Args:
            model: a supported causal LM, unpruned, full precision.
            menu: the choices to store.
            incumbent: the uniform choice of the walk (a menu choice).
            calib_tokens: GPTQ calibration tokens (None with ``cfg.quantizer == "rtn"``).
            cfg: quantizer knobs.
            root: a folder to persist the store in (per layer; resumed when ``key`` — a
                JSON-able description of every input — matches ``store.json``).
            key: what the stored files were built from.
            progress: ``(layers done, layers)`` after every layer.
        """
        from bitsack.engine import LayerEngine

        cfg = cfg or StoreConfig()
        menu.index(incumbent)
        if cfg.quantizer == "gptq" and calib_tokens is None:
            raise ValidationError("calib_tokens", "None; gptq needs calibration tokens")
        store = cls(menu, incumbent, Path(root) if root is not None else None)
        if store.root is not None:
            store._open(key)
        adapter = get_adapter(model)
        choices = menu.steps
        tied = tied_pairs(model)
        store.tied = dict(tied)
        head = output_name(model)
        n_layers = len(adapter.layers())
        tick = progress or (lambda done, total: None)

        # input embeddings not tied to the head: RTN first, as compress does
        for name, mod in model.named_modules():
            if mod is model.get_input_embeddings() and name not in tied:
                store._add(name, quantize_choices(mod.weight.detach().float(), None, choices,
                                                  StoreConfig(quantizer="rtn")))
                with torch.no_grad():
                    mod.weight.data.copy_(store.dense(name, incumbent).to(mod.weight.dtype))
        engine = None
        if cfg.quantizer == "gptq":
            engine = LayerEngine(model, calib_tokens, batch_size=cfg.batch_size)
        for i in range(n_layers):
            prefix = adapter.layer_prefix(i)
            mods = {prefix + rel: m for rel, m in adapter.linear_modules(i).items()}
            if not store._load_layer(i):
                if engine is None:
                    for name, mod in mods.items():
                        store._add(name, quantize_choices(dense_weight(mod), None, choices,
                                                          cfg))
                        write_weight(mod, store.dense(name, incumbent))
                else:
                    stages = engine.stages(mods) if cfg.true_sequential else [list(mods)]
                    for stage in stages:
                        hess = engine.hessians({n: mods[n] for n in stage})
                        for name in stage:
                            store._add(name, quantize_choices(dense_weight(mods[name]),
                                                              hess[name], choices, cfg))
                            write_weight(mods[name], store.dense(name, incumbent))
                store._save_layer(i, list(mods))
            else:
                for name, mod in mods.items():
                    write_weight(mod, store.dense(name, incumbent))
            if engine is not None:
                engine.advance()
            tick(i + 1, n_layers + 1)
        # the head (a tied embedding is stored under the embedding's name)
        heads = {emb: hd for emb, hd in tied.items()} or ({head: head} if head else {})
        if not store._load_layer(n_layers):
            for name, head_name in heads.items():
                mod = model.get_submodule(name)
                hmod = model.get_submodule(head_name)
                hess = engine.head_hessian(hmod) if engine is not None else None
                store._add(name, quantize_choices(mod.weight.detach().float(), hess, choices,
                                                  cfg))
            store._save_layer(n_layers, list(heads))
        for name in heads:
            mod = model.get_submodule(name)
            with torch.no_grad():
                mod.weight.data.copy_(store.dense(name, incumbent).to(mod.weight.dtype))
        tick(n_layers + 1, n_layers + 1)
        return store

    def _add(self, name: str, per_choice: dict[Choice, Any]) -> None:
        self.variants[name] = per_choice
        for key in [k for k in self._dense if k[0] == name]:
            del self._dense[key]

    # ---- persistence ------------------------------------------------------------------
    def _open(self, key: Any) -> None:
        assert self.root is not None
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self.root / "store.json"
        want = {"schema": STORE_SCHEMA, "key": key,
                "menu": list(self.menu.option_ids), "incumbent": self.incumbent.option_id}
        if manifest.is_file():
            try:
                have = json.loads(manifest.read_text())
            except ValueError:
                have = None
            if have == want:
                return
        for f in self.root.glob("layer_*.safetensors"):  # built from other inputs: stale
            f.unlink()
        from bitsack.io import write_json

        write_json(manifest, want)

    def _file(self, i: int) -> Path | None:
        return None if self.root is None else self.root / f"layer_{i:04d}.safetensors"

    def _save_layer(self, i: int, names: list[str]) -> None:
        path = self._file(i)
        if path is None:
            return
        from safetensors.torch import save_file

        from bitsack.io import atomic_write_path
        from bitsack.kernels.formats import pack

        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            for c, v in self.variants[name].items():
                k = f"{name}|{c.option_id}"
                if isinstance(v, torch.Tensor):
                    tensors[k + "|weight"] = v.contiguous()
                else:
                    tensors[k + "|qdata"] = pack(v.codes.to(torch.int64), v.bits).view(
                        torch.int32).contiguous()
                    tensors[k + "|scale"] = v.scale.contiguous()
                    tensors[k + "|zero"] = v.zero.contiguous()
                    tensors[k + "|shape"] = torch.tensor(list(v.codes.shape),
                                                         dtype=torch.int64)
        atomic_write_path(path, lambda tmp: save_file(tensors, tmp))

    def _load_layer(self, i: int) -> bool:
        path = self._file(i)
        if path is None or not path.is_file():
            return False
        from safetensors.torch import load_file

        from bitsack.kernels.formats import unpack_torch
        from bitsack.kernels.quantizers import QuantizedTensor
        from bitsack.plan import parse_choice

        try:
            raw = load_file(str(path))
        except Exception as exc:  # a truncated or foreign file: rebuild this layer
            raise FormatError(f"{path}: not a readable store layer ({exc}); delete it to "
                              "rebuild") from None
        found: dict[str, dict[Choice, Any]] = {}
        for k in sorted({k.rsplit("|", 1)[0] for k in raw}):
            name, oid = k.split("|")
            c = parse_choice(oid, 64, "store")
            if f"{k}|weight" in raw:
                v: Any = raw[f"{k}|weight"]
            else:
                rows, cols = raw[f"{k}|shape"].tolist()
                codes = unpack_torch(raw[f"{k}|qdata"].view(torch.uint32), c.bits, cols)
                v = QuantizedTensor(codes.to(torch.uint8), raw[f"{k}|scale"],
                                    raw[f"{k}|zero"], c.bits, c.group_size)
            found.setdefault(name, {})[c] = v
        for name, per in found.items():
            self._add(name, per)
        return True
