"""Packed layers: a weight matrix stored as segments of packed low-bit (or fp16) weights.

A ``PackedLinear`` holds its ``[out_features, in_features]`` weight as ``Segment``s cut along
one axis: ranges of output rows (``axis=0``; units of q/k/v/gate/up) or of input columns
(``axis=1``; units of o_proj/down_proj), each with its own bit-width and group size, covering
the matrix once, in order. Groups always run along the input dimension inside a segment and
restart at its first column; a group size need not divide the segment's width (the last group
of each row is then shorter). The numbers are ``bitsack.kernels.formats.PackFormat``;
``forward`` runs on the backend named by ``backend`` (``bitsack.kernels.backends``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitsack.errors import ValidationError
from bitsack.kernels.formats import (
    SUPER_COLS,
    PackFormat,
    check_bits,
    check_group_size,
    check_scale_bits,
    check_tiling,
    num_groups,
    pack,
    pack_zero,
    packed_nbytes,
    unpack_torch,
    unpack_zero,
    zero_words,
)
from bitsack.kernels.grid import (
    QuantizedTensor,
    dequantize_codes,
    expand_scales,
    rtn_quantize,
)

__all__ = ["PackedEmbedding", "PackedLinear", "Segment"]


@dataclass(frozen=True)
class Segment:
    """One contiguous part of a matrix in one format.

    Attributes:
        axis: 0 = output rows ``start:stop`` (full width), 1 = input columns ``start:stop``
            (full height).
        start: first row/column of the segment in the matrix.
        stop: one past the last.
        bits: 1..8 (packed) or 16 (fp16 weights).
        group_size: columns per group, any positive integer; group g covers the segment's
            columns ``[g·G, min((g+1)·G, cols))`` (for 16 bits: unused).
        shape: ``(rows, cols)`` of the segment.
        qdata: uint32 ``[rows, words_per_row(cols, bits)]`` (None for 16 bits).
        scale: fp16 ``[rows, ceil(cols / group_size)]`` (None for 16 bits and for
            double-quantized segments: ``scales()`` reads either).
        zero: the zero points' stream, uint32 ``[zero_words(rows, groups, bits)]`` (integers
            ``0..2**bits − 1``, ``bits`` bits each; ``zeros()`` unpacks them; None for 16 bits).
        weight: fp16 ``[rows, cols]`` for 16 bits (None otherwise).
        scale_bits: None (fp16 scales), or S: the scales are stored double-quantized, as
            ``scale_codes`` (uint32, the S-bit codes k as one stream, the layout of ``zero``)
            and ``step`` (fp16 ``[rows, ceil(cols / SUPER_COLS)]``); ``scales()`` expands
            them into the exact fp16 scales ``k·step`` on each call, never held (a ``scale``
            given too is dropped): a packed module holds what its file holds, and the CPU
            kernels read the codes.
    """

    axis: int
    start: int
    stop: int
    bits: int
    group_size: int
    shape: tuple[int, int]
    qdata: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    scale_bits: int | None = None
    scale_codes: torch.Tensor | None = None
    step: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.axis not in (0, 1):
            raise ValidationError("segment.axis", f"{self.axis!r}; valid: 0 (rows) or 1 (cols)")
        if not 0 <= self.start < self.stop:
            raise ValidationError("segment.start:stop", f"{self.start}:{self.stop} is not a "
                                  "non-empty range")
        check_bits(self.bits, allow_16=True, field="segment.bits")
        rows, cols = self.shape
        if (rows if self.axis == 0 else cols) != self.stop - self.start:
            raise ValidationError("segment.shape", f"{self.shape} does not match the range "
                                  f"{self.start}:{self.stop} along axis {self.axis}")
        if self.bits == 16:
            w = self.weight
            if w is None or w.dtype != torch.float16 or tuple(w.shape) != (rows, cols):
                raise ValidationError("segment.weight", f"{_desc(w)}; valid: float16 "
                                      f"[{rows}, {cols}] for a 16-bit segment")
            return
        check_group_size(self.group_size, field="segment.group_size")
        want_q = (rows, -(-self.bits * cols // 32))
        q = self.qdata
        if q is None or q.dtype != torch.uint32 or tuple(q.shape) != want_q:
            raise ValidationError("segment.qdata", f"{_desc(q)}; valid: uint32 {list(want_q)}")
        want_g = (rows, num_groups(cols, self.group_size))
        if check_scale_bits(self.scale_bits, field="segment.scale_bits") is not None:
            self._check_double_quantized(want_g)
        else:
            self._check_scale(want_g)
        want_z = (zero_words(rows, want_g[1], self.bits),)
        t = self.zero
        if t is None or t.dtype != torch.uint32 or tuple(t.shape) != want_z:
            raise ValidationError("segment.zero", f"{_desc(t)}; valid: uint32 {list(want_z)} "
                                  f"(the zero points, {self.bits} bits each, one stream)")

    def _check_scale(self, want_g: tuple[int, int]) -> None:
        t = self.scale
        if t is None or t.dtype != torch.float16 or tuple(t.shape) != want_g:
            raise ValidationError("segment.scale", f"{_desc(t)}; valid: float16 {list(want_g)}")

    def _check_double_quantized(self, want_g: tuple[int, int]) -> None:
        """Check ``scale_codes`` and ``step`` (and drop a ``scale`` given too)."""
        rows, cols = self.shape
        sb = self.scale_bits
        want_c = (zero_words(rows, want_g[1], sb),)
        t = self.scale_codes
        if t is None or t.dtype != torch.uint32 or tuple(t.shape) != want_c:
            raise ValidationError("segment.scale_codes", f"{_desc(t)}; valid: uint32 "
                                  f"{list(want_c)} (the scale codes, {sb} bits each)")
        want_s = (rows, num_groups(cols, SUPER_COLS))
        t = self.step
        if t is None or t.dtype != torch.float16 or tuple(t.shape) != want_s:
            raise ValidationError("segment.step", f"{_desc(t)}; valid: float16 {list(want_s)}")
        object.__setattr__(self, "scale", None)

    def scales(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The fp16 scales ``[rows, groups]`` (of ``rows`` only, if given): ``scale``, or
        expanded from the codes and steps of a double-quantized segment."""
        if self.bits == 16:
            raise ValidationError("segment.bits", "16 has no scales; valid: a packed segment")
        if self.scale_bits is None:
            return self.scale if rows is None else self.scale[rows]
        r, c = self.shape
        return expand_scales(self.scale_codes, self.step, self.scale_bits, r, c,
                             self.group_size, rows)

    @property
    def format(self) -> PackFormat:
        return PackFormat.for_bits(self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes stored: qdata + scale + zero, or qdata + scale codes + steps + zero with
        ``scale_bits`` (the expanded fp16 scales are not stored), or the fp16 weight:
        ``packed_nbytes(...)``."""
        return packed_nbytes(self.shape[0], self.shape[1], self.bits, self.group_size,
                             self.scale_bits)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, axis: int, start: int) -> Segment:
        """Pack a ``QuantizedTensor`` as the segment starting at ``start`` along ``axis``."""
        rows, cols = qt.shape
        n = rows if axis == 0 else cols
        dq = {}
        if qt.scale_bits is not None:
            dq = {"scale_bits": qt.scale_bits, "step": qt.step.contiguous(),
                  "scale_codes": pack_zero(qt.scale_codes(), qt.scale_bits)}
        return cls(axis, start, start + n, qt.bits, qt.group_size, (rows, cols),
                   qdata=pack(qt.codes, qt.bits),
                   scale=None if dq else qt.scale.contiguous(),
                   zero=pack_zero(qt.zero, qt.bits), **dq)

    @classmethod
    def from_fp16(cls, weight: torch.Tensor, axis: int, start: int) -> Segment:
        """An fp16 (16-bit, untouched) segment starting at ``start`` along ``axis``."""
        w = weight.detach().to(torch.float16).contiguous()
        rows, cols = w.shape
        n = rows if axis == 0 else cols
        return cls(axis, start, start + n, 16, cols, (rows, cols), weight=w)

    def spec(self) -> dict:
        """The segment's layout as plain JSON-able values (everything but the tensors)."""
        out = {"axis": self.axis, "start": self.start, "stop": self.stop, "bits": self.bits,
               "group_size": self.group_size, "shape": list(self.shape)}
        if self.scale_bits is not None:
            out["scale_bits"] = self.scale_bits
        return out

    @classmethod
    def empty(cls, spec: dict, device: torch.device | str = "cpu") -> Segment:
        """A zero-filled segment of the layout ``spec`` (to load a state dict into)."""
        try:
            axis, start, stop, bits, g = (int(spec[k]) for k in
                                          ("axis", "start", "stop", "bits", "group_size"))
            rows, cols = (int(v) for v in spec["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValidationError("segment", f"{spec!r}; valid: a dict with axis, start, stop, "
                                  "bits, group_size, shape [rows, cols]") from None
        check_bits(bits, allow_16=True, field="segment.bits")
        if bits == 16:
            return cls(axis, start, stop, 16, g, (rows, cols),
                       weight=torch.zeros((rows, cols), dtype=torch.float16, device=device))
        g = check_group_size(g, field="segment.group_size")
        words = -(-bits * cols // 32)
        meta = (rows, num_groups(cols, g))
        sb = check_scale_bits(spec.get("scale_bits"), field="segment.scale_bits")
        dq = {}
        if sb is not None:
            dq = {"scale_bits": sb,
                  "scale_codes": torch.zeros(zero_words(rows, meta[1], sb), dtype=torch.int32,
                                             device=device).view(torch.uint32),
                  "step": torch.zeros((rows, num_groups(cols, SUPER_COLS)),
                                      dtype=torch.float16, device=device)}
        return cls(axis, start, stop, bits, g, (rows, cols), **dq,
                   qdata=torch.zeros((rows, words), dtype=torch.int32, device=device)
                   .view(torch.uint32),
                   scale=None if dq else torch.zeros(meta, dtype=torch.float16,
                                                     device=device),
                   zero=torch.zeros(zero_words(rows, meta[1], bits), dtype=torch.int32,
                                    device=device).view(torch.uint32))

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes ``[rows, cols]``."""
        if self.bits == 16:
            raise ValidationError("segment.bits", "16 has no codes; valid: a packed segment")
        return unpack_torch(self.qdata, self.bits, self.shape[1])

    def zeros(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """The zero points ``[rows, groups]`` unpacked from their stream (fp16 by default,
        the dtype ``QuantizedTensor`` holds them in)."""
        if self.bits == 16:
            raise ValidationError("segment.bits", "16 has no zero points; valid: a packed "
                                  "segment")
        rows, cols = self.shape
        return unpack_zero(self.zero, self.bits, rows, num_groups(cols, self.group_size),
                           dtype=dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        """The segment's weights ``[rows, cols]`` (or only ``rows``), computed in fp32."""
        if self.bits == 16:
            w = self.weight if rows is None else self.weight[rows]
            return w.to(dtype)
        q, s, z = self.qdata, self.scales(rows), self.zeros()
        if rows is not None:
            q, z = q[rows], z[rows]
        codes = unpack_torch(q, self.bits, self.shape[1], dtype=torch.float32)
        return dequantize_codes(codes, s, z, self.group_size, dtype)


_REGISTRY: list[dict] = []  # the backends' registry, bound on first use (import cycle)


def _backend(name: str):
    """The registered backend ``name`` (validated when the module's backend was set)."""
    if not _REGISTRY:
        from bitsack.kernels.backends import _BACKENDS

        _REGISTRY.append(_BACKENDS)
    return _REGISTRY[0][name]


def _desc(t: torch.Tensor | None) -> str:
    return "None" if t is None else f"{t.dtype} {list(t.shape)}"


def _check_tiling(segments: Sequence[Segment], rows: int, cols: int) -> int:
    """Check that the segments tile a rows × cols matrix along one axis; return the axis."""
    axis = check_tiling(segments, rows, cols)
    other = cols if axis == 0 else rows
    for i, seg in enumerate(segments):
        if seg.shape[1 - axis] != other:
            raise ValidationError(f"segments[{i}].shape", f"{seg.shape}; valid: the full "
                                  f"{other} along the other axis")
    return axis


class _SegmentStore(torch.nn.Module):
    """Registers each segment's tensors as buffers (so ``state_dict``/``.to`` carry them)."""

    _FIELDS = ("qdata", "scale", "zero", "weight", "scale_codes", "step")

    def _store(self, segments: Sequence[Segment]) -> None:
        self._meta = [(s.axis, s.start, s.stop, s.bits, s.group_size, s.shape) for s in segments]
        self._scale_bits = [s.scale_bits for s in segments]
        for i, seg in enumerate(segments):
            for f in self._FIELDS:
                t = getattr(seg, f)
                # (a double-quantized segment has no fp16 scales: codes and steps only, so a
                # module's memory is its file's bytes)
                if t is not None:
                    self.register_buffer(f"seg{i}_{f}", t)

    @property
    def segments(self) -> tuple[Segment, ...]:
        """The segments, built on the current buffers (wherever the module now lives)."""
        out = []
        for i, (axis, start, stop, bits, g, shape) in enumerate(self._meta):
            tensors = {f: getattr(self, f"seg{i}_{f}", None) for f in self._FIELDS}
            out.append(Segment(axis, start, stop, bits, g, shape, **tensors,
                               scale_bits=self._scale_bits[i]))
        return tuple(out)

    def layout(self) -> list[dict]:
        """Each segment's ``Segment.spec()``: with the dims, enough to rebuild the module."""
        return [s.spec() for s in self.segments]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weights (qdata + scale + zero, or fp16), bias excluded."""
        return sum(packed_nbytes(sh[0], sh[1], b, g, sb)
                   for (_, _, _, b, g, sh), sb in zip(self._meta, self._scale_bits, strict=True))


class PackedLinear(_SegmentStore):
    """``y = x Ŵᵀ + b`` with Ŵ stored as packed segments.

    Args:
        in_features: columns of the weight.
        out_features: rows of the weight.
        segments: along one axis, contiguous, covering the matrix exactly once.
        bias: optional ``[out_features]`` (kept in its dtype; computed with in fp32).
        backend: kernel backend name: ``cpu`` (default: fused packed GEMV / tiled dequantize
            + BLAS on CPU tensors, ``torch`` on others), ``torch`` (whole-weight dequantize per
            call: a debug mode), ``reference``, ``cupy``.
    """

    def __init__(self, in_features: int, out_features: int, segments: Sequence[Segment],
                 bias: torch.Tensor | None = None, backend: str = "cpu"):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.axis = _check_tiling(segments, self.out_features, self.in_features)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValidationError("bias", f"shape {tuple(bias.shape)}; valid: "
                                  f"[{self.out_features}]")
        self._store(segments)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.backend = backend
        #: Keep the dequantized weight after the first call and run one dense matmul (the
        #: ``torch`` path) at the memory cost of a dense fp32 weight; never saved.
        self.cache_weight = False
        self._weight_cache: torch.Tensor | None = None

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``dequantize(dtype)``, served from the cache when ``cache_weight`` is set."""
        if not self.cache_weight:
            return self.dequantize(dtype)
        c = self._weight_cache
        if c is None or c.dtype != dtype:
            c = self._weight_cache = self.dequantize(dtype)
        return c

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / .half(): the caches are stale
        self._weight_cache = None
        self.__dict__.pop("_cpu_plan", None)
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):  # new weights: the caches are stale
        self._weight_cache = None
        self.__dict__.pop("_cpu_plan", None)
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        from bitsack.kernels.backends import get_backend

        get_backend(name)  # fail early on an unknown name
        self._backend = name

    @classmethod
    def from_quantized(cls, parts: Sequence[QuantizedTensor | torch.Tensor], axis: int,
                       bias: torch.Tensor | None = None, backend: str = "cpu") -> PackedLinear:
        """Pack pieces laid end to end along ``axis``.

        Args:
            parts: ``QuantizedTensor``s (packed) or fp16/float tensors (kept as fp16), in
                order; row pieces (``axis=0``) share the width, column pieces the height.
            axis: 0 (pieces are row ranges) or 1 (column ranges).
            bias: optional bias.
            backend: kernel backend name.
        """
        if axis not in (0, 1):
            raise ValidationError("axis", f"{axis!r}; valid: 0 (rows) or 1 (columns)")
        segments, pos = [], 0
        for part in parts:
            if isinstance(part, QuantizedTensor):
                seg = Segment.from_quantized(part, axis, pos)
            else:
                seg = Segment.from_fp16(part, axis, pos)
            segments.append(seg)
            pos = seg.stop
        if not segments:
            raise ValidationError("parts", "empty; valid: at least one piece")
        rows = pos if axis == 0 else segments[0].shape[0]
        cols = segments[0].shape[1] if axis == 0 else pos
        return cls(cols, rows, segments, bias=bias, backend=backend)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bits: int | Sequence[tuple[int, ...]],
                   group_size: int, axis: int = 0, bias: torch.Tensor | None = None,
                   backend: str = "cpu") -> PackedLinear:
        """RTN-quantize a dense ``[out, in]`` weight and pack it.

        Args:
            weight: the dense weight.
            bits: one bit-width for the whole matrix, or ranges along ``axis`` tiling it,
                each ``(start, stop, bits)`` or ``(start, stop, bits, group_size)`` (bits 16
                keeps a range in fp16; a column range is grouped from its own first column).
            group_size: columns per group (any positive integer; the last group of a row may
                be shorter), for the ranges that do not give their own.
            axis: the axis the ranges cut.
            bias: optional bias.
            backend: kernel backend name.
        """
        n = weight.shape[axis]
        ranges = [(0, n, bits)] if isinstance(bits, int) else [tuple(r) for r in bits]
        parts: list[QuantizedTensor | torch.Tensor] = []
        for r in ranges:
            if len(r) not in (3, 4):
                raise ValidationError("bits", f"range {r!r}; valid: (start, stop, bits) or "
                                      "(start, stop, bits, group_size)")
            start, stop, b = r[:3]
            g = r[3] if len(r) == 4 else group_size
            piece = weight[start:stop] if axis == 0 else weight[:, start:stop]
            parts.append(piece.to(torch.float16) if b == 16 else rtn_quantize(piece, b, g))
        layer = cls.from_quantized(parts, axis, bias=bias, backend=backend)
        if (layer.out_features, layer.in_features) != tuple(weight.shape):
            raise ValidationError("bits", f"ranges {ranges} do not tile the {n} "
                                  f"{'rows' if axis == 0 else 'columns'}")
        return layer

    @classmethod
    def from_layout(cls, in_features: int, out_features: int, layout: Sequence[dict],
                    bias_dtype: torch.dtype | None = None, backend: str = "cpu",
                    device: torch.device | str = "cpu") -> PackedLinear:
        """A zero-filled layer of the given ``layout()``, to ``load_state_dict`` into.

        Args:
            in_features: columns.
            out_features: rows.
            layout: as returned by ``layout()``.
            bias_dtype: dtype of the bias, or None for no bias.
            backend: kernel backend name.
            device: where the buffers are allocated.
        """
        segments = [Segment.empty(spec, device) for spec in layout]
        bias = None if bias_dtype is None else torch.zeros(out_features, dtype=bias_dtype,
                                                           device=device)
        return cls(in_features, out_features, segments, bias=bias, backend=backend)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight ``[out_features, in_features]`` the kernels compute with."""
        parts = [seg.dequantize(torch.float32) for seg in self.segments]
        return torch.cat(parts, dim=self.axis).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValidationError("x", f"last dim {x.shape[-1]}; valid: {self.in_features}")
        return _backend(self._backend).linear(self, x)

    def extra_repr(self) -> str:
        segs = ", ".join(f"{s}:{e}@{b}b" for _, s, e, b, _, _ in self._meta)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"axis={self.axis}, segments=[{segs}], backend={self.backend}")


class PackedEmbedding(_SegmentStore):
    """An embedding table ``[num_embeddings, embedding_dim]`` stored as packed segments.

    ``forward(ids)`` gathers the rows of ``ids`` and dequantizes only those. A tied lm_head
    computes ``h Eᵀ`` with the same table: ``as_linear()`` returns a ``PackedLinear`` whose
    buffers are the same tensors (no copy). They stay shared as long as both modules are
    moved together (``model.to``) — moving one alone copies its buffers.

    Args:
        num_embeddings: rows of the table (vocabulary).
        embedding_dim: columns.
        segments: tiling the table along one axis.
        dtype: dtype of the returned embeddings.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, segments: Sequence[Segment],
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.axis = _check_tiling(segments, self.num_embeddings, self.embedding_dim)
        self._store(segments)
        self.dtype = dtype

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bits: int, group_size: int,
                   dtype: torch.dtype | None = None,
                   scale_bits: int | None = None) -> PackedEmbedding:
        """RTN-quantize a dense table (bits 16: fp16) into one segment (``scale_bits``:
        double-quantized scales)."""
        seg = Segment.from_fp16(weight, 0, 0) if bits == 16 else \
            Segment.from_quantized(rtn_quantize(weight, bits, group_size, scale_bits), 0, 0)
        return cls(weight.shape[0], weight.shape[1], [seg], dtype=dtype or weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValidationError("ids", f"dtype {ids.dtype}; valid: int32 or int64")
        flat = ids.reshape(-1).to(torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise ValidationError("ids", f"values span [{int(flat.min())}, {int(flat.max())}]; "
                                  f"valid: 0..{self.num_embeddings - 1}")
        out = torch.empty((flat.numel(), self.embedding_dim), dtype=torch.float32,
                          device=flat.device)
        for seg in self.segments:
            if seg.axis == 1:
                out[:, seg.start:seg.stop] = seg.dequantize(torch.float32, rows=flat)
            else:
                hit = (flat >= seg.start) & (flat < seg.stop)
                if bool(hit.any()):
                    out[hit] = seg.dequantize(torch.float32, rows=flat[hit] - seg.start)
        return out.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense table."""
        return torch.cat([s.dequantize(torch.float32) for s in self.segments],
                         dim=self.axis).to(dtype)

    @classmethod
    def from_layout(cls, num_embeddings: int, embedding_dim: int, layout: Sequence[dict],
                    dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> PackedEmbedding:
        """A zero-filled table of the given ``layout()``, to ``load_state_dict`` into."""
        return cls(num_embeddings, embedding_dim, [Segment.empty(s, device) for s in layout],
                   dtype=dtype)

    def as_linear(self, backend: str = "cpu") -> PackedLinear:
        """A ``PackedLinear`` (in = embedding_dim, out = num_embeddings) on the same buffers."""
        return PackedLinear(self.embedding_dim, self.num_embeddings, self.segments,
                            backend=backend)
