"""The lowering table of :mod:`reshift.codegen.onnx`: one entry per registry op.

``lower(em, node, inputs) -> output names``; ``inputs`` are ONNX names (``""`` for an absent
optional input). The last node a lowering emits goes through ``em.final`` so it writes the IR
value names, which keeps the exported graph readable next to ``print(graph)``.
"""

from __future__ import annotations

import math

import numpy as np

from reshift.codegen.onnx import IR_TO_ONNX_DTYPE, ONNX_LOWERINGS, OnnxEmitter, lowering, register_decomposition
from reshift.ir import Node
from reshift.ir.types import numpy_dtype, split_dim

SIMPLE = {
    "relu": "Relu",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
    "erf": "Erf",
    "exp": "Exp",
    "log": "Log",
    "sqrt": "Sqrt",
    "reciprocal": "Reciprocal",
    "sin": "Sin",
    "cos": "Cos",
    "neg": "Neg",
    "abs": "Abs",
    "identity": "Identity",
    "logical_not": "Not",
    "add": "Add",
    "sub": "Sub",
    "mul": "Mul",
    "div": "Div",
    "pow": "Pow",
    "maximum": "Max",
    "minimum": "Min",
    "equal": "Equal",
    "less": "Less",
    "less_equal": "LessOrEqual",
    "greater": "Greater",
    "greater_equal": "GreaterOrEqual",
    "logical_and": "And",
    "logical_or": "Or",
    "where": "Where",
    "matmul": "MatMul",
}


def _simple(op_type: str):
    return lambda em, node, ins: em.final(node, op_type, ins)


for _ir, _onnx in SIMPLE.items():
    ONNX_LOWERINGS[_ir] = _simple(_onnx)


@lowering("silu")
def _silu(em: OnnxEmitter, node: Node, ins):
    return em.final(node, "Mul", [ins[0], em.one("Sigmoid", ins)])


@lowering("rsqrt")
def _rsqrt(em, node, ins):
    return em.final(node, "Reciprocal", [em.one("Sqrt", ins)])


@lowering("gelu")
def _gelu(em, node, ins):
    x, like, approximate = ins[0], node.inputs[0], node.attrs["approximate"]
    if em.opset >= 20:
        return em.final(node, "Gelu", [x], approximate=approximate)
    if approximate == "tanh":
        cube = em.one("Mul", [em.one("Mul", [x, x]), x])
        inner = em.one("Add", [x, em.one("Mul", [cube, em.scalar(0.044715, like)])])
        gate = em.one("Tanh", [em.one("Mul", [inner, em.scalar(math.sqrt(2.0 / math.pi), like)])])
    else:
        gate = em.one("Erf", [em.one("Mul", [x, em.scalar(1.0 / math.sqrt(2.0), like)])])
    half_x = em.one("Mul", [x, em.scalar(0.5, like)])
    return em.final(node, "Mul", [half_x, em.one("Add", [gate, em.scalar(1.0, like)])])


@lowering("clip")
def _clip(em, node, ins):
    like = node.inputs[0]
    bounds = ["" if node.attrs[k] is None else em.scalar(node.attrs[k], like) for k in ("min", "max")]
    while bounds and bounds[-1] == "":
        bounds.pop()
    return em.final(node, "Clip", [ins[0], *bounds])


@lowering("cast")
def _cast(em, node, ins):
    return em.final(node, "Cast", ins, to=IR_TO_ONNX_DTYPE[node.attrs["dtype"]])


@lowering("linear")
def _linear(em, node, ins):
    x, w, b = node.inputs
    if x.type.rank == 2:
        return em.final(node, "Gemm", [n for n in ins if n], transB=1)
    if w.is_constant:
        weight_t = em.const(np.ascontiguousarray(w.data.T), f"{w.name}_t")
    else:
        weight_t = em.one("Transpose", [ins[1]], perm=[1, 0])
    if b is None:
        return em.final(node, "MatMul", [ins[0], weight_t])
    return em.final(node, "Add", [em.one("MatMul", [ins[0], weight_t]), ins[2]])


@lowering("conv2d")
def _conv2d(em, node, ins):
    a = node.attrs
    kernel = list(node.inputs[1].shape[2:])
    return em.final(
        node,
        "Conv",
        [n for n in ins if n],
        kernel_shape=kernel,
        strides=list(a["stride"]),
        pads=list(a["padding"]),  # (top, left, bottom, right) is ONNX's (h_begin, w_begin, h_end, w_end)
        dilations=list(a["dilation"]),
        group=a["groups"],
    )


@lowering("conv3d", "conv_transpose2d", "conv_transpose3d")
def _conv_nd(em, node, ins):
    """ONNX ``Conv`` (rank 5) and ``ConvTranspose``: the IR's begins-then-ends padding is ONNX's ``pads``."""
    a = node.attrs
    extra = {"output_padding": list(a["output_padding"])} if node.op.startswith("conv_transpose") else {}
    return em.final(
        node,
        "Conv" if node.op == "conv3d" else "ConvTranspose",
        [n for n in ins if n],
        kernel_shape=list(node.inputs[1].shape[2:]),
        strides=list(a["stride"]),
        pads=list(a["padding"]),
        dilations=list(a["dilation"]),
        group=a["groups"],
        **extra,
    )


@lowering("batch_norm")
def _batch_norm(em, node, ins):
    return em.final(node, "BatchNormalization", ins, epsilon=node.attrs["eps"])


@lowering("layer_norm")
def _layer_norm(em, node, ins):
    x = node.inputs[0]
    axis, eps = node.attrs["axis"] % x.type.rank, node.attrs["eps"]
    weight = ins[1] if len(ins) > 1 and ins[1] else ""
    bias = ins[2] if len(ins) > 2 and ins[2] else ""
    if em.opset >= 17:
        if not weight:
            normalized = [split_dim(d)[0] for d in x.shape[axis:]]
            weight = em.const(np.ones(normalized, numpy_dtype(x.dtype)), "ln_weight")
        return em.final(node, "LayerNormalization", [ins[0], weight] + ([bias] if bias else []), axis=axis, epsilon=eps)
    axes = list(range(axis, x.type.rank))
    centered = em.one("Sub", [ins[0], em.reduce("ReduceMean", ins[0], axes, True)])
    variance = em.reduce("ReduceMean", em.one("Mul", [centered, centered]), axes, True)
    y = em.one("Div", [centered, em.one("Sqrt", [em.one("Add", [variance, em.scalar(eps, x)])])])
    steps = [("Mul", weight), ("Add", bias)]
    steps = [(op, operand) for op, operand in steps if operand]
    for op, operand in steps[:-1]:
        y = em.one(op, [y, operand])
    if not steps:
        return em.final(node, "Identity", [y])
    return em.final(node, steps[-1][0], [y, steps[-1][1]])


@lowering("softmax", "log_softmax")
def _softmax(em, node, ins):
    return em.final(node, "Softmax" if node.op == "softmax" else "LogSoftmax", ins, axis=node.attrs["axis"])


_REDUCE = {"reduce_mean": "ReduceMean", "reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin"}


@lowering(*_REDUCE)
def _reduce(em, node, ins):
    return [em.reduce(_REDUCE[node.op], ins[0], node.attrs["axes"], node.attrs["keepdims"], [node.output.name])]


@lowering("max_pool2d", "avg_pool2d")
def _pool(em, node, ins):
    a = node.attrs
    attrs = {
        "kernel_shape": list(a["kernel"]),
        "strides": list(a["stride"]),
        "pads": list(a["padding"]),
        "ceil_mode": int(a["ceil_mode"]),
    }
    if node.op == "max_pool2d":
        return em.final(node, "MaxPool", ins, dilations=list(a["dilation"]), **attrs)
    return em.final(node, "AveragePool", ins, count_include_pad=int(a["count_include_pad"]), **attrs)


@lowering("reshape")
def _reshape(em, node, ins):
    x, target = node.inputs[0], list(node.attrs["shape"])
    symbolic = [i for i, d in enumerate(target) if d != -1 and split_dim(d)[1] is not None]
    literal_zero = any(d == 0 for d in target)
    if not literal_zero and all(i < x.type.rank and x.shape[i] == target[i] for i in symbolic):
        dims = [0 if i in symbolic else d for i, d in enumerate(target)]  # 0 copies the input dim
        shape = em.const(np.asarray(dims, np.int64), "shape")
        return em.final(node, "Reshape", [ins[0], shape])
    out_dims = list(node.outputs[0].shape)
    allowzero = 1 if literal_zero else None
    return em.final(node, "Reshape", [ins[0], em.shape_tensor(out_dims)], allowzero=allowzero)


@lowering("expand")
def _expand(em, node, ins):
    return em.final(node, "Expand", [ins[0], em.shape_tensor(node.outputs[0].shape)])


@lowering("transpose")
def _transpose(em, node, ins):
    return em.final(node, "Transpose", ins, perm=list(node.attrs["perm"]))


@lowering("concat")
def _concat(em, node, ins):
    return em.final(node, "Concat", ins, axis=node.attrs["axis"])


@lowering("split")
def _split(em, node, ins):
    sizes = em.const(np.asarray(node.attrs["sizes"], np.int64), "split")
    return em.final(node, "Split", [ins[0], sizes], axis=node.attrs["axis"])


@lowering("slice")
def _slice(em, node, ins):
    a = node.attrs
    vectors = [em.const(np.asarray(a[k], np.int64), k) for k in ("starts", "ends", "axes", "steps")]
    return em.final(node, "Slice", [ins[0], *vectors])


@lowering("gather")
def _gather(em, node, ins):
    return em.final(node, "Gather", ins, axis=node.attrs["axis"])


@lowering("pad")
def _pad(em, node, ins):
    pads = em.const(np.asarray(node.attrs["pads"], np.int64), "pads")
    return em.final(node, "Pad", [ins[0], pads, em.scalar(node.attrs["value"], node.inputs[0])], mode="constant")


@lowering("cumsum")
def _cumsum(em, node, ins):
    a = node.attrs
    axis = em.const(np.asarray(a["axis"], np.int64), "axis")
    return em.final(node, "CumSum", [ins[0], axis], exclusive=int(a["exclusive"]), reverse=int(a["reverse"]))


@lowering("gather_elements")
def _gather_elements(em, node, ins):
    return em.final(node, "GatherElements", ins, axis=node.attrs["axis"])


@lowering("gather_nd")
def _gather_nd(em, node, ins):
    return em.final(node, "GatherND", ins, batch_dims=node.attrs["batch_dims"])


# ScatterND's reduction attribute: add/mul from opset 16, max/min from 18
_SCATTER_ND_OPSET = {"none": 11, "add": 16, "mul": 16, "max": 18, "min": 18}


@lowering("scatter_nd")
def _scatter_nd(em, node, ins):
    from reshift.errors import CodegenError

    reduction = node.attrs["reduction"]
    if em.opset < _SCATTER_ND_OPSET[reduction]:
        raise CodegenError(
            f"scatter_nd (node {node.name}) with reduction {reduction!r} needs ONNX opset "
            f">= {_SCATTER_ND_OPSET[reduction]}; export with opset={_SCATTER_ND_OPSET[reduction]} or later"
        )
    attrs = {"reduction": reduction} if reduction != "none" else {}
    return em.final(node, "ScatterND", ins, **attrs)


@lowering("resize2d")
def _resize2d(em, node, ins):
    """ONNX Resize by output sizes; the coordinate modes are ONNX's own names."""
    from reshift.errors import CodegenError

    a = node.attrs
    if a["coordinate_transformation"] == "half_pixel_symmetric" and em.opset < 19:
        raise CodegenError(f"resize2d (node {node.name}): half_pixel_symmetric needs ONNX opset >= 19; export with 19")
    if a["antialias"] and em.opset < 18:
        raise CodegenError(f"resize2d (node {node.name}): antialias needs ONNX opset >= 18; export with 18 or later")
    sizes = em.shape_tensor(node.outputs[0].shape)
    scales = ""
    if a["scales"]:  # ONNX samples at 1 / scale then; the output size is floor(in * scale) = size
        scales, sizes = em.const(np.asarray([1.0, 1.0, *a["scales"]], np.float32), "scales"), ""
    roi, extra = "", {}
    if a["mode"] == "cubic" or a["antialias"]:
        extra = {"cubic_coeff_a": a["cubic_coeff_a"], "exclude_outside": int(a["exclude_outside"])}
    if a["antialias"]:
        extra["antialias"] = 1
    if a["coordinate_transformation"] == "tf_crop_and_resize":
        h0, w0, h1, w1 = a["roi"]
        roi = em.const(np.asarray([0, 0, h0, w0, 1, 1, h1, w1], np.float32), "roi")
        extra["extrapolation_value"] = a["extrapolation_value"]
    return em.final(
        node,
        "Resize",
        [ins[0], roi, scales, sizes] if sizes else [ins[0], roi, scales],
        mode=a["mode"],
        coordinate_transformation_mode=a["coordinate_transformation"],
        nearest_mode=a["nearest_mode"],
        **extra,
    )


@lowering("arange")
def _arange(em, node, ins):
    a, out = node.attrs, node.outputs[0]
    length = em.symbolic_dim(a["shape"][0])
    limit = em.one("Squeeze", [length, em.const(np.asarray([0], np.int64), "axes")])
    zero, one = em.const(np.asarray(0, np.int64), "zero"), em.const(np.asarray(1, np.int64), "one")
    y = em.one("Range", [zero, limit, one])
    if out.dtype != "int64":
        y = em.one("Cast", [y], to=IR_TO_ONNX_DTYPE[out.dtype])
    if a["step"] != 1.0:
        y = em.one("Mul", [y, em.scalar(a["step"], out)])
    if a["start"] != 0.0:
        y = em.one("Add", [y, em.scalar(a["start"], out)])
    return em.final(node, "Identity", [y])


@lowering("topk")
def _topk(em, node, ins):
    a = node.attrs
    k = em.const(np.asarray([a["k"]], np.int64), "k")
    return em.final(node, "TopK", [ins[0], k], axis=a["axis"], largest=int(a["largest"]), sorted=int(a["sorted"]))


@lowering("isnan")
def _isnan(em, node, ins):
    return em.final(node, "IsNaN", ins)


@lowering("isinf")
def _isinf(em, node, ins):
    a = node.attrs
    return em.final(
        node, "IsInf", ins, detect_positive=int(a["detect_positive"]), detect_negative=int(a["detect_negative"])
    )


# -- reference decompositions of reshift's custom ops (see the codegen.onnx docstring) -------------
def _dequantized_linear(em: OnnxEmitter, node: Node, ins, weight: np.ndarray):
    """``x @ W^T + bias`` with ``W`` dequantized at export time (packed weights are constants)."""
    y = em.one("MatMul", [ins[0], em.const(np.ascontiguousarray(weight.T), f"{node.name}_weight_t")])
    bias = ins[3] if len(ins) > 3 else ""
    return em.final(node, "Add", [y, bias]) if bias else em.final(node, "Identity", [y])


def _constant_weights(node: Node, count: int) -> list[np.ndarray]:
    from reshift.errors import CodegenError

    values = node.inputs[1 : 1 + count]
    if not all(v is not None and v.is_constant for v in values):
        raise CodegenError(f"{node.op} node {node.name}: the decomposition needs constant packed weights")
    return [v.data for v in values]


def _float_lut_only(node: Node) -> None:
    """The dense decomposition is the float semantics; ``lut_dtype="int8"`` (T-MAC tables) has none."""
    from reshift.errors import CodegenError

    if node.attrs.get("lut_dtype", "float32") != "float32":
        raise CodegenError(
            f"{node.op} node {node.name}: lut_dtype={node.attrs['lut_dtype']!r} has no standard-ONNX "
            "decomposition (its int8 tables are not a dense MatMul); export with custom_ops='domain'"
        )


@register_decomposition("bcq_linear")
def _bcq_linear(em, node, ins):
    from reshift.ir.ops_lowbit import bcq_weight

    _float_lut_only(node)
    bits, alpha = _constant_weights(node, 2)
    a = node.attrs
    return _dequantized_linear(em, node, ins, bcq_weight(bits, alpha, a["group_size"], a["in_features"]))


@register_decomposition("ternary_linear")
def _ternary_linear(em, node, ins):
    from reshift.ir.ops_lowbit import ternary_weight

    _float_lut_only(node)
    trits, scale = _constant_weights(node, 2)
    a = node.attrs
    return _dequantized_linear(em, node, ins, ternary_weight(trits, scale, a["group_size"], a["in_features"]))


@register_decomposition("shift_linear")
def _shift_linear(em, node, ins):
    """Per-row int8 activation quantization, then ``q @ (sign * 2^(E - exponent))^T`` in float
    (integers, exact while partial sums stay below 2^24), then ``* 2^-E * s * scale + bias``."""
    sign, exponent = _constant_weights(node, 2)
    x = node.inputs[0]
    e_max = 2 ** node.attrs["exponent_bits"] - 1
    w_int = sign.astype(np.float32) * np.exp2(e_max - exponent.astype(np.float32))
    amax = em.reduce("ReduceMax", em.one("Abs", [ins[0]]), [-1], True)
    s = em.one("Div", [amax, em.scalar(127.0, x)])
    safe = em.one("Where", [em.one("Greater", [s, em.scalar(0.0, x)]), s, em.scalar(1.0, x)])
    q = em.one("Clip", [em.one("Round", [em.one("Div", [ins[0], safe])]), em.scalar(-127.0, x), em.scalar(127.0, x)])
    acc = em.one("MatMul", [q, em.const(np.ascontiguousarray(w_int.T), f"{node.name}_shift_weight_t")])
    y = em.one("Mul", [em.one("Mul", [acc, em.scalar(2.0**-e_max, x)]), s])
    y_scaled = [y, ins[3]]
    if len(ins) > 4 and ins[4]:
        return em.final(node, "Add", [em.one("Mul", y_scaled), ins[4]])
    return em.final(node, "Mul", y_scaled)


@register_decomposition("shift_conv2d")
def _shift_conv2d(em, node, ins):
    """im2col as a depthwise ``Conv`` with one-hot filters (channel ``c*kh*kw + i*kw + j`` picks tap
    ``(i, j)`` of channel ``c``: exact, padding zeros included), then ``shift_linear``'s steps per
    group's row: ``ReduceMax`` of ``|patch|`` over the group's ``C/groups*kh*kw`` taps, int8
    ``Round``/``Clip``, the integer-valued shift filter as a grouped 1x1 ``Conv`` (exact while partial
    sums stay below 2^24), then ``* 2^-E * s * scale + bias``."""
    sign, exponent = _constant_weights(node, 2)
    x, a = node.inputs[0], node.attrs
    out, cg, kh, kw = sign.shape
    groups, taps = a["groups"], cg * kh * kw
    channels, (oh, ow) = x.shape[1], node.outputs[0].shape[2:]
    tap = np.arange(channels * kh * kw)
    one_hot = np.zeros((channels * kh * kw, 1, kh, kw), np.float32)
    one_hot[tap, 0, tap // kw % kh, tap % kw] = 1
    window = dict(strides=list(a["stride"]), pads=list(a["padding"]), dilations=list(a["dilation"]))
    patches = em.one(
        "Conv", [ins[0], em.const(one_hot, f"{node.name}_im2col")], kernel_shape=[kh, kw], group=channels, **window
    )
    rows = em.one("Reshape", [patches, em.const(np.asarray([0, groups, taps, oh, ow], np.int64), "shape")])
    amax = em.reduce("ReduceMax", em.one("Abs", [rows]), [2], True)  # [N, groups, 1, OH, OW]
    s = em.one("Div", [amax, em.scalar(127.0, x)])
    safe = em.one("Where", [em.one("Greater", [s, em.scalar(0.0, x)]), s, em.scalar(1.0, x)])
    q = em.one("Clip", [em.one("Round", [em.one("Div", [rows, safe])]), em.scalar(-127.0, x), em.scalar(127.0, x)])
    q = em.one("Reshape", [q, em.const(np.asarray([0, groups * taps, oh, ow], np.int64), "shape")])
    e_max = 2 ** a["exponent_bits"] - 1
    w_int = sign.astype(np.float32) * np.exp2(e_max - exponent.astype(np.float32))
    acc = em.one(
        "Conv",
        [q, em.const(w_int.reshape(out, taps, 1, 1), f"{node.name}_shift_weight")],
        kernel_shape=[1, 1],
        group=groups,
    )
    acc = em.one("Reshape", [acc, em.const(np.asarray([0, groups, out // groups, oh, ow], np.int64), "shape")])
    y = em.one("Mul", [em.one("Mul", [acc, em.scalar(2.0**-e_max, x)]), s])
    y = em.one("Reshape", [y, em.const(np.asarray([0, out, oh, ow], np.int64), "shape")])
    channel = em.const(np.asarray([out, 1, 1], np.int64), "shape")
    y_scaled = [y, em.one("Reshape", [ins[3], channel])]
    if len(ins) > 4 and ins[4]:
        return em.final(node, "Add", [em.one("Mul", y_scaled), em.one("Reshape", [ins[4], channel])])
    return em.final(node, "Mul", y_scaled)


@register_decomposition("binary_attention")
def _binary_attention(em, node, ins):
    """The reference's quadratic form: codes ``Where(h >= 0, 1, -1)``, ``w = 1 + (b + C_q C_k^T) / 2``
    (small integers, exact in float32), the causal triangle as a constant factor, then
    ``MatMul(w, v) / ReduceSum(w)``."""
    qh, kh, v = node.inputs
    bits, rank = qh.shape[-1], qh.type.rank
    codes = [
        em.one("Where", [em.one("GreaterOrEqual", [h, em.scalar(0.0, qh)]), em.scalar(1.0, qh), em.scalar(-1.0, qh)])
        for h in ins[:2]
    ]
    kt = em.one("Transpose", [codes[1]], perm=list(range(rank - 2)) + [rank - 1, rank - 2])
    dots = em.one("MatMul", [codes[0], kt])
    w = em.one(
        "Add",
        [em.one("Mul", [em.one("Add", [dots, em.scalar(float(bits), qh)]), em.scalar(0.5, qh)]), em.scalar(1.0, qh)],
    )
    if node.attrs["causal"]:
        tokens = qh.shape[-2]
        w = em.one("Mul", [w, em.const(np.tril(np.ones((tokens, tokens), np.float32)), f"{node.name}_causal")])
    den = em.reduce("ReduceSum", w, [-1], True)
    return em.final(node, "Div", [em.one("MatMul", [w, ins[2]]), den])
