"""A priori error bounds of the packed kernels, per output element.

Notation: one output ``y_i = Σ_j ŵ_ij x_j + b_i`` over n = in_features terms, ŵ the exact
dequantized weight (``s·(q − z)``, exact in fp32: see ``bitsack.kernels.grid``), x the
input as given, u the unit roundoff of a format (fp32 2⁻²⁴, fp16 2⁻¹¹, bf16 2⁻⁸, fp64 2⁻⁵³)
and ``γ_n = n·u/(1 − n·u)`` (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1:
a dot product of n terms summed in *any* order — sequential, pairwise, split-K, a warp's
shuffle tree, with or without FMA — is within γ_n Σ|terms| of the exact one).

A backend's arithmetic is described by ``Numerics``; ``output_error_bound`` then bounds the
distance of its output to the float64 reference output, one step at a time:

1. inputs rounded for the kernel: ŵ' = fl_d(ŵ) (``dequant_u``, plus ``dequant_eta`` for the
   absolute error of subnormals, 2⁻²⁵ in fp16) and x' = fl_c(x) (``x_u``):
   ``|Σ ŵ'x' − Σ ŵx| ≤ ((1+u_d)(1+u_x) − 1)·A + η_d(1+u_x)·Σ|x|  =: E_in``, A = Σ_j|ŵ_ij x_j|;
2. the sum in the accumulator: ``γ_{n+1}(A + E_in + |b|)`` when the bias is added inside the
   fp32 sum; when the product is first rounded to a narrower dtype (``sum_u``, e.g. an fp16
   GEMM output) and the bias added afterwards in fp32: γ_n(A + E_in), then
   ``u_s·(|S| + E) + η_s`` for the rounding of the sum, then ``u·(|S + b| + E)`` for the fp32
   bias add;
3. the output rounding to the result dtype: ``u_out·(|y| + E) + η_out``;
4. the float64 reference's own error, ``γ_{n+1}^{(64)}·(A + |b|)``, so that the bound holds
   against the *computed* reference, not only the exact value.

|S| and |y| are bounded with the reference output itself (plus its error), and A is computed in
float64 from |ŵ| and |x| and inflated by its own γ^{(64)}, so the bound is rigorous in
floating point. Overflow is excluded (outputs and dequantized fp16 weights must be finite).

For min-max RTN against the *unquantized* weights, ``rtn_error_bound``:
``|Σ_j (ŵ_ij − w_ij) x_j| ≤ RTN_SLACK · Σ_g (s_g/2) Σ_{j∈g} |x_j|`` where s_g is the *stored*
fp16 scale (rounded up when stored, so the grid covers the group: see the quantizer) and
``RTN_SLACK = 1 + 2⁻³⁰`` covers the float64 rounding in choosing codes (≤ 2⁻⁴⁰·s) and the
float64 evaluation of both sides (n·2⁻⁵³ relative, for n < 10⁶ columns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsack.errors import ValidationError

__all__ = [
    "Numerics",
    "RTN_SLACK",
    "U_BF16",
    "U_FP16",
    "U_FP32",
    "U_FP64",
    "gamma",
    "layer_error_bound",
    "output_error_bound",
    "rtn_error_bound",
    "unit_roundoff",
]

U_FP64 = 2.0**-53
U_FP32 = 2.0**-24
U_FP16 = 2.0**-11
U_BF16 = 2.0**-8
#: Absolute rounding error of fp16 in its subnormal range (half its smallest step 2⁻²⁴).
ETA_FP16 = 2.0**-25
#: Same for bf16 and fp32 (subnormal steps 2⁻¹³³ and 2⁻¹⁴⁹).
ETA_BF16 = 2.0**-134
ETA_FP32 = 2.0**-150
RTN_SLACK = 1.0 + 2.0**-30

_U = {torch.float64: (U_FP64, 0.0), torch.float32: (U_FP32, ETA_FP32),
      torch.float16: (U_FP16, ETA_FP16), torch.bfloat16: (U_BF16, ETA_BF16)}


def unit_roundoff(dtype: torch.dtype) -> tuple[float, float]:
    """``(u, η)``: relative unit roundoff and absolute subnormal error of a float dtype."""
    try:
        return _U[dtype]
    except KeyError:
        raise ValidationError("dtype", f"{dtype} has no rounding model; valid: float64, "
                              "float32, float16, bfloat16") from None


def rounding(from_dtype: torch.dtype, to_dtype: torch.dtype) -> tuple[float, float]:
    """``(u, η)`` of converting ``from_dtype`` values to ``to_dtype`` (``(0, 0)`` if exact)."""
    exact = {torch.float64: {torch.float64, torch.float32, torch.float16, torch.bfloat16},
             torch.float32: {torch.float32, torch.float16, torch.bfloat16}}
    if from_dtype == to_dtype or from_dtype in exact.get(to_dtype, ()):
        return 0.0, 0.0
    return unit_roundoff(to_dtype)


def gamma(n: int, u: float = U_FP32) -> float:
    """``γ_n = n·u/(1 − n·u)``; raises if n·u ≥ 1 (no bound exists)."""
    if n * u >= 1.0:
        raise ValidationError("n", f"{n} terms at unit roundoff {u:g} give n·u ≥ 1; no bound")
    return n * u / (1.0 - n * u)


@dataclass(frozen=True)
class Numerics:
    """The floating-point recipe of a backend, for one call.

    Attributes:
        dequant_u: relative rounding of ŵ stored in a narrower dtype (0: exact, fp32).
        dequant_eta: absolute rounding of ŵ in the subnormal range of that dtype.
        x_u: relative rounding of x into the compute dtype (0: exact).
        accum_u: unit roundoff of the accumulator (fp32).
        sum_u: rounding of the sum before the bias is added (0: bias inside the sum).
        sum_eta: its subnormal floor.
        out_u: rounding of the result to the output dtype (0: output is fp32/fp64).
        out_eta: its subnormal floor.
    """

    dequant_u: float = 0.0
    dequant_eta: float = 0.0
    x_u: float = 0.0
    accum_u: float = U_FP32
    sum_u: float = 0.0
    sum_eta: float = 0.0
    out_u: float = 0.0
    out_eta: float = 0.0


def output_error_bound(w_hat: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None,
                       numerics: Numerics = Numerics(),
                       y_ref: torch.Tensor | None = None) -> torch.Tensor:
    """Bound on ``|y − y_ref|`` per output, for a backend with ``numerics``.

    Args:
        w_hat: the exact dequantized weight ``[out, in]`` (e.g. ``layer.dequantize()``).
        x: input ``[..., in]``.
        bias: optional ``[out]``.
        numerics: the backend's arithmetic.
        y_ref: the float64 reference output ``[..., out]`` (computed here if None).

    Returns:
        float64 tensor shaped like the output, ``[..., out]``.
    """
    n = w_hat.shape[1]
    w64 = w_hat.detach().to(torch.float64)
    x64 = x.detach().to(torch.float64).reshape(-1, n)
    b64 = None if bias is None else bias.detach().to(torch.float64)
    if y_ref is None:
        y_ref = x64 @ w64.T + (0.0 if b64 is None else b64)
    y_abs = y_ref.detach().to(torch.float64).reshape(x64.shape[0], -1).abs()
    # Σ|ŵx| and Σ|x| in float64, inflated by their own rounding (all terms are ≥ 0).
    infl = 1.0 + gamma(n + 1, U_FP64)
    A = (x64.abs() @ w64.abs().T) * infl
    X1 = x64.abs().sum(-1, keepdim=True) * infl
    B = 0.0 if b64 is None else b64.abs()
    nm = numerics
    ref_err = gamma(n + 1, U_FP64) * (A + B)
    S_abs = y_abs + ref_err + B  # |Σ ŵx| ≤ |y_ref| + ref_err + |b|

    e_in = ((1 + nm.dequant_u) * (1 + nm.x_u) - 1) * A + nm.dequant_eta * (1 + nm.x_u) * X1
    if nm.sum_u == 0.0:
        err = e_in + gamma(n + 1, nm.accum_u) * (A + e_in + B)
    else:
        err = e_in + gamma(n, nm.accum_u) * (A + e_in)
        err = err + nm.sum_u * (S_abs + err) + nm.sum_eta
        if b64 is not None:
            err = err + nm.accum_u * (y_abs + ref_err + err)
    err = err + nm.out_u * (y_abs + ref_err + err) + nm.out_eta
    err = err + ref_err
    return err.reshape(*x.shape[:-1], w_hat.shape[0])


def layer_error_bound(layer, x: torch.Tensor, backend: str | None = None,
                      y_ref: torch.Tensor | None = None) -> torch.Tensor:
    """``output_error_bound`` of a ``PackedLinear`` on its (or the named) backend."""
    from bitsack.kernels.registry import get_backend  # filled when the backends were imported

    be = get_backend(backend or layer.backend)
    return output_error_bound(layer.dequantize(torch.float64), x, layer.bias,
                              be.numerics(layer, x), y_ref=y_ref)


def rtn_error_bound(scale: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Bound on ``|Σ_j (ŵ_ij − w_ij) x_j|`` for min-max RTN with stored fp16 ``scale``.

    Args:
        scale: the stored scales ``[rows, ceil(cols / group_size)]``.
        x: input ``[..., cols]``; group g covers columns ``[g·G, min((g+1)·G, cols))``, so a
            short last group sums only its own columns.
        group_size: columns per group.

    Returns:
        float64 ``[..., rows]``: ``RTN_SLACK · Σ_g (s_g/2) Σ_{j∈g}|x_j|``.
    """
    rows, ngroups = scale.shape
    cols = x.shape[-1]
    if group_size <= 0 or -(-cols // group_size) != ngroups:
        raise ValidationError("x", f"last dim {cols} does not make {ngroups} groups of "
                              f"{group_size}; valid: {(ngroups - 1) * group_size + 1}.."
                              f"{ngroups * group_size}")
    xa = x.detach().to(torch.float64).abs().reshape(-1, cols)
    pad = ngroups * group_size - cols  # zeros: a short last group sums its own columns only
    xg = torch.nn.functional.pad(xa, (0, pad)).reshape(-1, ngroups, group_size).sum(-1)
    out = (xg @ (scale.to(torch.float64) / 2).T) * RTN_SLACK
    return out.reshape(*x.shape[:-1], rows)
