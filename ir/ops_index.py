"""Scan, element-gather and resampling ops of the registry: cumsum, gather_elements, resize2d.

Registered into :data:`reshift.ir.ops.OPS` (imported at the end of ``ir/ops.py``). They are what
Hugging Face models compute at run time: RoBERTa's position ids (``cumsum`` of the padding mask,
``gather_elements`` of the token-type buffer by them), SegFormer's bilinear decoder upsampling.
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
    normalize_axis(axis, x.rank, "gather_elements")
    if indices.dtype not in ("int32", "int64") or indices.rank != x.rank:
        raise IRTypeError(f"gather_elements: indices must be int32/int64 of x's rank {x.rank}, got {indices}")
    return [x.with_shape(indices.shape)]


def _gather_elements(x, indices, axis):
    """ONNX GatherElements / ``torch.gather``: ``out[i][j] = x[i][indices[i][j]]`` for axis 1."""
    size = x.shape[axis]
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise IndexError(f"gather_elements: index out of range [{-size}, {size}) along axis {axis}")
    picked = np.take_along_axis(x, np.where(indices < 0, indices + size, indices), axis=axis)
    return np.ascontiguousarray(picked)


register(
    "gather_elements",
    ["x", "indices"],
    {"axis": Attr("int", 0)},
    _gather_elements_infer,
    _gather_elements,
    "take along axis element-wise: the output has the indices' shape (torch.gather)",
)

RESIZE_MODES = ("linear", "nearest")
COORDINATE_MODES = ("half_pixel", "align_corners", "asymmetric")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _resize2d_infer(x, size, mode, coordinate_transformation, nearest_mode="round_prefer_floor"):
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
    if len(size) != 2 or any(s < 1 for s in size):
        raise IRTypeError(f"resize2d: size must be two positive ints (height, width), got {list(size)}")
    if any(isinstance(d, str) for d in x.shape[2:]):
        raise IRTypeError("resize2d: the spatial dimensions must be static")
    return [x.with_shape(x.shape[:2] + tuple(size))]


def source_coordinates(length: int, out: int, coordinate_transformation: str) -> np.ndarray:
    """ONNX Resize's source coordinate of each output index (scale = out / length)."""
    i = np.arange(out, dtype=np.float64)
    if coordinate_transformation == "align_corners":
        return i * ((length - 1) / (out - 1)) if out > 1 else np.zeros(out)
    if coordinate_transformation == "half_pixel":
        return (i + 0.5) * (length / out) - 0.5
    return i * (length / out)


def nearest_taps(length: int, out: int, coordinate_transformation: str, nearest_mode: str) -> np.ndarray:
    """The source index of each output index for ONNX Resize's ``mode="nearest"``.

    ``round_prefer_floor`` rounds halves down, ``round_prefer_ceil`` up (ONNX's two rounding
    modes), then the index is clamped to ``[0, length - 1]``.
    """
    source = source_coordinates(length, out, coordinate_transformation)
    if nearest_mode == "floor":
        index = np.floor(source)
    elif nearest_mode == "ceil":
        index = np.ceil(source)
    elif nearest_mode == "round_prefer_ceil":
        index = np.floor(source + 0.5)
    else:
        index = np.ceil(source - 0.5)
    return np.clip(index, 0, length - 1).astype(np.int64)


def linear_taps(length: int, out: int, coordinate_transformation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(low, high, weight)`` per output index: ``out[i] = in[low] * (1 - w) + in[high] * w``.

    The source coordinate follows ONNX Resize: half_pixel ``(i + 0.5) / scale - 0.5`` (torch's
    ``align_corners=False``), align_corners ``i * (length - 1) / (out - 1)``, asymmetric ``i / scale``;
    it is clamped to ``[0, length - 1]`` (torch clamps negatives to 0, the edge is replicated).
    """
    source = np.clip(source_coordinates(length, out, coordinate_transformation), 0.0, length - 1)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, length - 1)
    return low, high, (source - low).astype(np.float32)


def _resize2d(x, size, mode, coordinate_transformation, nearest_mode="round_prefer_floor"):
    """Bilinear (rows, then columns) or nearest resampling of ``[N, C, H, W]`` to ``[N, C, *size]``."""
    (h, w), (oh, ow) = x.shape[2:], size
    if mode == "nearest":
        rows = nearest_taps(h, oh, coordinate_transformation, nearest_mode)
        cols = nearest_taps(w, ow, coordinate_transformation, nearest_mode)
        return x[:, :, rows][:, :, :, cols]
    low, high, weight = linear_taps(h, oh, coordinate_transformation)
    rows = x[:, :, low, :] * (1 - weight)[:, None] + x[:, :, high, :] * weight[:, None]
    low, high, weight = linear_taps(w, ow, coordinate_transformation)
    return (rows[..., low] * (1 - weight) + rows[..., high] * weight).astype(x.dtype)


register(
    "resize2d",
    ["x"],
    {
        "size": Attr("ints"),
        "mode": Attr("str", "linear"),
        "coordinate_transformation": Attr("str", "half_pixel"),
        "nearest_mode": Attr("str", "round_prefer_floor"),
    },
    _resize2d_infer,
    _resize2d,
    "resample [N, C, H, W] to [N, C, *size] (bilinear or nearest; ONNX Resize coordinate and rounding modes)",
)
