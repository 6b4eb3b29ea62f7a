"""Scan, gather/scatter and resampling ops of the registry: cumsum, gather_elements, gather_nd,
scatter_nd, resize2d.

Registered into :data:`reshift.ir.ops.OPS` (imported at the end of ``ir/ops.py``). They are what
Hugging Face models compute at run time: RoBERTa's position ids (``cumsum`` of the padding mask,
``gather_elements`` of the token-type buffer by them), SegFormer's bilinear decoder upsampling,
detection heads' ``GatherND``/``ScatterND`` of run-time boxes. Index semantics follow ONNX:
indices in ``[-size, size)``, negatives count from the end; the references raise ``IndexError``
(an ``ExecutionError`` naming the node, from the interpreter) on any other index.
"""

from __future__ import annotations

import numpy as np

from reshift.errors import IRTypeError
from reshift.ir.ops import NUMERIC_DTYPES, Attr, register
from reshift.ir.shapes import normalize_axis, require_float, require_rank


def _cumsum_infer(x, axis, exclusive, reverse):
    normalize_axis(axis, x.rank, "cumsum")
    if x.dtype not in NUMERIC_DTYPES:
        raise IRTypeError(f"cumsum: x must be a numeric tensor, got {x}")
    return [x]


def _cumsum(x, axis, exclusive, reverse):
    """ONNX CumSum / ``torch.cumsum``: running sums along ``axis``, in x's dtype."""
    y = np.flip(x, axis) if reverse else x
    out = np.cumsum(y, axis=axis, dtype=x.dtype)
    if exclusive:
        out = out - y
    return np.ascontiguousarray(np.flip(out, axis) if reverse else out)


register(
    "cumsum",
    ["x"],
    {"axis": Attr("int"), "exclusive": Attr("bool", False), "reverse": Attr("bool", False)},
    _cumsum_infer,
    _cumsum,
    "running sum along axis (exclusive: without the element itself; reverse: from the end)",
)


def _gather_elements_infer(x, indices, axis):
    axis = normalize_axis(axis, x.rank, "gather_elements")
    if indices.dtype not in ("int32", "int64") or indices.rank != x.rank:
        raise IRTypeError(f"gather_elements: indices must be int32/int64 of x's rank {x.rank}, got {indices}")
    for d, (size, extent) in enumerate(zip(x.shape, indices.shape, strict=True)):
        if d != axis and isinstance(size, int) and isinstance(extent, int) and extent > size:
            raise IRTypeError(f"gather_elements: indices {indices} exceed x {x} on axis {d} (only axis {axis} may)")
    return [x.with_shape(indices.shape)]


def _gather_elements(x, indices, axis):
    """ONNX GatherElements / ``torch.gather``: ``out[i][j] = x[i][indices[i][j]]`` for axis 1.

    ``indices`` may be smaller than ``x`` on the other axes (torch and ONNX allow it): they read
    ``x``'s leading part there.
    """
    size = x.shape[axis]
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise IndexError(
            f"gather_elements: index {int(indices.min() if indices.min() < -size else indices.max())} out of "
            f"range [{-size}, {size}) along axis {axis} of x {list(x.shape)}"
        )
    grid = list(np.ogrid[tuple(slice(0, n) for n in indices.shape)])
    grid[axis] = np.where(indices < 0, indices + size, indices)
    return np.ascontiguousarray(x[tuple(grid)])


register(
    "gather_elements",
    ["x", "indices"],
    {"axis": Attr("int", 0)},
    _gather_elements_infer,
    _gather_elements,
    "take along axis element-wise: the output has the indices' shape (torch.gather)",
)


def _index_tuple_type(x, indices, batch_dims: int, op: str) -> int:
    """Check ``indices`` ``[..., M]`` against ``x`` (M indexes axes ``batch_dims..batch_dims+M``); M."""
    if indices.dtype not in ("int32", "int64") or indices.rank < 1:
        raise IRTypeError(f"{op}: indices must be an int32/int64 tensor [..., M], got {indices}")
    depth = indices.shape[-1]
    if isinstance(depth, str) or not 1 <= depth <= x.rank - batch_dims:
        raise IRTypeError(f"{op}: the last indices axis (M = {depth}) must be static, in 1..{x.rank - batch_dims}")
    return depth


def _checked_index_tuples(x_shape, indices, batch_dims: int, op: str) -> np.ndarray:
    """``indices`` with negatives counted from the end; ``IndexError`` on one outside ``[-size, size)``."""
    sizes = np.asarray(x_shape[batch_dims : batch_dims + indices.shape[-1]], dtype=np.int64)
    bad = (indices < -sizes) | (indices >= sizes)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise IndexError(
            f"{op}: index {int(indices[where])} at position {list(where)} is out of range [-{sizes[where[-1]]}, "
            f"{sizes[where[-1]]}) for axis {batch_dims + where[-1]} of data {list(x_shape)}"
        )
    return np.where(indices < 0, indices + sizes, indices).astype(np.int64)


def _gather_nd_infer(x, indices, batch_dims):
    if not 0 <= batch_dims < min(x.rank, indices.rank):
        raise IRTypeError(f"gather_nd: batch_dims {batch_dims} must be in [0, {min(x.rank, indices.rank)})")
    if tuple(x.shape[:batch_dims]) != tuple(indices.shape[:batch_dims]):
        raise IRTypeError(f"gather_nd: the first {batch_dims} axes of {x} and {indices} must agree")
    depth = _index_tuple_type(x, indices, batch_dims, "gather_nd")
    return [x.with_shape(tuple(indices.shape[:-1]) + tuple(x.shape[batch_dims + depth :]))]


def _gather_nd(x, indices, batch_dims):
    """ONNX GatherND: ``out[b..., i...] = x[b..., *indices[b..., i..., :]]`` (``b``: the batch_dims axes)."""
    depth = indices.shape[-1]
    index = _checked_index_tuples(x.shape, indices, batch_dims, "gather_nd")
    batches = int(np.prod(x.shape[:batch_dims], dtype=np.int64))
    flat_x = x.reshape((batches,) + x.shape[batch_dims:])
    flat_index = index.reshape(batches, -1, depth)
    picked = flat_x[(np.arange(batches)[:, None], *(flat_index[..., k] for k in range(depth)))]
    return np.ascontiguousarray(picked.reshape(indices.shape[:-1] + x.shape[batch_dims + depth :]))


register(
    "gather_nd",
    ["x", "indices"],
    {"batch_dims": Attr("int", 0)},
    _gather_nd_infer,
    _gather_nd,
    "ONNX GatherND: slices of x at the index tuples in the last indices axis, after batch_dims shared axes",
)

SCATTER_REDUCTIONS = ("none", "add", "mul", "max", "min")


def _scatter_nd_infer(data, indices, updates, reduction):
    depth = _index_tuple_type(data, indices, 0, "scatter_nd")
    expected = tuple(indices.shape[:-1]) + tuple(data.shape[depth:])
    if updates.dtype != data.dtype or tuple(updates.shape) != expected:
        raise IRTypeError(
            f"scatter_nd: updates must be {data.dtype}{list(expected)} for {data} and {indices}, got {updates}"
        )
    if reduction not in SCATTER_REDUCTIONS:
        raise IRTypeError(f"scatter_nd: reduction {reduction!r}; expected one of {SCATTER_REDUCTIONS}")
    return [data]


_SCATTER_UFUNCS = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _scatter_nd(data, indices, updates, reduction):
    """ONNX ScatterND: a copy of data with ``updates`` written (or combined) at the index tuples, in order.

    With ``reduction="none"`` a repeated index tuple keeps its last update, as ONNX's sequential
    definition does.
    """
    depth = indices.shape[-1]
    index = _checked_index_tuples(data.shape, indices, 0, "scatter_nd").reshape(-1, depth)
    rows = updates.reshape((index.shape[0],) + data.shape[depth:])
    out = data.copy()
    if reduction == "none":
        flat = np.ravel_multi_index(tuple(index.T), data.shape[:depth]) if index.size else np.zeros(0, np.int64)
        _, first_from_end = np.unique(flat[::-1], return_index=True)
        last = index.shape[0] - 1 - first_from_end
        out[tuple(index[last].T)] = rows[last]
    else:
        _SCATTER_UFUNCS[reduction].at(out, tuple(index.T), rows)
    return out


register(
    "scatter_nd",
    ["data", "indices", "updates"],
    {"reduction": Attr("str", "none")},
    _scatter_nd_infer,
    _scatter_nd,
    "ONNX ScatterND: data with updates written (none) or combined (add/mul/max/min) at the index tuples",
)

RESIZE_MODES = ("linear", "nearest", "cubic")
COORDINATE_MODES = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_crop_and_resize",
)
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
FULL_ROI = (0.0, 0.0, 1.0, 1.0)
SCALED_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "asymmetric")  # sample at 1 / scale


def _resize2d_infer(x, size, mode, coordinate_transformation, nearest_mode, roi, scales, antialias, **_):
    require_rank(x, 4, "resize2d")
    require_float(x, "resize2d")
    if mode not in RESIZE_MODES:
        raise IRTypeError(f"resize2d: mode {mode!r} is not supported; expected one of {RESIZE_MODES}")
    if coordinate_transformation not in COORDINATE_MODES:
        raise IRTypeError(
            f"resize2d: coordinate_transformation {coordinate_transformation!r}; one of {COORDINATE_MODES}"
        )
    if nearest_mode not in NEAREST_MODES:
        raise IRTypeError(f"resize2d: nearest_mode {nearest_mode!r} is not supported; expected one of {NEAREST_MODES}")
    if antialias and mode == "nearest":
        raise IRTypeError("resize2d: antialias applies to linear and cubic, not nearest")
    if len(size) != 2 or any(s < 1 for s in size):
        raise IRTypeError(f"resize2d: size must be two positive ints (height, width), got {list(size)}")
    if len(roi) != 4:
        raise IRTypeError(f"resize2d: roi must be 4 floats (h_start, w_start, h_end, w_end), got {list(roi)}")
    if scales and (len(scales) != 2 or min(scales) <= 0 or coordinate_transformation not in SCALED_MODES):
        raise IRTypeError(
            f"resize2d: scales {list(scales)} must be two positive factors, for coordinate_transformation in "
            f"{SCALED_MODES} (the others do not sample at 1 / scale)"
        )
    if any(isinstance(d, str) for d in x.shape[2:]):
        raise IRTypeError("resize2d: the spatial dimensions must be static")
    return [x.with_shape(x.shape[:2] + tuple(size))]


def source_coordinates(
    length: int,
    out: int,
    coordinate_transformation: str,
    roi: tuple[float, float] = (0.0, 1.0),
    scale: float | None = None,
) -> np.ndarray:
    """ONNX Resize's source coordinate of each output index.

    ``roi`` is the (start, end) crop of ``tf_crop_and_resize`` in normalized coordinates; ``scale``
    the factor given to ONNX Resize (``scales``) or torch (``scale_factor``) where ``out / length``
    differs from it (``floor(length * scale) = out``): the half-pixel and asymmetric modes sample at
    ``1 / scale`` then.
    """
    i = np.arange(out, dtype=np.float64)
    if coordinate_transformation == "half_pixel_symmetric":  # ONNX 19: half_pixel, re-centred when floored
        factor = scale if scale is not None else out / length
        offset = length / 2 * (1 - out / (factor * length))
        return offset + (i + 0.5) / factor - 0.5
    if scale is not None and coordinate_transformation == "asymmetric":
        return i / scale
    one_pixel_torch = coordinate_transformation == "pytorch_half_pixel" and out == 1
    if scale is not None and coordinate_transformation in SCALED_MODES and not one_pixel_torch:
        return (i + 0.5) / scale - 0.5
    if coordinate_transformation == "align_corners":
        return i * ((length - 1) / (out - 1)) if out > 1 else np.zeros(out)
    if coordinate_transformation == "tf_crop_and_resize":
        # in float32 and onnxruntime's order of operations, so that nearest's ties round alike
        start, end, span, i = np.float32(roi[0]), np.float32(roi[1]), np.float32(length - 1), i.astype(np.float32)
        if out == 1:
            return np.full(out, np.float32(0.5) * (start + end) * span, dtype=np.float64)
        return (start * span + (i * (end - start) * span) / np.float32(out - 1)).astype(np.float64)
    if coordinate_transformation == "pytorch_half_pixel" and out == 1:
        return np.zeros(out)  # the spec; linear and nearest clamp -0.5 (ONNX reference code) to 0 alike
    if coordinate_transformation in ("half_pixel", "pytorch_half_pixel"):
        return (i + 0.5) * (length / out) - 0.5
    return i * (length / out)


def inside_roi(length: int, out: int, coordinate_transformation: str, roi: tuple[float, float]) -> np.ndarray:
    """Whether each output index samples inside the input; ``tf_crop_and_resize`` extrapolates the others."""
    if coordinate_transformation != "tf_crop_and_resize":
        return np.ones(out, dtype=bool)
    source = source_coordinates(length, out, coordinate_transformation, roi)
    return (source >= 0) & (source <= length - 1)


def nearest_taps(
    length: int,
    out: int,
    coordinate_transformation: str,
    nearest_mode: str,
    roi: tuple[float, float] = (0.0, 1.0),
    scale: float | None = None,
) -> np.ndarray:
    """The source index of each output index for ONNX Resize's ``mode="nearest"``.

    ``round_prefer_floor`` rounds halves down, ``round_prefer_ceil`` up (ONNX's two rounding
    modes), then the index is clamped to ``[0, length - 1]``.
    """
    source = source_coordinates(length, out, coordinate_transformation, roi, scale)
    if nearest_mode == "floor":
        index = np.floor(source)
    elif nearest_mode == "ceil":
        index = np.ceil(source)
    elif nearest_mode == "round_prefer_ceil":
        index = np.floor(source + 0.5)
    else:
        index = np.ceil(source - 0.5)
    return np.clip(index, 0, length - 1).astype(np.int64)


def linear_taps(
    length: int,
    out: int,
    coordinate_transformation: str,
    roi: tuple[float, float] = (0.0, 1.0),
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(low, high, weight)`` per output index: ``out[i] = in[low] * (1 - w) + in[high] * w``.

    The source coordinate follows ONNX Resize: half_pixel ``(i + 0.5) / scale - 0.5`` (torch's
    ``align_corners=False``), align_corners ``i * (length - 1) / (out - 1)``, asymmetric ``i / scale``;
    it is clamped to ``[0, length - 1]`` (torch clamps negatives to 0, the edge is replicated).
    """
    source = np.clip(source_coordinates(length, out, coordinate_transformation, roi, scale), 0.0, length - 1)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, length - 1)
    return low, high, (source - low).astype(np.float32)


def cubic_taps(
    length: int,
    out: int,
    coordinate_transformation: str,
    a: float = -0.75,
    exclude_outside: bool = False,
    roi: tuple[float, float] = (0.0, 1.0),
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(index, weight)``, each ``[out, 4]``: ``out[i] = sum_k in[index[i, k]] * weight[i, k]``.

    Keys's cubic convolution kernel with coefficient ``a`` (ONNX ``cubic_coeff_a``; -0.75 is
    torch's bicubic, -0.5 TensorFlow's) on the four inputs around the unclamped source coordinate.
    Taps outside the input read the edge (torch and ONNX), or with ``exclude_outside`` get weight 0
    and the rest are renormalized (ONNX).
    """
    source = source_coordinates(length, out, coordinate_transformation, roi, scale)
    base = np.floor(source)
    offsets = np.arange(-1, 3, dtype=np.float64)
    index = base[:, None] + offsets
    distance = np.abs(source[:, None] - index)
    near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
    weight = np.where(distance <= 1, near, np.where(distance < 2, far, 0.0))
    if exclude_outside:
        weight = np.where((index >= 0) & (index <= length - 1), weight, 0.0)
        total = weight.sum(axis=1, keepdims=True)  # 0 only far outside a tf_crop_and_resize roi (extrapolated)
        weight = np.divide(weight, total, out=np.zeros_like(weight), where=total != 0)
    return np.clip(index, 0, length - 1).astype(np.int64), weight.astype(np.float32)


def antialias_taps(
    length: int,
    out: int,
    coordinate_transformation: str,
    resample: str,
    a: float = -0.75,
    exclude_outside: bool = False,
    roi: tuple[float, float] = (0.0, 1.0),
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(index, weight)``, each ``[out, K]``, for ONNX Resize's ``antialias=1`` (linear or cubic).

    Downsampling by ``s < 1`` stretches the kernel by ``1 / s``: the taps are the ``K`` inputs
    nearest the source coordinate, each weighted ``kernel(s * distance)``, normalized to sum 1
    (upsampling keeps the plain kernel). The left tap is the one at ratio ``(0, 1]``, as ONNX's
    reference picks it; taps outside read the edge, or with ``exclude_outside`` get weight 0.
    """
    factor = min(scale if scale is not None else out / length, 1.0)
    source = source_coordinates(length, out, coordinate_transformation, roi, scale)
    base = np.ceil(source) - 1
    support = 2.0 if resample == "cubic" else 1.0
    start = int(np.floor(-support / factor) + 1)
    offsets = np.arange(start, 2 - start, dtype=np.float64)
    index = base[:, None] + offsets
    x = np.abs(factor * (offsets - (source - base)[:, None]))
    if resample == "cubic":
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        weight = np.where(x <= 1, near, np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))
    else:
        weight = np.clip(1 - x, 0.0, 1.0)
    if exclude_outside:
        weight = np.where((index >= 0) & (index <= length - 1), weight, 0.0)
    total = weight.sum(axis=1, keepdims=True)
    weight = np.divide(weight, total, out=np.zeros_like(weight), where=total != 0)
    return np.clip(index, 0, length - 1).astype(np.int64), weight.astype(np.float32)


def axis_rois(roi: tuple[float, ...]) -> tuple[tuple[float, float], tuple[float, float]]:
    """The (start, end) crop of the height and of the width axis from ``(h_start, w_start, h_end, w_end)``."""
    return (roi[0], roi[2]), (roi[1], roi[3])


def filter_taps(resample: str, coordinate_transformation: str, a: float, exclude_outside: bool, antialias: bool):
    """``taps(length, out, roi, scale) -> (index, weight)`` of a cubic or antialiased resize (``[out, K]``)."""

    def taps(length, out, roi, scale):
        if antialias:
            return antialias_taps(length, out, coordinate_transformation, resample, a, exclude_outside, roi, scale)
        return cubic_taps(length, out, coordinate_transformation, a, exclude_outside, roi, scale)

    return taps


def axis_scales(scales: tuple[float, ...]) -> tuple[float | None, float | None]:
    """The given (height, width) scale factors, or ``(None, None)``: sample at ``length / out``."""
    return (scales[0], scales[1]) if scales else (None, None)


def _resize2d(
    x,
    size,
    mode,
    coordinate_transformation,
    nearest_mode="round_prefer_floor",
    cubic_coeff_a=-0.75,
    exclude_outside=False,
    roi=FULL_ROI,
    extrapolation_value=0.0,
    scales=(),
    antialias=False,
):
    """Cubic, bilinear (rows, then columns) or nearest resampling of ``[N, C, H, W]`` to ``[N, C, *size]``."""
    (h, w), (oh, ow) = x.shape[2:], size
    (roi_h, roi_w), (scale_h, scale_w) = axis_rois(roi), axis_scales(scales)
    if mode == "nearest":
        rows = nearest_taps(h, oh, coordinate_transformation, nearest_mode, roi_h, scale_h)
        cols = nearest_taps(w, ow, coordinate_transformation, nearest_mode, roi_w, scale_w)
        y = x[:, :, rows][:, :, :, cols]
    elif mode == "cubic" or antialias:
        taps = filter_taps(mode, coordinate_transformation, cubic_coeff_a, exclude_outside, antialias)
        index, weight = taps(h, oh, roi_h, scale_h)
        rows = sum(x[:, :, index[:, k], :] * weight[:, k, None] for k in range(index.shape[1]))
        index, weight = taps(w, ow, roi_w, scale_w)
        y = sum(rows[..., index[:, k]] * weight[:, k] for k in range(index.shape[1]))
    else:
        low, high, weight = linear_taps(h, oh, coordinate_transformation, roi_h, scale_h)
        rows = x[:, :, low, :] * (1 - weight)[:, None] + x[:, :, high, :] * weight[:, None]
        low, high, weight = linear_taps(w, ow, coordinate_transformation, roi_w, scale_w)
        y = rows[..., low] * (1 - weight) + rows[..., high] * weight
    if coordinate_transformation == "tf_crop_and_resize":
        inside = inside_roi(h, oh, coordinate_transformation, roi_h)[:, None]
        inside = inside & inside_roi(w, ow, coordinate_transformation, roi_w)[None, :]
        y = np.where(inside, y, np.asarray(extrapolation_value, x.dtype))
    return y.astype(x.dtype)


register(
    "resize2d",
    ["x"],
    {
        "size": Attr("ints"),
        "mode": Attr("str", "linear"),
        "coordinate_transformation": Attr("str", "half_pixel"),
        "nearest_mode": Attr("str", "round_prefer_floor"),
        "cubic_coeff_a": Attr("float", -0.75),
        "exclude_outside": Attr("bool", False),
        "roi": Attr("floats", FULL_ROI),
        "extrapolation_value": Attr("float", 0.0),
        "scales": Attr("floats", ()),
        "antialias": Attr("bool", False),
    },
    _resize2d_infer,
    _resize2d,
    "resample [N, C, H, W] to [N, C, *size] (nearest, bilinear or cubic; ONNX Resize coordinate, rounding, "
    "cubic and tf_crop_and_resize modes)",
)
