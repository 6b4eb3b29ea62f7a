"""The op registry: every op reshift knows, declared once with schema, inference and reference.

An :class:`OpDef` holds the input names (``"bias?"`` optional, ``"inputs*"`` variadic), the
typed attributes with defaults, a type-inference function and a numpy reference. The reference
is the ground truth every pass and backend is checked against, so it stays plain numpy.
Adding an op means adding one ``register(...)`` call here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reshift.errors import IRTypeError, UnknownOpError
from reshift.ir import numpy_kernels as nk
from reshift.ir.shapes import (
    broadcast_shapes,
    normalize_axis,
    require_dtype,
    require_float,
    require_rank,
    require_same_dtype,
    window_output,
)
from reshift.ir.types import FLOAT_DTYPES, INT_DTYPES, Dim, TensorType, numpy_dtype, resolve_dim

REQUIRED = object()
BOOL = frozenset({"bool"})
NUMERIC_DTYPES = frozenset(FLOAT_DTYPES | INT_DTYPES)
ATTR_KINDS = ("int", "float", "bool", "str", "ints", "floats", "shape", "dtype")


@dataclass(frozen=True)
class Attr:
    """An attribute's kind (one of ``ATTR_KINDS``) and default (``REQUIRED`` if none)."""

    kind: str
    default: Any = REQUIRED


@dataclass(frozen=True)
class OpDef:
    name: str
    inputs: tuple[str, ...]
    attrs: dict[str, Attr]
    infer: Callable[..., list[TensorType]]
    reference: Callable[..., Any]
    doc: str = ""
    macs: Callable[..., int] | None = None
    tags: frozenset[str] = field(default_factory=frozenset)

    @property
    def variadic(self) -> bool:
        return any(name.endswith("*") for name in self.inputs)

    def arity(self) -> tuple[int, int | None]:
        """Minimum and maximum number of inputs (``None``: unbounded)."""
        required = sum(1 for n in self.inputs if not n.endswith(("?", "*")))
        return required, None if self.variadic else len(self.inputs)

    def arity_problem(self, count: int, padded: bool = False) -> str | None:
        """Why ``count`` inputs do not fit this op, or None; ``padded``: omitted optional ones must be None."""
        low, high = self.arity()
        if count < low or (high is not None and (count != high if padded else count > high)):
            return f"takes {low}..{high or 'any'} inputs, got {count}"
        return None

    def pad_inputs(self, inputs: list) -> list:
        """``inputs`` with the omitted optional trailing ones as None (the form nodes hold)."""
        high = self.arity()[1]
        return list(inputs) + [None] * ((high or len(inputs)) - len(inputs))

    def normalize_attrs(self, attrs: dict[str, Any], where: str = "") -> dict[str, Any]:
        """Fill defaults, reject unknown or missing attributes, coerce values to their kind."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise IRTypeError(
                f"{where}{self.name}: unknown attribute(s) {sorted(unknown)}; known: {sorted(self.attrs)}"
            )
        result = {}
        for key, spec in self.attrs.items():
            value = attrs.get(key, spec.default)
            if value is REQUIRED:
                raise IRTypeError(f"{where}{self.name}: missing required attribute {key!r}")
            result[key] = _coerce(value, spec.kind, f"{where}{self.name}.{key}")
        return result


def _coerce(value: Any, kind: str, where: str) -> Any:
    try:
        if value is None:
            return None
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            return bool(value)
        if kind in ("str", "dtype"):
            return str(value)
        if kind == "ints":
            return tuple(int(v) for v in value)
        if kind == "floats":
            return tuple(float(v) for v in value)
        if kind == "shape":
            return tuple(v if isinstance(v, str) else int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise IRTypeError(f"{where}: cannot read {value!r} as {kind}") from exc
    raise IRTypeError(f"{where}: unknown attribute kind {kind!r}")


OPS: dict[str, OpDef] = {}


def register(name, inputs, attrs, infer, reference, doc="", macs=None, tags=()) -> OpDef:
    if name in OPS:
        raise ValueError(f"op {name!r} registered twice")
    OPS[name] = OpDef(name, tuple(inputs), dict(attrs), infer, reference, doc, macs, frozenset(tags))
    return OPS[name]


def get_op(name: str) -> OpDef:
    if name not in OPS:
        raise UnknownOpError(f"unknown op {name!r}; the registry (reshift/ir/ops.py) has: {', '.join(sorted(OPS))}")
    return OPS[name]


def _same(x: TensorType, *_, **__) -> list[TensorType]:
    return [x]


def _float_same(x: TensorType, *_, **__) -> list[TensorType]:
    require_float(x, "op")
    return [x]


# -- elementwise ------------------------------------------------------------------------------
def _gelu(x, approximate):
    if approximate == "tanh":
        inner = np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)
        return (0.5 * x * (1.0 + np.tanh(inner))).astype(x.dtype)
    return (0.5 * x * (1.0 + nk.erf(x / np.float32(np.sqrt(2.0))))).astype(x.dtype)


def _sigmoid(x):
    return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


UNARY_FLOAT: dict[str, Callable] = {
    "relu": lambda x: np.maximum(x, 0).astype(x.dtype),
    "sigmoid": _sigmoid,
    "silu": lambda x: (x * _sigmoid(x)).astype(x.dtype),
    "tanh": np.tanh,
    "erf": nk.erf,
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: (1.0 / np.sqrt(x)).astype(x.dtype),
    "reciprocal": lambda x: (1.0 / x).astype(x.dtype),
    "sin": np.sin,
    "cos": np.cos,
}
for _name, _fn in UNARY_FLOAT.items():
    register(_name, ["x"], {}, _float_same, _fn, f"elementwise {_name}", tags={"elementwise", "unary"})


def _numeric_same(x: TensorType, *_, **__) -> list[TensorType]:
    require_dtype(x, NUMERIC_DTYPES, "op", "input")
    return [x]


register("neg", ["x"], {}, _numeric_same, np.negative, "elementwise -x", tags={"elementwise", "unary"})
register("abs", ["x"], {}, _numeric_same, np.abs, "elementwise absolute value", tags={"elementwise", "unary"})
register("identity", ["x"], {}, _same, lambda x: x, "no-op copy", tags={"elementwise", "unary"})
register(
    "gelu",
    ["x"],
    {"approximate": Attr("str", "none")},
    _float_same,
    _gelu,
    "GELU, exact (erf) or tanh approximation",
    tags={"elementwise", "unary"},
)
register(
    "clip",
    ["x"],
    {"min": Attr("float", None), "max": Attr("float", None)},
    _same,
    lambda x, min, max: np.clip(x, min, max).astype(x.dtype),
    "clamp to [min, max] (None: unbounded)",
    tags={"elementwise", "unary"},
)
register(
    "cast",
    ["x"],
    {"dtype": Attr("dtype")},
    lambda x, dtype: [x.with_dtype(dtype)],
    lambda x, dtype: x.astype(numpy_dtype(dtype)),
    "convert to dtype",
    tags={"elementwise", "unary"},
)


def _logical_not_infer(x: TensorType) -> list[TensorType]:
    require_dtype(x, BOOL, "logical_not", "input")
    return [x]


register("logical_not", ["x"], {}, _logical_not_infer, np.logical_not, "elementwise not", tags={"elementwise"})


def _binary_infer(result_dtype: str | None, operand_dtypes: frozenset[str] | None = None):
    """Broadcasting inference for ``op(a, b)``: one operand dtype (from ``operand_dtypes`` if given)."""

    def infer(a: TensorType, b: TensorType) -> list[TensorType]:
        dtype = require_same_dtype("op", a=a, b=b)
        if operand_dtypes is not None:
            require_dtype(a, operand_dtypes, "op", "each operand")
        return [TensorType(broadcast_shapes(a.shape, b.shape), result_dtype or dtype)]

    return infer


def _keep_dtype(fn):
    return lambda a, b: np.asarray(fn(a, b)).astype(np.result_type(a, b))


def _div(a, b):
    if np.issubdtype(a.dtype, np.integer):
        return np.trunc(a / b).astype(a.dtype)  # ONNX/ATen integer division truncates
    return (a / b).astype(a.dtype)


BINARY: dict[str, Callable] = {
    "add": _keep_dtype(np.add),
    "sub": _keep_dtype(np.subtract),
    "mul": _keep_dtype(np.multiply),
    "div": _div,
    "pow": _keep_dtype(np.power),
    "maximum": _keep_dtype(np.maximum),
    "minimum": _keep_dtype(np.minimum),
}
# bool - bool, bool / bool and bool ** bool have no meaning in torch or ONNX and no TVM lowering.
NO_BOOL_BINARY = frozenset({"sub", "div", "pow"})
for _name, _fn in BINARY.items():
    _infer = _binary_infer(None, NUMERIC_DTYPES if _name in NO_BOOL_BINARY else None)
    register(_name, ["a", "b"], {}, _infer, _fn, f"broadcasting {_name}", tags={"elementwise", "binary"})

COMPARE: dict[str, Callable] = {
    "equal": np.equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
}
for _name, _fn in COMPARE.items():
    _infer = _binary_infer("bool", BOOL if _name.startswith("logical_") else None)
    register(_name, ["a", "b"], {}, _infer, _fn, f"broadcasting {_name} -> bool", tags={"elementwise"})


def _where_infer(cond: TensorType, a: TensorType, b: TensorType) -> list[TensorType]:
    require_dtype(cond, BOOL, "where", "the condition")
    dtype = require_same_dtype("where", a=a, b=b)
    return [TensorType(broadcast_shapes(cond.shape, a.shape, b.shape, op="where"), dtype)]


register("where", ["cond", "a", "b"], {}, _where_infer, lambda c, a, b: np.where(c, a, b), "select a where cond else b")


# -- linear algebra ---------------------------------------------------------------------------
def _matmul_infer(a: TensorType, b: TensorType) -> list[TensorType]:
    require_same_dtype("matmul", a=a, b=b)
    if a.rank < 1 or b.rank < 1:
        raise IRTypeError(f"matmul: operands {a} and {b} must have rank 1 or more")
    a_shape = a.shape if a.rank > 1 else (1,) + a.shape
    b_shape = b.shape if b.rank > 1 else b.shape + (1,)
    if a_shape[-1] != b_shape[-2]:
        raise IRTypeError(f"matmul: contraction mismatch {a} @ {b}")
    batch = broadcast_shapes(a_shape[:-2], b_shape[:-2], op="matmul")
    out = batch + (a_shape[-2],) * (a.rank > 1) + (b_shape[-1],) * (b.rank > 1)
    return [TensorType(out, a.dtype)]


def _matmul_macs(out_shape, a_shape, b_shape) -> int:
    return int(np.prod(out_shape)) * int(a_shape[-1])


register(
    "matmul",
    ["a", "b"],
    {},
    _matmul_infer,
    lambda a, b: np.matmul(a, b).astype(a.dtype, copy=False),  # numpy's bfloat16 matmul answers float32
    "numpy matmul",
    macs=_matmul_macs,
    tags={"contraction"},
)


def _linear_infer(x: TensorType, w: TensorType, b: TensorType | None) -> list[TensorType]:
    require_rank(w, 2, "linear", "weight")
    require_same_dtype("linear", x=x, weight=w, bias=b)
    if x.rank < 1 or x.shape[-1] != w.shape[1] or (b is not None and tuple(b.shape) != (w.shape[0],)):
        raise IRTypeError(f"linear: input {x}, weight {w}, bias {b} do not agree (weight is [out, in])")
    return [x.with_shape(x.shape[:-1] + (w.shape[0],))]


def _linear(x, w, b):
    y = (np.ascontiguousarray(x).reshape(-1, x.shape[-1]) @ w.T).reshape(x.shape[:-1] + (w.shape[0],))
    return (y + b if b is not None else y).astype(x.dtype)


register(
    "linear",
    ["x", "weight", "bias?"],
    {},
    _linear_infer,
    _linear,
    "y = x @ weight^T + bias, weight [out, in]",
    macs=lambda out, x, w, *_: int(np.prod(out)) * int(w[1]),
    tags={"contraction"},
)


def conv2d_output_type(
    x, w, b, stride, padding, dilation, groups, op: str = "conv2d", weight: str = "weight"
) -> TensorType:
    """The NCHW output type of a conv with an OIHW filter ``w`` (shared by ``conv2d`` and ``shift_conv2d``)."""
    require_rank(x, 4, op)
    require_rank(w, 4, op, weight)
    if not w.is_static or isinstance(x.shape[1], str):
        raise IRTypeError(f"{op}: the {weight} {w} and the input channels of {x} must be static")
    if len(stride) != 2 or len(padding) != 4 or len(dilation) != 2:
        raise IRTypeError(f"{op}: stride/dilation take 2 values, padding 4 (top, left, bottom, right)")
    if groups < 1 or x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
        raise IRTypeError(f"{op}: input {x} and {weight} {w} disagree with groups={groups}")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise IRTypeError(f"{op}: bias {b} must be [{w.shape[0]}]")
    oh, ow = window_output(x, w.shape[2:], stride, padding, dilation)
    return x.with_shape((x.shape[0], w.shape[0], oh, ow))


def _conv_infer(x, w, b, stride, padding, dilation, groups):
    require_same_dtype("conv2d", x=x, weight=w, bias=b)
    return [conv2d_output_type(x, w, b, stride, padding, dilation, groups)]


register(
    "conv2d",
    ["x", "weight", "bias?"],
    {
        "stride": Attr("ints", (1, 1)),
        "padding": Attr("ints", (0, 0, 0, 0)),
        "dilation": Attr("ints", (1, 1)),
        "groups": Attr("int", 1),
    },
    _conv_infer,
    nk.conv2d,
    "NCHW convolution, weight OIHW, padding (top, left, bottom, right)",
    macs=lambda out, x, w, *_: int(np.prod(out)) * int(np.prod(w[1:])),
    tags={"contraction"},
)


# -- normalization ----------------------------------------------------------------------------
def _bn_infer(x, scale, bias, mean, var, eps):
    require_float(x, "batch_norm")
    require_same_dtype("batch_norm", x=x, scale=scale, bias=bias, mean=mean, var=var)
    if x.rank < 2 or any(tuple(p.shape) != (x.shape[1],) for p in (scale, bias, mean, var)):
        raise IRTypeError(f"batch_norm: parameters must be [{x.shape[1] if x.rank > 1 else '?'}] for input {x}")
    return [x]


def _batch_norm(x, scale, bias, mean, var, eps):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    inv = scale / np.sqrt(var + eps)
    return (x * inv.reshape(shape) + (bias - mean * inv).reshape(shape)).astype(x.dtype)


register(
    "batch_norm",
    ["x", "scale", "bias", "mean", "var"],
    {"eps": Attr("float", 1e-5)},
    _bn_infer,
    _batch_norm,
    "inference batch norm over channel axis 1",
)


def _ln_infer(x, weight, bias, axis, eps):
    require_float(x, "layer_norm")
    require_same_dtype("layer_norm", x=x, weight=weight, bias=bias)
    start = normalize_axis(axis, x.rank, "layer_norm")
    for p in (weight, bias):
        if p is not None and tuple(p.shape) != tuple(x.shape[start:]):
            raise IRTypeError(f"layer_norm: parameter {p} must match normalized shape {x.shape[start:]}")
    return [x]


def _layer_norm(x, weight, bias, axis, eps):
    axes = tuple(range(axis % x.ndim, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


register(
    "layer_norm",
    ["x", "weight?", "bias?"],
    {"axis": Attr("int", -1), "eps": Attr("float", 1e-5)},
    _ln_infer,
    _layer_norm,
    "normalize over dims axis..end, then affine",
)


def _softmax(x, axis):
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=axis, keepdims=True)).astype(x.dtype)


def _axis_same(x, axis):
    require_float(x, "softmax")
    normalize_axis(axis, x.rank, "softmax")
    return [x]


register("softmax", ["x"], {"axis": Attr("int", -1)}, _axis_same, _softmax, "softmax along axis")
register(
    "log_softmax",
    ["x"],
    {"axis": Attr("int", -1)},
    _axis_same,
    lambda x, axis: np.log(_softmax(x, axis)).astype(x.dtype),
    "log of softmax along axis",
)


# -- reductions -------------------------------------------------------------------------------
def _reduce_infer(x, axes, keepdims):
    normalized = [normalize_axis(a, x.rank, "reduce") for a in axes]
    if len(set(normalized)) != len(normalized):
        raise IRTypeError(f"reduce: axes {list(axes)} name an axis twice (rank {x.rank})")
    axes = set(normalized) if axes else set(range(x.rank))
    shape = [(1 if i in axes else d) for i, d in enumerate(x.shape) if keepdims or i not in axes]
    return [x.with_shape(shape)]


def _reducer(fn):
    def reference(x, axes, keepdims):
        return np.asarray(fn(x, axis=tuple(axes) if axes else None, keepdims=keepdims)).astype(x.dtype)

    return reference


for _name, _fn in {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min}.items():
    register(
        _name,
        ["x"],
        {"axes": Attr("ints", ()), "keepdims": Attr("bool", True)},
        _reduce_infer,
        _reducer(_fn),
        f"{_name.split('_')[1]} over axes (empty: all)",
    )


# -- pooling ----------------------------------------------------------------------------------
def _pool_infer(x, kernel, stride, padding, ceil_mode, dilation=(1, 1), **_):
    require_rank(x, 4, "pool")
    oh, ow = window_output(x, kernel, stride, padding, dilation, ceil_mode)
    return [x.with_shape((x.shape[0], x.shape[1], oh, ow))]


_POOL_ATTRS = {
    "kernel": Attr("ints"),
    "stride": Attr("ints", (1, 1)),
    "padding": Attr("ints", (0, 0, 0, 0)),
    "ceil_mode": Attr("bool", False),
}
register(
    "max_pool2d",
    ["x"],
    {**_POOL_ATTRS, "dilation": Attr("ints", (1, 1))},
    _pool_infer,
    nk.max_pool2d,
    "NCHW max pooling (padding is -inf)",
)
register(
    "avg_pool2d",
    ["x"],
    {**_POOL_ATTRS, "count_include_pad": Attr("bool", True)},
    _pool_infer,
    nk.avg_pool2d,
    "NCHW average pooling",
)


def _resolve_shape_attr(shape: tuple[Dim, ...], bindings: dict[str, int]) -> tuple[int, ...]:
    return tuple(-1 if d == -1 else resolve_dim(d, bindings) for d in shape)


def resolve_symbolic_attrs(opdef: OpDef, attrs: dict[str, Any], bindings: dict[str, int]) -> dict[str, Any]:
    """Replace symbolic dimensions in ``shape`` attributes by their bound values."""
    return {
        key: _resolve_shape_attr(value, bindings) if opdef.attrs[key].kind == "shape" else value
        for key, value in attrs.items()
    }


def infer_types(opdef: OpDef, input_types: list[TensorType | None], attrs: dict[str, Any]) -> list[TensorType]:
    """Run an op's type inference, with the op name on any error."""
    try:
        return opdef.infer(*input_types, **attrs)
    except IRTypeError as exc:
        message = str(exc)
        for generic in ("op: ", "binary op: ", f"{opdef.name}: "):  # shared inference names no op
            message = message.removeprefix(generic)
        raise IRTypeError(f"{opdef.name}: {message}") from None


from reshift.ir import ops_attention as _ops_attention  # noqa: E402,F401
from reshift.ir import ops_index as _ops_index  # noqa: E402,F401
from reshift.ir import ops_layout as _ops_layout  # noqa: E402,F401
from reshift.ir import ops_lowbit as _ops_lowbit  # noqa: E402,F401
from reshift.ir import ops_moe as _ops_moe  # noqa: E402,F401
from reshift.ir import ops_nn as _ops_nn  # noqa: E402,F401
from reshift.ir import ops_quant as _ops_quant  # noqa: E402,F401
from reshift.ir import ops_select as _ops_select  # noqa: E402,F401
