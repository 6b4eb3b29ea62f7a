"""ONNX backend: every registry op exported, checked (full_check) and run in onnxruntime vs the
reference interpreter at several batch sizes and opsets; custom-op encodings; model round trips."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from reshift.codegen.onnx import CUSTOM_DECOMPOSITIONS, CUSTOM_DOMAIN, ONNX_LOWERINGS, to_onnx
from reshift.errors import CodegenError
from reshift.frontend.onnx import from_onnx
from reshift.ir import OPS, GraphBuilder, interpret, parse, verify
from reshift.ir.ops import Attr, register


def _w(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# op -> (input types, build(builder, *inputs) -> output value(s))
CASES = {
    **{op: (["f32[N,3,5]"], lambda b, x, op=op: b.op(op, x)) for op in ("relu", "sigmoid", "silu", "tanh", "erf")},
    **{op: (["f32[N,3,5]"], lambda b, x, op=op: b.op(op, x)) for op in ("exp", "sin", "cos", "neg", "abs")},
    **{op: (["f32[N,3,5]"], lambda b, x, op=op: b.op(op, b.exp(x))) for op in ("log", "sqrt", "rsqrt", "reciprocal")},
    "identity": (["f32[N,3]"], lambda b, x: b.identity(b.relu(x))),
    "gelu": (["f32[N,3,5]"], lambda b, x: [b.gelu(x), b.gelu(x, approximate="tanh")]),
    "clip": (["f32[N,8]"], lambda b, x: [b.clip(x, min=-0.5, max=0.3), b.clip(x, min=0.1)]),
    "cast": (
        ["f32[N,8]"],
        lambda b, x: b.cast(b.cast(b.mul(x, b.constant(np.float32(4))), dtype="int32"), dtype="float32"),
    ),
    "logical_not": (
        ["f32[N,8]"],
        lambda b, x: b.cast(b.logical_not(b.less(x, b.constant(np.float32(0)))), dtype="float32"),
    ),
    **{
        op: (["f32[N,3,5]", "f32[N,3,5]"], lambda b, x, y, op=op: b.op(op, x, y))
        for op in ("add", "sub", "mul", "div", "maximum", "minimum")
    },
    "pow": (["f32[N,3,5]"], lambda b, x: b.pow(b.exp(x), b.constant(_w(5)))),
    **{
        op: (["f32[N,3,5]", "f32[5]"], lambda b, x, y, op=op: b.cast(b.op(op, x, y), dtype="float32"))
        for op in ("equal", "less", "less_equal", "greater", "greater_equal")
    },
    **{
        op: (
            ["f32[N,6]"],
            lambda b, x, op=op: b.cast(
                b.op(op, b.less(x, b.constant(np.float32(0.3))), b.greater(x, b.constant(np.float32(-0.3)))),
                dtype="float32",
            ),
        )  # noqa: E501
        for op in ("logical_and", "logical_or")
    },
    "where": (["f32[N,6]", "f32[6]"], lambda b, x, y: b.where(b.less(x, y), x, y)),
    "matmul": (["f32[N,2,3,5]", "f32[5,4]"], lambda b, x, y: b.matmul(x, y)),
    "linear": (
        ["f32[N,3,5]", "f32[N,5]"],
        lambda b, x, y: [
            b.linear(x, b.constant(_w(4, 5)), b.constant(_w(4, seed=2))),
            b.linear(y, b.constant(_w(4, 5)), b.constant(_w(4, seed=2))),
            b.linear(x, b.constant(_w(7, 5)), None),
        ],
    ),
    "conv2d": (
        ["f32[N,4,9,9]"],
        lambda b, x: [
            b.conv2d(x, b.constant(_w(6, 2, 3, 3)), b.constant(_w(6)), stride=(2, 1), padding=(1, 0, 2, 1), groups=2),
            b.conv2d(x, b.constant(_w(3, 4, 3, 3)), None, dilation=(2, 2)),
        ],
    ),
    "conv3d": (
        ["f32[N,4,5,6,7]"],
        lambda b, x: [
            b.conv3d(
                x,
                b.constant(_w(6, 2, 2, 3, 2)),
                b.constant(_w(6)),
                stride=(1, 2, 1),
                padding=(1, 0, 1, 0, 2, 1),
                groups=2,
            ),
            b.conv3d(x, b.constant(_w(3, 4, 1, 2, 1)), None, dilation=(1, 2, 1)),
        ],
    ),
    "conv_transpose2d": (
        ["f32[N,4,5,6]"],
        lambda b, x: [
            b.conv_transpose2d(
                x,
                b.constant(_w(4, 3, 3, 2)),
                b.constant(_w(6)),
                stride=(2, 3),
                padding=(1, 0, 1, 1),
                output_padding=(1, 2),
                dilation=(1, 2),
                groups=2,
            ),
            b.conv_transpose2d(x, b.constant(_w(4, 2, 3, 3)), None, stride=(2, 2), padding=(1, 1, 1, 1)),
        ],
    ),
    "conv_transpose3d": (
        ["f32[N,4,3,4,5]"],
        lambda b, x: b.conv_transpose3d(
            x, b.constant(_w(4, 2, 2, 3, 2)), b.constant(_w(4)), stride=(2, 1, 2), padding=(1, 0, 0, 0, 1, 1), groups=2
        ),
    ),
    "batch_norm": (
        ["f32[N,3,4,4]"],
        lambda b, x: b.batch_norm(
            x, *(b.constant(_w(3, seed=i)) for i in range(3)), b.constant(np.full(3, 0.7, np.float32))
        ),
    ),
    "layer_norm": (
        ["f32[N,3,8]"],
        lambda b, x: [
            b.layer_norm(x, b.constant(_w(8)), b.constant(_w(8, seed=3))),
            b.layer_norm(x, None, None, axis=1),
        ],
    ),
    "softmax": (["f32[N,3,8]"], lambda b, x: [b.softmax(x), b.softmax(x, axis=1)]),
    "log_softmax": (["f32[N,3,8]"], lambda b, x: b.log_softmax(x)),
    **{
        op: (["f32[N,3,4,5]"], lambda b, x, op=op: [b.op(op, x, axes=(1, -1)), b.op(op, x, axes=(2,), keepdims=False)])
        for op in ("reduce_mean", "reduce_sum", "reduce_max", "reduce_min")
    },
    "max_pool2d": (
        ["f32[N,3,9,9]"],
        lambda b, x: [
            b.max_pool2d(x, kernel=(3, 3), stride=(2, 2), padding=(1, 1, 1, 1)),
            b.max_pool2d(x, kernel=(2, 2), stride=(2, 2), ceil_mode=True),
        ],  # noqa: E501
    ),
    "avg_pool2d": (
        ["f32[N,3,9,9]"],
        lambda b, x: [
            b.avg_pool2d(x, kernel=(3, 3), stride=(2, 2), padding=(1, 1, 1, 1)),
            b.avg_pool2d(x, kernel=(3, 3), stride=(2, 2), padding=(1, 1, 1, 1), count_include_pad=False),
        ],
    ),
    "reshape": (
        ["f32[N,4,6]"],
        lambda b, x: [
            b.reshape(x, shape=("N", 2, -1)),
            b.reshape(x, shape=("4*N", 6)),
            b.reshape(x, shape=(6, "N", 4)),
        ],
    ),
    "expand": (
        ["f32[N,1,6]"],
        lambda b, x: [b.expand(x, shape=("N", 3, 6)), b.expand(b.constant(_w(1, 6)), shape=("N", 6))],
    ),
    "transpose": (["f32[N,4,6]"], lambda b, x: b.transpose(x, perm=(2, 0, 1))),
    "concat": (["f32[N,4,6]", "f32[N,2,6]"], lambda b, x, y: b.concat(x, y, b.relu(y), axis=1)),
    "split": (["f32[N,7]"], lambda b, x: b.split(x, axis=1, sizes=(2, 5))),
    "slice": (["f32[N,7,8]"], lambda b, x: b.slice(x, starts=(1, -1), ends=(6, -9), axes=(1, 2), steps=(2, -2))),
    "gather": (
        ["f32[N,7,3]", "i64[N,4]"],
        lambda b, x, i: [
            b.gather(x, b.constant(np.asarray([0, 6, -1], np.int64)), axis=1),
            b.gather(b.constant(_w(10, 3)), i),
        ],
    ),
    "pad": (["f32[N,3,4]"], lambda b, x: b.pad(x, pads=(0, 1, 0, 0, 2, 3), value=-1.5)),
    "cumsum": (["f32[N,4,6]"], lambda b, x: [b.cumsum(x, axis=2), b.cumsum(x, axis=1, exclusive=True, reverse=True)]),
    "gather_elements": (["f32[N,10,3]", "i64[N,4,3]"], lambda b, x, i: b.gather_elements(x, i, axis=1)),
    "resize2d": (
        ["f32[N,2,4,6]"],
        lambda b, x: [
            b.resize2d(x, size=(8, 9)),
            b.resize2d(x, size=(3, 2), coordinate_transformation="align_corners"),
            b.resize2d(x, size=(7, 5), coordinate_transformation="asymmetric"),
            b.resize2d(x, size=(8, 9), mode="cubic", exclude_outside=True),
            b.resize2d(x, size=(3, 5), mode="cubic", cubic_coeff_a=-0.5, coordinate_transformation="align_corners"),
            b.resize2d(x, size=(5, 7), coordinate_transformation="tf_crop_and_resize", roi=(0.1, -0.2, 0.8, 1.1)),
            b.resize2d(x, size=(3, 4), mode="cubic", scales=(0.8, 0.7)),  # sampled at 1 / scale, not in / out
        ],
    ),
    "gather_nd": (
        ["f32[N,10,3]", "i64[N,4,1]"],
        lambda b, x, i: [
            b.gather_nd(x, i, batch_dims=1),
            b.gather_nd(x, b.constant(np.asarray([[0, 1], [-1, 9]], np.int64))),  # axis 0 is the batch
        ],
    ),
    "scatter_nd": (
        ["f32[N,5,3]", "f32[N,2,3]"],
        lambda b, x, u: b.scatter_nd(
            b.transpose(x, perm=(1, 0, 2)),
            b.constant(np.asarray([[3], [-5]], np.int64)),
            b.transpose(u, perm=(1, 0, 2)),
        ),
    ),
    "topk": (["f32[N,5,6]"], lambda b, x: [*b.topk(x, k=3), *b.topk(x, k=2, axis=1, largest=False)]),
    "isnan": (["f32[N,3,5]"], lambda b, x: b.isnan(b.log(x))),
    "isinf": (
        ["f32[N,3,5]"],
        lambda b, x: [
            b.isinf(b.concat(b.reciprocal(b.relu(x)), b.neg(b.reciprocal(b.relu(x))), axis=1), **flags)
            for flags in ({}, {"detect_negative": False}, {"detect_positive": False})
        ],
    ),
    "arange": (
        ["f32[N,3]"],
        lambda b, x: [
            b.arange(shape=("N",)),
            b.arange(shape=("2*N",), start=1.0, step=0.5, dtype="float32"),
            b.arange(shape=(5,)),
        ],
    ),
}


def feeds_for(graph, batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for value in graph.inputs:
        shape = value.type.concrete_shape({"N": batch})
        out[value.name] = (
            rng.integers(0, 10, shape) if value.dtype == "int64" else rng.standard_normal(shape).astype(np.float32)
        )
    return out


def build_case(op: str):
    types, build = CASES[op]
    b = GraphBuilder(f"case_{op}")
    inputs = [b.input(f"in{i}", t) for i, t in enumerate(types)]
    outputs = build(b, *inputs)
    return b.build(*(outputs if isinstance(outputs, (list, tuple)) else [outputs]))


def check_in_onnxruntime(graph, model, batches=(1, 3), rtol=1e-5):
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in batches:
        feeds = feeds_for(graph, batch)
        expected = interpret(graph, feeds)
        got = session.run(None, feeds)
        for (name, want), have in zip(expected.items(), got, strict=True):
            assert have.shape == want.shape and have.dtype == want.dtype, (name, have.shape, want.shape)
            scale = max(float(np.max(np.abs(want))), 1e-30) if want.size else 1.0
            assert np.max(np.abs(have.astype(np.float64) - want), initial=0.0) <= rtol * scale, name


def test_every_standard_op_has_a_case_and_a_lowering():
    standard = {name for name, opdef in OPS.items() if "custom" not in opdef.tags}
    assert standard - set(CASES) == set(), "add a CASES entry for new registry ops"
    assert standard - set(ONNX_LOWERINGS) == set()
    custom = {name for name, opdef in OPS.items() if "custom" in opdef.tags and not name.startswith("test_")}
    assert custom - set(CUSTOM_DECOMPOSITIONS) == set(), "add a reference decomposition (codegen/onnx_lowering.py)"


@pytest.mark.parametrize("opset", [13, 17, 21])
@pytest.mark.parametrize("op", sorted(CASES))
def test_op_runs_in_onnxruntime(op, opset):
    graph = build_case(op)
    model = to_onnx(graph, opset=opset)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    check_in_onnxruntime(graph, model)


def _scatter_nd_graph(reduction: str):
    b = GraphBuilder(f"scatter_{reduction}")
    x, u = b.input("x", "f32[6,N]"), b.input("u", "f32[3,N]")
    index = b.constant(np.asarray([[1], [-1], [1]], np.int64))  # a repeated row: combined in order
    return b.build(b.scatter_nd(x, index, u, reduction=reduction))


@pytest.mark.parametrize("reduction", ["add", "mul", "max", "min"])
def test_scatter_nd_reductions_run_in_onnxruntime(reduction):
    graph = _scatter_nd_graph(reduction)
    check_in_onnxruntime(graph, to_onnx(graph, opset=18))


def test_resize2d_antialias_runs_in_onnxruntime_from_opset_18():
    b = GraphBuilder("antialias")
    x = b.input("x", "f32[N,2,9,12]")
    graph = b.build(*(b.resize2d(x, size=(4, 5), mode=m, antialias=True) for m in ("linear", "cubic")))
    check_in_onnxruntime(graph, to_onnx(graph, opset=18))
    with pytest.raises(CodegenError, match="antialias needs ONNX opset >= 18"):
        to_onnx(graph, opset=17)


def test_resize2d_half_pixel_symmetric_needs_opset_19():
    b = GraphBuilder("symmetric")
    x = b.input("x", "f32[N,2,4,6]")
    graph = b.build(b.resize2d(x, size=(9, 4), coordinate_transformation="half_pixel_symmetric", scales=(2.3, 0.7)))
    check_in_onnxruntime(graph, to_onnx(graph, opset=19))
    with pytest.raises(CodegenError, match="half_pixel_symmetric needs ONNX opset >= 19"):
        to_onnx(graph, opset=18)


def test_scatter_nd_reduction_below_its_opset_is_refused():
    with pytest.raises(CodegenError, match=r"scatter_nd \(node .*reduction 'add' needs ONNX opset >= 16"):
        to_onnx(_scatter_nd_graph("add"), opset=13)


def test_layer_norm_and_gelu_use_native_ops_when_available():
    graph = parse(
        """
        graph g(%x: f32[N,4]) {
          const %w: f32[4] = [1.0, 2.0, 0.5, 1.5]
          %n: f32[N,4] = layer_norm(%x, %w) {axis=-1, eps=1e-5}
          %y: f32[N,4] = gelu(%n) {approximate="none"}
          return %y
        }
        """
    )
    ops = {opset: [n.op_type for n in to_onnx(graph, opset=opset).graph.node] for opset in (13, 17, 20)}
    assert "LayerNormalization" not in ops[13] and "Erf" in ops[13]
    assert "LayerNormalization" in ops[17] and "Gelu" not in ops[17]
    assert ops[20] == ["LayerNormalization", "Gelu"]


def test_reshape_copies_batch_where_aligned():
    graph = parse(
        """
        graph g(%x: f32[N,4,6]) {
          %y: f32[N,24] = reshape(%x) {shape=[N, 24]}
          return %y
        }
        """
    )
    model = to_onnx(graph)
    assert [n.op_type for n in model.graph.node] == ["Reshape"]  # target [0, 24], no Shape needed
    check_in_onnxruntime(graph, model)


# -- custom ops -----------------------------------------------------------------------------------
@pytest.fixture
def custom_op():
    """A throwaway custom op ``y = x * 2^shift`` with its reference decomposition."""
    name = "test_pow2_scale"
    register(
        name, ["x"], {"shift": Attr("int", 0)},
        lambda x, shift: [x], lambda x, shift: (x * np.float32(2.0**shift)).astype(x.dtype),
        "test-only custom op", tags={"custom"},
    )  # fmt: skip

    def decompose(em, node, ins):
        return em.final(node, "Mul", [ins[0], em.scalar(2.0 ** node.attrs["shift"], node.inputs[0])])

    CUSTOM_DECOMPOSITIONS[name] = decompose
    yield name
    del OPS[name], CUSTOM_DECOMPOSITIONS[name]


def test_custom_op_decomposition_and_domain(custom_op, tmp_path):
    b = GraphBuilder("custom")
    x = b.input("x", "f32[N,5]")
    graph = b.build(b.op(custom_op, b.relu(x), shift=-3))
    decomposed = to_onnx(graph)
    assert all(n.domain == "" for n in decomposed.graph.node)
    check_in_onnxruntime(graph, decomposed)

    path = tmp_path / "custom.onnx"
    encoded = to_onnx(graph, path, custom_ops="domain")
    node = encoded.graph.node[-1]
    assert (node.domain, node.op_type) == (CUSTOM_DOMAIN, custom_op)
    assert {o.domain for o in encoded.opset_import} == {"", CUSTOM_DOMAIN}
    back = from_onnx(path)
    assert [n.op for n in back.nodes] == ["relu", custom_op] and back.nodes[1].attrs == {"shift": -3}
    feeds = feeds_for(graph, 2)
    np.testing.assert_array_equal(
        interpret(back, feeds)["test_pow2_scale_0"], interpret(graph, feeds)[graph.outputs[0].name]
    )


def test_custom_op_without_decomposition_is_reported(custom_op):
    b = GraphBuilder("custom")
    x = b.input("x", "f32[2,5]")
    graph = b.build(b.op(custom_op, x, shift=1))
    saved = CUSTOM_DECOMPOSITIONS.pop(custom_op)
    try:
        with pytest.raises(CodegenError, match=f"{custom_op} x1"):
            to_onnx(graph)
    finally:
        CUSTOM_DECOMPOSITIONS[custom_op] = saved


def _lowbit_graph(op: str, out: int = 6, k: int = 20, bias: bool = True):
    from reshift.ir.ops_lowbit import groups, pack_signs, pack_trits

    rng = np.random.default_rng(7)
    b = GraphBuilder(op)
    x = b.input("x", "f32[N,3,20]")
    bias_value = b.constant(_w(out, seed=5)) if bias else None
    if op == "shift_linear":
        sign = b.constant(rng.integers(-1, 2, (out, k)).astype(np.int8))
        exponent = b.constant(rng.integers(0, 16, (out, k)).astype(np.uint8))
        y = b.shift_linear(x, sign, exponent, b.constant(np.abs(_w(out, seed=6))), bias_value, exponent_bits=4)
    elif op == "bcq_linear":
        bits = b.constant(pack_signs(rng.choice([-1, 1], (3, out, k))))
        alpha = b.constant(np.abs(_w(out, groups(k, 8), 3)))
        y = b.bcq_linear(x, bits, alpha, bias_value, group_size=8, in_features=k)
    else:
        trits = b.constant(pack_trits(rng.integers(-1, 2, (out, k))))
        y = b.ternary_linear(
            x, trits, b.constant(np.abs(_w(out, groups(k, 8)))), bias_value, group_size=8, in_features=k
        )
    return b.build(y)


# the quantizer ops (quantize_uniform, log2_quant, int8_linear, log2_matmul) export as QDQ / their own
# decompositions, tested with calibrated graphs in tests/test_passes_quantize.py (int8_conv2d:
# tests/test_kernels_int8.py, log2_matmul: test_passes_log2.py)
QDQ_TESTED = ("quantize_uniform", "log2_quant", "int8_linear", "int8_conv2d", "log2_matmul")


def test_every_custom_op_has_an_export_test():
    custom = {n for n, o in OPS.items() if "custom" in o.tags and not n.startswith("test_")}
    # moe_linear: test_moe.py; binary_attention: test_binary_attention.py
    tested_elsewhere = {"moe_linear", "binary_attention"}
    assert custom <= {"shift_linear", "shift_conv2d", "bcq_linear", "ternary_linear", *tested_elsewhere, *QDQ_TESTED}, (
        custom
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("op", ["shift_linear", "bcq_linear", "ternary_linear"])
def test_registry_custom_ops_decompose_for_onnxruntime(op, bias):
    graph = _lowbit_graph(op, bias=bias)
    model = to_onnx(graph)
    assert all(n.domain == "" for n in model.graph.node)
    check_in_onnxruntime(graph, model, rtol=1e-5)
    domain = to_onnx(graph, custom_ops="domain")
    assert [n.op_type for n in domain.graph.node if n.domain == CUSTOM_DOMAIN] == [op]
    feeds = feeds_for(graph, 2)
    np.testing.assert_array_equal(
        list(interpret(from_onnx(domain), feeds).values())[0], interpret(graph, feeds)[op + "_0"]
    )


def _shift_conv_graph(groups: int, kernel: int, bias: bool, **window):
    rng = np.random.default_rng(3)
    b = GraphBuilder("shift_conv2d")
    x = b.input("x", "f32[N,6,9,8]")
    shape = (4 if groups == 2 else 6, 6 // groups, kernel, kernel)
    y = b.shift_conv2d(
        x,
        b.constant(rng.integers(-1, 2, shape).astype(np.int8)),
        b.constant(rng.integers(0, 16, shape).astype(np.uint8)),
        b.constant(np.abs(_w(shape[0], seed=6))),
        b.constant(_w(shape[0], seed=5)) if bias else None,
        groups=groups,
        **window,
    )
    return b.build(y)


@pytest.mark.parametrize(
    "groups, kernel, bias, window",
    [
        (1, 3, True, {"padding": (1, 1, 1, 1)}),
        (2, 3, False, {"stride": (2, 1), "padding": (0, 1, 2, 1), "dilation": (2, 1)}),
        (6, 5, True, {"stride": (2, 2), "padding": (2, 2, 2, 2)}),
    ],
)
def test_shift_conv2d_decomposes_for_onnxruntime(groups, kernel, bias, window):
    graph = _shift_conv_graph(groups, kernel, bias, **window)
    model = to_onnx(graph)
    assert all(n.domain == "" for n in model.graph.node)
    check_in_onnxruntime(graph, model, rtol=1e-5)
    feeds = feeds_for(graph, 2)
    feeds["x"][1, 0, 4, 4] = np.nan  # a non-finite window gives NaN outputs there, as in the reference
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = interpret(graph, feeds)["shift_conv2d_0"]
    np.testing.assert_array_equal(np.isnan(session.run(None, feeds)[0]), np.isnan(want))
    domain = to_onnx(graph, custom_ops="domain")
    assert [n.op_type for n in domain.graph.node if n.domain == CUSTOM_DOMAIN] == ["shift_conv2d"]
    back = from_onnx(domain)
    assert back.nodes[0].attrs == graph.nodes[0].attrs
    np.testing.assert_array_equal(list(interpret(back, feeds).values())[0], want)


def test_bad_arguments():
    graph = build_case("relu")
    with pytest.raises(CodegenError, match="opset 12"):
        to_onnx(graph, opset=12)
    with pytest.raises(CodegenError, match="custom_ops"):
        to_onnx(graph, custom_ops="inline")


# -- whole models -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name,opset", [("swin_block", 17), ("gpt2", 21), ("resnet18", 13)])
def test_model_round_trip(tmp_path, name, opset):
    """torch -> ONNX -> IR -> to_onnx -> IR: same function, batch kept symbolic."""
    import warnings

    import torch

    from examples.models import MODELS

    spec = MODELS[name]
    source = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.build(), spec.example_inputs(2), str(source), input_names=list(spec.input_names),
            output_names=["output"], opset_version=17, dynamo=False,
            dynamic_axes={n: {0: "batch"} for n in spec.input_names},
        )  # fmt: skip
    graph = from_onnx(source)
    exported = to_onnx(graph, tmp_path / "out.onnx", opset=opset)
    assert (tmp_path / "out.onnx").is_file()
    check_in_onnxruntime(graph, exported, batches=(1, 3), rtol=spec.rtol)
    again = from_onnx(exported)
    verify(again)
    assert again.inputs[0].shape[0] == "N"
    feeds = {n: t.numpy() for n, t in zip(spec.input_names, spec.example_inputs(3), strict=False)}
    want = interpret(graph, feeds)["output"]
    got = interpret(again, feeds)["output"]
    assert np.max(np.abs(got - want)) <= spec.rtol * np.max(np.abs(want))
