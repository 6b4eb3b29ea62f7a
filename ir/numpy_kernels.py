"""Numpy implementations behind the op registry's references that need more than one line.

Plain, readable numpy (sliding windows + einsum); correctness over speed.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def erf(x: np.ndarray) -> np.ndarray:
    """Error function to float32 accuracy without scipy.

    Taylor series for |x| < 0.5 (keeps relative accuracy near 0), Numerical Recipes'
    Chebyshev fit of erfc (fractional error < 1.2e-7) elsewhere.
    """
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (
        1.00002368
        + t
        * (
            0.37409196
            + t
            * (
                0.09678418
                + t
                * (
                    -0.18628806
                    + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))
                )
            )
        )
    )
    erfc = t * np.exp(-z * z + poly)
    large = np.sign(x) * (1.0 - erfc)
    x2 = x.astype(np.float64) ** 2
    series = _TWO_OVER_SQRT_PI * x * (1 - x2 / 3 + x2**2 / 10 - x2**3 / 42 + x2**4 / 216 - x2**5 / 1320)
    return np.where(z < 0.5, series, large).astype(x.dtype)


def pool_output_size(
    size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int, ceil_mode: bool
) -> int:
    """Output length of a convolution/pooling window (PyTorch's rule, ceil_mode included)."""
    span = dilation * (kernel - 1) + 1
    numerator = size + pad_begin + pad_end - span
    out = (-(-numerator // stride) if ceil_mode else numerator // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad_begin:
        out -= 1  # the last window must start inside the input or left padding
    return out


def conv2d(x, w, b, stride, padding, dilation, groups):
    """NCHW x OIHW grouped, dilated 2-D convolution; ``padding`` is (top, left, bottom, right)."""
    n, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    top, left, bottom, right = padding
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = sliding_window_view(xp, ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1), axis=(2, 3))
    windows = windows[:, :, :: stride[0], :: stride[1], :: dilation[0], :: dilation[1]]
    oh, ow = windows.shape[2], windows.shape[3]
    windows = windows.reshape(n, groups, cg, oh, ow, kh, kw)
    wg = w.reshape(groups, o // groups, cg, kh, kw)
    y = np.einsum("ngchwij,gocij->ngohw", windows, wg, optimize=True).reshape(n, o, oh, ow)
    if b is not None:
        y = y + b.reshape(1, o, 1, 1)
    return y.astype(x.dtype)


def _pool_windows(x, kernel, stride, padding, dilation, ceil_mode, pad_value):
    _, _, h, w = x.shape
    top, left, bottom, right = padding
    oh = pool_output_size(h, kernel[0], stride[0], top, bottom, dilation[0], ceil_mode)
    ow = pool_output_size(w, kernel[1], stride[1], left, right, dilation[1], ceil_mode)
    span_h = (kernel[0] - 1) * dilation[0] + 1
    span_w = (kernel[1] - 1) * dilation[1] + 1
    extra_h = max(0, (oh - 1) * stride[0] + span_h - (h + top + bottom))
    extra_w = max(0, (ow - 1) * stride[1] + span_w - (w + left + right))
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom + extra_h), (left, right + extra_w)), constant_values=pad_value)
    windows = sliding_window_view(xp, (span_h, span_w), axis=(2, 3))
    return windows[:, :, :: stride[0], :: stride[1], :: dilation[0], :: dilation[1]][:, :, :oh, :ow]


def max_pool2d(x, kernel, stride, padding, dilation, ceil_mode):
    windows = _pool_windows(x, kernel, stride, padding, dilation, ceil_mode, -np.inf)
    return windows.max(axis=(-2, -1)).astype(x.dtype)


def avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad):
    """Average pooling; padding counts in the divisor only when ``count_include_pad``.

    Windows that run past the padded input (ceil_mode) never count the overhang, as in PyTorch.
    """
    sums = _pool_windows(x, kernel, stride, padding, (1, 1), ceil_mode, 0.0).sum(axis=(-2, -1))
    ones = np.ones((1, 1) + x.shape[2:], dtype=x.dtype)
    if count_include_pad:
        top, left, bottom, right = padding
        ones = np.pad(ones, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=1.0)
        counts = _pool_windows(ones, kernel, stride, (0, 0, 0, 0), (1, 1), ceil_mode, 0.0)
        counts = counts.sum(axis=(-2, -1))[:, :, : sums.shape[2], : sums.shape[3]]
    else:
        counts = _pool_windows(ones, kernel, stride, padding, (1, 1), ceil_mode, 0.0).sum(axis=(-2, -1))
    return (sums / counts).astype(x.dtype)


def slice_axes(x, starts, ends, axes, steps):
    """ONNX ``Slice`` semantics: per-axis start/end/step, clamped like Python slicing."""
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        index[axis] = slice(start, end, step)
    return x[tuple(index)]
