"""ATen ``einsum``, ``topk`` and ``isnan``/``isinf`` converters.

Registered into :data:`reshift.frontend.aten_ops.ATEN_CONVERTERS`, which keeps them whole through
torch's decompositions: ``einsum`` is built by the same decomposition as ONNX ``Einsum``
(:mod:`reshift.frontend.einsum`) instead of torch's bmm path; ``topk`` and ``isnan``/``isinf``
are the registry ops of ``ir/ops_select.py``. On integer tensors (never NaN or infinite)
``isnan``/``isinf`` are ``not equal(x, x)``, all false.
"""

from __future__ import annotations

from reshift.frontend.aten_ops import Unsupported, _axis, converts
from reshift.frontend.einsum import Builders, EinsumError, einsum
from reshift.ir.types import FLOAT_DTYPES


@converts("einsum")
def _einsum(cx, a):
    operands = [cx.value(t) for t in a["tensors"]]  # one dtype: torch refuses mixed ones itself
    build = Builders(
        op=lambda name, *xs, **attrs: cx.emit(name, list(xs), **attrs),
        matmul=lambda x, y: cx.emit("matmul", [x, y]),
        shape_of=lambda x: x.shape,
        constant=lambda array: cx.constant(array, f"{cx.node.name}_diagonal"),
    )
    try:
        return einsum(a["equation"], operands, build)
    except EinsumError as exc:
        raise Unsupported(str(exc)) from None


@converts("topk")
def _topk(cx, a):
    x = cx.value(a["self"])
    if not isinstance(a["k"], int):
        raise Unsupported(f"topk with k={a['k']} computed from the input's shape; reshift needs a fixed k")
    axis = _axis(a["dim"], x.type.rank)
    return cx.emit("topk", [x], k=a["k"], axis=axis, largest=bool(a["largest"]), sorted=bool(a["sorted"]))


def _never_special(cx, x):
    return cx.emit("logical_not", [cx.emit("equal", [x, x])])


@converts("isnan")
def _isnan(cx, a):
    x = cx.value(a["self"])
    return cx.emit("isnan", [x]) if x.dtype in FLOAT_DTYPES else _never_special(cx, x)


@converts("isinf", "isposinf", "isneginf")
def _isinf(cx, a):
    x = cx.value(a["self"])
    if x.dtype not in FLOAT_DTYPES:
        return _never_special(cx, x)
    target = str(cx.node.target)
    return cx.emit("isinf", [x], detect_positive="isneginf" not in target, detect_negative="isposinf" not in target)
