"""Lowerings of the selection and value-class ops (``ir/ops_select.py``): topk, isnan, isinf.

``topk`` is Relax's topk, which on the CPU returns ties lowest index first as the reference does
(tests/test_codegen_tvm.py ``graph_select`` feeds many ties); with NaNs in the input its order is
not the reference's (ONNX leaves it open). On CUDA it becomes ``topi.cuda.topk`` (NOTES_tvm.md).
"""

from __future__ import annotations

from tvm import relax

from reshift.codegen.tvm.lower import LowerContext, lowering, op, scalar
from reshift.ir.graph import Node


@lowering("topk")
def lower_topk(ctx: LowerContext, node: Node, x: relax.Expr) -> list[relax.Expr]:
    a = node.attrs
    axis = a["axis"] % node.inputs[0].type.rank
    both = ctx.emit(op.topk(x, a["k"], axis=axis, ret_type="both", largest=bool(a["largest"]), dtype="int64"))
    return [ctx.emit(relax.TupleGetItem(both, 0)), ctx.emit(relax.TupleGetItem(both, 1))]


@lowering("isnan")
def lower_isnan(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    return ctx.emit(op.isnan(x))


@lowering("isinf")
def lower_isinf(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    positive, negative = node.attrs["detect_positive"], node.attrs["detect_negative"]
    if positive and negative:
        return ctx.emit(op.isinf(x))
    if not positive and not negative:
        return ctx.emit(op.zeros(ctx.shape(node.outputs[0]), "bool"))
    infinity = scalar(float("inf") if positive else float("-inf"), node.inputs[0].dtype)
    return ctx.emit(op.equal(x, infinity))
