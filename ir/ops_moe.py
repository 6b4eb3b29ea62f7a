"""``moe_linear``: a linear layer as a mixture of a multiplication expert and a shift expert
(ShiftAddViT, You et al., NeurIPS 2023, Sec. 4.3: "mixture of multiplication primitives").

Every row (token) of ``x [..., K]`` goes to exactly one expert (top-1 routing of two experts):

* the **multiplication expert**: ``x @ weight^T`` in float32 (the original ``linear``);
* the **shift expert**: reshift's ``shift_linear`` on the same row, ``W ~ scale[o] * sign[o,i] *
  2^-exponent[o,i]`` (DeepShift-PS), per-row int8 activations, int32 shift-add accumulation
  (:func:`reshift.ir.ops_lowbit.shift_rows`);

then ``+ bias`` (one bias shared by both experts). The router reads the shift expert's int8 codes
of the row, so routing is integer-exact and costs no second quantization:

``acc[r] = sum_k q[r,k] * router[k]`` (int32; ``q``, ``s`` from :func:`quantize_rows_int8`),
``p[r] = (float32(acc[r]) * s[r]) * router_scale`` (float32, left to right), ``d[r] = p[r] +
router_bias``; row ``r`` goes to the shift expert iff ``d[r] > 0``, evaluated as ``p[r] >
-router_bias`` (the same decision: a rounded sum is positive iff the exact one is), so no fused
multiply-add can change it. Ties (``d = 0``) and NaN (a row holding NaN
or +-inf has ``s`` = inf, so ``d`` = NaN) go to the multiplication expert; an all-zero row has
``d = router_bias``. This ``d`` is the logit difference ``l_shift - l_mult`` of ShiftAddViT's
two-way softmax router, with its weights int8-coded.

No gate value scales the output (hard top-1 dispatch at inference); recovery training uses the
router's probabilities only in the backward pass and the load-balancing loss. ``macs`` counts the
worst case (every row through the multiplication expert) plus the quantization and the router;
the share of rows the shift expert takes is data dependent and reported by the pass
(:func:`multiplications_removed`).
"""

from __future__ import annotations

import numpy as np

from reshift.errors import IRTypeError
from reshift.ir.ops import Attr, register
from reshift.ir.ops_lowbit import (
    _check_exponent_bits,
    _check_shift_codes,
    _check_weight_type,
    _check_x_bias,
    _finish,
    _rows,
    quantize_rows_int8,
)

MULT, SHIFT = 0, 1  # expert indices (the order of the router's two logits)


def shift_rows_blas(x2: np.ndarray, sign, exponent, scale, exponent_bits: int) -> np.ndarray:
    """:func:`shift_rows`, bit-identical, with the integer matmul in float64 BLAS: every product and
    partial sum is an integer below 2^31 < 2^53, so float64 holds it exactly (numpy's int64 matmul has
    no BLAS and is ~50x slower); the float32 steps after it are :func:`shift_rows`'s own."""
    e_max = 2**exponent_bits - 1
    q, s, finite = quantize_rows_int8(x2)
    w_int = sign.astype(np.float64) * np.exp2(e_max - exponent.astype(np.float64))
    acc = q.astype(np.float64) @ w_int.T
    y = acc.astype(np.float32) * np.float32(2.0**-e_max)
    y = y * s[:, None]
    y = y * scale.astype(np.float32)[None, :]
    y[~finite] = np.nan
    return y


def route_rows(
    q: np.ndarray, s: np.ndarray, router: np.ndarray, router_scale: np.ndarray, router_bias: np.ndarray
) -> np.ndarray:
    """``True`` where a row goes to the shift expert (module docstring): ``q [M, K]`` int codes, ``s [M]``."""
    acc = q.astype(np.float64) @ router.astype(np.float64)  # integers below 2^31: exact (as int64)
    p = acc.astype(np.float32) * s.astype(np.float32)
    p = p * np.float32(router_scale.reshape(-1)[0])
    return p > -np.float32(router_bias.reshape(-1)[0])  # <=> p + router_bias > 0, with no add to round


def router_score(x2: np.ndarray, router, router_scale, router_bias) -> np.ndarray:
    """``d[r]`` of the module docstring for float rows ``x2 [M, K]`` (NaN for non-finite rows)."""
    q, s, _ = quantize_rows_int8(x2)
    with np.errstate(invalid="ignore"):
        d = (q.astype(np.float64) @ router.astype(np.float64)).astype(np.float32) * s
        return d * np.float32(router_scale.reshape(-1)[0]) + np.float32(router_bias.reshape(-1)[0])


def routes(x: np.ndarray, router, router_scale, router_bias) -> np.ndarray:
    """The routing decision of every row of ``x [..., K]`` as a bool array ``[rows]`` (True: shift)."""
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float32)
    q, s, _ = quantize_rows_int8(x2)
    with np.errstate(invalid="ignore"):
        return route_rows(q, s, router, router_scale, router_bias)


def _moe_reference(x, router, router_scale, router_bias, weight, sign, exponent, scale, bias, exponent_bits):
    """Rows routed by :func:`route_rows`; multiplication rows ``x @ weight^T`` (float32), shift rows
    :func:`reshift.ir.ops_lowbit.shift_rows` (computed as :func:`shift_rows_blas`); then ``+ bias`` in float32."""
    _check_shift_codes("moe_linear", sign, exponent, exponent_bits)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).astype(np.float32)
    to_shift = routes(x2, router, router_scale, router_bias)
    y = np.empty((x2.shape[0], weight.shape[0]), np.float32)
    y[~to_shift] = x2[~to_shift] @ weight.astype(np.float32).T
    y[to_shift] = shift_rows_blas(x2[to_shift], sign, exponent, scale, exponent_bits)
    return _finish(y, bias, lead)


def _moe_infer(x, router, router_scale, router_bias, weight, sign, exponent, scale, bias, exponent_bits):
    if weight.rank != 2:
        raise IRTypeError(f"moe_linear: weight must be a float32 matrix [out, in], got {weight}")
    out, k = weight.shape
    if x.dtype != "float32":
        raise IRTypeError(f"moe_linear: input {x} must be float32")
    types = _check_x_bias("moe_linear", x, k, out, bias)
    _check_exponent_bits("moe_linear", exponent_bits)
    _check_weight_type("moe_linear", weight, "weight", "float32", (out, k))
    _check_weight_type("moe_linear", router, "router", "int8", (k,))
    _check_weight_type("moe_linear", router_scale, "router_scale", "float32", (1,))
    _check_weight_type("moe_linear", router_bias, "router_bias", "float32", (1,))
    _check_weight_type("moe_linear", sign, "sign", "int8", (out, k))
    _check_weight_type("moe_linear", exponent, "exponent", "uint8", (out, k))
    _check_weight_type("moe_linear", scale, "scale", "float32", (out,))
    return types


def _moe_macs(out_shape, x, router, router_scale, router_bias, weight, *_):
    out, k = int(weight[0]), int(weight[1])
    return _rows(out_shape) * (out * k + 2 * k)  # worst case: every row multiplied; + quantize and router


register(
    "moe_linear",
    ["x", "router", "router_scale", "router_bias", "weight", "sign", "exponent", "scale", "bias?"],
    {"exponent_bits": Attr("int", 4)},
    _moe_infer,
    _moe_reference,
    "ShiftAddViT mixture: each row routed (int8 router on the row's int8 codes, d > 0 -> shift) to a "
    "float32 linear or a DeepShift-PS shift_linear expert, + bias",
    macs=_moe_macs,
    tags={"custom", "contraction"},
)


def multiplications_removed(shift_share: float, out_features: int, in_features: int) -> float:
    """The fraction of a ``linear``'s ``O*K`` multiplies per row a ``moe_linear`` no longer does, when
    ``shift_share`` of the rows take the shift expert: a multiplication row costs ``O*K``, a shift row
    ``O`` rescales, every row ``K`` quantizing divides and ``K`` router multiplies (int8)."""
    o, k = out_features, in_features
    per_row = (1.0 - shift_share) * o * k + shift_share * o + 2 * k
    return 1.0 - per_row / (o * k)


__all__ = ["MULT", "SHIFT", "multiplications_removed", "route_rows", "router_score", "routes", "shift_rows_blas"]
