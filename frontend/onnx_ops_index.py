"""ONNX ``GatherElements``, ``GatherND``, ``ScatterND``, ``ScatterElements``, ``CumSum`` on run-time tensors.

Registered into ``ONNX_CONVERTERS``. Each maps to the registry op of the same meaning
(``gather_elements``, ``gather_nd``, ``scatter_nd``, ``cumsum``; ``Gather`` is in onnx_ops.py);
``ScatterElements`` (and opset 9's ``Scatter``) is ``scatter_nd`` of each element's coordinates;
``ctx.op`` folds them when every input is known, so shape arithmetic still works. Indices that are
known at conversion time are checked here, so a bad constant index names the node before anything
runs; run-time indices are checked by the reference interpreter (an ``ExecutionError``) and wrapped
then clamped by the compiled kernels (codegen/tvm/lower_shape.py).
"""

from __future__ import annotations

import numpy as np

from reshift.frontend.decompose import element_coordinates
from reshift.frontend.onnx_ops import NotConvertible, _norm, _scalar, converter
from reshift.ir.ops_index import SCATTER_REDUCTIONS


def _check_known_indices(indices, sizes, what: str) -> None:
    """A constant index outside ``[-size, size)`` of its axis (``sizes`` broadcast against it) is refused."""
    if not isinstance(indices, np.ndarray) or indices.dtype == object or not indices.size:
        return
    if any(isinstance(s, str) for s in np.ravel(sizes)):
        return
    sizes = np.asarray(sizes, dtype=np.int64)
    bad = (indices < -sizes) | (indices >= sizes)
    if bad.any():
        value = int(indices[tuple(np.argwhere(bad)[0])])
        raise NotConvertible(f"{what} index {value} is out of range for data of shape {sizes.tolist()} on its axis")


@converter("GatherElements")
def _gather_elements(ctx, node, ins, at):
    data, indices = ins
    rank = len(ctx.shape(data))
    axis = _norm(at.get("axis", 0), rank)
    if len(ctx.shape(indices)) != rank:
        raise NotConvertible(f"GatherElements indices of rank {len(ctx.shape(indices))} for data of rank {rank}")
    _check_known_indices(indices, ctx.shape(data)[axis], "GatherElements")
    return ctx.op("gather_elements", data, indices, axis=axis)


@converter("GatherND")
def _gather_nd(ctx, node, ins, at):
    data, indices = ins
    depth = ctx.shape(indices)[-1] if ctx.shape(indices) else None
    batch_dims = at.get("batch_dims", 0)
    if isinstance(depth, int):
        _check_known_indices(indices, list(ctx.shape(data))[batch_dims : batch_dims + depth], "GatherND")
    return ctx.op("gather_nd", data, indices, batch_dims=batch_dims)


@converter("ScatterND")
def _scatter_nd(ctx, node, ins, at):
    data, indices, updates = ins
    reduction = at.get("reduction", "none")
    if reduction not in SCATTER_REDUCTIONS:
        raise NotConvertible(f"ScatterND reduction {reduction!r} is not supported ({', '.join(SCATTER_REDUCTIONS)})")
    depth = ctx.shape(indices)[-1] if ctx.shape(indices) else None
    if isinstance(depth, int):
        _check_known_indices(indices, list(ctx.shape(data))[:depth], "ScatterND")
    return ctx.op("scatter_nd", data, indices, updates, reduction=reduction)


@converter("ScatterElements", "Scatter")
def _scatter_elements(ctx, node, ins, at):
    """``out[..., indices[i, j], ...] = updates[i, j]`` on ``axis``: ScatterND of every element's full
    coordinates (frontend/decompose.py, shared with ``torch.scatter``)."""
    data, indices, updates = ins
    rank, shape = len(ctx.shape(data)), list(ctx.shape(indices))
    axis, reduction = _norm(at.get("axis", 0), rank), at.get("reduction", "none")
    if reduction not in SCATTER_REDUCTIONS:
        raise NotConvertible(
            f"{node.op_type} reduction {reduction!r} is not supported ({', '.join(SCATTER_REDUCTIONS)})"
        )
    if len(shape) != rank or list(ctx.shape(updates)) != shape:
        raise NotConvertible(f"{node.op_type} indices {shape} and updates must have data's rank {rank} and one shape")
    _check_known_indices(indices, ctx.shape(data)[axis], node.op_type)
    index = indices if ctx.dtype(indices) == "int64" else ctx.op("cast", indices, dtype="int64")
    tuples = element_coordinates(index, shape, axis, lambda op, inputs, **attrs: ctx.op(op, *inputs, **attrs))
    return ctx.op("scatter_nd", data, tuples, updates, reduction=reduction)


@converter("CumSum")
def _cumsum(ctx, node, ins, at):
    x, axis = ins
    axis = _norm(int(_scalar(axis, "CumSum axis")), len(ctx.shape(x)))
    return ctx.op("cumsum", x, axis=axis, exclusive=bool(at.get("exclusive", 0)), reverse=bool(at.get("reverse", 0)))
