"""Volumetric and transposed convolutions of the registry: ``conv3d``, ``conv_transpose2d``.

Registered into :data:`reshift.ir.ops.OPS` (imported at the end of ``ir/ops.py``). 1-D convs,
1-D/3-D pooling, PRelu/Elu/Selu, LRN and InstanceNormalization need no op of their own: the
frontends write them exactly with ``conv2d``, the 2-D pools and elementwise ops
(``frontend/onnx_ops_nn.py``). These two do need one: a 3-D window does not factor into 2-D ones
when it mixes channels, and a transposed conv as a conv over a zero-stuffed input costs
stride^2 times the multiplications.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from reshift.errors import IRTypeError
from reshift.ir.ops import Attr, register
from reshift.ir.shapes import require_float, require_rank, require_same_dtype
from reshift.ir.types import TensorType


def _static_spatial(x: TensorType, op: str) -> tuple[int, ...]:
    spatial = x.shape[2:]
    if any(isinstance(d, str) for d in spatial):
        raise IRTypeError(f"{op}: spatial dimensions of {x} must be static")
    return tuple(int(d) for d in spatial)


def _check_window(op: str, kernel, stride, padding, dilation, rank: int) -> None:
    if len(stride) != rank or len(dilation) != rank or len(padding) != 2 * rank:
        raise IRTypeError(f"{op}: stride/dilation take {rank} values, padding {2 * rank} (begins, then ends)")
    if min(*kernel, *stride, *dilation) < 1 or min(padding) < 0:
        raise IRTypeError(
            f"{op}: kernel {list(kernel)}, stride {list(stride)} and dilation {list(dilation)} must be "
            f"positive and padding {list(padding)} non-negative"
        )


# -- conv3d ----------------------------------------------------------------------------------------
def _conv3d_infer(x, w, b, stride, padding, dilation, groups):
    require_rank(x, 5, "conv3d")
    require_rank(w, 5, "conv3d", "weight")
    require_float(x, "conv3d")
    require_same_dtype("conv3d", x=x, weight=w, bias=b)
    _check_window("conv3d", w.shape[2:], stride, padding, dilation, 3)
    if groups < 1 or x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
        raise IRTypeError(f"conv3d: input {x} and weight {w} disagree with groups={groups}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise IRTypeError(f"conv3d: bias {b} must be [{w.shape[0]}]")
    out = []
    for size, k, s, d, lo, hi in zip(
        _static_spatial(x, "conv3d"), w.shape[2:], stride, dilation, padding[:3], padding[3:], strict=True
    ):
        length = (size + lo + hi - d * (k - 1) - 1) // s + 1
        if length < 1:
            raise IRTypeError(
                f"conv3d: kernel {list(w.shape[2:])} (dilation {list(dilation)}) exceeds the padded input {x}"
            )
        out.append(length)
    return [x.with_shape((x.shape[0], w.shape[0], *out))]


def conv3d(x, w, b, stride, padding, dilation, groups):
    """NCDHW x OIDHW grouped, dilated 3-D convolution (ONNX ``Conv`` on rank-5 input)."""
    n = x.shape[0]
    o, cg, *kernel = w.shape
    pads = [(0, 0), (0, 0)] + [(padding[i], padding[i + 3]) for i in range(3)]
    spans = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True))
    windows = sliding_window_view(np.pad(x, pads), spans, axis=(2, 3, 4))
    windows = windows[:, :, :: stride[0], :: stride[1], :: stride[2], :: dilation[0], :: dilation[1], :: dilation[2]]
    out = windows.shape[2:5]
    windows = windows.reshape(n, groups, cg, *out, *kernel)
    wg = w.reshape(groups, o // groups, cg, *kernel)
    y = np.einsum("ngcdhwijk,gocijk->ngodhw", windows, wg, optimize=True).reshape(n, o, *out)
    if b is not None:
        y = y + b.reshape(1, o, 1, 1, 1)
    return y.astype(x.dtype)


register(
    "conv3d",
    ["x", "weight", "bias?"],
    {
        "stride": Attr("ints", (1, 1, 1)),
        "padding": Attr("ints", (0, 0, 0, 0, 0, 0)),
        "dilation": Attr("ints", (1, 1, 1)),
        "groups": Attr("int", 1),
    },
    _conv3d_infer,
    conv3d,
    "NCDHW convolution, weight OIDHW, padding (front, top, left, back, bottom, right)",
    macs=lambda out, x, w, *_: int(np.prod(out)) * int(np.prod(w[1:])),
    tags={"contraction"},
)


# -- conv_transpose2d ------------------------------------------------------------------------------
def conv_transpose_length(size: int, kernel: int, stride: int, dilation: int, lo: int, hi: int, extra: int) -> int:
    """ONNX ConvTranspose output length: ``stride*(in-1) + output_padding + dilation*(k-1) + 1 - pads``."""
    return stride * (size - 1) + extra + dilation * (kernel - 1) + 1 - lo - hi


def _conv_transpose2d_infer(x, w, b, stride, padding, output_padding, dilation, groups):
    require_rank(x, 4, "conv_transpose2d")
    require_rank(w, 4, "conv_transpose2d", "weight")
    require_float(x, "conv_transpose2d")
    require_same_dtype("conv_transpose2d", x=x, weight=w, bias=b)
    _check_window("conv_transpose2d", w.shape[2:], stride, padding, dilation, 2)
    if len(output_padding) != 2 or any(
        not 0 <= p < max(s, d) for p, s, d in zip(output_padding, stride, dilation, strict=True)
    ):
        raise IRTypeError(
            f"conv_transpose2d: output_padding {list(output_padding)} must be 2 values, each "
            "below its stride or dilation"
        )
    if groups < 1 or x.shape[1] != w.shape[0] or w.shape[0] % groups:
        raise IRTypeError(f"conv_transpose2d: input {x} and weight {w} (IOHW) disagree with groups={groups}")
    out_channels = w.shape[1] * groups
    if b is not None and tuple(b.shape) != (out_channels,):
        raise IRTypeError(f"conv_transpose2d: bias {b} must be [{out_channels}]")
    out = []
    for i, size in enumerate(_static_spatial(x, "conv_transpose2d")):
        length = conv_transpose_length(
            size, w.shape[2 + i], stride[i], dilation[i], padding[i], padding[i + 2], output_padding[i]
        )
        if length < 1:
            raise IRTypeError(f"conv_transpose2d: padding {list(padding)} leaves no output for input {x}")
        out.append(length)
    return [x.with_shape((x.shape[0], out_channels, *out))]


def conv_transpose2d(x, w, b, stride, padding, output_padding, dilation, groups):
    """The gradient of conv2d w.r.t. its input (ONNX ``ConvTranspose``): every input pixel ``i``
    adds ``x[i] * w[tap]`` at output ``i*stride + tap*dilation - pad_begin``; weight IOHW."""
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    cg = c // groups
    full_h = stride[0] * (h - 1) + dilation[0] * (kh - 1) + 1 + output_padding[0]
    full_w = stride[1] * (wd - 1) + dilation[1] * (kw - 1) + 1 + output_padding[1]
    acc = np.zeros((n, groups, og, full_h, full_w), dtype=np.result_type(x.dtype, np.float32))
    xg = x.reshape(n, groups, cg, h, wd)
    wg = w.reshape(groups, cg, og, kh, kw)
    for i in range(kh):
        for j in range(kw):
            tap = np.einsum("ngchw,gco->ngohw", xg, wg[:, :, :, i, j], optimize=True)
            r0, c0 = i * dilation[0], j * dilation[1]
            acc[
                :, :, :, r0 : r0 + stride[0] * (h - 1) + 1 : stride[0], c0 : c0 + stride[1] * (wd - 1) + 1 : stride[1]
            ] += tap
    top, left, bottom, right = padding
    y = acc.reshape(n, groups * og, full_h, full_w)[:, :, top : full_h - bottom, left : full_w - right]
    if b is not None:
        y = y + b.reshape(1, -1, 1, 1)
    return np.ascontiguousarray(y).astype(x.dtype)


register(
    "conv_transpose2d",
    ["x", "weight", "bias?"],
    {
        "stride": Attr("ints", (1, 1)),
        "padding": Attr("ints", (0, 0, 0, 0)),
        "output_padding": Attr("ints", (0, 0)),
        "dilation": Attr("ints", (1, 1)),
        "groups": Attr("int", 1),
    },
    _conv_transpose2d_infer,
    conv_transpose2d,
    "NCHW transposed convolution, weight IOHW (in, out/groups, kh, kw), padding (top, left, bottom, right) "
    "cropped from the full output, output_padding added at the bottom/right",
    macs=lambda out, x, w, *_: int(np.prod(x)) * int(np.prod(w[1:])),
    tags={"contraction"},
)
