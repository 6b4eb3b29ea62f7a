"""``shift_linear`` on int8 dot products (AVX-512 VNNI ``vpdpbusd``), bit-exact, for 7-level shift codes.

Where the nonzero weights of every output channel use at most 7 exponents, ``hi_o - lo_o <= 6``
(what option ``shift_levels <= 7`` of ``passes/shift.py`` produces), ``w[o,i] = sign * 2^(E - exponent)
= 2^(E - hi_o) * v[o,i]`` with ``v = sign * 2^(hi_o - exponent)`` in ``[-64, 64]``: an int8 (``hi_o``,
``lo_o``: the channel's largest and smallest exponent, ``E = 2^bits - 1``). ``hi_o - lo_o = 7`` fits
too when every weight at ``lo_o`` has one sign (``-128`` is an int8: a channel whose top weights are
positive is negated, as ``shift_int.encode_int16`` does for int16). Then the reference's accumulator
is ``acc[r,o] = 2^(E - hi_o) * D[r,o]`` with ``D = sum_i q[r,i] v[o,i]``, and

* ``vpdpbusd`` multiplies unsigned by signed bytes: the activation codes go in as ``q + 128``
  (``[1, 255]``) and ``128 * sum_i v[o,i]`` is taken off once per output, exact in int32
  (``|D| <= 127 * 128 * K``);
* ``float32(acc) * 2^-E = float32(D) * p[o]`` with ``p = +-2^-hi_o`` exactly (scaling by a power of
  two commutes with rounding to float32; ``|D| >= 1`` keeps both sides normal), so the reference's
  float steps ``((float32(acc) * 2^-E) * s[r]) * scale[o] + bias`` run as written and the output is
  bit-exact: ``int8_fused.gemm_rescale_func(shift=True)``, the GEMM, rescale and bias in one kernel.
  (A zero of a negated channel is ``-0.0`` before the bias add: only a ``-0.0`` bias keeps it.)

Four multiply-adds per 32-bit lane per instruction, twice the int16 kernel's, and no separate
rescale pass. On aarch64 with the dot product (preset ``arm64-dotprod``) the same codes run on
``int8_gemm``'s ``sdot`` GEMM and the float steps as elementwise ops (:func:`shift_matmul_sdot`).
Other layers (a wider spread, or mixed signs at a spread of 7) and other CPUs keep ``shift_int``'s
int16 kernel; :func:`shift_matmul_cpu` chooses per layer.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from reshift.codegen.tvm import knobs as knob_db
from reshift.codegen.tvm.kernels import int8_fused, int8_gemm, shift_int
from reshift.codegen.tvm.kernels.shift_int import Int8Weights, encode_int8
from reshift.codegen.tvm.lower import LowerContext, op


def _channel_vector(ctx: LowerContext, value: relax.Expr | np.ndarray | None, out: int, width: int) -> relax.Expr:
    """A per-channel float32 vector (a constant, an expression or None = zeros) padded with zeros to ``width``."""
    if value is None or isinstance(value, np.ndarray):
        full = np.zeros(width, np.float32)
        if value is not None:
            full[:out] = value
        return relax.const(full)
    if width == out:
        return value
    return ctx.emit(op.concat([value, relax.const(np.zeros(width - out, np.float32))], axis=0))


def shift_matmul_int8(
    ctx: LowerContext, x2: relax.Expr, rows, weights: Int8Weights, scale: relax.Expr, bias: relax.Expr | None, bits: int
) -> relax.Expr:
    """``shift_linear`` on ``x2 [rows, K]`` as ``[rows, O]`` float32, bias included, on the VNNI kernel."""
    out, k = weights.code.shape
    packed = int8_gemm.pack_weights(weights.code)
    blocks, k4 = packed.shape[:2]
    width = blocks * int8_fused.LANES
    q8, s = shift_int.quantize_rows_codes(ctx, x2, k, multiple=4, dtype="uint8", offset=128)
    offset, p_out = _channel_factors(weights, bits)
    wsum = np.zeros(width, np.int32)
    wsum[:out] = offset
    p = np.ones(width, np.float32)
    p[:out] = p_out
    factors = ctx.emit(op.concat([relax.const(p), _channel_vector(ctx, scale, out, width)], axis=0))
    shape = {"rows": rows, "blocks": blocks, "k4": k4}
    knobs = knob_db.choose("int8_gemm_rescale_vnni", shape) if isinstance(rows, int) else None
    gv = ctx.bb.add_func(int8_fused.gemm_rescale_func(blocks, k4, knobs, shift=True), "shift_int8_gemm_vnni")
    args = [q8, s, relax.const(packed), relax.const(wsum), factors, _channel_vector(ctx, bias, out, width)]
    y = ctx.emit(relax.op.call_tir(gv, args, out_ty=relax.TensorType((rows, width), "float32")))
    if width != out:
        y = ctx.emit(op.strided_slice(y, axes=[1], begin=[0], end=[out]))
    return y


def _channel_factors(weights: Int8Weights, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(128 * sum_k v[o, k]`` int32, ``p[o] = mult[o] * 2^-E`` float32)`` per output channel."""
    offset = (128 * weights.code.astype(np.int64).sum(axis=1)).astype(np.int32)
    return offset, (weights.mult.astype(np.float64) * 2.0 ** -(2**bits - 1)).astype(np.float32)


def shift_matmul_sdot(
    ctx: LowerContext, x2: relax.Expr, rows, weights: Int8Weights, scale: relax.Expr, bias: relax.Expr | None, bits: int
) -> relax.Expr:
    """``shift_linear`` on ``x2 [rows, K]`` (bias included) on aarch64's ``sdot``: ``D = sum (q + 128) v -
    128 sum v``, then ``((float32(D) * p) * s) * scale + bias`` (module docstring)."""
    out, k = weights.code.shape
    q8, s = shift_int.quantize_rows_codes(ctx, x2, k, multiple=4, dtype="uint8", offset=128)
    packed = int8_gemm.pack_weights(weights.code)
    acc = int8_gemm.sdot_gemm(ctx, q8, rows, weights.code, packed)
    if packed.shape[0] * int8_fused.LANES != out:
        acc = ctx.emit(op.strided_slice(acc, axes=[1], begin=[0], end=[out]))
    offset, p = _channel_factors(weights, bits)
    y = ctx.emit(op.multiply(op.astype(op.subtract(acc, relax.const(offset)), "float32"), relax.const(p)))
    y = ctx.emit(op.multiply(y, s))
    y = ctx.emit(op.multiply(y, scale))
    return y if bias is None else ctx.emit(op.add(y, bias))


def shift_matmul_cpu(
    ctx: LowerContext,
    x2: relax.Expr,
    rows,
    sign: np.ndarray,
    exponent: np.ndarray,
    scale: relax.Expr,
    bias: relax.Expr | None,
    bits: int,
) -> relax.Expr:
    """``shift_linear`` on ``x2 [rows, K]`` (bias included) on the CPU: the int8 kernel where the codes
    fit it and the target has VNNI (or ``sdot``), else ``shift_int``'s int16 kernel."""
    vnni, sdot = int8_gemm.has_vnni(), int8_gemm.has_sdot()
    weights = encode_int8(sign, exponent, bits) if vnni or sdot else None
    if weights is not None:
        matmul = shift_matmul_int8 if vnni else shift_matmul_sdot
        return matmul(ctx, x2, rows, weights, scale, bias, bits)
    y = shift_int.shift_matmul_int(ctx, x2, rows, sign, exponent, scale, bits)
    return y if bias is None else ctx.emit(op.add(y, bias))


__all__ = ["shift_matmul_cpu", "shift_matmul_int8", "shift_matmul_sdot"]
