"""Torch translations of the standard ops' numpy references (``ir/ops*.py``), one table entry each."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reshift.codegen.torch.registry import register_torch_op
from reshift.ir.types import numpy_dtype

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in TORCH_DTYPES:
        raise TypeError(f"dtype {dtype} ({numpy_dtype(dtype)}) has no torch equivalent here")
    return TORCH_DTYPES[dtype]


for _name, _fn in {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "tanh": torch.tanh,
    "erf": torch.erf,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "reciprocal": torch.reciprocal,
    "sin": torch.sin,
    "cos": torch.cos,
    "neg": torch.neg,
    "abs": torch.abs,
    "identity": lambda x: x,
    "logical_not": torch.logical_not,
    "isnan": torch.isnan,
}.items():
    register_torch_op(_name, fn=_fn)

register_torch_op("gelu", fn=lambda x, approximate: F.gelu(x, approximate="tanh" if approximate == "tanh" else "none"))
register_torch_op("clip", fn=lambda x, min, max: torch.clamp(x, min=min, max=max))
register_torch_op("cast", fn=lambda x, dtype: x.to(torch_dtype(dtype)))
register_torch_op(
    "isinf",
    fn=lambda x, detect_positive, detect_negative: (
        (torch.isposinf(x) & detect_positive) | (torch.isneginf(x) & detect_negative)
    ),
)


def _div(a, b):
    if not a.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # ONNX/ATen integer division truncates
    return a / b


for _name, _fn in {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": _div,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "equal": torch.eq,
    "less": torch.lt,
    "less_equal": torch.le,
    "greater": torch.gt,
    "greater_equal": torch.ge,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
}.items():
    register_torch_op(_name, fn=_fn)

register_torch_op("where", fn=torch.where)
register_torch_op("matmul", fn=torch.matmul)


def _pad_nchw(x, padding, value=0.0):
    top, left, bottom, right = padding
    return F.pad(x, (left, right, top, bottom), value=value) if any(padding) else x


def _conv2d(x, weight, bias, stride, padding, dilation, groups):
    return F.conv2d(_pad_nchw(x, padding), weight, bias, stride=stride, dilation=dilation, groups=groups)


register_torch_op("conv2d", fn=_conv2d, params=("weight", "bias"))


def _batch_norm(x, scale, bias, mean, var, eps):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = scale / torch.sqrt(var + eps)
    return x * inv.reshape(shape) + (bias - mean * inv).reshape(shape)


register_torch_op("batch_norm", fn=_batch_norm, params=("scale", "bias"))


def _layer_norm(x, weight, bias, axis, eps):
    start = axis % x.dim()
    return F.layer_norm(x, x.shape[start:], weight, bias, eps)


register_torch_op("layer_norm", fn=_layer_norm, params=("weight", "bias"))
register_torch_op("softmax", fn=lambda x, axis: torch.softmax(x, dim=axis))
register_torch_op("log_softmax", fn=lambda x, axis: torch.log_softmax(x, dim=axis))


def _reducer(fn):
    def reduce(x, axes, keepdims):
        dims = tuple(axes) if axes else tuple(range(x.dim()))
        return fn(x, dim=dims, keepdim=keepdims) if dims else x

    return reduce


register_torch_op("reduce_sum", fn=_reducer(torch.sum))
register_torch_op("reduce_mean", fn=_reducer(torch.mean))
register_torch_op("reduce_max", fn=_reducer(torch.amax))
register_torch_op("reduce_min", fn=_reducer(torch.amin))


def _max_pool2d(x, kernel, stride, padding, ceil_mode, dilation):
    x = _pad_nchw(x, padding, float("-inf"))
    return F.max_pool2d(x, kernel, stride, 0, dilation, ceil_mode=ceil_mode)


def _avg_pool2d(x, kernel, stride, padding, ceil_mode, count_include_pad):
    top, left, bottom, right = padding
    if (top, left) != (bottom, right):
        raise NotImplementedError(f"avg_pool2d: asymmetric padding {tuple(padding)} has no torch translation here")
    return F.avg_pool2d(x, kernel, stride, (top, left), ceil_mode, count_include_pad)


register_torch_op("max_pool2d", fn=_max_pool2d)
register_torch_op("avg_pool2d", fn=_avg_pool2d)
register_torch_op("reshape", fn=lambda x, shape: x.reshape(tuple(shape)))
register_torch_op("expand", fn=lambda x, shape: x.expand(torch.broadcast_shapes(x.shape, tuple(shape))))
register_torch_op("transpose", fn=lambda x, perm: x.permute(*perm))
register_torch_op("concat", fn=lambda *xs, axis: torch.cat(xs, dim=axis))
register_torch_op("split", fn=lambda x, axis, sizes: tuple(torch.split(x, list(sizes), dim=axis)))


def _slice(x, starts, ends, axes, steps):
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        index = range(*slice(start, end, step).indices(x.shape[axis]))
        if step > 0:
            x = x.narrow(axis, index.start, len(index)) if step == 1 else x.index_select(axis, torch.tensor(index))
        else:
            x = x.index_select(axis, torch.tensor(list(index), dtype=torch.long))
    return x


register_torch_op("slice", fn=_slice)


def _gather(x, indices, axis):
    axis = axis % x.dim()
    idx = torch.where(indices < 0, indices + x.shape[axis], indices).long()
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1 :])


register_torch_op("gather", fn=_gather)


def _gather_elements(x, indices, axis):
    idx = torch.where(indices < 0, indices + x.shape[axis], indices).long()
    return torch.gather(x, axis, idx)


register_torch_op("gather_elements", fn=_gather_elements)


def _pad(x, pads, value):
    rank = x.dim()
    torch_pads = []
    for i in reversed(range(rank)):
        torch_pads += [pads[i], pads[i + rank]]
    return F.pad(x, torch_pads, value=value)


register_torch_op("pad", fn=_pad)
register_torch_op(
    "arange",
    fn=lambda shape, start, step, dtype: (start + step * torch.arange(shape[0], dtype=torch.float64)).to(
        torch_dtype(dtype)
    ),
)


def _cumsum(x, axis, exclusive, reverse):
    y = x.flip(axis) if reverse else x
    out = torch.cumsum(y, dim=axis)
    if exclusive:
        out = out - y
    return out.flip(axis) if reverse else out


register_torch_op("cumsum", fn=_cumsum)

__all__ = ["TORCH_DTYPES", "torch_dtype"]
