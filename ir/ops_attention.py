"""Binary-code attention (ShiftAddViT, You et al., NeurIPS 2023, Sec. 4.1; after EcoFormer's hashing).

``binary_attention(qh, kh, v)`` takes the hash projections of queries and keys (``qh = q P_q - o_q``
``[..., T, b]``, ``kh = k P_k - o_k`` ``[..., S, b]``, computed by ordinary ops before it) and the
values ``v [..., S, Dv]``. Its codes are ``c = +1 where h >= 0 else -1`` (NaN gives -1: the compare
is false). The attention weight of query ``i`` on key ``j`` is one plus the number of matching bits,

    w_ij = 1 + m_ij,   m_ij = (b + c_qi . c_kj) / 2   in {0, ..., b},

always positive, so the normalizer never vanishes:

    out_i = sum_j w_ij v_j / sum_j w_ij.

This is a linear attention ``phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1)`` with the feature map
``phi(c) = [1, (1 + c) / 2, (1 - c) / 2]`` (so ``phi(c_q) . phi(c_k) = 1 + m``); as ShiftAddViT's
``B_Q (B_K^T V)`` it is evaluated without any T x S matrix and without multiplications:

    num_i = S_v + sum_l (c_qil > 0 ? A_l : S_v - A_l),   A_l = sum_{j: c_kjl > 0} v_j,   S_v = sum_j v_j
    den_i = S   + sum_l (c_qil > 0 ? n_l : S - n_l),     n_l = #{j: c_kjl > 0}

(sums of selected rows: additions only; ``den`` is an exact integer; one division per output).
``causal=True`` keeps ``j <= i`` (``T == S``): the same sums as prefix sums over the keys.

The numpy reference below states it directly (the integer ``w`` as a matrix, the weighted sum in
float64, one rounding to float32); kernels are checked against it: the integer parts (codes,
matching counts, ``den``) exactly, the float sums within ``BINARY_ATTENTION_RTOL`` of ``max |v|``.
Registered into :data:`reshift.ir.ops.OPS`, tagged ``custom`` (ONNX domain ``ai.reshift``).
"""

from __future__ import annotations

import numpy as np

from reshift.errors import IRTypeError
from reshift.ir.ops import Attr, register
from reshift.ir.types import TensorType

# float32 sums of S terms against the float64 reference: |err| <= ~S * 2^-24 * max|v| in the worst
# case; the kernels stay far below it (measured ~1e-7). Tests use this bound, scaled by max|v|.
BINARY_ATTENTION_RTOL = 2e-6
MAX_DENOMINATOR = 2**24  # S * (b + 1) must be an exact float32 integer


def binary_codes(h: np.ndarray) -> np.ndarray:
    """int8 ``+1`` where ``h >= 0``, else ``-1`` (NaN: -1)."""
    return np.where(np.asarray(h) >= 0, np.int8(1), np.int8(-1))


def matching_weights(qh: np.ndarray, kh: np.ndarray, causal: bool) -> np.ndarray:
    """int64 ``w [..., T, S] = 1 + (b + c_q . c_k) / 2`` (0 above the diagonal when ``causal``)."""
    b = qh.shape[-1]
    cq, ck = binary_codes(qh).astype(np.int64), binary_codes(kh).astype(np.int64)
    w = 1 + (b + cq @ np.swapaxes(ck, -1, -2)) // 2
    if causal:
        w = w * np.tril(np.ones(w.shape[-2:], np.int64))
    return w


def binary_attention_ref(qh: np.ndarray, kh: np.ndarray, v: np.ndarray, causal: bool = False) -> np.ndarray:
    """``sum_j w_ij v_j / sum_j w_ij`` in float64 with the integer weights of :func:`matching_weights`."""
    w = matching_weights(qh, kh, causal)
    num = w.astype(np.float64) @ v.astype(np.float64)
    den = w.sum(axis=-1, keepdims=True).astype(np.float64)
    return (num / den).astype(np.float32)


def _infer(qh: TensorType, kh: TensorType, v: TensorType, causal: bool) -> list[TensorType]:
    op = "binary_attention"
    for name, t in (("qh", qh), ("kh", kh), ("v", v)):
        if t.dtype != "float32":
            raise IRTypeError(f"{op}: {name} {t} must be float32")
        if t.rank < 2:
            raise IRTypeError(f"{op}: {name} {t} must be [..., tokens, channels]")
    if not (qh.rank == kh.rank == v.rank) or qh.shape[:-2] != kh.shape[:-2] or kh.shape[:-2] != v.shape[:-2]:
        raise IRTypeError(f"{op}: qh {qh}, kh {kh} and v {v} must share their leading (batch, head) dims")
    if qh.shape[-1] != kh.shape[-1]:
        raise IRTypeError(f"{op}: qh {qh} and kh {kh} must have the same number of code bits")
    if kh.shape[-2] != v.shape[-2]:
        raise IRTypeError(f"{op}: kh {kh} and v {v} must have the same number of key tokens")
    bits, keys = qh.shape[-1], kh.shape[-2]
    if not isinstance(bits, int) or bits < 1:
        raise IRTypeError(f"{op}: the code width {bits!r} must be a static positive integer")
    if isinstance(keys, int) and keys * (bits + 1) >= MAX_DENOMINATOR:
        raise IRTypeError(f"{op}: {keys} keys x {bits + 1} weight levels do not fit an exact float32 normalizer")
    if causal and qh.shape[-2] != keys:
        raise IRTypeError(f"{op}: causal attention needs as many queries as keys, got {qh} and {kh}")
    return [v.with_shape(qh.shape[:-1] + (v.shape[-1],))]


def _macs(out_shape, *_) -> int:
    """One division per output element; codes, counts and the row sums are compares and adds."""
    return int(np.prod(out_shape))


def binary_attention_mults(
    tokens: int, keys: int, dim: int, v_dim: int, bits: int, local_taps: int = 0
) -> tuple[int, int]:
    """Multiplications per head of ``softmax(q k^T s) v`` (``q k^T``, the scale, softmax's normalizing
    divide, ``P V``) and of its binary-code replacement (the two hash projections, one divide per output,
    and ``local_taps`` multiply-adds per value element for the pass's local token mix)."""
    softmax_form = tokens * keys * dim + 2 * tokens * keys + tokens * keys * v_dim
    code_form = tokens * dim * bits + keys * dim * bits + tokens * v_dim + local_taps * keys * v_dim
    return softmax_form, code_form


register(
    "binary_attention",
    ["qh", "kh", "v"],
    {"causal": Attr("bool", False)},
    _infer,
    binary_attention_ref,
    "ShiftAddViT binary-code linear attention: codes sign(qh), sign(kh) in {-1,+1}^b, weights 1 + matching "
    "bits, out = sum_j w_ij v_j / sum_j w_ij (causal: j <= i)",
    macs=_macs,
    tags={"custom"},
)

__all__ = [
    "BINARY_ATTENTION_RTOL",
    "binary_attention_mults",
    "binary_attention_ref",
    "binary_codes",
    "matching_weights",
]
