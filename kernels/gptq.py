"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", Algorithm 1), onto the grids of
``bitsack.kernels.grid`` (min-max, MSE, weighted MSE, and their symmetric forms).

GPTQ quantizes one column at a time and spreads each column's error over the not yet quantized
columns through the inverse Hessian of the layer-wise objective ‖WX − QX‖², H = 2XXᵀ/n. Paper
symbols are used in ``GPTQ``. One matrix may be cut into segments (``SegmentSpec``), each with
its own bit-width and group size; the result (``GPTQResult``) holds one ``QuantizedTensor`` (or
fp16 weight) per segment (both in ``bitsack.kernels.segments``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bitsack.errors import NumericalError, ValidationError
from bitsack.kernels.formats import (
    SUPER_COLS,
    check_group_size,
    check_tiling,
    clip_search,
    num_groups,
    symmetric,
)
from bitsack.kernels.grid import (
    QuantizedTensor,
    check_weight,
    dq_steps,
    group_params,
    super_ranges,
)
from bitsack.kernels.hessian import Hessian
from bitsack.kernels.segments import GPTQResult, SegmentSpec, bits_map

__all__ = ["GPTQ"]


# The GPTQ engine works on rectangles of the matrix: rows r0:r1 × columns c0:c1, grouped by G
# from c0, with a bits map [r1 − r0, ceil((c1 − c0)/G)]. Row segments are rectangles of full
# width; column segments rectangles of full height; the older whole-matrix map one rectangle.


@dataclass
class _Rect:
    r0: int
    r1: int
    c0: int
    c1: int
    group_size: int
    bits: torch.Tensor  # int64 [r1 - r0, ngroups]
    scale: torch.Tensor  # fp16 [r1 - r0, ngroups] (filled by the engine)
    zero: torch.Tensor
    fp16: torch.Tensor | None = None  # 16-bit rectangles' weights when no .weight is returned
    scale_bits: int | None = None  # double-quantized scales: S, and the fp16 steps
    step: torch.Tensor | None = None  # [r1 - r0, ceil((c1 - c0) / SUPER_COLS)]
    grid: str = "minmax"  # how each group's parameters are chosen (``grid.group_params``)


@dataclass
class _Event:
    """One group's parameters to set: chunk rows ra:rb, columns c:end of rectangle ``rect``."""

    rect: _Rect
    gi: int
    ra: int  # chunk-local rows
    rb: int
    c: int
    end: int
    maxq: torch.Tensor  # float64 [rb - ra]
    is16: torch.Tensor  # bool [rb - ra]
    all16: bool


def _default_row_chunk(cols: int) -> int:
    """Rows per pass: a float64 copy of the chunk is about 64 MiB (a function of cols only,
    so a matrix quantized alone or stacked with others is cut the same way)."""
    return max(1, (1 << 23) // cols)


def _row_pieces(ranges: list[tuple[int, int]], row_chunk: int) -> list[list[tuple[int, int]]]:
    """Chunks of rows: each range cut into pieces of ≤ row_chunk rows (from its own start),
    consecutive pieces packed into chunks of ≤ row_chunk rows. Returns the pieces per chunk."""
    pieces = [(a, min(a + row_chunk, r1)) for r0, r1 in ranges for a in range(r0, r1, row_chunk)]
    chunks: list[list[tuple[int, int]]] = []
    size = 0
    for p in pieces:
        if chunks and size + (p[1] - p[0]) <= row_chunk:
            chunks[-1].append(p)
            size += p[1] - p[0]
        else:
            chunks.append([p])
            size = p[1] - p[0]
    return chunks


class GPTQ:
    """GPTQ for one linear layer ``y = W x`` (Frantar et al. 2022, Algorithm 1).

    Feed calibration inputs with ``add_batch``; it accumulates ``H = 2XXᵀ/n`` over the n input
    vectors seen in a ``Hessian`` (``self.hessian``: float64 sum of float32 batch products),
    or give a finished ``Hessian`` / matrix to ``from_hessian``. ``quantize_segments`` (and
    the older ``quantize``) then run the column-by-column algorithm with lazy block updates
    on a copy of the weight, in float64.

    Args:
        columns: the layer's input features (columns of W).
        device: where H lives (default CPU).
    """

    def __init__(self, columns: int, device: torch.device | str | None = None):
        self.hessian = Hessian(columns, device)
        self.columns = columns
        self._H: torch.Tensor | None = None  # a fixed H given to from_hessian
        self._H_cache: tuple[int, torch.Tensor] | None = None
        # (n, damp, act_order, escalations) -> (dead, perm, H⁻¹ factor, λ): one Cholesky
        # serves every call on the same Hessian (several segmentations of one matrix)
        self._factor_cache: dict[tuple, tuple] = {}

    @property
    def H(self) -> torch.Tensor:
        """``2XXᵀ/n`` (float64): the given matrix, or the accumulator's current ``matrix()``."""
        if self._H is not None:
            return self._H
        n = self.hessian.n
        if n <= 0:
            return torch.zeros_like(self.hessian.S)
        if self._H_cache is None or self._H_cache[0] != n:
            self._H_cache = (n, self.hessian.matrix())
        return self._H_cache[1]

    @property
    def nsamples(self) -> int:
        """Input vectors behind ``H`` (as given to ``from_hessian`` for a fixed matrix)."""
        return self._nsamples if self._H is not None else self.hessian.n

    @classmethod
    def from_hessian(cls, H: torch.Tensor | Hessian, nsamples: int = 1) -> GPTQ:
        """A GPTQ whose Hessian was accumulated elsewhere.

        Args:
            H: a ``Hessian`` accumulator (used as is, not copied: ``quantize`` only reads it),
                or the matrix ``2XXᵀ/n`` itself (copied to float64).
            nsamples: for a matrix, how many input vectors it came from (informational).
        """
        if isinstance(H, Hessian):
            obj = cls(H.columns, device=H.S.device)
            obj.hessian = H
            return obj
        if not isinstance(H, torch.Tensor) or H.dim() != 2 or H.shape[0] != H.shape[1]:
            shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
            raise ValidationError("hessian", f"shape {shape}; valid: square [cols, cols] or a "
                                  "Hessian")
        obj = cls(int(H.shape[0]), device=H.device)
        obj._H = H.detach().to(torch.float64).clone()
        obj._nsamples = int(nsamples)
        return obj

    def add_batch(self, x: torch.Tensor) -> None:
        """Add calibration inputs ``x[..., columns]`` (every leading index is one sample).

        Delegates to ``self.hessian`` (``bitsack.kernels.hessian.Hessian``: float64 running
        sum of float32 batch products).
        """
        if self._H is not None:
            raise ValidationError("add_batch", "this GPTQ holds a fixed Hessian matrix "
                                  "(from_hessian); valid: add to a Hessian accumulator instead")
        self.hessian.add(x)

    def _factor(self, damp: float, act_order: bool, max_escalations: int):
        """(dead inputs, act-order permutation or None, upper Cholesky factor of (H + λI)⁻¹
        in that order, λ), computed once per Hessian and settings."""
        key = (self.nsamples, float(damp), bool(act_order), int(max_escalations))
        hit = self._factor_cache.get(key)
        if hit is None:
            H = self.H.clone()
            # A dead input (never nonzero in calibration) carries no information: its weight
            # cannot influence the outputs seen, so zero it and give H a unit diagonal there.
            dead = torch.diag(H) == 0
            H[dead, dead] = 1.0
            if act_order:
                perm = torch.argsort(torch.diag(H), descending=True, stable=True)
                H = H[perm][:, perm]
            else:
                perm = None
            Hinv, lam = self._inverse_cholesky(H, damp, max_escalations)
            hit = (dead, perm, Hinv, lam)
            self._factor_cache = {key: hit}
        return hit

    def _inverse_cholesky(self, H: torch.Tensor, damp: float, max_escalations: int
                          ) -> tuple[torch.Tensor, float]:
        """Upper Cholesky factor of (H + λI)⁻¹, escalating λ ×10 while Cholesky fails."""
        mean_diag = float(torch.diag(H).mean())
        lam = damp * mean_diag
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        for _ in range(max_escalations + 1):
            L, info = torch.linalg.cholesky_ex(H + lam * eye)
            if int(info) == 0:
                U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
                if int(info) == 0 and bool(torch.isfinite(U).all()):
                    return U, lam
            # Not positive definite at this damping (rank-deficient or ill-conditioned H).
            lam = max(lam * 10.0, 1e-6 * mean_diag)
        raise NumericalError(f"hessian: Cholesky of H + λI failed up to λ = {lam / 10:.3g} "
                             f"({max_escalations} escalations ×10 from damp={damp})")

    def _check_call(self, weight: Any, damp: float, block_size: int) -> torch.Tensor:
        W0 = check_weight(weight, "weight")
        if W0.shape[1] != self.columns:
            raise ValidationError("weight", f"{W0.shape[1]} columns; valid: {self.columns} (the "
                                  "Hessian's size)")
        if self.nsamples <= 0:
            raise ValidationError("hessian", "no calibration inputs were added; valid: call "
                                  "add_batch(x) at least once")
        if not damp >= 0 or not math.isfinite(damp):
            raise ValidationError("damp", f"{damp!r}; valid: a finite number ≥ 0")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValidationError("block_size", f"{block_size!r}; valid: a positive integer")
        if not bool(torch.isfinite(self.H).all()):
            raise NumericalError("hessian: H holds NaN or infinite values")
        return W0

    def quantize_segments(self, weight: torch.Tensor, segments: Sequence[SegmentSpec], *,
                          damp: float = 0.01, act_order: bool = False, block_size: int = 128,
                          max_escalations: int = 6, row_chunk: int | None = None,
                          return_weight: bool = True) -> GPTQResult:
        """Quantize ``weight`` [rows, columns] with GPTQ, one bit-width and group size per
        segment.

        GPTQ treats rows independently (every row sees the same ``H``), so row segments are
        independent problems solved in one pass: stacking K copies of W as one ``[K·rows,
        cols]`` matrix with K row segments gives exactly (bit for bit) the K separate results.
        Column segments share the rows: each column's error is spread over the columns after
        it, whatever segment they are in.

        Args:
            weight: ``W`` ``[out_features, in_features]``; not modified.
            segments: ``SegmentSpec``s along one axis, contiguous, in order, tiling the rows
                (axis 0) or the columns (axis 1). A 16-bit segment is kept in fp16.
            damp: λ = damp · mean(diag H) added to the diagonal (escalates ×10 on failure).
            act_order: quantize columns in order of decreasing ``diag H``; group parameters
                are then fixed beforehand from the original weights, per row's own grouping
                ("static groups"), so each group still covers contiguous stored columns.
                Without it groups are "dynamic": a group's parameters come from the current
                (error-updated) weights when its first column is reached.
            block_size: columns per lazy batch update (B in the paper).
            max_escalations: how many ×10 escalations of λ before giving up.
            row_chunk: rows processed per pass, to bound memory (default: about 64 MiB of
                float64 per pass, a function of the column count only). A pass needs about
                4× (6× with act_order) the float64 bytes of its rows, plus the result: uint8
                codes, fp16 scale/zero, and (``return_weight``) a float32 weight.
            return_weight: also return the dequantized float32 weight (``.weight``).

        Returns:
            A ``GPTQResult`` with ``.parts`` (one per segment), ``.segments``, ``.losses``,
            ``.weight``, ``.loss``, ``.damp``.

        Raises:
            ValidationError: bad arguments, segments that do not tile, no calibration inputs.
            NumericalError: Cholesky fails even at the largest damping.
        """
        W0 = self._check_call(weight, damp, block_size)
        rows, cols = W0.shape
        segs = tuple(segments) if not isinstance(segments, SegmentSpec) else (segments,)
        for i, sp in enumerate(segs):
            if not isinstance(sp, SegmentSpec):
                raise ValidationError(f"segments[{i}]", f"{type(sp).__name__}; valid: a "
                                      "SegmentSpec")
        axis = check_tiling(segs, rows, cols)
        dev = self.H.device
        rects = []
        for sp in segs:
            r0, r1, c0, c1 = (sp.start, sp.stop, 0, cols) if axis == 0 else \
                (0, rows, sp.start, sp.stop)
            ng = num_groups(c1 - c0, sp.group_size)
            rc = _Rect(r0, r1, c0, c1, sp.group_size,
                       torch.full((r1 - r0, ng), sp.bits, dtype=torch.int64, device=dev),
                       torch.ones((r1 - r0, ng), dtype=torch.float16, device=dev),
                       torch.zeros((r1 - r0, ng), dtype=torch.float16, device=dev))
            rc.grid = sp.grid
            if sp.scale_bits is not None and sp.bits != 16:
                # the steps from the original weights: with static groups (act_order) no
                # group is clipped; dynamic groups wider than their super-block's step clamp
                rc.scale_bits = sp.scale_bits
                maxq = (1 << sp.bits) - 1
                rc.step = dq_steps(super_ranges(W0[r0:r1, c0:c1], sp.group_size,
                                                sym_maxq=maxq if symmetric(sp.grid) else None),
                                   maxq, sp.scale_bits)
            rects.append(rc)
        ranges = [(sp.start, sp.stop) for sp in segs] if axis == 0 else [(0, rows)]
        col_loss = axis == 1 and len(segs) > 1
        codes, weight_q, loss_rows, loss_cols, lam = self._run(
            W0, rects, ranges, damp, act_order, block_size, max_escalations, row_chunk,
            return_weight, col_loss)
        parts: list[QuantizedTensor | torch.Tensor] = []
        losses = []
        for sp, rc in zip(segs, rects, strict=True):
            if axis == 0:
                sl_r, sl_c = slice(sp.start, sp.stop), slice(None)
                losses.append(float(loss_rows[sp.start:sp.stop].sum()) * 0.5)
            else:
                sl_r, sl_c = slice(None), slice(sp.start, sp.stop)
                part_loss = loss_cols[sp.start:sp.stop] if col_loss else loss_rows
                losses.append(float(part_loss.sum()) * 0.5)
            if sp.bits == 16:
                # the fp16 value of the updated weights: from the returned weight, or (without
                # one) kept aside by the engine in ``rc.fp16``
                parts.append(rc.fp16 if weight_q is None else
                             weight_q[sl_r, sl_c].to(torch.float16))
            else:
                parts.append(QuantizedTensor(codes[sl_r, sl_c].contiguous(), rc.scale,
                                             rc.zero, sp.bits, sp.group_size, rc.scale_bits,
                                             rc.step))
        return GPTQResult(codes=None, scale=None, zero=None, bits=None, group_size=None,
                          weight=weight_q, damp=lam, loss=float(sum(losses)),
                          parts=tuple(parts), segments=segs, losses=tuple(losses))

    def quantize(self, weight: torch.Tensor, bits: Any, group_size: int, *,
                 bits_axis: int | None = None, damp: float = 0.01, act_order: bool = False,
                 block_size: int = 128, max_escalations: int = 6) -> GPTQResult:
        """Quantize ``weight`` [rows, columns] with GPTQ, one group size for the matrix.

        The older interface (``quantize_segments`` is the general one): same algorithm and
        engine, whole-matrix maps in the result.

        Args:
            weight: the layer's weight ``W`` ``[out_features, in_features]``; not modified.
            bits: an int (1..8, 16), a per-row integer tensor ``[rows]`` (units along rows:
                q/k/v/gate/up), a per-column-group tensor ``[ngroups]`` (units along
                columns: o_proj/down_proj), or a full map ``[rows, ngroups]``, with
                ``ngroups = ceil(cols / group_size)``. 16 keeps a part in fp16 (it still
                absorbs the error of the other columns).
            group_size: columns per group (any positive integer: the last group may be short).
            bits_axis: 0 or 1 to say what a 1-D ``bits`` is when rows == ngroups.
            damp: λ = damp · mean(diag H) added to the diagonal (escalates ×10 on failure).
            act_order: quantize columns in order of decreasing ``diag H`` with static groups
                (see ``quantize_segments``).
            block_size: columns per lazy batch update (B in the paper).
            max_escalations: how many ×10 escalations of λ before giving up.

        Returns:
            A ``GPTQResult`` for the whole matrix (``codes``/``scale``/``zero``/``bits`` maps).

        Raises:
            ValidationError: bad arguments or no calibration inputs.
            NumericalError: Cholesky fails even at the largest damping.
        """
        W0 = self._check_call(weight, damp, block_size)
        rows, cols = W0.shape
        g = check_group_size(group_size)
        dev = self.H.device
        ngroups = num_groups(cols, g)
        bmap = bits_map(bits, rows, ngroups, bits_axis, dev)
        rect = _Rect(0, rows, 0, cols, g, bmap,
                     torch.ones((rows, ngroups), dtype=torch.float16, device=dev),
                     torch.zeros((rows, ngroups), dtype=torch.float16, device=dev))
        # one pass over all rows: the whole-matrix maps are built in place
        codes, weight_q, loss_rows, _, lam = self._run(
            W0, [rect], [(0, rows)], damp, act_order, block_size, max_escalations, rows, True)
        return GPTQResult(codes=codes, scale=rect.scale, zero=rect.zero, bits=bmap,
                          group_size=g, weight=weight_q, damp=lam,
                          loss=float(loss_rows.sum()) * 0.5)

    # --------------------------------------------------------------------------------------
    # the engine
    # --------------------------------------------------------------------------------------

    def _run(self, W0: torch.Tensor, rects: list[_Rect], ranges: list[tuple[int, int]],
             damp: float, act_order: bool, block_size: int, max_escalations: int,
             row_chunk: int | None, return_weight: bool, col_loss: bool = False):
        """Quantize every row chunk; returns (codes, weight | None, loss per row, loss per
        column, λ). Scale/zero are written into the rectangles."""
        rows, cols = W0.shape
        dev = self.H.device
        dead, perm, Hinv, lam = self._factor(damp, act_order, max_escalations)
        if row_chunk is None:
            row_chunk = _default_row_chunk(cols)
        if isinstance(row_chunk, bool) or not isinstance(row_chunk, int) or row_chunk <= 0:
            raise ValidationError("row_chunk", f"{row_chunk!r}; valid: a positive integer")
        codes = torch.zeros((rows, cols), dtype=torch.uint8, device=dev)
        weight_q = torch.empty((rows, cols), dtype=torch.float32, device=dev) \
            if return_weight else None
        loss_rows = torch.zeros(rows, dtype=torch.float64, device=dev)
        loss_cols = torch.zeros(cols, dtype=torch.float64, device=dev)
        for rect in rects:
            if not return_weight and bool((rect.bits == 16).all()):
                rect.fp16 = torch.empty((rect.r1 - rect.r0, rect.c1 - rect.c0),
                                        dtype=torch.float16, device=dev)
        for pieces in _row_pieces(ranges, row_chunk):
            a, b = pieces[0][0], pieces[-1][1]
            self._run_chunk(W0, a, b, [(p0 - a, p1 - a) for p0, p1 in pieces], rects, dead,
                            perm, Hinv, block_size, codes, weight_q, loss_rows,
                            loss_cols if col_loss else None)
        return codes, weight_q, loss_rows, loss_cols, lam

    @staticmethod
    def _events(rects: list[_Rect], a: int, b: int, dev) -> list[_Event]:
        """Every group of every rectangle clipped to chunk rows a:b."""
        out = []
        for rc in rects:
            ra, rb = max(rc.r0, a), min(rc.r1, b)
            if ra >= rb:
                continue
            bm = rc.bits[ra - rc.r0:rb - rc.r0]
            is16 = bm == 16
            maxq = torch.where(is16, 0, (1 << bm.clamp(max=8)) - 1).to(torch.float64)
            for gi in range(bm.shape[1]):
                c = rc.c0 + gi * rc.group_size
                e16 = is16[:, gi]
                out.append(_Event(rc, gi, ra - a, rb - a, c, min(c + rc.group_size, rc.c1),
                                  maxq[:, gi].contiguous(), e16.contiguous(),
                                  bool(e16.all())))
        return out

    @staticmethod
    def _set_params(ev: _Event, values: torch.Tensor, a: int, s_out: torch.Tensor,
                    z_out: torch.Tensor, col_weight: torch.Tensor | None = None) -> None:
        """Grid parameters of one group from ``values`` [rows, span]; stored in the
        rectangle (fp16) and written (float64) into s_out / z_out (the group's rows).
        ``col_weight`` [span]: the weight of each column's squared error (``"hmse"``)."""
        rc = ev.rect
        rows = slice(ev.ra + a - rc.r0, ev.rb + a - rc.r0)
        if ev.all16:
            s_out.fill_(1.0)
            z_out.fill_(0.0)
            return
        # 16-bit rows get throwaway parameters (maxq 1 keeps the division finite).
        if rc.step is not None:  # a double-quantized segment (never 16-bit rows)
            step = rc.step[rows, (ev.gi * rc.group_size) // SUPER_COLS]
            s, z = group_params(values, ev.maxq, rc.grid, step, rc.scale_bits, col_weight)
        else:
            s, z = group_params(values, ev.maxq.clamp(min=1), rc.grid, col_weight=col_weight)
        s = torch.where(ev.is16, rc.scale[rows, ev.gi], s)
        z = torch.where(ev.is16, rc.zero[rows, ev.gi], z)
        rc.scale[rows, ev.gi] = s
        rc.zero[rows, ev.gi] = z
        s_out.copy_(s)
        z_out.copy_(z)

    def _run_chunk(self, W0, a, b, pieces, rects, dead, perm, Hinv, block_size, codes,
                   weight_q, loss_rows, loss_cols) -> None:
        """Algorithm 1 on rows a:b. Works on the transpose (one contiguous row per column of
        W): the per-column steps read and write contiguous vectors over the chunk's rows.

        Bit-exactness across chunkings: every per-column step is elementwise per row, and each
        matrix product (the lazy block update and the pending updates of a group straddling
        blocks) runs on one piece of rows at a time (a piece = one row segment, cut at
        ``row_chunk`` from its own start), so a row's result does not depend on the rows
        quantized beside it.
        """
        dev = Hinv.device
        cols = W0.shape[1]
        R = b - a
        f64 = torch.float64
        events = self._events(rects, a, b, dev)
        any16 = any(bool(ev.is16.any()) for ev in events)
        # "hmse": a column's squared error weighs as in GPTQ's loss, 1 / [chol(H⁻¹)]_jj²
        # (in quantization order, like Hinv)
        err_w = torch.diagonal(Hinv).reciprocal().square() \
            if any(clip_search(rc.grid) == "hmse" for rc in rects) else None
        is16_col = None
        if perm is not None:
            # The transpose is built in the quantization order directly (one pass), and the
            # static groups' parameters (from the original, dead-zeroed W) are written to the
            # permuted positions of their columns, so column i reads one contiguous vector.
            invperm = torch.argsort(perm)
            Wt = W0[a:b].detach().to(device=dev)[:, perm].to(f64).t().contiguous()
            Wt[dead[perm]] = 0.0
            # maxq / 16-bit masks as per-row vectors when no row changes them along its
            # columns (row segments), else per-column tables
            row_const = all(rc.c0 == 0 and rc.c1 == cols and
                            bool((rc.bits == rc.bits[:, :1]).all()) for rc in rects)
            S = torch.empty((cols, R), dtype=f64, device=dev)
            Z = torch.empty((cols, R), dtype=f64, device=dev)
            if row_const:
                M = None
                m_row = torch.zeros(R, dtype=f64, device=dev)
                is16_row = torch.zeros(R, dtype=torch.bool, device=dev) if any16 else None
            else:
                M = torch.zeros((cols, R), dtype=f64, device=dev)
                if any16:
                    is16_col = torch.zeros((cols, R), dtype=torch.bool, device=dev)
            s_tmp = torch.empty(R, dtype=f64, device=dev)
            z_tmp = torch.empty(R, dtype=f64, device=dev)
            for ev in events:
                sl = slice(ev.ra, ev.rb)
                pos = invperm[ev.c:ev.end]
                self._set_params(ev, Wt[pos, sl].t(), a, s_tmp[sl], z_tmp[sl],
                                 None if err_w is None else err_w[pos])
                S[pos, sl] = s_tmp[sl]
                Z[pos, sl] = z_tmp[sl]
                if M is not None:
                    M[pos, sl] = ev.maxq
                    if is16_col is not None:
                        is16_col[pos, sl] = ev.is16
                else:
                    m_row[sl] = ev.maxq
                    if is16_row is not None:
                        is16_row[sl] = ev.is16
            order = perm.tolist()
            starts: dict[int, list[_Event]] = {}
        else:
            Wt = W0[a:b].detach().to(device=dev, dtype=f64).t().contiguous()  # [cols, R]
            Wt[dead] = 0.0
            order = list(range(cols))
            starts = {}
            for ev in events:
                starts.setdefault(ev.c, []).append(ev)
            cur_s = torch.ones(R, dtype=f64, device=dev)
            cur_z = torch.zeros(R, dtype=f64, device=dev)
            cur_m = torch.zeros(R, dtype=f64, device=dev)
            cur16 = torch.zeros(R, dtype=torch.bool, device=dev) if any16 else None

        # the quantized weights of every column (transposed) are kept only when something
        # reads them afterwards: the returned weight or a 16-bit part's fp16 values
        keep_q = weight_q is not None or any(
            rc.fp16 is not None and max(rc.r0, a) < min(rc.r1, b) for rc in rects)
        Qt = torch.empty((cols, R) if keep_q else (1, R), dtype=f64, device=dev)
        Ct = torch.empty((cols, R), dtype=torch.uint8, device=dev)
        lossr = torch.zeros(R, dtype=f64, device=dev)
        lossc = None if loss_cols is None else torch.zeros(cols, dtype=f64, device=dev)
        qc = torch.empty(R, dtype=f64, device=dev)
        tmp = torch.empty((block_size, R), dtype=f64, device=dev)
        zero_codes = torch.zeros((), dtype=f64, device=dev)
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            nb = i2 - i1
            W1 = Wt[i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            hdiag = torch.diagonal(Hinv1).tolist()
            for j in range(nb):
                col = order[i1 + j]
                if perm is None:
                    for ev in starts.get(col, ()):
                        # The group starts here (columns run in order). Its params come from
                        # the *current* weights: the block's updated columns, and beyond the
                        # block the columns with this block's pending (lazy) updates applied.
                        sl = slice(ev.ra, ev.rb)
                        cur = W1[j:min(ev.end, i2) - i1, sl].t()
                        if ev.end > i2 and not ev.all16:
                            rest = Wt[i2:ev.end, sl].t() - \
                                Err1[:j, sl].t() @ Hinv[i1:i1 + j, i2:ev.end]
                            cur = torch.cat([cur, rest], dim=1)
                        self._set_params(ev, cur, a, cur_s[sl], cur_z[sl],
                                         None if err_w is None else err_w[ev.c:ev.end])
                        cur_m[sl] = ev.maxq
                        if cur16 is not None:
                            cur16[sl] = ev.is16
                    s, z, m, w16 = cur_s, cur_z, cur_m, cur16
                else:
                    s, z = S[i1 + j], Z[i1 + j]
                    if M is None:
                        m, w16 = m_row, is16_row
                    else:
                        m = M[i1 + j]
                        w16 = None if is16_col is None else is16_col[i1 + j]
                w = W1[j]
                # nearest code on the stored grid: clamp(round(w/s + z), 0, maxq)
                torch.div(w, s, out=qc)
                qc.add_(z).round_().clamp_(min=0.0)
                torch.minimum(qc, m, out=qc)
                q = Qt[col if keep_q else 0]
                # s·(q − z) is exact in fp32 and float64 alike (≤ 19 significant bits).
                torch.sub(qc, z, out=q)
                q.mul_(s)
                if w16 is not None:
                    torch.where(w16, w.to(torch.float16).to(f64), q, out=q)
                    torch.where(w16, zero_codes, qc, out=qc)
                Ct[col].copy_(qc)
                e = Err1[j]
                torch.sub(w, q, out=e)
                e.div_(hdiag[j])
                lossr.addcmul_(e, e)
                if lossc is not None:
                    lossc[col] = torch.dot(e, e)
                if j + 1 < nb:
                    t = tmp[:nb - j - 1]
                    torch.mul(Hinv1[j, j + 1:].unsqueeze(1), e.unsqueeze(0), out=t)
                    W1[j + 1:].sub_(t)
            if i2 < cols:
                Hblk = Hinv[i1:i2, i2:]
                for p0, p1 in pieces:
                    # the same product as Err1 @ Hinv[i1:i2, i2:] per piece (row-exact)
                    Wt[i2:, p0:p1].sub_((Err1[:, p0:p1].t() @ Hblk).t())
        codes[a:b] = Ct.t()
        if weight_q is not None:
            weight_q[a:b] = Qt.t().to(torch.float32)
        loss_rows[a:b] += lossr
        if lossc is not None:
            loss_cols += lossc
        for rc in rects:
            fp16 = getattr(rc, "fp16", None)
            if fp16 is not None:
                ra, rb = max(rc.r0, a), min(rc.r1, b)
                if ra < rb:
                    fp16[ra - rc.r0:rb - rc.r0] = Qt[rc.c0:rc.c1, ra - a:rb - a].t().to(
                        torch.float16)
