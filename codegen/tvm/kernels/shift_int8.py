"""``shift_linear`` / ``shift_conv2d`` on int8 dot products (VNNI ``vpdpbusd``, arm64 ``sdot``), bit-exact,
for 7-level shift codes.

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
* ``acc = D * mult[o]`` (``mult = +-2^(E - hi_o)``) is the reference's int32 accumulator, then its
  float steps ``((float32(acc) * 2^-E) * s[r]) * scale[o] + bias`` run as written, so the output is
  bit-exact: ``int8_fused.gemm_rescale_func(shift_bits=...)``, the GEMM, the integer multiplier,
  rescale and bias in one kernel.

Four multiply-adds per 32-bit lane per instruction, twice the int16 kernel's, and no separate
rescale pass. On aarch64 with the dot product (preset ``arm64-dotprod``) the same codes run on
``int8_gemm``'s ``sdot`` GEMM and the float steps as elementwise ops (:func:`sdot_rows`; linears and
dense convs; the VNNI convs are ``shift_int.py``'s fused conv GEMM in its int8 mode). Other layers
(a wider spread, or mixed signs at a spread of 7) and other CPUs keep ``shift_int``'s int16 kernel;
:func:`shift_matmul_cpu` and :func:`shift_conv_cpu` choose per layer.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from reshift.codegen.tvm import knobs as knob_db
from reshift.codegen.tvm.kernels import int8_fused, int8_gemm, shift_int
from reshift.codegen.tvm.kernels.shift_int import Int8Weights, encode_int8
from reshift.codegen.tvm.lower import LowerContext, op, scalar


def shift_matmul_int8(
    ctx: LowerContext, x2: relax.Expr, rows, weights: Int8Weights, scale: relax.Expr, bias: relax.Expr | None, bits: int
) -> relax.Expr:
    """``shift_linear`` on ``x2 [rows, K]`` as ``[rows, O]`` float32, bias included, on the VNNI kernel."""
    out, k = weights.code.shape
    packed = int8_gemm.pack_weights(weights.code)
    blocks, k4 = packed.shape[:2]
    width = blocks * int8_fused.LANES
    q8, s = shift_int.quantize_rows_codes(ctx, x2, k, multiple=4, dtype="uint8", offset=128)
    wsum = int8_gemm.channel_vector(ctx, _offsets(weights), out, width, "int32")
    mult = int8_gemm.channel_vector(ctx, weights.mult.astype(np.float32), out, width)  # powers of two: exact
    factors = ctx.emit(op.concat([mult, int8_gemm.channel_vector(ctx, scale, out, width)], axis=0))
    shape = {"rows": rows, "blocks": blocks, "k4": k4}
    knobs = knob_db.choose("int8_gemm_rescale_vnni", shape) if isinstance(rows, int) else None
    gv = ctx.bb.add_func(int8_fused.gemm_rescale_func(blocks, k4, knobs, shift_bits=bits), "shift_int8_gemm_vnni")
    args = [q8, s, relax.const(packed), wsum, factors, int8_gemm.channel_vector(ctx, bias, out, width)]
    y = ctx.emit(relax.op.call_tir(gv, args, out_ty=relax.TensorType((rows, width), "float32")))
    if width != out:
        y = ctx.emit(op.strided_slice(y, axes=[1], begin=[0], end=[out]))
    return y


def _offsets(weights: Int8Weights) -> np.ndarray:
    """int32 ``128 * sum_k v[o, k]`` per output channel: what the ``q + 128`` codes add to each sum."""
    return (128 * weights.code.astype(np.int64).sum(axis=1)).astype(np.int32)


def sdot_rows(
    ctx: LowerContext, q8: relax.Expr, s: relax.Expr, rows, weights: Int8Weights, scale, bias, bits: int
) -> relax.Expr:
    """``[rows, O]`` float32 (bias included) from the uint8 codes ``q8`` and row scales ``s`` on aarch64's
    ``sdot``: ``acc = (sum (q + 128) v - 128 sum v) * mult``, then ``((float32(acc) * 2^-E) * s) * scale + bias``."""
    out = weights.code.shape[0]
    packed = int8_gemm.pack_weights(weights.code)
    acc = int8_gemm.sdot_gemm(ctx, q8, rows, weights.code, packed)
    if packed.shape[0] * int8_fused.LANES != out:
        acc = ctx.emit(op.strided_slice(acc, axes=[1], begin=[0], end=[out]))
    acc = ctx.emit(
        op.multiply(op.subtract(acc, relax.const(_offsets(weights))), relax.const(weights.mult.astype(np.int32)))
    )
    y = ctx.emit(op.multiply(op.astype(acc, "float32"), scalar(2.0 ** -(2**bits - 1), "float32")))
    y = ctx.emit(op.multiply(y, s))
    y = ctx.emit(op.multiply(y, scale))
    return y if bias is None else ctx.emit(op.add(y, bias))


def shift_matmul_sdot(
    ctx: LowerContext, x2: relax.Expr, rows, weights: Int8Weights, scale: relax.Expr, bias: relax.Expr | None, bits: int
) -> relax.Expr:
    """``shift_linear`` on ``x2 [rows, K]`` (bias included) on aarch64's ``sdot`` (:func:`sdot_rows`)."""
    q8, s = shift_int.quantize_rows_codes(ctx, x2, weights.code.shape[1], multiple=4, dtype="uint8", offset=128)
    return sdot_rows(ctx, q8, s, rows, weights, scale, bias, bits)


def shift_conv_cpu(ctx: LowerContext, node, x, sign: np.ndarray, exponent: np.ndarray, scale, bias) -> relax.Expr:
    """``shift_conv2d`` with ``groups == 1`` on the CPU: on aarch64 with ``sdot`` (and no VNNI) and codes that
    fit, the uint8 window codes of ``shift_int.window_codes`` on :func:`sdot_rows`; else
    ``shift_int.shift_conv_int`` (VNNI int8 or int16, fused epilogues)."""
    bits = node.attrs["exponent_bits"]
    sdot = int8_gemm.has_sdot() and not int8_gemm.has_vnni()
    weights = encode_int8(shift_int.filter_rows(sign), shift_int.filter_rows(exponent), bits) if sdot else None
    if weights is None:
        return shift_int.shift_conv_int(ctx, node, x, sign, exponent, scale, bias)
    oh, ow = (int(d) for d in node.outputs[0].shape[2:])
    batch = ctx.shape(node.inputs[0])[0]
    rows = batch * oh * ow
    s, q8 = shift_int.window_codes(ctx, node, x, (oh, ow), rows, int8=True)
    y = sdot_rows(ctx, q8, s, rows, weights, scale, bias, bits)
    y = ctx.emit(op.reshape(y, [batch, oh, ow, sign.shape[0]]))
    return ctx.emit(op.permute_dims(y, [0, 3, 1, 2]))


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


__all__ = ["sdot_rows", "shift_conv_cpu", "shift_matmul_cpu", "shift_matmul_int8", "shift_matmul_sdot"]
