"""Lowerings of the compute ops: elementwise, comparisons, contractions, normalizations, reductions.

Each function mirrors one entry (or one family) of ``ir/ops.py``; the numpy reference there is the
specification. Relax ops are used where they agree with it exactly.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from reshift.codegen.tvm.kernels import cpu_lowering as cpu_kernels
from reshift.codegen.tvm.lower import LowerContext, lowering, op, scalar
from reshift.ir.graph import Node
from reshift.ir.types import INT_DTYPES

# -- elementwise -----------------------------------------------------------------------------
_UNARY = {
    "relu": op.nn.relu,
    "sigmoid": op.sigmoid,
    "silu": op.nn.silu,
    "tanh": op.tanh,
    "erf": op.erf,
    "exp": op.exp,
    "log": op.log,
    "sqrt": op.sqrt,
    "rsqrt": op.rsqrt,
    "sin": op.sin,
    "cos": op.cos,
    "neg": op.negative,
    "abs": op.abs,
    "logical_not": op.logical_not,
}


@lowering(*_UNARY)
def lower_unary(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    polynomial = {"tanh": cpu_kernels.tanh, "sigmoid": cpu_kernels.sigmoid}.get(node.op)
    fast = polynomial(ctx, node, x) if polynomial is not None else None
    return fast if fast is not None else ctx.emit(_UNARY[node.op](x))


@lowering("identity")
def lower_identity(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    return x


@lowering("reciprocal")
def lower_reciprocal(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    return ctx.emit(op.divide(scalar(1, node.inputs[0].dtype), x))


@lowering("gelu")
def lower_gelu(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    approximate = node.attrs["approximate"]
    if approximate not in ("none", "tanh"):
        from reshift.errors import CodegenError

        raise CodegenError(f"gelu (node {node.name}): approximate={approximate!r}; expected 'none' or 'tanh'")
    fast = cpu_kernels.gelu(ctx, node, x)
    if fast is not None:
        return fast
    return ctx.emit(op.nn.gelu_tanh(x) if approximate == "tanh" else op.nn.gelu(x))


@lowering("clip")
def lower_clip(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    dtype = node.inputs[0].dtype
    low, high = node.attrs["min"], node.attrs["max"]
    if dtype in INT_DTYPES:  # numpy clips in float, then casts back: round the bounds inwards
        low = None if low is None else int(np.ceil(low))
        high = None if high is None else int(np.floor(high))
    if low is not None:
        x = ctx.emit(op.maximum(x, scalar(low, dtype)))
    if high is not None:
        x = ctx.emit(op.minimum(x, scalar(high, dtype)))
    return x


@lowering("cast")
def lower_cast(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    dtype, source = node.attrs["dtype"], node.inputs[0].dtype
    if dtype == "bool" and source != "bool":  # numpy: nonzero -> True (a plain cast truncates 0.5 to 0)
        return ctx.emit(op.not_equal(x, scalar(0, source)))
    return ctx.emit(op.astype(x, dtype))


_BINARY = {
    "add": op.add,
    "sub": op.subtract,
    "mul": op.multiply,
    "maximum": op.maximum,
    "minimum": op.minimum,
    "equal": op.equal,
    "less": op.less,
    "less_equal": op.less_equal,
    "greater": op.greater,
    "greater_equal": op.greater_equal,
    "logical_and": op.logical_and,
    "logical_or": op.logical_or,
}


@lowering(*_BINARY)
def lower_binary(ctx: LowerContext, node: Node, a: relax.Expr, b: relax.Expr) -> relax.Expr:
    return ctx.emit(_BINARY[node.op](a, b))


@lowering("div")
def lower_div(ctx: LowerContext, node: Node, a: relax.Expr, b: relax.Expr) -> relax.Expr:
    if node.inputs[0].dtype not in INT_DTYPES:
        return ctx.emit(op.divide(a, b))
    return ctx.te(_broadcast_te(lambda x, y: tirx.truncdiv(x, y)), a, b, name="trunc_div")


@lowering("pow")
def lower_pow(ctx: LowerContext, node: Node, a: relax.Expr, b: relax.Expr) -> relax.Expr:
    dtype = node.inputs[0].dtype
    exponent = node.inputs[1]
    same_shape = node.outputs[0].shape == node.inputs[0].shape
    power = float(exponent.data.reshape(())) if exponent.is_constant and exponent.data.size == 1 else None
    if dtype not in INT_DTYPES and same_shape and power in (2.0, 3.0):  # x*x(*x): libm's pow is a call per element
        square = ctx.emit(op.multiply(a, a))
        return square if power == 2.0 else ctx.emit(op.multiply(square, a))
    if dtype not in INT_DTYPES:
        return ctx.emit(op.power(a, b))
    # integer power by repeated squaring (exponents < 64 matter; negative ones give 0 unless base is +-1)
    return ctx.te(_broadcast_te(_int_pow), a, b, name="int_pow")


def _int_pow(base: tirx.PrimExpr, exponent: tirx.PrimExpr) -> tirx.PrimExpr:
    dtype = base.dtype
    one = tirx.const(1, dtype)
    result, square = one, base
    for bit in range(6):
        use = tirx.bitwise_and(
            tirx.shift_right(exponent, tirx.const(bit, exponent.dtype)), tirx.const(1, exponent.dtype)
        )
        result = tirx.Select(use == tirx.const(1, exponent.dtype), result * square, result)
        square = square * square
    negative = tirx.Select(
        base == one,
        one,
        tirx.Select(
            base == tirx.const(-1, dtype), tirx.Select(tirx.truncmod(exponent, 2) == 0, one, -one), tirx.const(0, dtype)
        ),
    )
    return tirx.Select(exponent < tirx.const(0, exponent.dtype), negative, result)


def _broadcast_te(fn):
    """A TE compute applying scalar ``fn`` with numpy broadcasting of two tensors."""

    def compute(a: te.Tensor, b: te.Tensor) -> te.Tensor:
        rank = max(len(a.shape), len(b.shape))
        pa = [1] * (rank - len(a.shape)) + list(a.shape)
        pb = [1] * (rank - len(b.shape)) + list(b.shape)
        shape = [y if _is_one(x) else x for x, y in zip(pa, pb, strict=True)]

        def index(tensor, padded, idx):
            offset = rank - len(tensor.shape)
            return tensor[tuple(0 if _is_one(padded[i]) else idx[i] for i in range(offset, rank))]

        return te.compute(shape, lambda *idx: fn(index(a, pa, idx), index(b, pb, idx)), name="out")

    return compute


def _is_one(dim) -> bool:
    return isinstance(dim, int) and dim == 1 or isinstance(dim, tirx.IntImm) and dim.value == 1


@lowering("where")
def lower_where(ctx: LowerContext, node: Node, cond: relax.Expr, a: relax.Expr, b: relax.Expr) -> relax.Expr:
    return ctx.emit(op.where(cond, a, b))


# -- contractions ----------------------------------------------------------------------------
@lowering("matmul")
def lower_matmul(ctx: LowerContext, node: Node, a: relax.Expr, b: relax.Expr) -> relax.Expr:
    fast = cpu_kernels.dense_matmul(ctx, node, a)
    if fast is None:
        fast = cpu_kernels.batch_matmul(ctx, node, a, b)
    return fast if fast is not None else ctx.emit(op.matmul(a, b))


@lowering("linear")
def lower_linear(ctx: LowerContext, node: Node, x: relax.Expr, w: relax.Expr, b: relax.Expr | None) -> relax.Expr:
    fast = cpu_kernels.dense_linear(ctx, node, x)
    if fast is not None:
        return fast
    y = ctx.emit(op.matmul(x, op.permute_dims(w, [1, 0])))
    return ctx.emit(op.add(y, b)) if b is not None else y


@lowering("conv2d")
def lower_conv2d(ctx: LowerContext, node: Node, x: relax.Expr, w: relax.Expr, b: relax.Expr | None) -> relax.Expr:
    fast = cpu_kernels.conv2d(ctx, node, x)
    if fast is not None:
        return fast
    attrs = node.attrs
    y = ctx.emit(
        op.nn.conv2d(
            x,
            w,
            strides=attrs["stride"],
            padding=attrs["padding"],  # Relax's 4-value padding is (top, left, bottom, right), as ours
            dilation=attrs["dilation"],
            groups=attrs["groups"],
        )
    )
    if b is None:
        return y
    return ctx.emit(op.add(y, op.reshape(b, (1, -1, 1, 1))))


# -- normalization ---------------------------------------------------------------------------
@lowering("batch_norm")
def lower_batch_norm(ctx: LowerContext, node: Node, x, scale, bias, mean, var) -> relax.Expr:
    out = ctx.emit(op.nn.batch_norm(x, scale, bias, mean, var, axis=1, epsilon=node.attrs["eps"], training=False))
    return ctx.emit(relax.TupleGetItem(out, 0))


@lowering("layer_norm")
def lower_layer_norm(ctx: LowerContext, node: Node, x, weight, bias) -> relax.Expr:
    fast = cpu_kernels.layer_norm(ctx, node, x)
    if fast is not None:
        return fast
    value = node.inputs[0]
    start = node.attrs["axis"] % value.type.rank
    axes = list(range(start, value.type.rank))
    normalized = [ctx.dim(d) for d in value.shape[start:]]
    dtype = value.dtype
    gamma = weight if weight is not None else ctx.emit(op.ones(normalized, dtype))
    beta = bias if bias is not None else ctx.emit(op.zeros(normalized, dtype))
    return ctx.emit(op.nn.layer_norm(x, gamma, beta, axes=axes, epsilon=node.attrs["eps"]))


@lowering("softmax")
def lower_softmax(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    fast = cpu_kernels.softmax(ctx, node, x)
    if fast is not None:
        return fast
    return ctx.emit(op.nn.softmax(x, axis=node.attrs["axis"]))


@lowering("log_softmax")
def lower_log_softmax(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    return ctx.emit(op.nn.log_softmax(x, axis=node.attrs["axis"]))


# -- reductions ------------------------------------------------------------------------------
_REDUCE = {"reduce_mean": op.mean, "reduce_sum": op.sum, "reduce_max": op.max, "reduce_min": op.min}


@lowering(*_REDUCE)
def lower_reduce(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr:
    axes = node.attrs["axes"]
    rank = node.inputs[0].type.rank
    axis = sorted({a % rank for a in axes}) if axes else None
    if node.inputs[0].dtype == "bool":
        # TVM has no min/max identity for T.bool. Over 0/1 bytes, reduce_min is all; reduce_max is
        # any, and so are numpy's bool sum and mean cast back to bool (nonzero -> True).
        reduce = op.min if node.op == "reduce_min" else op.max
        reduced = ctx.emit(reduce(op.astype(x, "uint8"), axis=axis, keepdims=node.attrs["keepdims"]))
        return ctx.emit(op.astype(reduced, "bool"))
    return ctx.emit(_REDUCE[node.op](x, axis=axis, keepdims=node.attrs["keepdims"]))


# -- creation --------------------------------------------------------------------------------
@lowering("arange")
def lower_arange(ctx: LowerContext, node: Node) -> relax.Expr:
    out = node.outputs[0]
    start, step, dtype = node.attrs["start"], node.attrs["step"], out.dtype
    length = ctx.dim(out.shape[0])

    def compute() -> te.Tensor:  # float64 like numpy, then cast (truncation for ints, as astype)
        return te.compute(
            (length,),
            lambda i: (tirx.const(start, "float64") + tirx.const(step, "float64") * i.astype("float64")).astype(dtype),
            name="arange",
        )

    return ctx.te(compute, name="arange")
