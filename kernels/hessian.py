"""The layer-wise Hessian ``H = 2XXᵀ/n`` of GPTQ, accumulated once for every caller.

One numerical recipe for every stage that needs it (profiling, apply, GPTQ): the running sum
``S = Σ_t x_t x_tᵀ`` over the n input vectors seen is kept in float64, and each batch's
product ``XᵀX`` is computed in float32 (a BLAS GEMM about twice as fast as float64) unless
the batch itself is float64 (then the product is float64 too: the caller asked for it).

Error of a float32 batch product (Higham §3.1): ``|fl(XᵀX) − XᵀX| ≤ γ_m·|X|ᵀ|X|`` for a batch
of m rows, ``γ_m = m·u/(1 − m·u)``, u = 2⁻²⁴; the float64 sum over batches then adds only
float64 rounding. ``S`` and ``n`` are public so a distributed caller can all-reduce them
(sum both) before calling ``matrix()``.
"""

from __future__ import annotations

import torch

from bitsack.errors import ValidationError

__all__ = ["Hessian"]


class Hessian:
    """Running ``S = Σ x xᵀ`` (float64) and token count ``n`` of one layer input.

    Args:
        columns: the input features (last dim of every ``x``).
        device: where ``S`` lives (default CPU); batches are moved there.

    Attributes:
        S: float64 ``[columns, columns]``, the sum of outer products.
        n: number of input vectors added.
    """

    def __init__(self, columns: int, device: torch.device | str | None = None):
        if isinstance(columns, bool) or not isinstance(columns, int) or columns <= 0:
            raise ValidationError("columns", f"{columns!r}; valid: a positive integer")
        self.columns = columns
        self.S = torch.zeros((columns, columns), dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """Add inputs ``x[..., columns]``; every leading index is one input vector."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.columns:
            last = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else None
            raise ValidationError("x", f"last dim {last}; valid: {self.columns} (the layer's "
                                  "input features)")
        if not x.is_floating_point():
            raise ValidationError("x", f"dtype {x.dtype}; valid: a floating-point tensor")
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.detach().reshape(-1, self.columns).to(device=self.S.device, dtype=dt)
        if x.shape[0] == 0:
            return
        self.S += (x.T @ x).to(torch.float64)
        self.n += int(x.shape[0])

    def merge(self, other: Hessian) -> Hessian:
        """Add another accumulator of the same input (e.g. from another process); returns self."""
        if not isinstance(other, Hessian) or other.columns != self.columns:
            got = other.columns if isinstance(other, Hessian) else type(other).__name__
            raise ValidationError("other", f"{got}; valid: a Hessian of {self.columns} columns")
        self.S += other.S.to(self.S.device)
        self.n += other.n
        return self

    def matrix(self) -> torch.Tensor:
        """GPTQ's ``H = 2·S/n`` (float64).

        Raises:
            ValidationError: nothing was added yet.
        """
        if self.n <= 0:
            raise ValidationError("hessian", "no calibration inputs were added; valid: call "
                                  "add(x) at least once")
        return 2.0 * self.S / self.n

    def __repr__(self) -> str:
        return f"Hessian(columns={self.columns}, n={self.n}, device={self.S.device})"
