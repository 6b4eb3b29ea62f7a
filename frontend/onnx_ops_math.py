"""ONNX ``Einsum``, ``TopK``, ``IsNaN`` and ``IsInf`` converters (registered into ``ONNX_CONVERTERS``).

- ``Einsum``: the shared decomposition of :mod:`reshift.frontend.einsum` (transposes, reshapes,
  matmuls, muls, sums; a gather for a diagonal); a constant 2-D right operand of a contraction
  becomes ``linear``, as for ``MatMul``, so the weight passes see it.
- ``TopK``: the registry's ``topk``; ``K`` (an input from opset 10) must be known at conversion
  time, a run-time ``K`` has no static output shape.
- ``IsNaN``/``IsInf``: the registry's ``isnan``/``isinf``.
"""

from __future__ import annotations

from reshift.frontend.einsum import Builders, EinsumError, einsum
from reshift.frontend.onnx_ops import ONNX_CONVERTERS, NotConvertible, _known, _norm, _scalar, converter
from reshift.frontend.shape_eval import Sym


@converter("Einsum")
def _einsum(ctx, node, ins, at):
    build = Builders(
        op=ctx.op,
        matmul=lambda a, b: ONNX_CONVERTERS["MatMul"](ctx, node, [a, b], {}),
        shape_of=ctx.shape,
        constant=lambda array: array,
    )
    try:
        return einsum(at["equation"], ins, build)
    except EinsumError as exc:
        raise NotConvertible(str(exc)) from None


@converter("TopK")
def _topk(ctx, node, ins, at):
    x = ins[0]
    if "k" in at:  # opset 1..9
        k = at["k"]
    elif len(ins) < 2 or ins[1] is None:
        raise NotConvertible("TopK has no K input (opset 10 and later take K as the second input)")
    else:
        what = "TopK's K (the number of values to keep)"
        try:
            k = _scalar(_known(ins[1], what), what)
        except NotConvertible:
            raise NotConvertible(
                f"{what} is computed at run time, so the output shape is unknown at compile time; make K a "
                "constant (or freeze the input it depends on with input_values={name: value})"
            ) from None
        if isinstance(k, Sym):
            raise NotConvertible(f"{what} depends on the batch size; reshift needs a fixed K")
    axis = _norm(at.get("axis", -1), len(ctx.shape(x)))
    largest, ordered = bool(at.get("largest", 1)), bool(at.get("sorted", 1))
    return ctx.op("topk", x, k=int(k), axis=axis, largest=largest, sorted=ordered)


@converter("IsNaN")
def _isnan(ctx, node, ins, at):
    return ctx.op("isnan", ins[0])


@converter("IsInf")
def _isinf(ctx, node, ins, at):
    positive, negative = bool(at.get("detect_positive", 1)), bool(at.get("detect_negative", 1))
    return ctx.op("isinf", ins[0], detect_positive=positive, detect_negative=negative)
