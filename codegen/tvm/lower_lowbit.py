"""Reference lowerings of reshift's low-bit linear ops (``ir/ops_lowbit.py``), exact but not fast.

``bcq_linear`` and ``ternary_linear`` decode their packed constant weights at compile time into a
float32 matrix (the same ``bcq_weight`` / ``ternary_weight`` the reference uses) and run a plain
matmul. ``shift_linear`` follows its reference step by step: per-row int8 quantization
(round half to even), an exact integer matmul with ``sign << (E - exponent)``, then the float32
rescale. The multiplication-free kernels in ``codegen/tvm/kernels/`` replace these entries of
``LOWERINGS`` when they register with ``override=True``.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from reshift.codegen.tvm.lower import LowerContext, lowering, op, scalar
from reshift.errors import CodegenError
from reshift.ir.graph import Node
from reshift.ir.ops_lowbit import INT8_QMAX, bcq_weight, ternary_weight


def _constant(node: Node, index: int) -> np.ndarray:
    value = node.inputs[index]
    if value is None or not value.is_constant:
        raise CodegenError(
            f"{node.op} (node {node.name}): input {index} ({value.name if value else None}) must be a constant "
            "for the TVM backend; fold it with reshift.passes.run(graph, 'exact') first"
        )
    return value.data


def _dense(ctx: LowerContext, node: Node, x: relax.Expr, weight: np.ndarray, bias: relax.Expr | None) -> relax.Expr:
    y = ctx.emit(op.matmul(x, relax.const(np.ascontiguousarray(weight.T.astype(np.float32)))))
    return ctx.emit(op.add(y, bias)) if bias is not None else y


@lowering("bcq_linear")
def lower_bcq_linear(ctx: LowerContext, node: Node, x, bits, alpha, bias) -> relax.Expr:
    attrs = node.attrs
    weight = bcq_weight(_constant(node, 1), _constant(node, 2), attrs["group_size"], attrs["in_features"])
    return _dense(ctx, node, x, weight, bias)


@lowering("ternary_linear")
def lower_ternary_linear(ctx: LowerContext, node: Node, x, trits, scale, bias) -> relax.Expr:
    attrs = node.attrs
    weight = ternary_weight(_constant(node, 1), _constant(node, 2), attrs["group_size"], attrs["in_features"])
    return _dense(ctx, node, x, weight, bias)


@lowering("shift_linear")
def lower_shift_linear(ctx: LowerContext, node: Node, x, sign, exponent, scale, bias) -> relax.Expr:
    e_max = 2 ** node.attrs["exponent_bits"] - 1
    sign_np, exponent_np = _constant(node, 1), _constant(node, 2)
    w_int = sign_np.astype(np.int64) * np.left_shift(np.int64(1), e_max - exponent_np.astype(np.int64))
    amax = ctx.emit(row_absmax(x))
    s = ctx.emit(op.divide(amax, scalar(float(INT8_QMAX), "float32")))
    q = ctx.te(_quantize_rows, x, s, name="quantize_rows_int8")
    acc = ctx.emit(op.matmul(q, relax.const(np.ascontiguousarray(w_int.T.astype(np.int32)))))
    y = ctx.emit(op.multiply(op.astype(acc, "float32"), scalar(2.0**-e_max, "float32")))
    y = ctx.emit(op.multiply(y, s))
    y = ctx.emit(op.multiply(y, scale))
    finite = ctx.emit(op.less(op.abs(s), scalar(np.inf, "float32")))  # False for NaN and inf rows
    y = ctx.emit(op.where(finite, y, scalar(np.nan, "float32")))
    return ctx.emit(op.add(y, bias)) if bias is not None else y


def row_absmax(x: relax.Expr) -> relax.Expr:
    """``max |x|`` over the last axis (kept), +inf for a row holding NaN.

    ``max`` lowers to LLVM's ``maxnum`` (and CUDA's ``fmaxf``), which drop NaN: without the
    mapping, a NaN row would get a finite int8 scale and finite outputs instead of the
    reference's NaN. The callers turn a non-finite scale into NaN outputs.
    """
    magnitude = op.where(op.isnan(x), scalar(np.inf, "float32"), op.abs(x))
    return op.max(magnitude, axis=[-1], keepdims=True)


def int8_code(x: tirx.PrimExpr, scale: tirx.PrimExpr) -> tirx.PrimExpr:
    """``clip(rint(x / scale), -127, 127)`` as int32, 0 when ``scale`` is 0 or not finite (one element)."""
    ok = tirx.all(scale > tirx.const(0, "float32"), scale < tirx.const(np.inf, "float32"))
    safe = tirx.Select(ok, scale, tirx.const(1, "float32"))
    value = tirx.Select(scale < tirx.const(np.inf, "float32"), x, tirx.const(0, "float32"))
    rounded = tirx.nearbyint(value / safe)
    clipped = tirx.max(tirx.min(rounded, tirx.const(INT8_QMAX, "float32")), tirx.const(-INT8_QMAX, "float32"))
    return clipped.astype("int32")


def _quantize_rows(x: te.Tensor, s: te.Tensor) -> te.Tensor:
    """:func:`int8_code` of every element of ``x`` with its row's scale ``s[..., 0]``."""
    return te.compute(x.shape, lambda *idx: int8_code(x[idx], s[(*idx[:-1], 0)]), name="q")


# log2_matmul (RepQ-ViT shift-add attention) has no float reference lowering: its one lowering, CPU
# kernel and portable TE reduction, lives in kernels/log2_matmul.py; importing it registers it.
# binary_attention (ShiftAddViT binary-code attention): its CPU kernel and portable TE form live in
# kernels/binary_attention.py; importing it registers the lowering.
from reshift.codegen.tvm.kernels import binary_attention as _kernels_binary_attention  # noqa: E402,F401
from reshift.codegen.tvm.kernels import log2_matmul as _kernels_log2_matmul  # noqa: E402,F401
