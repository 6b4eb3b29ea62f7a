"""Selection and value-class ops of the registry: ``topk``, ``isnan``, ``isinf``.

Registered into :data:`reshift.ir.ops.OPS` (imported at the end of ``ir/ops.py``). ``topk`` is
ONNX ``TopK`` / ``torch.topk`` with ONNX's tie rule (of equal values the lower index comes first);
``isnan``/``isinf`` are what the default (sdpa) attention export of Hugging Face encoders checks
its softmax with.
"""

from __future__ import annotations

import numpy as np

from reshift.errors import IRTypeError
from reshift.ir.ops import NUMERIC_DTYPES, Attr, register
from reshift.ir.shapes import normalize_axis, require_dtype, require_float
from reshift.ir.types import TensorType


def _topk_infer(x: TensorType, k: int, axis: int, largest: bool, sorted: bool) -> list[TensorType]:
    require_dtype(x, NUMERIC_DTYPES, "topk", "input")
    if x.rank < 1:
        raise IRTypeError(f"topk: input {x} must have rank 1 or more")
    ax = normalize_axis(axis, x.rank, "topk")
    size = x.shape[ax]
    if isinstance(size, str):
        raise IRTypeError(f"topk: axis {axis} of {x} is symbolic; topk needs a static axis")
    if not 1 <= k <= size:
        raise IRTypeError(f"topk: k={k} must be in [1, {size}] (axis {axis} of {x})")
    shape = x.shape[:ax] + (k,) + x.shape[ax + 1 :]
    return [x.with_shape(shape), TensorType(shape, "int64")]


def _topk(x, k, axis, largest, sorted):
    """The ``k`` largest (smallest) values along ``axis`` in order, ties by lower index first.

    A stable ascending argsort keeps equal values in index order; for ``largest`` it runs on the
    flipped axis, so after flipping back equal values still come lowest index first. NaN sorts as
    the largest value (numpy's and torch's order). ``sorted=False`` returns the sorted order too,
    which ONNX and torch allow (the order is then unspecified).
    """
    size = x.shape[axis]
    if largest:
        order = size - 1 - np.flip(np.argsort(np.flip(x, axis), axis=axis, kind="stable"), axis)
    else:
        order = np.argsort(x, axis=axis, kind="stable")
    indices = np.take(order, np.arange(k), axis=axis).astype(np.int64)
    return np.ascontiguousarray(np.take_along_axis(x, indices, axis=axis)), np.ascontiguousarray(indices)


register(
    "topk",
    ["x"],
    {"k": Attr("int"), "axis": Attr("int", -1), "largest": Attr("bool", True), "sorted": Attr("bool", True)},
    _topk_infer,
    _topk,
    "k largest (smallest) values along axis and their int64 indices; ties: lower index first",
)


def _value_class_infer(x: TensorType, **_) -> list[TensorType]:
    require_float(x, "op")
    return [x.with_dtype("bool")]


def _isinf(x, detect_positive, detect_negative):
    return (np.isposinf(x) & detect_positive) | (np.isneginf(x) & detect_negative)


register("isnan", ["x"], {}, _value_class_infer, np.isnan, "elementwise x is NaN -> bool", tags={"elementwise"})
register(
    "isinf",
    ["x"],
    {"detect_positive": Attr("bool", True), "detect_negative": Attr("bool", True)},
    _value_class_infer,
    _isinf,
    "elementwise x is +inf (detect_positive) or -inf (detect_negative) -> bool",
    tags={"elementwise"},
)
