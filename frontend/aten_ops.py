"""The aten -> reshift IR converter table used by :mod:`reshift.frontend.torch`.

``ATEN_CONVERTERS`` maps ``"aten.op.overload"`` or ``"aten.op"`` to ``convert(cx, a)``: ``a`` holds
the node's arguments by schema name (IR values, lazy constants, dims, Python scalars), ``cx`` is
the converter (``cx.value``, ``cx.emit``, ``cx.out_type`` ...). A converter returns the IR value
(or a tuple for multi-output ops, ``None`` for outputs it does not produce) and raises
:class:`Unsupported` with a reason for cases the IR cannot express. Every op listed here is kept
whole by the decomposition table, so the table is also what torch.export hands us.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from reshift.ir import Value


class Unsupported(Exception):
    """A converter cannot express this node; the message says why."""


# Ops that only check things at run time and produce nothing reshift needs.
SIDE_EFFECT_OPS = frozenset(
    {
        "aten._assert_tensor_metadata",
        "aten._assert_scalar",
        "aten._assert_async",
        "aten._assert_async.msg",
        "aten.sym_constrain_range",
        "aten.sym_constrain_range_for_size",
        "aten._functional_sym_constrain_range",
        "aten._functional_sym_constrain_range_for_size",
        "with_effects",  # effect tokens around checks such as _linalg_check_errors
    }
)
# Ops whose result depends only on the shape of their tensor argument, never on its values.
SHAPE_ONLY_OPS = frozenset(
    {
        "aten.zeros_like",
        "aten.ones_like",
        "aten.full_like",
        "aten.empty_like",
        "aten.new_zeros",
        "aten.new_ones",
        "aten.new_full",
        "aten.new_empty",
    }
)

Converter = Callable[[Any, dict[str, Any]], Any]
ATEN_CONVERTERS: dict[str, Converter] = {}


def converts(*names: str):
    """Register one converter under several aten names (``"add"`` -> ``aten.add``)."""

    def register(fn: Converter) -> Converter:
        for name in names:
            ATEN_CONVERTERS[f"aten.{name}"] = fn
        return fn

    return register


def _pair(value: Any) -> tuple[int, int]:
    items = [value] if isinstance(value, int) else list(value)
    return (int(items[0]), int(items[-1]))


def _axis(dim: int, rank: int) -> int:
    return dim % rank if rank else 0


def _dims(dim: Any, rank: int) -> tuple[int, ...]:
    """Reduction axes: ``None`` or ``[]`` means all; negatives normalized."""
    if dim is None:
        return ()
    items = [dim] if isinstance(dim, int) else list(dim)
    return tuple(_axis(d, rank) for d in items)


def _promoted(cx, first: str, second: str) -> str:
    """torch's result dtype of two arguments (tensors or Python scalars; 0-d tensors rank lower)."""
    operands = []
    for key in (first, second):
        meta = cx.meta(key)
        is_tensor = isinstance(meta, torch.Tensor)
        operands.append(torch.empty((1,) if meta.dim() else (), dtype=meta.dtype) if is_tensor else meta)
    return cx.ir_dtype(torch.result_type(*operands))


def _operand(cx, entry: Any, dtype: str) -> Value:
    return cx.cast(cx.value(entry, dtype), dtype)


# -- identity and casts -------------------------------------------------------------------------
@converts("clone", "contiguous", "alias", "detach", "lift_fresh_copy", "dropout", "feature_dropout", "alpha_dropout")
def _identity(cx, a):
    return cx.value(a.get("self", a.get("input")))


@converts("_to_copy", "to.dtype", "to.dtype_layout", "type_as", "_to_dim_order_copy")
def _to(cx, a):
    return cx.cast(cx.value(a["self"]), cx.out_type.dtype)


# -- elementwise --------------------------------------------------------------------------------
def _unary(op: str) -> Converter:
    def convert(cx, a):
        return cx.emit(op, [_operand(cx, a["self"], cx.out_type.dtype)])

    return convert


for _aten, _op in {
    "relu": "relu",
    "sigmoid": "sigmoid",
    "silu": "silu",
    "tanh": "tanh",
    "erf": "erf",
    "exp": "exp",
    "log": "log",
    "sqrt": "sqrt",
    "rsqrt": "rsqrt",
    "reciprocal": "reciprocal",
    "sin": "sin",
    "cos": "cos",
    "neg": "neg",
    "abs": "abs",
    "logical_not": "logical_not",
}.items():
    converts(_aten)(_unary(_op))


@converts("log1p")
def _log1p(cx, a):
    x = _operand(cx, a["self"], cx.out_type.dtype)
    return cx.emit("log", [cx.emit("add", [x, cx.value(1.0, x.dtype)])])


@converts("elu")
def _elu(cx, a):
    """``scale * where(x > 0, x, alpha * (exp(input_scale * x) - 1))``; SELU is elu with a scale."""
    x = cx.value(a["self"])
    scaled = x if a["input_scale"] == 1 else cx.emit("mul", [x, cx.value(float(a["input_scale"]), x.dtype)])
    negative = cx.emit("sub", [cx.emit("exp", [scaled]), cx.value(1.0, x.dtype)])
    negative = cx.emit("mul", [negative, cx.value(float(a["alpha"]), x.dtype)])
    y = cx.emit("where", [cx.emit("greater", [x, cx.value(0.0, x.dtype)]), x, negative])
    return y if a["scale"] == 1 else cx.emit("mul", [y, cx.value(float(a["scale"]), x.dtype)])


@converts("bitwise_not")
def _bitwise_not(cx, a):
    x = cx.value(a["self"])
    if x.dtype != "bool":
        raise Unsupported("bitwise_not on integers; only bool tensors are supported")
    return cx.emit("logical_not", [x])


@converts("gelu")
def _gelu(cx, a):
    return cx.emit("gelu", [cx.value(a["self"])], approximate=a["approximate"])


def _clip(cx, x: Value, low: Any, high: Any) -> Value:
    return cx.emit("clip", [x], min=None if low is None else float(low), max=None if high is None else float(high))


@converts("clamp.default", "clamp_min.default", "clamp_max.default", "hardtanh", "relu6")
def _clamp(cx, a):
    x = _operand(cx, a["self"], cx.out_type.dtype)
    name = str(cx.node.target)
    if "hardtanh" in name:
        return _clip(cx, x, a["min_val"], a["max_val"])
    if "relu6" in name:
        return _clip(cx, x, 0.0, 6.0)
    low = a.get("min") if "clamp_max" not in name else None
    high = a.get("max") if "clamp_min" not in name else None
    return _clip(cx, x, low, high)


@converts("clamp.Tensor", "clamp_min.Tensor", "clamp_max.Tensor")
def _clamp_tensor(cx, a):
    dtype = cx.out_type.dtype
    x = _operand(cx, a["self"], dtype)
    if a.get("min") is not None:
        x = cx.emit("maximum", [x, _operand(cx, a["min"], dtype)])
    if a.get("max") is not None:
        x = cx.emit("minimum", [x, _operand(cx, a["max"], dtype)])
    return x


@converts("hardsigmoid", "hardswish")
def _hard(cx, a):
    x = cx.value(a["self"])
    gate = cx.emit("add", [cx.emit("mul", [x, cx.value(1.0 / 6.0, x.dtype)]), cx.value(0.5, x.dtype)])
    gate = _clip(cx, gate, 0.0, 1.0)
    return gate if "hardsigmoid" in str(cx.node.target) else cx.emit("mul", [x, gate])


@converts("leaky_relu")
def _leaky_relu(cx, a):
    x = cx.value(a["self"])
    slope = cx.emit("mul", [x, cx.value(float(a["negative_slope"]), x.dtype)])
    return cx.emit("maximum", [x, slope]) if a["negative_slope"] <= 1 else cx.emit("minimum", [x, slope])


def _binary(op: str) -> Converter:
    def convert(cx, a):
        dtype = cx.out_type.dtype
        x, y = _operand(cx, a["self"], dtype), _operand(cx, a["other"], dtype)
        alpha = a.get("alpha", 1)
        if alpha is not None and alpha != 1:
            y = cx.emit("mul", [y, cx.value(alpha, dtype)])
        return cx.emit(op, [x, y])

    return convert


for _aten, _op in {"add": "add", "sub": "sub", "mul": "mul", "maximum": "maximum", "minimum": "minimum"}.items():
    converts(f"{_aten}.Tensor", f"{_aten}.Scalar", _aten)(_binary(_op))
converts("div.Tensor", "div.Scalar")(_binary("div"))


@converts("div.Tensor_mode", "div.Scalar_mode")
def _div_mode(cx, a):
    if a["rounding_mode"] is not None:
        raise Unsupported(f"rounding_mode={a['rounding_mode']!r}")
    return _binary("div")(cx, a)


@converts("rsub")
def _rsub(cx, a):
    swapped = dict(a, self=a["other"], other=a["self"])
    dtype = cx.out_type.dtype
    x, y = _operand(cx, swapped["self"], dtype), _operand(cx, swapped["other"], dtype)
    if a.get("alpha", 1) != 1:
        y = cx.emit("mul", [y, cx.value(a["alpha"], dtype)])
    return cx.emit("sub", [x, y])


@converts("pow")
def _pow(cx, a):
    dtype = cx.out_type.dtype
    return cx.emit("pow", [_operand(cx, a["self"], dtype), _operand(cx, a["exponent"], dtype)])


def _compare(op: str, negate: bool = False) -> Converter:
    def convert(cx, a):
        dtype = _promoted(cx, "self", "other")
        result = cx.emit(op, [_operand(cx, a["self"], dtype), _operand(cx, a["other"], dtype)])
        return cx.emit("logical_not", [result]) if negate else result

    return convert


for _aten, (_op, _negate) in {
    "eq": ("equal", False),
    "ne": ("equal", True),
    "lt": ("less", False),
    "le": ("less_equal", False),
    "gt": ("greater", False),
    "ge": ("greater_equal", False),
}.items():
    converts(_aten)(_compare(_op, _negate))


def _logical(op: str) -> Converter:
    def convert(cx, a):
        x, y = cx.value(a["self"], "bool"), cx.value(a["other"], "bool")
        if "bitwise" in str(cx.node.target) and (x.dtype != "bool" or y.dtype != "bool"):
            raise Unsupported("bitwise ops on integers; only bool tensors are supported")
        return cx.emit(op, [cx.cast(x, "bool"), cx.cast(y, "bool")])

    return convert


converts("logical_and", "bitwise_and")(_logical("logical_and"))
converts("logical_or", "bitwise_or")(_logical("logical_or"))


@converts("where.self", "where.ScalarSelf", "where.ScalarOther", "where.Scalar")
def _where(cx, a):
    dtype = cx.out_type.dtype
    cond = cx.cast(cx.value(a["condition"]), "bool")
    return cx.emit("where", [cond, _operand(cx, a["self"], dtype), _operand(cx, a["other"], dtype)])


@converts("masked_fill")
def _masked_fill(cx, a):
    x = cx.value(a["self"])
    fill = _operand(cx, a["value"], x.dtype)
    return cx.emit("where", [cx.cast(cx.value(a["mask"]), "bool"), fill, x])


@converts("triu", "tril")
def _triangle(cx, a):
    x = cx.value(a["self"])
    rows, cols = x.shape[-2:]
    if isinstance(rows, str) or isinstance(cols, str):
        raise Unsupported("triangle of a batch-sized matrix")
    keep = (np.triu if "triu" in str(cx.node.target) else np.tril)(np.ones((rows, cols), dtype=bool), a["diagonal"])
    return cx.emit("where", [cx.constant(keep, f"{cx.node.name}_mask"), x, cx.value(0, x.dtype)])


# -- linear algebra -----------------------------------------------------------------------------
@converts("linear")
def _linear(cx, a):
    bias = cx.value(a["bias"]) if a["bias"] is not None else None
    return cx.emit("linear", [cx.value(a["input"]), cx.value(a["weight"]), bias])


@converts("matmul", "mm", "bmm")
def _matmul(cx, a):
    return cx.emit("matmul", [cx.value(a["self"]), cx.value(a["other"] if "other" in a else a["mat2"])])


@converts("addmm")
def _addmm(cx, a):
    x, weight, bias = cx.value(a["mat1"]), cx.value(a["mat2"]), cx.value(a["self"])
    if weight.is_constant and bias.is_constant and bias.type.rank == 1 and a["alpha"] == 1 and a["beta"] == 1:
        # GPT-2's Conv1D: x @ W + b with W [in, out] is linear(x, W^T, b).
        transposed = cx.emit("transpose", [weight], name=f"{weight.name}_t", perm=(1, 0))
        return cx.emit("linear", [x, transposed, bias])
    product = cx.emit("matmul", [x, weight])
    if a["alpha"] != 1:
        product = cx.emit("mul", [product, cx.value(a["alpha"], product.dtype)])
    if a["beta"] != 1:
        bias = cx.emit("mul", [bias, cx.value(a["beta"], bias.dtype)])
    return cx.emit("add", [product, bias])


@converts("t")
def _t(cx, a):
    x = cx.value(a["self"])
    return x if x.type.rank < 2 else cx.emit("transpose", [x], perm=(1, 0))


@converts("conv2d.default", "convolution.default", "conv1d.default")
def _conv(cx, a):
    x, weight = cx.value(a["input"]), cx.value(a["weight"])
    bias = cx.value(a["bias"]) if a["bias"] is not None else None
    if isinstance(a["padding"], str):
        raise Unsupported(f"padding={a['padding']!r}")
    one_d = x.type.rank == 3
    if x.type.rank not in (3, 4, 5):
        raise Unsupported(f"{x.type.rank - 2}-D convolution")
    stride, padding, dilation = (
        [a[k]] if isinstance(a[k], int) else list(a[k]) for k in ("stride", "padding", "dilation")
    )
    if x.type.rank == 5:  # conv3d / conv_transpose3d; torch pads symmetrically, the IR takes begins then ends
        stride, padding, dilation = ((v * 3 if len(v) == 1 else v) for v in (stride, padding, dilation))
        attrs = {"stride": stride, "padding": padding + padding, "dilation": dilation, "groups": a["groups"]}
        if a.get("transposed"):
            extra = [a["output_padding"]] if isinstance(a["output_padding"], int) else list(a["output_padding"])
            return cx.emit(
                "conv_transpose3d", [x, weight, bias], output_padding=extra * 3 if len(extra) == 1 else extra, **attrs
            )
        return cx.emit("conv3d", [x, weight, bias], **attrs)
    if one_d:  # run a 1-D convolution as a 2-D one over a height of 1
        x = cx.emit("reshape", [x], shape=x.shape[:2] + (1,) + x.shape[2:])
        weight = cx.emit("reshape", [weight], shape=weight.shape[:2] + (1,) + weight.shape[2:])
        stride, padding, dilation = [1] + stride[-1:], [0] + padding[-1:], [1] + dilation[-1:]
    ph, pw = _pair(padding)
    if a.get("transposed"):  # conv_transpose1d/2d: weight (in, out/groups, kh, kw) as the IR's
        extra = [a["output_padding"]] if isinstance(a["output_padding"], int) else list(a["output_padding"])
        y = cx.emit(
            "conv_transpose2d",
            [x, weight, bias],
            stride=_pair(stride),
            padding=(ph, pw, ph, pw),
            output_padding=_pair([0] + extra[-1:] if one_d else extra),
            dilation=_pair(dilation),
            groups=a["groups"],
        )
        return cx.emit("reshape", [y], shape=cx.out_type.shape) if one_d else y
    y = cx.emit(
        "conv2d",
        [x, weight, bias],
        stride=_pair(stride),
        padding=(ph, pw, ph, pw),
        dilation=_pair(dilation),
        groups=a["groups"],
    )
    return cx.emit("reshape", [y], shape=cx.out_type.shape) if one_d else y


# -- normalization ------------------------------------------------------------------------------
def _channel_param(cx, entry: Any, channels: int, fill: float) -> Value:
    if entry is None:
        name = f"{cx.node.name}_{'scale' if fill else 'bias'}"
        return cx.constant(np.full((channels,), fill, dtype=np.float32), name)
    return cx.value(entry)


def _batch_norm(cx, a) -> Value:
    x = cx.value(a["input"])
    channels = x.shape[1]
    params = [
        _channel_param(cx, a["weight"], channels, 1.0),
        _channel_param(cx, a["bias"], channels, 0.0),
        cx.value(a["running_mean"]),
        cx.value(a["running_var"]),
    ]
    return cx.emit("batch_norm", [x, *params], eps=a["eps"])


@converts("_native_batch_norm_legit_no_training")
def _bn_no_training(cx, a):
    return (_batch_norm(cx, a), None, None)


@converts("batch_norm")
def _bn(cx, a):
    if a["training"] or a["running_mean"] is None:
        raise Unsupported("batch statistics (training mode); call model.eval() first")
    return _batch_norm(cx, a)


def _layer_norm(cx, a) -> Value:
    weight = cx.value(a["weight"]) if a["weight"] is not None else None
    bias = cx.value(a["bias"]) if a["bias"] is not None else None
    axis = -len(a["normalized_shape"])
    return cx.emit("layer_norm", [cx.value(a["input"]), weight, bias], axis=axis, eps=a["eps"])


converts("layer_norm")(_layer_norm)


@converts("native_layer_norm")
def _native_layer_norm(cx, a):
    return (_layer_norm(cx, a), None, None)


@converts("native_group_norm")
def _group_norm(cx, a):
    """Normalize [N, G, C/G * HW] over its last axis, then the per-channel affine."""
    x = cx.value(a["input"])
    groups, channels = a["group"], x.shape[1]
    grouped = cx.emit("reshape", [x], shape=(x.shape[0], groups, -1))
    y = cx.emit("reshape", [cx.emit("layer_norm", [grouped], axis=-1, eps=a["eps"])], shape=x.shape)
    per_channel = (channels,) + (1,) * (x.type.rank - 2)
    if a["weight"] is not None:
        y = cx.emit("mul", [y, cx.emit("reshape", [cx.value(a["weight"])], shape=per_channel)])
    if a["bias"] is not None:
        y = cx.emit("add", [y, cx.emit("reshape", [cx.value(a["bias"])], shape=per_channel)])
    return (y, None, None)


@converts("softmax.int", "_softmax", "log_softmax.int", "_log_softmax")
def _softmax(cx, a):
    x = _operand(cx, a["self"], cx.out_type.dtype)
    op = "log_softmax" if "log_softmax" in str(cx.node.target) else "softmax"
    return cx.emit(op, [x], axis=_axis(a["dim"], x.type.rank))


@converts("linalg_vector_norm")
def _vector_norm(cx, a):
    x = _operand(cx, a["self"], cx.out_type.dtype)
    axes, keep, order = _dims(a["dim"], x.type.rank), bool(a["keepdim"]), float(a["ord"])
    if order == 2:
        return cx.emit("sqrt", [cx.emit("reduce_sum", [cx.emit("mul", [x, x])], axes=axes, keepdims=keep)])
    if order == 1:
        return cx.emit("reduce_sum", [cx.emit("abs", [x])], axes=axes, keepdims=keep)
    if order == math.inf:
        return cx.emit("reduce_max", [cx.emit("abs", [x])], axes=axes, keepdims=keep)
    raise Unsupported(f"vector norm of order {order}")


# -- reductions ---------------------------------------------------------------------------------
def _reduce(op: str) -> Converter:
    def convert(cx, a):
        x = _operand(cx, a["self"], cx.out_type.dtype)
        axes = _dims(a.get("dim"), x.type.rank)
        return cx.emit(op, [x], axes=axes, keepdims=bool(a.get("keepdim", False)))

    return convert


converts("mean.dim", "mean.default")(_reduce("reduce_mean"))
converts("sum.dim_IntList", "sum.default")(_reduce("reduce_sum"))
converts("amax")(_reduce("reduce_max"))
converts("amin")(_reduce("reduce_min"))


def _reduce_with_indices(op: str) -> Converter:
    def convert(cx, a):
        return (_reduce(op)(cx, a), None)

    return convert


converts("max.dim")(_reduce_with_indices("reduce_max"))
converts("min.dim")(_reduce_with_indices("reduce_min"))


@converts("var.correction", "var.dim")
def _var(cx, a):
    x = _operand(cx, a["self"], cx.out_type.dtype)
    axes = _dims(a["dim"], x.type.rank) or tuple(range(x.type.rank))
    sizes = [x.shape[axis] for axis in axes]
    if any(isinstance(size, str) for size in sizes):
        raise Unsupported("variance over the batch dimension")
    count = int(np.prod(sizes))
    correction = a["correction"] if "correction" in a else int(a.get("unbiased", True))
    correction = 1 if correction is None else correction
    centered = cx.emit("sub", [x, cx.emit("reduce_mean", [x], axes=axes, keepdims=True)])
    var = cx.emit("reduce_mean", [cx.emit("mul", [centered, centered])], axes=axes, keepdims=bool(a["keepdim"]))
    if correction == 0:
        return var
    return cx.emit("mul", [var, cx.value(count / max(count - correction, 0), x.dtype)])


def _boolean_reduce(op: str) -> Converter:
    def convert(cx, a):
        x = cx.cast(cx.value(a["self"]), "bool")
        axes = _dims(a.get("dim"), x.type.rank)
        return cx.emit(op, [x], axes=axes, keepdims=bool(a.get("keepdim", False)))

    return convert


converts("any")(_boolean_reduce("reduce_max"))
converts("all")(_boolean_reduce("reduce_min"))


# -- pooling ------------------------------------------------------------------------------------
def _window(a) -> dict[str, Any]:
    kernel = _pair(a["kernel_size"])
    stride = _pair(a["stride"]) if a["stride"] else kernel
    ph, pw = _pair(a["padding"])
    return {"kernel": kernel, "stride": stride, "padding": (ph, pw, ph, pw), "ceil_mode": bool(a["ceil_mode"])}


@converts("max_pool2d_with_indices")
def _max_pool_with_indices(cx, a):
    return (_max_pool(cx, a), None)


@converts("max_pool2d")
def _max_pool(cx, a):
    return cx.emit("max_pool2d", [cx.value(a["self"])], dilation=_pair(a["dilation"]), **_window(a))


@converts("avg_pool2d")
def _avg_pool(cx, a):
    if a["divisor_override"] is not None:
        raise Unsupported("divisor_override")
    return cx.emit("avg_pool2d", [cx.value(a["self"])], count_include_pad=bool(a["count_include_pad"]), **_window(a))


@converts("adaptive_max_pool2d")
def _adaptive_max_pool(cx, a):
    x = cx.value(a["self"])
    if _pair(a["output_size"]) != (1, 1):
        raise Unsupported("adaptive max pooling to more than 1x1")
    return (cx.emit("reduce_max", [x], axes=(x.type.rank - 2, x.type.rank - 1), keepdims=True), None)


@converts("adaptive_avg_pool2d", "_adaptive_avg_pool2d")
def _adaptive_avg_pool(cx, a):
    x = cx.value(a["self"])
    (h, w), (oh, ow) = x.shape[-2:], _pair(a["output_size"])
    if (oh, ow) == (1, 1):
        return cx.emit("reduce_mean", [x], axes=(x.type.rank - 2, x.type.rank - 1), keepdims=True)
    if h % oh or w % ow:
        raise Unsupported(f"adaptive pooling {h}x{w} -> {oh}x{ow} with uneven windows")
    kernel = (h // oh, w // ow)
    return cx.emit("avg_pool2d", [x], kernel=kernel, stride=kernel)


# The shape, data-movement, indexing and attention converters register themselves into the same table.
from reshift.frontend import aten_attention, aten_nn_ops, aten_shape_ops  # noqa: E402, F401
from reshift.frontend import aten_math_ops as _aten_math_ops  # noqa: E402, F401 -- einsum, topk, isnan, isinf
