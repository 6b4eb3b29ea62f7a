"""Volumetric and transposed convolutions of the registry: ``conv3d``, ``conv_transpose2d``/``3d``.

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


# -- conv_transpose2d, conv_transpose3d ----------------------------------------------------------
def conv_transpose_length(size: int, kernel: int, stride: int, dilation: int, lo: int, hi: int, extra: int) -> int:
    """ONNX ConvTranspose output length: ``stride*(in-1) + output_padding + dilation*(k-1) + 1 - pads``."""
    return stride * (size - 1) + extra + dilation * (kernel - 1) + 1 - lo - hi


def _conv_transpose_infer(rank: int):
    op = f"conv_transpose{rank}d"

    def infer(x, w, b, stride, padding, output_padding, dilation, groups):
        require_rank(x, rank + 2, op)
        require_rank(w, rank + 2, op, "weight")
        require_float(x, op)
        require_same_dtype(op, x=x, weight=w, bias=b)
        _check_window(op, w.shape[2:], stride, padding, dilation, rank)
        if len(output_padding) != rank or any(
            not 0 <= p < max(s, d) for p, s, d in zip(output_padding, stride, dilation, strict=True)
        ):
            raise IRTypeError(
                f"{op}: output_padding {list(output_padding)} must be {rank} values, each below its stride or dilation"
            )
        if groups < 1 or x.shape[1] != w.shape[0] or w.shape[0] % groups:
            raise IRTypeError(f"{op}: input {x} and weight {w} (in, out/groups, ...) disagree with groups={groups}")
        out_channels = w.shape[1] * groups
        if b is not None and tuple(b.shape) != (out_channels,):
            raise IRTypeError(f"{op}: bias {b} must be [{out_channels}]")
        out = []
        for i, size in enumerate(_static_spatial(x, op)):
            lo, hi = padding[i], padding[i + rank]
            length = conv_transpose_length(size, w.shape[2 + i], stride[i], dilation[i], lo, hi, output_padding[i])
            if length < 1:
                raise IRTypeError(f"{op}: padding {list(padding)} leaves no output for input {x}")
            out.append(length)
        return [x.with_shape((x.shape[0], out_channels, *out))]

    return infer


def conv_transpose(x, w, b, stride, padding, output_padding, dilation, groups):
    """The gradient of a conv w.r.t. its input (ONNX ``ConvTranspose``), any spatial rank: every input
    element ``i`` adds ``x[i] * w[tap]`` at output ``i*stride + tap*dilation - pad_begin``; weight
    ``[in, out/groups, k1, ...]``."""
    n, c, *spatial = x.shape
    _, og, *kernel = w.shape
    rank = len(spatial)
    full = [
        s * (size - 1) + d * (k - 1) + 1 + e
        for size, k, s, d, e in zip(spatial, kernel, stride, dilation, output_padding, strict=True)
    ]
    acc = np.zeros((n, groups, og, *full), dtype=np.result_type(x.dtype, np.float32))
    xg = x.reshape(n, groups, c // groups, *spatial)
    wg = w.reshape(groups, c // groups, og, *kernel)
    for tap in np.ndindex(*kernel):
        contribution = np.einsum("ngc...,gco->ngo...", xg, wg[(..., *tap)], optimize=True)
        window = tuple(
            slice(t * d, t * d + s * (size - 1) + 1, s)
            for t, d, s, size in zip(tap, dilation, stride, spatial, strict=True)
        )
        acc[(slice(None),) * 3 + window] += contribution
    crop = tuple(slice(lo, length - hi) for lo, hi, length in zip(padding[:rank], padding[rank:], full, strict=True))
    y = acc.reshape(n, groups * og, *full)[(slice(None),) * 2 + crop]
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * rank))
    return np.ascontiguousarray(y).astype(x.dtype)


def _conv_transpose_attrs(rank: int) -> dict[str, Attr]:
    return {
        "stride": Attr("ints", (1,) * rank),
        "padding": Attr("ints", (0,) * (2 * rank)),
        "output_padding": Attr("ints", (0,) * rank),
        "dilation": Attr("ints", (1,) * rank),
        "groups": Attr("int", 1),
    }


_CONV_TRANSPOSE_DOCS = {
    2: "NCHW transposed convolution, weight IOHW (in, out/groups, kh, kw), padding (top, left, bottom, right)",
    3: "NCDHW transposed convolution, weight IODHW, padding (front, top, left, back, bottom, right)",
}
for _rank, _doc in _CONV_TRANSPOSE_DOCS.items():
    register(
        f"conv_transpose{_rank}d",
        ["x", "weight", "bias?"],
        _conv_transpose_attrs(_rank),
        _conv_transpose_infer(_rank),
        conv_transpose,
        f"{_doc} cropped from the full output, output_padding added at the ends",
        macs=lambda out, x, w, *_: int(np.prod(x)) * int(np.prod(w[1:])),
        tags={"contraction"},
    )
