"""ATen converters for 3-D pooling, batch-statistics normalization and ``sign``.

Registered into :data:`reshift.frontend.aten_ops.ATEN_CONVERTERS`. ``max_pool3d``/``avg_pool3d``
are the separable 2-D pools of :func:`reshift.frontend.decompose.pool3d_as_2d` (the ONNX frontend
builds the same); ``nn.LocalResponseNorm`` reaches them through torch's own ``avg_pool3d``.
``InstanceNorm`` (and ``BatchNorm`` without running statistics) is torch's
``_native_batch_norm_legit.no_stats``: normalization over every axis but the channel one.
"""

from __future__ import annotations

from typing import Any

from reshift.frontend.aten_ops import Unsupported, converts
from reshift.frontend.decompose import pool3d_as_2d


def _triple(value: Any) -> list[int]:
    items = [value] if isinstance(value, int) else list(value)
    return [int(v) for v in (items * 3 if len(items) == 1 else items)]


def _pool3d(cx, a, op: str, **attrs):
    x = cx.value(a["self"])
    if x.type.rank != 5:
        raise Unsupported(f"{op.replace('2d', '3d')} on rank {x.type.rank}; expected N, C, D, H, W")
    kernel = _triple(a["kernel_size"])
    stride = _triple(a["stride"]) if a["stride"] else kernel
    pads = _triple(a["padding"])
    dilation = _triple(a.get("dilation", 1))
    ceil_mode = bool(a["ceil_mode"])

    def pool2d(v, k, s, p, d):
        extra = {"dilation": d} if op == "max_pool2d" else {}
        return cx.emit(op, [v], kernel=k, stride=s, padding=p, ceil_mode=ceil_mode, **extra, **attrs)

    return pool3d_as_2d(
        x,
        x.shape,
        kernel,
        stride,
        pads + pads,
        dilation,
        pool2d=pool2d,
        reshape=lambda v, shape: cx.emit("reshape", [v], shape=shape),
        shape_of=lambda v: v.shape,
    )


@converts("max_pool3d_with_indices")
def _max_pool3d_with_indices(cx, a):
    return (_pool3d(cx, a, "max_pool2d"), None)


@converts("max_pool3d")
def _max_pool3d(cx, a):
    return _pool3d(cx, a, "max_pool2d")


@converts("avg_pool3d")
def _avg_pool3d(cx, a):
    if a["divisor_override"] is not None:
        raise Unsupported("divisor_override")
    return _pool3d(cx, a, "avg_pool2d", count_include_pad=bool(a["count_include_pad"]))


@converts("_native_batch_norm_legit.no_stats")
def _batch_norm_batch_stats(cx, a):
    """``(x - mean) / sqrt(var + eps) * weight + bias``, mean and (biased) var over all axes but 1."""
    x = cx.value(a["input"])
    axes = tuple(i for i in range(x.type.rank) if i != 1)
    mean = cx.emit("reduce_mean", [x], axes=axes, keepdims=True)
    centered = cx.emit("sub", [x, mean])
    var = cx.emit("reduce_mean", [cx.emit("mul", [centered, centered])], axes=axes, keepdims=True)
    rstd = cx.emit("rsqrt", [cx.emit("add", [var, cx.value(float(a["eps"]), x.dtype)])])
    y = cx.emit("mul", [centered, rstd])
    per_channel = (x.shape[1],) + (1,) * (x.type.rank - 2)
    if a["weight"] is not None:
        y = cx.emit("mul", [y, cx.emit("reshape", [cx.value(a["weight"])], shape=per_channel)])
    if a["bias"] is not None:
        y = cx.emit("add", [y, cx.emit("reshape", [cx.value(a["bias"])], shape=per_channel)])
    return (y, None, None)


@converts("sign")
def _sign(cx, a):
    """``where(x > 0, 1, where(x < 0, -1, 0))``: NaN gives 0 as in ``torch.sign`` (ONNX Sign keeps NaN)."""
    x = cx.value(a["self"])
    if x.dtype == "bool":
        return x
    zero = cx.value(0, x.dtype)
    rest = (
        zero
        if x.dtype.startswith("uint")
        else cx.emit("where", [cx.emit("less", [x, zero]), cx.value(-1, x.dtype), zero])
    )
    return cx.emit("where", [cx.emit("greater", [x, zero]), cx.value(1, x.dtype), rest])
