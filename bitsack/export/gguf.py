"""Export to GGUF (llama.cpp): per-tensor ggml types, arch ``llama`` or ``deci``.

**Tensor types.** Every packed matrix is first one grid (``bitsack.export.common``), then
written block by block in the ggml type of fewest bytes that holds it exactly
(``bitsack.export.ggml_blocks``; min-max grids with fp16 scales: Q4_0 for 1–3 bits, Q4_1
for 4, Q5_1 for 5, Q8_0 for 6–8; symmetric grids (``--grid sym…``): Q4_0 / Q5_0 for 4 / 5
bits, and with scale codes on rows of whole 256-weight super-blocks the K-quants Q2_K (2
bits, ``--scale-bits 4``), Q3_K (3 bits, ≤ 5), Q6_K (6 bits, or any ≤ 5-bit grid in groups
of 16); F16 for 16 — of which packed folders, 1–4 and 8 bits, reach all but Q5_0 and Q5_1;
the table of mappings and their errors is there). Norms are F32; other unpacked weights keep
their dtype (F32 / F16).

**Architectures.** An unpruned model (a bits-only plan; bitsack's consistent permutation of
heads and channels changes no output) is written as arch ``llama``, which llama.cpp and
transformers' ``gguf_file=`` loader both read. A pruned model is written as arch ``deci``
(DeciLM / Nemotron-NAS): ``attention.head_count``, ``attention.head_count_kv`` and
``feed_forward_length`` become per-layer arrays, and llama.cpp sizes each layer from them
(``src/models/deci.cpp``); a layer with no heads left is attention-free (``n_head = 0``: no
attention tensors), a layer with no MLP channels left FFN-free (``n_ff = 0``). llama.cpp's
``deci`` graph drops the attention output of a layer that keeps attention but has
``n_ff = 0`` (``if (n_ff == 0) continue;`` skips ``inpL = cur``), so such a layer gets a
zero FFN of 32 channels instead (F16 zeros: its output is exactly 0). Its head size is read
from layer 0, so a model whose layer 0 lost all its heads is refused.

Q and K rows are permuted per head from transformers' rotate-half RoPE order to llama.cpp's
pairwise order (``NORM`` rope of ``llama`` / ``deci``): GGUF row ``h·d + 2i + j`` is
transformers row ``h·d + j·d/2 + i`` — rows carry their own groups, so this is exact.

**Tokenizer.** ``tokenizer.*`` metadata is copied from a GGUF: ``tokenizer_gguf`` if given,
else the GGUF the model was compressed from (``base_model`` in ``bitsack.json``, e.g. the
embedded default). Its vocabulary must match the embedding rows.

Refused (``ExportError``): matrices that mix bit-widths (see ``bitsack.export.common``); group
sizes that are not a multiple of 32; rows that are not a multiple of 32; non-Llama architectures;
biases; RoPE scaling other than the default; no tokenizer GGUF.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitsack.export.common import (
    DenseMatrix,
    ExportedTensor,
    ExportError,
    ExportResult,
    GridMatrix,
    Source,
    dense_state,
    is_export_dir,
    matrix_of,
    open_source,
    write_folder,
)
from bitsack.export.ggml_blocks import (  # noqa: F401 - the encoders are re-exported
    BLOCK_BYTES,
    QK,
    Encoded,
    encode,
    encode_q4_1,
    encode_q5_1,
    encode_q8_0,
)
from bitsack.kernels.formats import GGUF_TYPES

FORMAT = "gguf"
GGUF_FILE = "model.gguf"

#: Channels of the zero FFN given to an attention-keeping, FFN-free ``deci`` layer.
ZERO_FFN_WIDTH = 32

_LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


# ------------------------------------------------------------------------------------------
# model layout
# ------------------------------------------------------------------------------------------


def rope_permutation(rows: int, head_dim: int) -> np.ndarray:
    """Row order taking transformers' q/k rows (rotate-half) to llama.cpp's (pairs): GGUF row
    ``r`` is transformers row ``index[r]``."""
    if rows % head_dim or head_dim % 2:
        raise ExportError("head_dim", f"{head_dim} does not split {rows} rows into heads of "
                          "an even size; valid: rows = heads · head_dim, head_dim even")
    n = rows // head_dim
    return np.arange(rows).reshape(n, 2, head_dim // 2).transpose(0, 2, 1).reshape(-1)


def _permute_rows(m: GridMatrix | DenseMatrix, index: np.ndarray) -> GridMatrix | DenseMatrix:
    if isinstance(m, GridMatrix):
        return m.take_rows(index)
    return DenseMatrix(m.name, np.ascontiguousarray(m.weight[index]), m.exact)


@dataclass(frozen=True)
class Hyper:
    """The hyperparameters written as GGUF metadata (per layer where they vary)."""

    arch: str
    n_layer: int
    n_embd: int
    n_ctx: int
    n_vocab: int
    head_dim: int
    n_head: tuple[int, ...]
    n_head_kv: tuple[int, ...]
    n_ff: tuple[int, ...]
    rms_eps: float
    rope_theta: float
    zero_ffn_layers: tuple[int, ...] = ()


def hyperparameters(src: Source) -> Hyper:
    """Arch and per-layer sizes of a compressed Llama (``deci`` when anything was pruned).

    Raises:
        ExportError: not a plain Llama (biases, RoPE scaling), or layer 0 has no heads.
    """
    c = src.config
    if src.model_type != "llama":
        raise ExportError("model_type", f"{src.model_type!r} has no GGUF export here; valid: "
                          "'llama' (arch llama, or deci when pruned)")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise ExportError(key, "true: llama / deci GGUF without bias tensors is what this "
                              "export writes; valid: false")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ExportError("rope_parameters.rope_type", f"{rope_type!r} is not exported; "
                          "valid: 'default' (plain RoPE)")
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    heads, kv = int(c["num_attention_heads"]), int(c["num_key_value_heads"])
    head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    r = heads // kv
    dims = src.layer_dims()
    n_head = tuple(int(d["kv_heads"]) * r for d in dims)
    n_head_kv = tuple(int(d["kv_heads"]) for d in dims)
    n_ff = [int(d["mlp_width"]) for d in dims]
    pruned = bool(src.pruned_layers())
    zero_ffn = tuple(i for i in range(len(dims)) if n_ff[i] == 0 and n_head[i] > 0)
    for i in zero_ffn:
        n_ff[i] = ZERO_FFN_WIDTH
    if pruned and n_head[0] == 0:
        raise ExportError("layer 0", "has no attention heads left; llama.cpp reads the head "
                          "size from layer 0 (n_embd / n_head(0)), so such a model cannot load; "
                          "valid: a plan that keeps at least one head group in layer 0")
    return Hyper(arch="deci" if pruned else "llama", n_layer=len(dims),
                 n_embd=int(c["hidden_size"]), n_ctx=int(c.get("max_position_embeddings", 2048)),
                 n_vocab=int(c["vocab_size"]), head_dim=head_dim, n_head=n_head,
                 n_head_kv=n_head_kv, n_ff=tuple(n_ff), rms_eps=float(c["rms_norm_eps"]),
                 rope_theta=float(theta), zero_ffn_layers=zero_ffn)


def _tensors(src: Source, hp: Hyper) -> list[tuple[str, GridMatrix | DenseMatrix, str | None]]:
    """(GGUF name, matrix, bitsack module) of every tensor, in file order."""
    packed = src.packed_modules()
    dense = dense_state(src)
    tied = bool(src.config.get("tie_word_embeddings", False))

    def matrix(module_name: str) -> GridMatrix | DenseMatrix:
        if module_name in packed:
            return matrix_of(module_name, packed[module_name], "GGUF")
        w = dense.get(f"{module_name}.weight")
        if w is None:
            raise ExportError(module_name, "has no weight in the compressed folder")
        return DenseMatrix(module_name, w)

    def vector(key: str) -> DenseMatrix:
        return DenseMatrix(key, dense[key].astype(np.float32))

    out: list[tuple[str, GridMatrix | DenseMatrix, str | None]] = [
        ("token_embd.weight", matrix("model.embed_tokens"), "model.embed_tokens"),
        ("output_norm.weight", vector("model.norm.weight"), None),
    ]
    if not tied:
        out.append(("output.weight", matrix("lm_head"), "lm_head"))
    for i in range(hp.n_layer):
        pre = f"model.layers.{i}."
        blk = f"blk.{i}."
        if hp.n_head[i] > 0:
            out.append((blk + "attn_norm.weight", vector(pre + "input_layernorm.weight"), None))
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.o_proj"):
                m = matrix(pre + part)
                if part in ("self_attn.q_proj", "self_attn.k_proj"):
                    m = _permute_rows(m, rope_permutation(m.shape[0], hp.head_dim))
                out.append((blk + _LLAMA_NAMES[part] + ".weight", m, pre + part))
        if hp.n_ff[i] > 0:
            out.append((blk + "ffn_norm.weight", vector(pre + "post_attention_layernorm.weight"),
                        None))
            if i in hp.zero_ffn_layers:
                h, f = hp.n_embd, ZERO_FFN_WIDTH
                for name, shape in (("ffn_gate", (f, h)), ("ffn_up", (f, h)),
                                    ("ffn_down", (h, f))):
                    out.append((f"{blk}{name}.weight",
                                DenseMatrix(f"{pre}mlp (zero FFN)",
                                            np.zeros(shape, dtype=np.float16)), None))
                continue
            for part in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                out.append((blk + _LLAMA_NAMES[part] + ".weight", matrix(pre + part), pre + part))
    return out


# ------------------------------------------------------------------------------------------
# tokenizer metadata
# ------------------------------------------------------------------------------------------


def tokenizer_source(src: Source, tokenizer_gguf: str | os.PathLike | None) -> Path:
    """The GGUF whose ``tokenizer.*`` metadata the export copies (see module docstring).

    Raises:
        ExportError: none given and the model did not come from a GGUF.
    """
    if tokenizer_gguf is not None:
        p = Path(tokenizer_gguf)
        if not p.is_file():
            raise ExportError("tokenizer_gguf", f"{str(p)!r} is not a file; valid: a .gguf "
                              "file with tokenizer.* metadata")
        return p
    base = src.meta.get("base_model")
    cand: Path | None = None
    if isinstance(base, dict) and base.get("gguf_file") and base.get("path"):
        cand = Path(base["path"]) / base["gguf_file"]
    elif isinstance(base, str):
        from bitsack.models.loading import DEFAULT_ALIASES, default_model_path

        cand = default_model_path() if base in DEFAULT_ALIASES else \
            (Path(base) if base.endswith(".gguf") else None)
    if cand is not None and cand.is_file():
        return cand
    raise ExportError("tokenizer_gguf", f"not given, and the model's base ({base!r} in "
                      "bitsack.json) is no GGUF file to copy the tokenizer from; valid: "
                      "--tokenizer-gguf FILE, a GGUF with the same vocabulary")


def copy_tokenizer(writer: Any, path: Path, n_vocab: int) -> int:
    """Copy every ``tokenizer.*`` key of the GGUF ``path`` into ``writer``; return the number
    of tokens.

    Raises:
        ExportError: no token list, or its length is not ``n_vocab``.
    """
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_tok = len(tokens.data) if tokens is not None else 0
    if n_tok != n_vocab:
        raise ExportError("tokenizer_gguf", f"{str(path)!r} has {n_tok} tokens, the model's "
                          f"embedding {n_vocab} rows; valid: a GGUF of the model's tokenizer")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == GGUFValueType.STRING:  # raw bytes: no decode / re-encode round trip
                val: Any = [bytes(field.parts[i]) for i in field.data]
            else:
                val = [v.item() if hasattr(v, "item") else v for v in field.contents()]
            writer.add_key_value(key, val, vtype, sub_type=sub)
        elif vtype == GGUFValueType.STRING:
            writer.add_key_value(key, bytes(field.parts[field.data[0]]), vtype)
        else:
            writer.add_key_value(key, field.contents(), vtype)
    return n_tok


# ------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------


def export_gguf(source_dir: str | os.PathLike, out: str | os.PathLike, *,
                tokenizer_gguf: str | os.PathLike | None = None,
                force: bool = False) -> ExportResult:
    """Write the compressed folder ``source_dir`` as ``out/model.gguf`` (see module docstring).

    Args:
        source_dir: a bitsack compressed-model folder.
        out: output folder: new, empty, or an earlier GGUF export (replaced atomically);
            anything else is refused unless ``force``.
        tokenizer_gguf: the GGUF to copy ``tokenizer.*`` from (default: the model's base GGUF).
        force: replace ``out`` whatever it holds.

    Returns:
        What was written: files, bytes, per-tensor ggml types, deviations in ``notes``.

    Raises:
        ExportError: the model cannot be stored in GGUF (see module docstring).
        FormatError: ``source_dir`` is not an intact bitsack folder.
        ValidationError: ``out`` would destroy something that is not an export.
    """
    from bitsack.io import check_output_dir

    check_output_dir(out, what=f"bitsack {FORMAT} export", is_ours=is_export_dir(FORMAT),
                     force=force)
    src = open_source(source_dir)
    hp = hyperparameters(src)
    tok = tokenizer_source(src, tokenizer_gguf)
    plan = _tensors(src, hp)
    sym = src.symmetric_grid()
    encoded = [(name, encode(m, sym), source) for name, m, source in plan]
    return write_folder(out, FORMAT, force,
                        lambda tmp: _write(src, hp, tok, encoded, tmp))


def _write(src: Source, hp: Hyper, tok: Path, encoded: list[tuple[str, Encoded, str | None]],
           tmp: Path) -> ExportResult:
    import gguf

    writer = gguf.GGUFWriter(tmp / GGUF_FILE, hp.arch)
    writer.add_name("bitsack export")
    writer.add_type("model")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(hp.n_layer)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_vocab_size(hp.n_vocab)
    per_layer = hp.arch == "deci"
    writer.add_feed_forward_length(list(hp.n_ff) if per_layer else hp.n_ff[0])
    writer.add_head_count(list(hp.n_head) if per_layer else hp.n_head[0])
    writer.add_head_count_kv(list(hp.n_head_kv) if per_layer else hp.n_head_kv[0])
    writer.add_rope_dimension_count(hp.head_dim)
    if per_layer or hp.head_dim * hp.n_head[0] != hp.n_embd:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    copy_tokenizer(writer, tok, hp.n_vocab)
    tensors, notes = [], []
    for name, enc, source in encoded:
        if enc.type in ("F16", "F32"):
            writer.add_tensor(name, np.ascontiguousarray(enc.data))
        else:
            writer.add_tensor(name, np.ascontiguousarray(enc.data),
                              raw_dtype=gguf.GGMLQuantizationType[enc.type])
        shape = (enc.data.shape[0], enc.data.shape[1] // BLOCK_BYTES[enc.type]
                 * GGUF_TYPES[enc.type][0]) if enc.type in BLOCK_BYTES \
            else tuple(enc.data.shape)
        tensors.append(ExportedTensor(name, enc.type, shape, int(enc.data.nbytes), source))
    notes.extend(_deviation_notes(encoded))
    if hp.zero_ffn_layers:
        notes.append(f"layers {list(hp.zero_ffn_layers)}: MLP fully pruned but attention kept; "
                     f"written with a zero FFN of {ZERO_FFN_WIDTH} channels (llama.cpp's deci "
                     "graph drops the attention output of an n_ff = 0 layer)")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    layout = {"architecture": hp.arch, "kind": "pruned" if hp.arch == "deci" else "bits-only",
              "tokenizer_from": str(tok), "n_head": list(hp.n_head),
              "n_head_kv": list(hp.n_head_kv), "n_ff": list(hp.n_ff)}
    return ExportResult(format=FORMAT, out=tmp, files={}, tensors=tuple(tensors),
                        source=src.path, source_packed_bytes=src.meta.get("packed_bytes"),
                        layout=layout, notes=tuple(notes))


def _deviation_notes(encoded: list[tuple[str, Encoded, str | None]]) -> list[str]:
    notes = []
    offs = [(n, e) for n, e, _ in encoded if e.type in ("Q4_1", "Q5_1")]
    if offs:
        worst = max(offs, key=lambda t: t[1].max_error)
        notes.append(f"Q4_1/Q5_1 ({len(offs)} tensors): offsets m = -s*z rounded to fp16 once, "
                     f"bound 2^-11*|m| per weight; largest change {worst[1].max_error:.3g} "
                     f"({worst[0]})")
    q8 = [(n, e) for n, e, _ in encoded if e.type == "Q8_0"]
    re = [(n, e) for n, e in q8 if e.rerounded_blocks]
    if q8:
        total = sum(e.blocks for _, e in q8)
        n_re = sum(e.rerounded_blocks for _, e in q8)
        if re:
            worst = max(re, key=lambda t: t[1].max_error)
            notes.append(f"Q8_0 ({len(q8)} tensors): {n_re} of {total} blocks had codes beyond "
                         f"-128..127 around their zero point and were re-rounded to a symmetric "
                         f"grid (error <= d/2); largest change {worst[1].max_error:.3g} "
                         f"({worst[0]}); the other blocks are exact")
        else:
            notes.append(f"Q8_0 ({len(q8)} tensors): exact (all {total} blocks fit int8 "
                         "around their zero point)")
    return notes
