"""Lowerings of data-movement ops (reshape, slice, gather, pad, ...) and pooling.

Shapes come from the IR's inferred output types, so ``-1`` and batch symbols in ``shape``
attributes are already resolved. Pooling pads explicitly (as the numpy reference does), then
runs an unpadded Relax pool, so ``ceil_mode`` and ``count_include_pad`` match PyTorch exactly.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te

from reshift.codegen.tvm.lower import LowerContext, lowering, op, scalar
from reshift.errors import CodegenError
from reshift.ir.graph import Node
from reshift.ir.numpy_kernels import pool_output_size
from reshift.ir.ops_index import linear_taps, nearest_taps
from reshift.ir.types import numpy_dtype


@lowering("reshape")
def lower_reshape(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    return ctx.emit(op.reshape(x, ctx.shape(node.outputs[0])))


@lowering("expand")
def lower_expand(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    out = node.outputs[0]
    if out.type.rank > node.inputs[0].type.rank:
        x = ctx.emit(op.reshape(x, [1] * (out.type.rank - node.inputs[0].type.rank) + ctx.shape(node.inputs[0])))
    return ctx.emit(op.broadcast_to(x, ctx.shape(out)))


@lowering("transpose")
def lower_transpose(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    return ctx.emit(op.permute_dims(x, list(node.attrs["perm"])))


@lowering("concat")
def lower_concat(ctx: LowerContext, node: Node, *xs: relax.Expr) -> relax.Expr:
    if len(xs) == 1:
        return xs[0]
    return ctx.emit(op.concat(list(xs), axis=node.attrs["axis"] % node.inputs[0].type.rank))


@lowering("split")
def lower_split(ctx: LowerContext, node: Node, x: relax.Expr) -> list[relax.Expr]:
    sizes = node.attrs["sizes"]
    axis = node.attrs["axis"] % node.inputs[0].type.rank
    if len(sizes) == 1:
        return [x]
    parts = ctx.emit(op.split(x, [int(v) for v in np.cumsum(sizes)[:-1]], axis=axis))
    return [ctx.emit(relax.TupleGetItem(parts, i)) for i in range(len(sizes))]


@lowering("slice")
def lower_slice(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    shape = node.inputs[0].shape
    rank = len(shape)
    ascending: dict[int, tuple[int, int, int]] = {}
    flipped: list[int] = []
    for start, end, axis, step in zip(*(node.attrs[k] for k in ("starts", "ends", "axes", "steps")), strict=True):
        axis %= rank
        begin, stop, stride = slice(start, end, step).indices(shape[axis])  # Python/ONNX clamping
        count = len(range(begin, stop, stride))
        if count == 0:
            ascending[axis] = (0, 0, 1)
        elif stride > 0:
            ascending[axis] = (begin, begin + (count - 1) * stride + 1, stride)
        else:  # negative step: the same elements in ascending order, then flip the axis
            low = begin + (count - 1) * stride
            ascending[axis] = (low, begin + 1, -stride)
            flipped.append(axis)
    axes = sorted(ascending)
    x = ctx.emit(
        op.strided_slice(
            x,
            axes=axes,
            begin=[ascending[a][0] for a in axes],
            end=[ascending[a][1] for a in axes],
            strides=[ascending[a][2] for a in axes],
            assume_inbound=True,
        )
    )
    for axis in flipped:
        x = ctx.emit(op.flip(x, axis=axis))
    return x


@lowering("gather")
def lower_gather(ctx: LowerContext, node: Node, x: relax.Expr, indices: relax.Expr) -> relax.Expr:
    # "wrap" maps the valid range [-size, size) like numpy; "fast" would read out of bounds
    return ctx.emit(op.take(x, indices, axis=node.attrs["axis"] % node.inputs[0].type.rank, mode="wrap"))


@lowering("pad")
def lower_pad(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    pads, rank = node.attrs["pads"], node.inputs[0].type.rank
    if not any(pads):
        return x
    width = [p for i in range(rank) for p in (pads[i], pads[i + rank])]
    return ctx.emit(op.nn.pad(x, width, pad_value=node.attrs["value"]))


# -- pooling ---------------------------------------------------------------------------------
def _pool_padding(node: Node, dilation: tuple[int, int]) -> tuple[list[int], tuple[int, int]]:
    """Relax pad widths for NCHW that give every window in full (ceil-mode overhang included)."""
    _, _, h, w = node.inputs[0].shape
    kernel, stride, padding, ceil_mode = (node.attrs[k] for k in ("kernel", "stride", "padding", "ceil_mode"))
    top, left, bottom, right = padding
    oh = pool_output_size(h, kernel[0], stride[0], top, bottom, dilation[0], ceil_mode)
    ow = pool_output_size(w, kernel[1], stride[1], left, right, dilation[1], ceil_mode)
    span_h, span_w = (kernel[0] - 1) * dilation[0] + 1, (kernel[1] - 1) * dilation[1] + 1
    # pad just enough for the last window; a floor-mode pool may leave padding unused
    bottom_total = (oh - 1) * stride[0] + span_h - (h + top)
    right_total = (ow - 1) * stride[1] + span_w - (w + left)
    return [0, 0, 0, 0, top, bottom_total, left, right_total], (oh, ow)


def _pad_for_pool(ctx: LowerContext, node: Node, x: relax.Expr, widths: list[int], value: float) -> relax.Expr:
    _, _, h, w = node.inputs[0].shape
    if widths[5] < 0 or widths[7] < 0:  # trailing input no window reaches (floor mode): crop it
        end = [h + min(0, widths[5]), w + min(0, widths[7])]
        x = ctx.emit(op.strided_slice(x, axes=[2, 3], begin=[0, 0], end=end, assume_inbound=True))
    if not any(max(0, w) for w in widths):
        return x
    return ctx.emit(op.nn.pad(x, [max(0, w) for w in widths], pad_value=value))


@lowering("max_pool2d")
def lower_max_pool2d(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    dilation = tuple(node.attrs["dilation"])
    widths, _ = _pool_padding(node, dilation)
    x = _pad_for_pool(ctx, node, x, widths, float("-inf"))
    kernel, stride = node.attrs["kernel"], node.attrs["stride"]
    return ctx.emit(op.nn.max_pool2d(x, pool_size=kernel, strides=stride, dilation=dilation))


@lowering("avg_pool2d")
def lower_avg_pool2d(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    widths, (oh, ow) = _pool_padding(node, (1, 1))
    x = _pad_for_pool(ctx, node, x, widths, 0.0)
    kernel, stride = node.attrs["kernel"], node.attrs["stride"]
    y = ctx.emit(op.nn.avg_pool2d(x, pool_size=kernel, strides=stride, count_include_pad=True))
    # Relax divided every window by the kernel area; rescale to the reference's divisor
    dtype = node.inputs[0].dtype
    divisor = _window_counts(node, oh, ow)
    area = float(kernel[0] * kernel[1])
    if np.all(divisor == area):
        return y
    return ctx.emit(op.multiply(y, relax.const((area / divisor).astype(numpy_dtype(dtype)))))


def _window_counts(node: Node, oh: int, ow: int) -> np.ndarray:
    """The divisor of each output window, following ``ir.numpy_kernels.avg_pool2d``."""
    _, _, h, w = node.inputs[0].shape
    kernel, stride, padding, ceil_mode = (node.attrs[k] for k in ("kernel", "stride", "padding", "ceil_mode"))
    top, left, bottom, right = padding
    valid = np.ones((h, w))
    if node.attrs["count_include_pad"]:
        valid = np.pad(valid, ((top, bottom), (left, right)), constant_values=1.0)
        top = left = 0
    counts = np.zeros((1, 1, oh, ow))
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * stride[0] - top, j * stride[1] - left
            rows = slice(max(r0, 0), max(r0 + kernel[0], 0))
            cols = slice(max(c0, 0), max(c0 + kernel[1], 0))
            counts[0, 0, i, j] = valid[rows, cols].sum()
    return counts


@lowering("cumsum")
def lower_cumsum(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    """Relax cumsum (inclusive or exclusive); ``reverse`` scans the flipped axis."""
    attrs = node.attrs
    axis = attrs["axis"] % node.inputs[0].type.rank
    if attrs["reverse"]:
        x = ctx.emit(op.flip(x, axis))
    y = ctx.emit(op.cumsum(x, axis=axis, dtype=node.outputs[0].dtype, exclusive=bool(attrs["exclusive"])))
    return ctx.emit(op.flip(y, axis)) if attrs["reverse"] else y


@lowering("gather_elements")
def lower_gather_elements(ctx: LowerContext, node: Node, x: relax.Expr, indices: relax.Expr) -> relax.Expr:
    """Relax gather_elements after mapping negative indices to ``index + size`` (as the reference)."""
    axis = node.attrs["axis"] % node.inputs[0].type.rank
    size, dtype = ctx.dim(node.inputs[0].shape[axis]), node.inputs[1].dtype
    if not isinstance(size, int):
        raise CodegenError(f"gather_elements (node {node.name}) along the batch axis; gather along a static axis")
    wrapped = op.where(op.less(indices, scalar(0, dtype)), op.add(indices, scalar(size, dtype)), indices)
    return ctx.emit(op.gather_elements(x, ctx.emit(wrapped), axis=axis))


@lowering("resize2d")
def lower_resize2d(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    """Bilinear or nearest resize as a TE compute over the reference's own tap tables (``ops_index``)."""
    (h, w), (oh, ow) = node.inputs[0].shape[2:], node.attrs["size"]
    mode = node.attrs["coordinate_transformation"]
    if node.attrs["mode"] == "nearest":
        rounding = node.attrs["nearest_mode"]
        rows, cols = (
            relax.const(t) for t in (nearest_taps(h, oh, mode, rounding), nearest_taps(w, ow, mode, rounding))
        )

        def gather(data, rows, cols):
            shape = (data.shape[0], data.shape[1], oh, ow)
            return te.compute(shape, lambda b, c, i, j: data[b, c, rows[i], cols[j]], name="resize2d")

        return ctx.te(gather, x, rows, cols, name="resize2d_nearest")
    taps = [relax.const(t) for t in (*linear_taps(h, oh, mode), *linear_taps(w, ow, mode))]

    def compute(data, low_h, high_h, weight_h, low_w, high_w, weight_w):
        def column(b, c, row, j):
            return data[b, c, row, low_w[j]] * (1 - weight_w[j]) + data[b, c, row, high_w[j]] * weight_w[j]

        def pixel(b, c, i, j):  # columns of the two source rows, then rows (the reference's order)
            return column(b, c, low_h[i], j) * (1 - weight_h[i]) + column(b, c, high_h[i], j) * weight_h[i]

        return te.compute((data.shape[0], data.shape[1], oh, ow), pixel, name="resize2d")

    return ctx.te(compute, x, *taps, name="resize2d_linear")
