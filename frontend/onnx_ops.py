"""The ONNX op table: ``ONNX_CONVERTERS[op_type](ctx, node, inputs, attrs) -> operand(s)``.

An operand is an IR :class:`~reshift.ir.Value` or a known numpy array (a constant or a shape
vector, see :mod:`reshift.frontend.shape_eval`). Converters build through ``ctx.op(op, ...)``,
which folds when every input is known, so one converter serves run-time tensors and shape
arithmetic alike. Attribute-vs-input forms that changed across opsets 13..21 (``Split``,
``Squeeze``/``Unsqueeze``, ``Reduce*``, ``Pad``, ``Clip``) are read by :func:`_axes_arg`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx

from reshift.errors import IRTypeError, ModelLoadError
from reshift.frontend.onnx_tensors import tensor_to_array
from reshift.frontend.shape_eval import Sym, dim_to_known, known_to_dim, shape_vector
from reshift.ir.limits import check_array_size
from reshift.ir.types import FLOAT_DTYPES, dims_product, split_dim


class NotConvertible(Exception):
    """This node cannot be converted as written; the message says why and what to do."""


Converter = Callable[..., object]
ONNX_CONVERTERS: dict[str, Converter] = {}


def converter(*op_types: str):
    def register(fn: Converter) -> Converter:
        for op_type in op_types:
            ONNX_CONVERTERS[op_type] = fn
        return fn

    return register


def onnx_attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as Python values (strings decoded, tensors as numpy arrays)."""
    out = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            try:
                value = value.decode()
            except UnicodeDecodeError:
                raise ModelLoadError(f"node {node.name!r} attribute {attr.name!r}: {value!r} is not UTF-8") from None
        elif isinstance(value, onnx.TensorProto):
            value = tensor_to_array(value, f"node {node.name or node.op_type!r} attribute {attr.name!r}")
        out[attr.name] = value
    return out


def _known(x, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise NotConvertible(f"{what} must be a constant or computable from shapes at conversion time")
    return x


def _ints(x, what: str) -> list:
    """A shape-like input (shape, axes, starts, pads) as Python ints; an integer tensor in ONNX."""
    values = np.asarray(_known(x, what))
    if values.dtype.kind not in "iuO":  # "O": holds symbolic batch dims
        raise NotConvertible(f"{what} must be an int64 tensor, got {values.dtype}; insert a Cast to int64 before it")
    return [e if isinstance(e, Sym) else int(e) for e in values.reshape(-1).tolist()]


def _scalar(x, what: str):
    values = np.asarray(_known(x, what)).reshape(-1)
    if values.size != 1:
        raise NotConvertible(f"{what} must be a scalar")
    return values[0].item() if hasattr(values[0], "item") else values[0]


def _axes_arg(ctx, ins, attrs, index: int = 1) -> list[int] | None:
    """Axes from the ``axes`` attribute (older opsets) or the optional input (newer ones)."""
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(ins) > index and ins[index] is not None:
        return [int(a) for a in _ints(ins[index], "axes")]
    return None


def _norm(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise NotConvertible(f"axis {axis} out of range for rank {rank}")
    return axis % rank if rank else 0


# -- elementwise --------------------------------------------------------------------------------
UNARY = {
    "Relu": "relu",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Erf": "erf",
    "Exp": "exp",
    "Log": "log",
    "Sqrt": "sqrt",
    "Reciprocal": "reciprocal",
    "Sin": "sin",
    "Cos": "cos",
    "Neg": "neg",
    "Abs": "abs",
    "Not": "logical_not",
}
BINARY = {
    "Add": "add",
    "Sub": "sub",
    "Mul": "mul",
    "Div": "div",
    "Equal": "equal",
    "Less": "less",
    "LessOrEqual": "less_equal",
    "Greater": "greater",
    "GreaterOrEqual": "greater_equal",
    "And": "logical_and",
    "Or": "logical_or",
}
VARIADIC = {"Max": "maximum", "Min": "minimum", "Sum": "add"}
# ops with no registry counterpart, evaluated with numpy when every input is known
KNOWN_ONLY = {
    "Floor": np.floor,
    "Ceil": np.ceil,
    "Round": np.round,
    "Mod": lambda a, b, fmod=0: np.fmod(a, b) if fmod else np.mod(a, b),
    "ReduceProd": None,
}


def _unary(op: str) -> Converter:
    return lambda ctx, node, ins, at: ctx.op(op, ins[0])


def _binary(op: str) -> Converter:
    return lambda ctx, node, ins, at: ctx.op(op, ins[0], ins[1])


def _variadic(op: str) -> Converter:
    def convert(ctx, node, ins, at):
        result = ins[0]
        for x in ins[1:]:
            result = ctx.op(op, result, x)
        return result

    return convert


for _onnx, _ir in UNARY.items():
    ONNX_CONVERTERS[_onnx] = _unary(_ir)
for _onnx, _ir in BINARY.items():
    ONNX_CONVERTERS[_onnx] = _binary(_ir)
for _onnx, _ir in VARIADIC.items():
    ONNX_CONVERTERS[_onnx] = _variadic(_ir)


@converter("Pow")
def _pow(ctx, node, ins, at):
    base, exponent = ins
    base_dtype, exponent_dtype = ctx.dtype(base), ctx.dtype(exponent)
    if base_dtype not in FLOAT_DTYPES and exponent_dtype in FLOAT_DTYPES:  # int ** float: in float, then back
        power = ctx.op("pow", ctx.op("cast", base, dtype=exponent_dtype), exponent)
        return ctx.op("cast", power, dtype=base_dtype)
    if exponent_dtype != base_dtype:  # ONNX lets the exponent's type differ; the IR's pow does not
        exponent = ctx.op("cast", exponent, dtype=base_dtype)
    if isinstance(exponent, np.ndarray) and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0:
        return ctx.op("mul", base, base)
    return ctx.op("pow", base, exponent)


@converter("Mean")
def _mean(ctx, node, ins, at):
    total = _variadic("add")(ctx, node, ins, at)
    return ctx.op("div", total, np.asarray(len(ins), dtype=ctx.dtype(total)))


@converter("Identity", "Dropout")
def _identity(ctx, node, ins, at):
    return ins[0]


@converter("Where")
def _where(ctx, node, ins, at):
    return ctx.op("where", *ins)


@converter("Cast", "CastLike")
def _cast(ctx, node, ins, at):
    from reshift.frontend.onnx import ONNX_DTYPES

    x = ins[0]
    if node.op_type == "CastLike":
        target = ctx.dtype(ins[1])
    elif at["to"] in ONNX_DTYPES:
        target = ONNX_DTYPES[at["to"]]
    elif at["to"] in onnx.helper.get_all_tensor_dtypes():
        target = onnx.helper.tensor_dtype_to_np_dtype(at["to"]).name
    else:
        raise NotConvertible(f"Cast to element type {at['to']}, which ONNX does not define")
    if ctx.dtype(x) == target or (isinstance(x, np.ndarray) and x.dtype == object and target.startswith("int")):
        return x
    if isinstance(x, np.ndarray) and target not in ONNX_DTYPES.values():
        return x.astype(target)  # e.g. float64 shape arithmetic, folded in numpy
    return ctx.op("cast", x, dtype=target)


@converter("Gelu")
def _gelu(ctx, node, ins, at):
    return ctx.op("gelu", ins[0], approximate=at.get("approximate", "none"))


@converter("Clip")
def _clip(ctx, node, ins, at):
    x, low, high = (list(ins) + [None, None])[:3]
    if isinstance(low, np.ndarray) or low is None:
        if isinstance(high, np.ndarray) or high is None:
            if isinstance(x, np.ndarray):
                return np.clip(x, None if low is None else low, None if high is None else high).astype(x.dtype)
            low = None if low is None else _scalar(low, "Clip min")
            high = None if high is None else _scalar(high, "Clip max")
            return ctx.op("clip", x, min=low, max=high)
    if low is not None:
        x = ctx.op("maximum", x, low)
    return x if high is None else ctx.op("minimum", x, high)


@converter("HardSigmoid", "HardSwish")
def _hard_sigmoid(ctx, node, ins, at):
    x = ins[0]
    dtype = np.dtype(ctx.dtype(x))
    alpha, beta = (1.0 / 6.0, 0.5) if node.op_type == "HardSwish" else (at.get("alpha", 0.2), at.get("beta", 0.5))
    scaled = ctx.op("add", ctx.op("mul", x, np.asarray(alpha, dtype)), np.asarray(beta, dtype))
    gate = ctx.op("clip", scaled, min=0.0, max=1.0)
    return ctx.op("mul", x, gate) if node.op_type == "HardSwish" else gate


@converter("LeakyRelu")
def _leaky_relu(ctx, node, ins, at):
    x = ins[0]
    dtype = np.dtype(ctx.dtype(x))
    negative = ctx.op("mul", ctx.op("minimum", x, np.asarray(0, dtype)), np.asarray(at.get("alpha", 0.01), dtype))
    return ctx.op("add", ctx.op("relu", x), negative)


@converter("Softplus")
def _softplus(ctx, node, ins, at):
    x = ins[0]
    return ctx.op("log", ctx.op("add", ctx.op("exp", x), np.asarray(1, np.dtype(ctx.dtype(x)))))


def _known_only(op_type: str, fn) -> Converter:
    def convert(ctx, node, ins, at):
        arrays = [
            _known(x, f"every input of {op_type} (reshift has no run-time {op_type})") for x in ins if x is not None
        ]
        return _KNOWN_IMPLS.get(op_type, fn)(*arrays, **at)

    return convert


def _tile(x, repeats):
    repeats = [int(r) for r in np.asarray(repeats).reshape(-1)]
    if len(repeats) != x.ndim or any(r < 0 for r in repeats):
        raise NotConvertible(f"Tile repeats {repeats} must be {x.ndim} non-negative counts")
    check_array_size([d * r for d, r in zip(x.shape, repeats, strict=True)], x.dtype, "Tile result")
    return np.tile(x, repeats)


def _reduce_prod(x, axes=None, keepdims=1, noop_with_empty_axes=0):
    axes = tuple(int(a) for a in np.asarray(axes).reshape(-1)) if axes is not None else None
    return np.prod(x, axis=axes or None, keepdims=bool(keepdims)).astype(x.dtype)


_KNOWN_IMPLS = {"ReduceProd": _reduce_prod}
for _onnx, _fn in KNOWN_ONLY.items():
    ONNX_CONVERTERS[_onnx] = _known_only(_onnx, _fn)


# -- constants and shapes -----------------------------------------------------------------------
@converter("Constant")
def _constant(ctx, node, ins, at):
    if "value" in at:
        return np.asarray(at["value"])
    for key, dtype in (
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        if key in at:
            return np.asarray(at[key], dtype=dtype)
    raise NotConvertible(f"Constant with attribute(s) {sorted(at)} is not supported (only dense tensors and numbers)")


@converter("Shape")
def _shape(ctx, node, ins, at):
    vector = shape_vector(ctx.shape(ins[0]))
    return vector[at.get("start", 0) : at.get("end", len(vector))]


@converter("Size")
def _size(ctx, node, ins, at):
    count = dims_product(list(ctx.shape(ins[0])))
    coefficient, symbol = split_dim(count)
    if symbol is None:
        return np.asarray(coefficient, dtype=np.int64)
    out = np.empty((), dtype=object)
    out[()] = dim_to_known(count)
    return out


@converter("ConstantOfShape")
def _constant_of_shape(ctx, node, ins, at):
    fill = np.asarray(at.get("value", np.zeros(1, np.float32))).reshape(-1)[:1]
    if fill.size == 0:
        raise NotConvertible("ConstantOfShape value is an empty tensor; it must hold one element")
    dims = _ints(ins[0], "ConstantOfShape shape")
    if not any(isinstance(d, Sym) for d in dims):
        if any(d < 0 for d in dims):
            raise NotConvertible(f"ConstantOfShape shape {dims} has a negative dimension")
        check_array_size(dims, fill.dtype, "ConstantOfShape result")
        return np.full(dims, fill[0], dtype=fill.dtype)
    return ctx.op("expand", fill.reshape((1,) * len(dims)), shape=[known_to_dim(d) for d in dims])


@converter("Range")
def _range(ctx, node, ins, at):
    start, limit, delta = (_scalar(x, "Range input") for x in ins)
    dtype = np.asarray(_known(ins[0], "Range start")).dtype
    if isinstance(limit, Sym) or isinstance(start, Sym) or isinstance(delta, Sym):
        if isinstance(start, Sym) or isinstance(delta, Sym) or start != 0 or delta != 1:
            raise NotConvertible("Range over the batch size must start at 0 with step 1")
        return ctx.op("arange", shape=[known_to_dim(limit)], dtype=dtype.name)
    if delta == 0:
        raise NotConvertible("Range delta is 0")
    check_array_size([max(math.ceil((limit - start) / delta), 0)], dtype, "Range result")
    return np.arange(start, limit, delta).astype(dtype)


@converter("Reshape")
def _reshape(ctx, node, ins, at):
    x, shape = ins
    dims = ctx.shape(x)
    target = _ints(shape, "Reshape shape")
    if not at.get("allowzero", 0):
        if any(not isinstance(d, Sym) and d == 0 for d in target[len(dims) :]):
            raise NotConvertible(f"Reshape shape {target} copies (0) an axis that {len(dims)}-d input lacks")
        target = [dims[i] if (not isinstance(d, Sym) and d == 0) else d for i, d in enumerate(target)]
    target = [d if isinstance(d, str) else known_to_dim(d) for d in target]
    return ctx.op("reshape", x, shape=target)


@converter("Flatten")
def _flatten(ctx, node, ins, at):
    dims = list(ctx.shape(ins[0]))
    axis = at.get("axis", 1)
    axis = axis + len(dims) if axis < 0 else axis
    return ctx.op("reshape", ins[0], shape=[dims_product(dims[:axis]), dims_product(dims[axis:])])


def _squeezed_shape(dims, axes):
    rank = len(dims)
    if axes is None:
        axes = [i for i, d in enumerate(dims) if d == 1]
    axes = {_norm(a, rank) for a in axes}
    for a in axes:
        if dims[a] != 1:
            raise NotConvertible(f"cannot squeeze axis {a} of size {dims[a]}")
    return [d for i, d in enumerate(dims) if i not in axes]


@converter("Squeeze")
def _squeeze(ctx, node, ins, at):
    return ctx.op("reshape", ins[0], shape=_squeezed_shape(ctx.shape(ins[0]), _axes_arg(ctx, ins, at)))


@converter("Unsqueeze")
def _unsqueeze(ctx, node, ins, at):
    dims = list(ctx.shape(ins[0]))
    axes = _axes_arg(ctx, ins, at) or []
    rank = len(dims) + len(axes)
    for axis in sorted(_norm(a, rank) for a in axes):
        dims.insert(axis, 1)
    return ctx.op("reshape", ins[0], shape=dims)


@converter("Transpose")
def _transpose(ctx, node, ins, at):
    perm = at.get("perm") or list(range(len(ctx.shape(ins[0]))))[::-1]
    return ctx.op("transpose", ins[0], perm=perm)


@converter("Concat")
def _concat(ctx, node, ins, at):
    parts = [x for x in ins if x is not None and 0 not in ctx.shape(x)] or [x for x in ins if x is not None][:1]
    if len(parts) == 1:
        return parts[0]
    return ctx.op("concat", *parts, axis=at["axis"])


@converter("Split")
def _split(ctx, node, ins, at):
    x = ins[0]
    dims = ctx.shape(x)
    axis = _norm(at.get("axis", 0), len(dims))
    size = dims[axis]
    if isinstance(size, str):
        raise NotConvertible("cannot split the symbolic batch dimension")
    if "split" in at:
        sizes = list(at["split"])
    elif len(ins) > 1 and ins[1] is not None:
        sizes = _ints(ins[1], "Split sizes")
    else:
        parts = at.get("num_outputs", len(node.output))
        chunk = math.ceil(size / parts)
        sizes = [min(chunk, size - i * chunk) for i in range(parts)]
    result = ctx.op("split", x, axis=axis, sizes=sizes)
    return result if isinstance(result, list) else [result]


INT64_MAX = 2**63 - 1


@converter("Slice")
def _slice(ctx, node, ins, at):
    x, starts, ends = ins[:3]
    dims = ctx.shape(x)
    starts, ends = _ints(starts, "Slice starts"), _ints(ends, "Slice ends")
    axes = _ints(ins[3], "Slice axes") if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = _ints(ins[4], "Slice steps") if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    keep, prefixes = ([], [], [], []), []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=False):
        axis = _norm(axis, len(dims))
        dim = dims[axis]
        if isinstance(dim, (str, Sym)):
            whole = (
                start == 0 and step == 1 and (_covers(end, dim) or not isinstance(end, Sym) and end >= INT64_MAX // 2)
            )
            if not whole:
                raise NotConvertible(f"cannot slice the symbolic dimension {dim} (axis {axis}) except whole")
            continue
        if start == 0 and step == 1 and isinstance(end, Sym) and end.coefficient == 1 and len(end.symbols) == 1:
            prefixes.append((axis, end.symbols[0], dim))  # table[:S], e.g. BERT's position ids
            continue
        if isinstance(start, Sym) or isinstance(end, Sym):
            raise NotConvertible(f"slice bounds {start}:{end} of axis {axis} are symbolic")
        clamp = lambda v, d=dim: max(-d - 1, min(d, v))  # noqa: E731  (same result, readable attrs)
        for column, value in zip(keep, (clamp(start), clamp(end), axis, step), strict=False):
            column.append(value)
    if keep[2]:
        x = ctx.op("slice", x, starts=keep[0], ends=keep[1], axes=keep[2], steps=keep[3])
    for axis, symbol, dim in prefixes:
        # the first S rows of a static axis: a gather of arange(S), exact while S <= dim, which the
        # graph records (symbol_bounds) so binding a larger S is an InputError, not a wrapped read
        bounds = ctx.graph.symbol_bounds
        bounds[symbol] = min(bounds.get(symbol, dim), dim)
        x = ctx.op("gather", x, ctx.op("arange", shape=[symbol], dtype="int64"), axis=axis)
    return x


def _covers(end, dim) -> bool:
    """Whether a symbolic slice end reaches past ``dim`` for every value of the symbols (``2*N`` covers ``N``)."""
    size = dim_to_known(dim) if isinstance(dim, str) else dim
    return (
        isinstance(end, Sym)
        and isinstance(size, Sym)
        and end.symbols == size.symbols
        and end.coefficient >= size.coefficient
    )


@converter("Gather")
def _gather(ctx, node, ins, at):
    axis = _norm(at.get("axis", 0), len(ctx.shape(ins[0])))
    size, indices = ctx.shape(ins[0])[axis], ins[1]
    if isinstance(indices, np.ndarray) and indices.dtype != object and indices.size and isinstance(size, int):
        if indices.min() < -size or indices.max() >= size:
            raise NotConvertible(f"Gather indices {indices.min()}..{indices.max()} out of range for size {size}")
    return ctx.op("gather", ins[0], indices, axis=axis)


@converter("Expand")
def _expand(ctx, node, ins, at):
    return ctx.op("expand", ins[0], shape=[known_to_dim(d) for d in _ints(ins[1], "Expand shape")])


@converter("Trilu")
def _trilu(ctx, node, ins, at):
    x = ins[0]
    k = int(_scalar(ins[1], "Trilu k")) if len(ins) > 1 and ins[1] is not None else 0
    upper = at.get("upper", 1)
    if isinstance(x, np.ndarray):
        return np.triu(x, k) if upper else np.tril(x, k)
    rows, cols = ctx.shape(x)[-2:]
    if isinstance(rows, str) or isinstance(cols, str):
        raise NotConvertible("Trilu over a symbolic dimension")
    ones = np.ones((rows, cols), dtype=bool)
    mask = np.triu(ones, k) if upper else np.tril(ones, k)
    return ctx.op("where", mask, x, np.zeros((), np.dtype(ctx.dtype(x))))


# -- Sign, Shrink, Pad, Tile, Conv, ConvTranspose, pools, PRelu/Elu/Selu, LRN, InstanceNorm: onnx_ops_nn.py --
@converter("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(ctx, node, ins, at):
    op = "reduce_mean" if node.op_type == "GlobalAveragePool" else "reduce_max"
    return ctx.op(op, ins[0], axes=list(range(2, len(ctx.shape(ins[0])))), keepdims=True)


@converter("BatchNormalization")
def _batch_norm(ctx, node, ins, at):
    if at.get("training_mode", 0):
        raise NotConvertible("training-mode BatchNormalization; export the model in eval mode")
    return ctx.op("batch_norm", *ins[:5], eps=at.get("epsilon", 1e-5))


@converter("LayerNormalization")
def _layer_norm(ctx, node, ins, at):
    x, scale, bias = (list(ins) + [None])[:3]
    return ctx.op("layer_norm", x, scale, bias, axis=at.get("axis", -1), eps=at.get("epsilon", 1e-5))


@converter("Softmax", "LogSoftmax")
def _softmax(ctx, node, ins, at):
    return ctx.op("softmax" if node.op_type == "Softmax" else "log_softmax", ins[0], axis=at.get("axis", -1))


@converter("MatMul")
def _matmul(ctx, node, ins, at):
    a, b = ins
    if isinstance(b, np.ndarray) and b.ndim == 2 and not isinstance(a, np.ndarray):
        if a.type.rank and a.type.shape[-1] != b.shape[0]:  # say it in MatMul's terms, not linear's
            raise IRTypeError(f"inner dimensions differ: {a.type} @ {list(b.shape)}")
        return ctx.op("linear", a, np.ascontiguousarray(b.T))  # weight [out, in], as passes expect
    return ctx.op("matmul", a, b)


@converter("Gemm")
def _gemm(ctx, node, ins, at):
    a, b, c = (list(ins) + [None])[:3]
    alpha, beta = at.get("alpha", 1.0), at.get("beta", 1.0)
    if at.get("transA", 0):
        a = ctx.op("transpose", a, perm=[1, 0])
    if isinstance(b, np.ndarray):
        weight = b if at.get("transB", 0) else b.T
        weight = np.ascontiguousarray(weight * np.asarray(alpha, b.dtype) if alpha != 1.0 else weight)
        out = weight.shape[0]
        bias = None
        if isinstance(c, np.ndarray) and c.size in (1, out) and c.ndim <= 2 and (c.ndim < 2 or c.shape[0] == 1):
            bias = np.ascontiguousarray(np.broadcast_to(c.reshape(-1) * np.asarray(beta, c.dtype), (out,)))
            c = None
        y = ctx.op("linear", a, weight, bias)
    else:
        y = ctx.op("matmul", a, ctx.op("transpose", b, perm=[1, 0]) if at.get("transB", 0) else b)
        if alpha != 1.0:
            y = ctx.op("mul", y, np.asarray(alpha, np.dtype(ctx.dtype(y))))
    if c is None or beta == 0.0:
        return y
    return ctx.op("add", y, ctx.op("mul", c, np.asarray(beta, np.dtype(ctx.dtype(c)))) if beta != 1.0 else c)


_REDUCE = {"ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum", "ReduceMax": "reduce_max", "ReduceMin": "reduce_min"}


@converter(*_REDUCE, "ReduceL2", "ReduceL1", "ReduceSumSquare")
def _reduce(ctx, node, ins, at):
    x = ins[0]
    axes = _axes_arg(ctx, ins, at)
    if not axes and at.get("noop_with_empty_axes", 0):
        return x
    attrs = {"axes": axes or [], "keepdims": bool(at.get("keepdims", 1))}
    if node.op_type in _REDUCE:
        return ctx.op(_REDUCE[node.op_type], x, **attrs)
    if node.op_type == "ReduceL1":
        return ctx.op("reduce_sum", ctx.op("abs", x), **attrs)
    squares = ctx.op("reduce_sum", ctx.op("mul", x, x), **attrs)
    return ctx.op("sqrt", squares) if node.op_type == "ReduceL2" else squares


from reshift.frontend import onnx_ops_index as _onnx_ops_index  # noqa: E402,F401 -- GatherElements/ND, ScatterND, CumSum
from reshift.frontend import onnx_ops_math as _onnx_ops_math  # noqa: E402,F401 -- Einsum, TopK, IsNaN, IsInf
from reshift.frontend import onnx_ops_nn as _onnx_ops_nn  # noqa: E402,F401 -- registers its converters


@converter("If")
def _if(ctx, node, ins, at):
    """ONNX ``If`` with a condition known at conversion time: the taken branch, inlined.

    reshift compiles one dataflow graph, so a branch chosen at run time cannot be kept; a
    condition computed from constants, shapes or frozen inputs (``input_values``) is folded away.
    """
    cond = ins[0]
    if not isinstance(cond, np.ndarray):
        raise NotConvertible(
            "the condition is computed at run time and reshift compiles a single branch; make it a constant "
            "(freeze the input it depends on with input_values={name: value}, e.g. a sample rate)"
        )
    flat = np.asarray(cond).reshape(-1)
    if flat.size != 1:
        raise NotConvertible(f"the condition has {flat.size} elements; If needs a single boolean")
    branch = at["then_branch" if bool(flat[0]) else "else_branch"]
    label = node.name or node.op_type
    return ctx.inline_subgraph(branch, f"If {label!r} {'then' if bool(flat[0]) else 'else'}_branch")
