"""Multiplication-free lowerings of ``bcq_linear``, ``ternary_linear`` and ``shift_linear``.

They replace the reference entries of ``lower_lowbit.py`` (which decode weights to float32 at
build time): the packed weights stay packed, re-laid out for the kernel (``packing.py``), and run
through the lookup-table GEMV (``lut_gemv.py``; a static row count of ``GEMM_MIN_ROWS`` or more runs the
tile-decoding GEMM of ``bcq_gemm.py``; ``lut_dtype="int8"`` always the int8-table GEMV of
``lut_gemv_int8.py``) or the shift-add GEMV (``shift_gemv.py``).

The kernel variant follows ``tvm.target.Target.current()`` at lowering time (host CPU if none):
AVX-512 x86 gets the intrinsic kernels, other CPUs the portable loops, CUDA the split-K kernels of
``lut_gemv_cuda.py`` (BCQ, ternary) and ``shift_gemv_cuda.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax

from reshift.codegen.tvm import lower_lowbit
from reshift.codegen.tvm.kernels import shift_int8
from reshift.codegen.tvm.kernels.bcq_gemm import GEMM_MIN_ROWS, gemm_func
from reshift.codegen.tvm.kernels.lut_gemv import bias_row, gemv_func, table_compute
from reshift.codegen.tvm.kernels.lut_gemv_cuda import gemv_cuda_func, split_for
from reshift.codegen.tvm.kernels.packing import ROWS, alpha_dtype_for, pack_bcq, pack_shift, pack_ternary
from reshift.codegen.tvm.kernels.reduce_cuda import row_absmax_cuda_func
from reshift.codegen.tvm.kernels.shift_gemv import shift_gemv_func
from reshift.codegen.tvm.kernels.shift_gemv_cuda import shift_gemv_cuda_func, shift_split_for
from reshift.codegen.tvm.lower import LowerContext, lowering, op, product, scalar
from reshift.codegen.tvm.targets import current_target_is_gpu
from reshift.ir.graph import Node
from reshift.ir.ops_lowbit import INT8_QMAX, groups


def kernel_flavor() -> str:
    """``"avx512"``, ``"cpu"`` (portable loops) or ``"gpu"`` for the current (or host) target."""
    target = tvm.target.Target.current(allow_none=True)
    if target is None:
        from reshift.codegen.tvm.targets import host_cpu_flags

        return "avx512" if "avx512f" in host_cpu_flags() else "cpu"
    if current_target_is_gpu():
        return "gpu"
    triple = str(target.attrs.get("mtriple", "")) or "x86_64"
    if not triple.startswith("x86_64"):
        return "cpu"
    mcpu = str(target.attrs.get("mcpu", ""))
    if mcpu:
        try:
            if tvm.target.codegen.llvm_cpu_has_features(["avx512f"], target):
                return "avx512"
        except Exception:  # noqa: BLE001 -- an LLVM without the query: be conservative
            return "cpu"
    return "cpu"


def _rows_2d(ctx: LowerContext, node: Node, x: relax.Expr) -> tuple[relax.Expr, list, Any]:
    """``(x as [rows, K], the leading dims, rows)``; ``rows`` may be symbolic."""
    lead = ctx.shape(node.inputs[0])[:-1]
    rows = product(lead)
    return ctx.emit(op.reshape(x, (rows, node.inputs[0].shape[-1]))), lead, rows


def _row_absmax(ctx: LowerContext, x2: relax.Expr, rows, in_features: int) -> relax.Expr:
    """``max_k |x2[m, k]|`` as ``[rows, 1]``, +inf for NaN rows: on a GPU reshift's cross-thread kernel."""
    if kernel_flavor() != "gpu":
        return ctx.emit(lower_lowbit.row_absmax(x2))
    gv = ctx.bb.add_func(row_absmax_cuda_func(in_features), "row_absmax_cuda")
    return ctx.emit(relax.op.call_tir(gv, [x2], out_ty=relax.TensorType((rows, 1), "float32")))


def _finish(
    ctx: LowerContext, y: relax.Expr, lead: list, out_features: int, bias: relax.Expr | None, bias_in_kernel: bool
) -> relax.Expr:
    if out_features % ROWS:
        y = ctx.emit(op.strided_slice(y, axes=[1], begin=[0], end=[out_features]))
    if bias is not None and not bias_in_kernel:
        y = ctx.emit(op.add(y, bias))
    return ctx.emit(op.reshape(y, [*lead, out_features]))


def _int8_lut_linear(ctx, x2, m, words, alpha, bias_np, group_size: int, in_features: int, op_name: str):
    """``lut_dtype="int8"`` (``ops_lowbit.lut_int8_rows``) at any row count: int8 tables, then the
    ``vpermb`` GEMV of ``lut_gemv_int8.py``; a target without AVX-512 BW + VBMI + VNNI is refused."""
    from reshift.codegen.tvm.kernels.lut_gemv_int8 import (
        TABLE_BYTES,
        gemv_int8_func,
        has_int8_lut,
        int8_tables_func,
        table_shape,
    )
    from reshift.errors import CodegenError

    if kernel_flavor() == "gpu" or not has_int8_lut():
        raise CodegenError(
            f"{op_name} with lut_dtype='int8' runs on x86 CPUs with AVX-512 BW, VBMI and VNNI only; "
            "this target has no int8-table kernel (use lut_dtype='float32')"
        )
    blocks, n_groups, planes = words.shape[:3]
    tables_ty = [
        relax.TensorType((m, n_groups, table_shape(group_size)[1], TABLE_BYTES), "int8"),
        relax.TensorType((m, n_groups), "float32"),
    ]
    gv_tables = ctx.bb.add_func(int8_tables_func(in_features, group_size), f"{op_name}_int8_tables")
    tables = ctx.emit(relax.op.call_tir(gv_tables, [x2], out_ty=tables_ty))
    alpha = alpha.astype(alpha_dtype_for(alpha))
    gv = ctx.bb.add_func(gemv_int8_func(blocks, n_groups, planes, group_size, alpha.dtype.name), f"{op_name}_lut8_gemv")
    args = [relax.TupleGetItem(tables, 0), relax.TupleGetItem(tables, 1), relax.const(words), relax.const(alpha)]
    out_ty = relax.TensorType((m, blocks * ROWS), "float32")
    return ctx.emit(relax.op.call_tir(gv, [*args, relax.const(bias_np)], out_ty=out_ty))


def _lut_linear(
    ctx, node, x, bias, words: np.ndarray, alpha: np.ndarray, group_size: int, in_features: int
) -> relax.Expr:
    blocks, n_groups, planes = words.shape[:3]
    out_features = node.outputs[0].shape[-1]
    x2, lead, m = _rows_2d(ctx, node, x)
    bias_const = node.inputs[-1] is not None and node.inputs[-1].is_constant
    bias_np = bias_row(node.inputs[-1].data if bias_const else None, out_features)
    if node.attrs.get("lut_dtype", "float32") == "int8":
        y = _int8_lut_linear(ctx, x2, m, words, alpha, bias_np, group_size, in_features, node.op)
        finite = ctx.emit(op.less(_row_absmax(ctx, x2, m, in_features), scalar(np.inf, "float32")))
        y = ctx.emit(op.where(finite, y, scalar(np.nan, "float32")))
        return _finish(ctx, y, lead, out_features, bias, bias_const)
    gemm = isinstance(m, int) and m >= GEMM_MIN_ROWS and kernel_flavor() != "gpu"
    lut = None if gemm else ctx.te(table_compute, x2, in_features, group_size, name=f"{node.op}_lut")
    if kernel_flavor() == "gpu":  # split-K partial sums, then their sum and the bias (dlight)
        gv = ctx.bb.add_func(gemv_cuda_func(blocks, n_groups, planes, group_size), f"{node.op}_lut_gemv_cuda")
        part_ty = relax.TensorType((split_for(n_groups), m, blocks * ROWS), "float32")
        part = ctx.emit(relax.op.call_tir(gv, [lut, relax.const(words), relax.const(alpha)], out_ty=part_ty))
        y = ctx.emit(op.add(op.sum(part, axis=[0]), relax.const(bias_np)))
    elif gemm:  # many static rows: decode weight tiles, then GEMM
        alpha = alpha.astype(alpha_dtype_for(alpha))
        func = gemm_func(blocks, n_groups, planes, group_size, in_features, alpha.dtype.name)
        gv = ctx.bb.add_func(func, f"{node.op}_gemm")
        y = ctx.emit(
            relax.op.call_tir(
                gv,
                [x2, relax.const(words), relax.const(alpha), relax.const(bias_np)],
                out_ty=relax.TensorType((m, blocks * ROWS), "float32"),
            )
        )
    else:
        # The registry's alpha is float32; where every scale is a float16 value (reshift.llm's fits round
        # them so) the kernel reads half the scale bytes and computes the same result.
        alpha = alpha.astype(alpha_dtype_for(alpha))
        func = gemv_func(
            blocks, n_groups, planes, group_size, kernel_flavor() == "avx512", alpha_dtype=alpha.dtype.name
        )
        gv = ctx.bb.add_func(func, f"{node.op}_lut_gemv")
        y = ctx.emit(
            relax.op.call_tir(
                gv,
                [lut, relax.const(words), relax.const(alpha), relax.const(bias_np)],
                out_ty=relax.TensorType((m, blocks * ROWS), "float32"),
            )
        )
    # A +-inf activation meets opposite-signed bit planes (inf - inf): define every output of a
    # non-finite row as NaN, as shift_linear does, instead of the dense reference's mix of inf/NaN.
    finite = ctx.emit(op.less(_row_absmax(ctx, x2, m, in_features), scalar(np.inf, "float32")))
    y = ctx.emit(op.where(finite, y, scalar(np.nan, "float32")))
    return _finish(ctx, y, lead, out_features, bias, bias_const)


@lowering("bcq_linear", override=True)
def lower_bcq_linear(ctx: LowerContext, node: Node, x, bits, alpha, bias) -> relax.Expr:
    g, k = node.attrs["group_size"], node.attrs["in_features"]
    words, alpha_blocked = pack_bcq(lower_lowbit._constant(node, 1), lower_lowbit._constant(node, 2), g, k)
    return _lut_linear(ctx, node, x, bias, words, alpha_blocked, g, k)


@lowering("ternary_linear", override=True)
def lower_ternary_linear(ctx: LowerContext, node: Node, x, trits, scale, bias) -> relax.Expr:
    g, k = node.attrs["group_size"], node.attrs["in_features"]
    words, alpha_blocked = pack_ternary(lower_lowbit._constant(node, 1), lower_lowbit._constant(node, 2), g, k)
    assert words.shape[1] == groups(k, g)
    return _lut_linear(ctx, node, x, bias, words, alpha_blocked, g, k)


def quantize_rows_int8(ctx: LowerContext, x2: relax.Expr, rows, k: int) -> tuple[relax.Expr, relax.Expr]:
    """``(q int32 [rows, K], s float32 [rows, 1])``: each row's int8 codes and scale ``max|x| / 127``
    (the registry's ``quantize_rows_int8``; ``s`` is +inf for a row holding NaN or inf)."""
    amax = _row_absmax(ctx, x2, rows, k)
    s = ctx.emit(op.divide(amax, scalar(float(INT8_QMAX), "float32")))
    return ctx.te(lower_lowbit._quantize_rows, x2, s, name="quantize_rows_int8"), s


def shift_matmul(
    ctx: LowerContext, x2: relax.Expr, rows, sign: np.ndarray, exponent: np.ndarray, scale: relax.Expr, bits: int
) -> relax.Expr:
    """``x2 [rows, K] @ (scale * sign * 2^-exponent)^T`` as ``[rows, out]`` through the shift-add GEMV.

    Per-row int8 activations, int32 shift-add accumulation, one float rescale per output; rows
    holding NaN or inf give NaN outputs. Shared by ``shift_linear`` and ``shift_conv2d`` (im2col).
    """
    q, s = quantize_rows_int8(ctx, x2, rows, sign.shape[1])
    return shift_matmul_int8(ctx, q, s, rows, sign, exponent, scale, bits)


def shift_matmul_int8(
    ctx: LowerContext,
    q: relax.Expr,
    s: relax.Expr,
    rows,
    sign: np.ndarray,
    exponent: np.ndarray,
    scale: relax.Expr,
    bits: int,
) -> relax.Expr:
    """:func:`shift_matmul` from already quantized rows ``q`` with their scales ``s`` (see
    :func:`quantize_rows_int8`)."""
    e_max = 2**bits - 1
    out_features = sign.shape[0]
    code = pack_shift(sign, exponent, bits)
    blocks, k = code.shape[0], code.shape[1]
    if kernel_flavor() == "gpu":  # split-K int32 partial sums, then their (exact) sum
        gv = ctx.bb.add_func(shift_gemv_cuda_func(blocks, k), "shift_linear_gemv_cuda")
        part_ty = relax.TensorType((shift_split_for(k), rows, blocks * ROWS), "int32")
        acc = ctx.emit(op.sum(ctx.emit(relax.op.call_tir(gv, [relax.const(code), q], out_ty=part_ty)), axis=[0]))
    else:
        gv = ctx.bb.add_func(shift_gemv_func(blocks, k, kernel_flavor() == "avx512"), "shift_linear_gemv")
        acc = ctx.emit(
            relax.op.call_tir(gv, [relax.const(code), q], out_ty=relax.TensorType((rows, blocks * ROWS), "int32"))
        )
    if out_features % ROWS:
        acc = ctx.emit(op.strided_slice(acc, axes=[1], begin=[0], end=[out_features]))
    y = ctx.emit(op.multiply(op.astype(acc, "float32"), scalar(2.0**-e_max, "float32")))
    y = ctx.emit(op.multiply(y, s))
    y = ctx.emit(op.multiply(y, scale))
    finite = ctx.emit(op.less(op.abs(s), scalar(np.inf, "float32")))  # False for NaN and inf rows
    return ctx.emit(op.where(finite, y, scalar(np.nan, "float32")))


@lowering("shift_linear", override=True)
def lower_shift_linear(ctx: LowerContext, node: Node, x, sign, exponent, scale, bias) -> relax.Expr:
    sign_np, exponent_np = lower_lowbit._constant(node, 1), lower_lowbit._constant(node, 2)
    x2, lead, rows = _rows_2d(ctx, node, x)
    bits = node.attrs["exponent_bits"]
    if kernel_flavor() == "gpu":
        y = shift_matmul(ctx, x2, rows, sign_np, exponent_np, scale, bits)
        y = y if bias is None else ctx.emit(op.add(y, bias))
    else:  # CPUs: int8 or int16 dot products
        y = shift_int8.shift_matmul_cpu(ctx, x2, rows, sign_np, exponent_np, scale, bias, bits)
    return ctx.emit(op.reshape(y, [*lead, node.outputs[0].shape[-1]]))
