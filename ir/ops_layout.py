"""Shape and data-movement ops of the registry: reshape, expand, transpose, concat, split, slice,
gather, pad, arange.

Registered into :data:`reshift.ir.ops.OPS` (imported at the end of ``ir/ops.py``); shape-typed
attributes may hold the batch symbol, resolved by the interpreter at run time.
"""

from __future__ import annotations

import numpy as np

from reshift.errors import IRTypeError
from reshift.ir import numpy_kernels as nk
from reshift.ir.ops import Attr, register
from reshift.ir.shapes import broadcast_shapes, normalize_axis, reshape_shape
from reshift.ir.types import Dim, TensorType, dim_mul, numpy_dtype, split_dim

register(
    "reshape",
    ["x"],
    {"shape": Attr("shape")},
    lambda x, shape: [x.with_shape(reshape_shape(x.shape, shape))],
    lambda x, shape: x.reshape(shape),
    "reshape; target may hold one -1 and the batch symbol",
    tags={"layout"},
)


def _expand_infer(x, shape):
    return [x.with_shape(broadcast_shapes(x.shape, shape, op="expand"))]


register(
    "expand",
    ["x"],
    {"shape": Attr("shape")},
    _expand_infer,
    lambda x, shape: np.broadcast_to(x, np.broadcast_shapes(x.shape, shape)).copy(),
    "broadcast to shape",
    tags={"layout"},
)


def _transpose_infer(x, perm):
    if sorted(perm) != list(range(x.rank)):
        raise IRTypeError(f"transpose: perm {list(perm)} is not a permutation of rank {x.rank}")
    return [x.with_shape([x.shape[p] for p in perm])]


register(
    "transpose",
    ["x"],
    {"perm": Attr("ints")},
    _transpose_infer,
    lambda x, perm: np.transpose(x, perm),
    "permute axes",
    tags={"layout"},
)


def _concat_infer(*xs, axis):
    first = xs[0]
    ax = normalize_axis(axis, first.rank, "concat")
    total: Dim = 0
    for x in xs:
        if (
            x.rank != first.rank
            or x.dtype != first.dtype
            or any(x.shape[i] != first.shape[i] for i in range(x.rank) if i != ax)
        ):
            raise IRTypeError(f"concat: inputs {[str(v) for v in xs]} disagree off axis {axis}")
        total = x.shape[ax] if total == 0 else _dim_add(total, x.shape[ax])
    return [first.with_shape(first.shape[:ax] + (total,) + first.shape[ax + 1 :])]


def _dim_add(a: Dim, b: Dim) -> Dim:
    (ca, sa), (cb, sb) = split_dim(a), split_dim(b)
    if sa != sb:
        raise IRTypeError(f"concat: cannot add dimensions {a!r} and {b!r}")
    return dim_mul(ca + cb, sa) if sa else ca + cb


register(
    "concat",
    ["inputs*"],
    {"axis": Attr("int")},
    _concat_infer,
    lambda *xs, axis: np.concatenate(xs, axis=axis),
    "join along axis",
    tags={"layout"},
)


def _split_infer(x, axis, sizes):
    ax = normalize_axis(axis, x.rank, "split")
    if isinstance(x.shape[ax], str) or sum(sizes) != x.shape[ax]:
        raise IRTypeError(f"split: sizes {list(sizes)} do not add up to dim {x.shape[ax]} of {x}")
    return [x.with_shape(x.shape[:ax] + (s,) + x.shape[ax + 1 :]) for s in sizes]


register(
    "split",
    ["x"],
    {"axis": Attr("int"), "sizes": Attr("ints")},
    _split_infer,
    lambda x, axis, sizes: tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis)),
    "split along axis into len(sizes) outputs",
    tags={"layout"},
)


def _slice_infer(x, starts, ends, axes, steps):
    if not len(starts) == len(ends) == len(axes) == len(steps) or 0 in steps:
        raise IRTypeError("slice: starts, ends, axes and steps must have equal lengths, steps non-zero")
    shape = list(x.shape)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        ax = normalize_axis(axis, x.rank, "slice")
        if isinstance(shape[ax], str):
            raise IRTypeError(f"slice: cannot slice the symbolic dimension {shape[ax]!r} of {x}")
        shape[ax] = len(range(*slice(start, end, step).indices(shape[ax])))
    return [x.with_shape(shape)]


register(
    "slice",
    ["x"],
    {"starts": Attr("ints"), "ends": Attr("ints"), "axes": Attr("ints"), "steps": Attr("ints")},
    _slice_infer,
    nk.slice_axes,
    "python-style strided slice on each listed axis",
    tags={"layout"},
)


def _gather_infer(x, indices, axis):
    ax = normalize_axis(axis, x.rank, "gather")
    if indices.dtype not in ("int32", "int64"):
        raise IRTypeError(f"gather: indices must be int32/int64, got {indices}")
    return [x.with_shape(x.shape[:ax] + indices.shape + x.shape[ax + 1 :])]


def _gather(x, indices, axis):
    size = x.shape[axis]
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise IndexError(f"gather: index out of range [{-size}, {size}) along axis {axis}")
    return np.take(x, indices, axis=axis)


register(
    "gather",
    ["x", "indices"],
    {"axis": Attr("int", 0)},
    _gather_infer,
    _gather,
    "take along axis (embedding lookup is gather on axis 0)",
)


def _pad_infer(x, pads, value):
    if len(pads) != 2 * x.rank:
        raise IRTypeError(f"pad: pads must list {2 * x.rank} values (all begins, then all ends)")
    shape = []
    for i, d in enumerate(x.shape):
        if isinstance(d, str):
            if pads[i] or pads[i + x.rank]:
                raise IRTypeError("pad: cannot pad the symbolic dimension")
            shape.append(d)
        else:
            shape.append(d + pads[i] + pads[i + x.rank])
    return [x.with_shape(shape)]


def _pad(x, pads, value):
    rank = x.ndim
    return np.pad(x, [(pads[i], pads[i + rank]) for i in range(rank)], constant_values=value)


register(
    "pad",
    ["x"],
    {"pads": Attr("ints"), "value": Attr("float", 0.0)},
    _pad_infer,
    _pad,
    "constant padding; pads = begins then ends (ONNX order)",
    tags={"layout"},
)


def _arange_infer(shape, start, step, dtype):
    if len(shape) != 1:
        raise IRTypeError(f"arange: shape must hold one dimension (the length), got {list(shape)}")
    return [TensorType(tuple(shape), dtype)]


register(
    "arange",
    [],
    {"shape": Attr("shape"), "start": Attr("float", 0.0), "step": Attr("float", 1.0), "dtype": Attr("dtype", "int64")},
    _arange_infer,
    lambda shape, start, step, dtype: (start + step * np.arange(shape[0])).astype(numpy_dtype(dtype)),
    "start + step * [0, 1, ..., length-1]; the length (shape[0]) may be the batch symbol",
)
