"""Lowerings of data-movement ops (reshape, slice, gather, pad, ...) and pooling.

Shapes come from the IR's inferred output types, so ``-1`` and batch symbols in ``shape``
attributes are already resolved. Pooling pads explicitly (as the numpy reference does), then
runs an unpadded Relax pool, so ``ceil_mode`` and ``count_include_pad`` match PyTorch exactly.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from reshift.codegen.tvm.lower import LowerContext, lowering, op, scalar
from reshift.ir.graph import Node
from reshift.ir.numpy_kernels import pool_output_size
from reshift.ir.ops_index import axis_rois, axis_scales, filter_taps, inside_roi, linear_taps, nearest_taps
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
    # "wrap" maps the valid range [-size, size) like numpy and any other index modulo size (never out
    # of bounds; the reference raises on it); "fast" would read out of bounds. gather_elements,
    # gather_nd and scatter_nd clamp instead (_safe_index)
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


def _safe_index(index: te.Tensor | tirx.PrimExpr, size: tirx.PrimExpr) -> tirx.PrimExpr:
    """An index in ``[-size, size)`` mapped to ``[0, size)``; any other index clamped into it.

    The references raise on an out-of-range index; a compiled kernel cannot, so it clamps rather
    than read or write outside the tensor (the result for such an index is the edge element's).
    """
    index = index.astype("int64")
    size = tirx.const(size, "int64") if isinstance(size, int) else size.astype("int64")
    wrapped = tirx.Select(index < 0, index + size, index)
    return tirx.max(tirx.min(wrapped, size - 1), tirx.const(0, "int64"))


@lowering("gather_elements")
def lower_gather_elements(ctx: LowerContext, node: Node, x: relax.Expr, indices: relax.Expr) -> relax.Expr:
    """``out[..., i, ...] = x[..., indices[..., i, ...], ...]`` on ``axis``, negatives wrapped, the rest clamped."""
    axis = node.attrs["axis"] % node.inputs[0].type.rank

    def compute(data, index):
        def element(*i):
            at = list(i)
            at[axis] = _safe_index(index[i], data.shape[axis])
            return data[tuple(at)]

        return te.compute(index.shape, element, name="gather_elements")

    return ctx.te(compute, x, indices, name="gather_elements")


@lowering("gather_nd")
def lower_gather_nd(ctx: LowerContext, node: Node, x: relax.Expr, indices: relax.Expr) -> relax.Expr:
    """ONNX GatherND as one TE compute; each index component wrapped, then clamped (``_safe_index``)."""
    batch_dims, depth = node.attrs["batch_dims"], node.inputs[1].shape[-1]
    lead = node.inputs[1].type.rank - 1

    def compute(data, index):
        out_shape = list(index.shape[:-1]) + list(data.shape[batch_dims + depth :])

        def element(*i):
            coordinates = [_safe_index(index[i[:lead] + (k,)], data.shape[batch_dims + k]) for k in range(depth)]
            return data[tuple(i[:batch_dims]) + tuple(coordinates) + tuple(i[lead:])]

        return te.compute(out_shape, element, name="gather_nd")

    return ctx.te(compute, x, indices, name="gather_nd")


_RELAX_REDUCTION = {"none": "update", "add": "add", "mul": "mul", "max": "max", "min": "min"}


@lowering("scatter_nd")
def lower_scatter_nd(
    ctx: LowerContext, node: Node, data: relax.Expr, indices: relax.Expr, updates: relax.Expr
) -> relax.Expr:
    """Relax scatter_nd (TOPI: serial over index tuples, so a repeated tuple's last update wins as in the
    reference; parallel over the slice) after the indices are wrapped and clamped (``_safe_index``)."""
    depth = node.inputs[1].shape[-1]

    def safe(data, index):
        def component(*i):  # index[..., k] addresses data axis k
            size = data.shape[depth - 1]
            for axis in reversed(range(depth - 1)):
                size = tirx.Select(i[-1] == axis, data.shape[axis].astype("int64"), size.astype("int64"))
            return _safe_index(index[i], size)

        return te.compute(index.shape, component, name="scatter_nd_index")

    index = ctx.te(safe, data, indices, name="scatter_nd_index")
    return ctx.emit(op.scatter_nd(data, index, updates, reduction=_RELAX_REDUCTION[node.attrs["reduction"]]))


def _weighted_sum(terms: list, weights: list) -> tirx.PrimExpr:
    total = terms[0] * weights[0]
    for term, weight in zip(terms[1:], weights[1:], strict=True):
        total = total + term * weight
    return total


def _resize_axis_taps(
    node: Node, length: int, out: int, roi: tuple[float, float], scale: float | None
) -> list[np.ndarray]:
    """The reference's own tap tables for one axis (``ir/ops_index.py``): what the TE compute reads."""
    a, mode = node.attrs, node.attrs["coordinate_transformation"]
    if a["mode"] == "nearest":
        return [nearest_taps(length, out, mode, a["nearest_mode"], roi, scale)]
    if a["mode"] == "cubic" or a["antialias"]:
        taps = filter_taps(a["mode"], mode, a["cubic_coeff_a"], a["exclude_outside"], a["antialias"])
        return list(taps(length, out, roi, scale))
    return list(linear_taps(length, out, mode, roi, scale))


@lowering("resize2d")
def lower_resize2d(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    """Nearest, bilinear or cubic resize as a TE compute over the reference's tap tables; a
    ``tf_crop_and_resize`` output outside the input is the extrapolation value (a constant mask)."""
    (h, w), (oh, ow) = node.inputs[0].shape[2:], node.attrs["size"]
    resample, coordinates = node.attrs["mode"], node.attrs["coordinate_transformation"]
    (roi_h, roi_w), (scale_h, scale_w) = axis_rois(node.attrs["roi"]), axis_scales(node.attrs["scales"])
    rows, cols = _resize_axis_taps(node, h, oh, roi_h, scale_h), _resize_axis_taps(node, w, ow, roi_w, scale_w)
    taps = [relax.const(t) for t in (*rows, *cols)]
    filtered = resample == "cubic" or node.attrs["antialias"]

    def compute(data, *tables):
        if resample == "nearest":
            row, col = tables

            def pixel(b, c, i, j):
                return data[b, c, row[i], col[j]]

        elif filtered:  # cubic or antialiased: K taps per axis
            row, row_weight, col, col_weight = tables
            taps_h, taps_w = rows[0].shape[1], cols[0].shape[1]

            def pixel(b, c, i, j):  # each source column along the rows first, then along the row (as the reference)
                def column(q):
                    return _weighted_sum(
                        [data[b, c, row[i, p], q] for p in range(taps_h)], [row_weight[i, p] for p in range(taps_h)]
                    )

                return _weighted_sum(
                    [column(col[j, q]) for q in range(taps_w)], [col_weight[j, q] for q in range(taps_w)]
                )

        else:
            low_h, high_h, weight_h, low_w, high_w, weight_w = tables

            def column(b, c, r, j):
                return data[b, c, r, low_w[j]] * (1 - weight_w[j]) + data[b, c, r, high_w[j]] * weight_w[j]

            def pixel(b, c, i, j):  # columns of the two source rows, then rows (the reference's order)
                return column(b, c, low_h[i], j) * (1 - weight_h[i]) + column(b, c, high_h[i], j) * weight_h[i]

        return te.compute((data.shape[0], data.shape[1], oh, ow), pixel, name="resize2d")

    y = ctx.te(compute, x, *taps, name=f"resize2d_{resample}{'_antialias' if node.attrs['antialias'] else ''}")
    if coordinates != "tf_crop_and_resize":
        return y
    inside = inside_roi(h, oh, coordinates, roi_h)[:, None] & inside_roi(w, ow, coordinates, roi_w)[None, :]
    fill = scalar(node.attrs["extrapolation_value"], node.inputs[0].dtype)
    return ctx.emit(op.where(relax.const(inside.reshape(1, 1, oh, ow)), y, fill))
