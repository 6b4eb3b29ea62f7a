"""ONNX conv/pool/norm/activation/pad/tile converters (frontend/onnx_ops_nn.py) against onnxruntime.

Each case is one node on an input with a symbolic batch, compared at batch 2 and 3 through the
interpreter; a few decompositions also go through a CPU build. Negative cases check the refusal
names the node and says why.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from reshift.errors import ModelLoadError
from reshift.frontend.onnx import from_onnx
from reshift.ir import interpret
from tests.test_frontend_onnx import compare, make_model, x_of

F = TensorProto.FLOAT


def w_of(*shape: int) -> np.ndarray:
    return x_of(*shape, seed=7)


def node(op, *extra, **attrs):
    return helper.make_node(op, ["x", *extra], ["y"], name=f"{op.lower()}_node", **attrs)


# name -> (node, initializers, input shape without the batch, opset)
CASES = {
    "conv1d": (
        node("Conv", "w", "b", strides=[2], pads=[1, 2], dilations=[2]),
        {"w": w_of(5, 4, 3), "b": w_of(5)},
        (4, 11),
    ),
    "conv1d_groups_same": (node("Conv", "w", group=2, auto_pad="SAME_LOWER"), {"w": w_of(6, 2, 4)}, (4, 9)),
    "conv3d": (
        node("Conv", "w", "b", strides=[1, 2, 1], pads=[1, 0, 1, 0, 2, 1], dilations=[2, 1, 1]),
        {"w": w_of(4, 3, 2, 3, 2), "b": w_of(4)},
        (3, 5, 6, 5),
    ),
    "conv3d_groups": (node("Conv", "w", group=2), {"w": w_of(4, 2, 1, 2, 3)}, (4, 3, 4, 5)),
    "conv_transpose2d": (
        node("ConvTranspose", "w", "b", strides=[2, 2], pads=[1, 0, 1, 1], output_padding=[1, 0]),
        {"w": w_of(4, 3, 3, 3), "b": w_of(3)},
        (4, 5, 6),
    ),
    "conv_transpose2d_groups_dilated": (
        node("ConvTranspose", "w", group=2, dilations=[2, 1], strides=[1, 3]),
        {"w": w_of(4, 2, 3, 2)},
        (4, 5, 4),
    ),
    "conv_transpose3d": (
        node("ConvTranspose", "w", "b", strides=[2, 1, 2], pads=[1, 0, 0, 0, 1, 1], output_padding=[1, 0, 1], group=2),
        {"w": w_of(4, 2, 2, 3, 2), "b": w_of(4)},
        (4, 3, 4, 5),
    ),
    "conv_transpose1d": (node("ConvTranspose", "w", strides=[3], pads=[1, 0]), {"w": w_of(3, 2, 4)}, (3, 7)),
    "conv_transpose_output_shape": (
        node("ConvTranspose", "w", strides=[2, 2], output_shape=[10, 9]),
        {"w": w_of(2, 3, 3, 3)},
        (2, 5, 4),
    ),
    "conv_transpose_same_upper": (
        node("ConvTranspose", "w", strides=[2, 2], auto_pad="SAME_UPPER"),
        {"w": w_of(2, 3, 4, 3)},
        (2, 5, 4),
    ),
    "max_pool1d": (
        node("MaxPool", kernel_shape=[3], strides=[2], pads=[1, 1], dilations=[2], ceil_mode=1),
        {},
        (3, 10),
    ),
    "avg_pool1d": (node("AveragePool", kernel_shape=[3], strides=[2], pads=[1, 1], count_include_pad=1), {}, (3, 9)),
    "max_pool3d": (
        node("MaxPool", kernel_shape=[2, 3, 2], strides=[2, 1, 2], pads=[1, 1, 0, 0, 1, 1], ceil_mode=1),
        {},
        (2, 5, 6, 7),
    ),
    "avg_pool3d_exclude_pad": (
        node("AveragePool", kernel_shape=[3, 2, 3], strides=[2, 2, 1], pads=[1, 0, 1, 1, 1, 1]),
        {},
        (2, 6, 5, 6),
    ),
    "avg_pool3d_include_pad_ceil": (
        node(
            "AveragePool",
            kernel_shape=[2, 2, 2],
            strides=[2, 2, 2],
            pads=[1, 1, 1, 0, 0, 0],
            count_include_pad=1,
            ceil_mode=1,
        ),
        {},
        (2, 5, 4, 5),
    ),
    "prelu_channel": (node("PRelu", "slope"), {"slope": w_of(3, 1, 1)}, (3, 4, 5)),
    "prelu_scalar": (node("PRelu", "slope"), {"slope": np.asarray([0.25], np.float32)}, (3, 4)),
    "elu": (node("Elu", alpha=0.5), {}, (3, 8)),
    "selu": (node("Selu"), {}, (3, 8)),
    "selu_custom": (node("Selu", alpha=2.0, gamma=0.5), {}, (3, 8)),
    "lrn": (node("LRN", size=3, alpha=1e-3, beta=0.75, bias=2.0), {}, (6, 4, 5)),
    "instance_norm": (
        node("InstanceNormalization", "s", "b", epsilon=1e-3),
        {"s": w_of(3), "b": w_of(3) + 1},
        (3, 4, 5),
    ),
    "instance_norm_rank3": (node("InstanceNormalization", "s", "b"), {"s": w_of(4), "b": w_of(4)}, (4, 6)),
    "group_norm": (
        node("GroupNormalization", "s", "b", num_groups=2, epsilon=1e-3),
        {"s": w_of(6), "b": w_of(6) + 1},
        (6, 3, 4),
        21,
    ),
    "pad_reflect": (node("Pad", "pads", mode="reflect"), {"pads": np.asarray([0, 1, 2, 3, 0, 2, 1, 2])}, (3, 4, 5)),
    "pad_edge": (node("Pad", "pads", mode="edge"), {"pads": np.asarray([0, 0, 3, 0, 0, 1, 0, 2])}, (3, 4, 5)),
    "pad_wrap": (node("Pad", "pads", mode="wrap"), {"pads": np.asarray([0, 0, 2, 1, 0, 0, 1, 3])}, (3, 4, 5), 19),
    "sign": (node("Sign"), {}, (3, 4)),
    "shrink": (node("Shrink", bias=0.5, lambd=0.75), {}, (3, 8)),
    "tile": (node("Tile", "repeats"), {"repeats": np.asarray([1, 2, 1, 3])}, (3, 1, 2)),
    "tile_batch": (node("Tile", "repeats"), {"repeats": np.asarray([2, 1, 1])}, (3, 2)),
}


def case_model(name: str):
    spec = CASES[name]
    onnx_node, inits, shape = spec[:3]
    opset = spec[3] if len(spec) > 3 else 17
    out = output_shape(onnx_node, shape)
    return make_model([onnx_node], [("x", F, ["batch", *shape])], [("y", F, out)], list(inits.items()), opset), shape


def output_shape(onnx_node, shape):
    """None (ONNX shape inference fills it) except for GroupNormalization, which it cannot infer."""
    return ["batch", *shape] if onnx_node.op_type == "GroupNormalization" else None


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_onnxruntime(name):
    model, shape = case_model(name)
    for batch in (2, 3):
        compare(model, {"x": x_of(batch, *shape)}, rtol=1e-5)


def test_lrn_even_size_matches_onnx_reference():
    """onnxruntime refuses an even LRN size; the spec's window is c - 1 .. c + 2 for size 4.

    The reference evaluator loops its channels over ``range(x.shape[0])``, so batch = channels here.
    """
    from onnx.reference import ReferenceEvaluator

    model = make_model([node("LRN", size=4, alpha=0.5)], [("x", F, ["batch", 5, 3, 2])], [("y", F, None)])
    x = x_of(5, 5, 3, 2)
    (want,) = ReferenceEvaluator(model).run(None, {"x": x})
    np.testing.assert_allclose(interpret(from_onnx(model), {"x": x})["y"], want, rtol=1e-5)


@pytest.mark.parametrize("name", ["avg_pool3d_exclude_pad", "lrn", "pad_reflect", "tile_batch", "group_norm"])
def test_decomposition_builds_for_cpu(name):
    """Decompositions reshape around the symbolic batch; the CPU build agrees with the interpreter."""
    import reshift

    model, shape = case_model(name)
    compiled = reshift.compile(model, target="cpu")
    feeds = {"x": x_of(3, *shape)}
    expected = interpret(from_onnx(model), feeds)["y"]
    np.testing.assert_allclose(compiled.run_dict(feeds)["y"], expected, rtol=1e-5, atol=1e-6)


REFUSED = {
    "conv_transpose4d": (
        node("ConvTranspose", "w"),
        {"w": w_of(2, 2, 1, 1, 1, 1)},
        (2, 3, 3, 3, 3),
        r"convtranspose_node.*only 1-D \(rank 3\), 2-D \(rank 4\), 3-D \(rank 5\) inputs are supported, got rank 6",
    ),
    "group_norm_uneven": (
        node("GroupNormalization", "s", "b", num_groups=4),
        {"s": w_of(6), "b": w_of(6)},
        (6, 3),
        r"groupnormalization_node.*6 channels, num_groups=4",
        21,
    ),
    "conv_weight_rank": (
        node("Conv", "w"),
        {"w": w_of(2, 3, 3)},
        (3, 5, 5),
        r"conv_node.*weight \[2, 3, 3\] must have the input's rank 4",
    ),
    "conv4d": (node("Conv", "w"), {"w": w_of(2, 2, 1, 1, 1, 1)}, (2, 3, 3, 3, 3), r"conv_node.*got rank 6"),
    "pad_reflect_too_wide": (
        node("Pad", "pads", mode="reflect"),
        {"pads": np.asarray([0, 0, 4, 0, 0, 0])},
        (3, 4),
        r"pad_node.*'reflect': pads 4, 0 exceed axis 2 of size 4",
    ),
    "avg_pool_dilated": (
        node("AveragePool", kernel_shape=[2, 2], dilations=[2, 2]),
        {},
        (2, 6, 6),
        r"averagepool_node.*AveragePool with dilations",
        19,
    ),
    "max_pool_indices": (
        helper.make_node("MaxPool", ["x"], ["y", "i"], name="maxpool_node", kernel_shape=[2]),
        {},
        (2, 6),
        r"maxpool_node.*Indices output",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_forms_are_refused_naming_the_node(name):
    onnx_node, inits, shape, message = REFUSED[name][:4]
    opset = REFUSED[name][4] if len(REFUSED[name]) > 4 else 17
    # outputs declared with the input's rank: ONNX shape inference fails on some of these forms
    outputs = [(out, TensorProto.INT64 if out == "i" else F, ["batch", *shape]) for out in onnx_node.output]
    model = make_model([onnx_node], [("x", F, ["batch", *shape])], outputs, list(inits.items()), opset)
    with pytest.raises(ModelLoadError, match=message):
        from_onnx(model)


def test_tile_repeats_computed_at_run_time_is_refused():
    tile = helper.make_node("Tile", ["x", "r"], ["y"], name="tile_node")
    model = make_model([tile], [("x", F, ["batch", 3]), ("r", TensorProto.INT64, [2])], [("y", F, None)])
    with pytest.raises(ModelLoadError, match="tile_node.*Tile repeats must be a constant"):
        from_onnx(model)


def test_float64_graph_is_computed_in_float64():
    """DOUBLE inputs and initializers stay float64 through the interpreter and the CPU build (no cast)."""
    import reshift

    D = TensorProto.DOUBLE
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    inits = [("w", np.linspace(-1, 1, 12).reshape(4, 3)), ("b", np.asarray([1e-12, 0.5, -0.25]))]
    model = make_model(nodes, [("x", D, ["batch", 4])], [("y", D, None)], inits)
    x = np.random.default_rng(0).standard_normal((3, 4))
    graph = from_onnx(model)
    assert graph.inputs[0].dtype == "float64" and graph.outputs[0].dtype == "float64"
    compare(model, {"x": x}, rtol=1e-12)
    got = reshift.compile(model, target="cpu").run_dict({"x": x})["y"]
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, interpret(graph, {"x": x})["y"], rtol=1e-12)


def test_sign_keeps_nan_and_integers():
    """NaN passes through the interpreter and the CPU build (no ``x == x`` test a compiler folds away)."""
    import reshift

    model = make_model([node("Sign")], [("x", F, ["batch", 5])], [("y", F, None)])
    x = np.asarray([[np.nan, -0.0, 0.0, -3.5, 2.0]], np.float32)
    np.testing.assert_array_equal(interpret(from_onnx(model), {"x": x})["y"], np.sign(x))
    np.testing.assert_array_equal(reshift.compile(model, target="cpu").run_dict({"x": x})["y"], np.sign(x))
    for elem, dtype in ((TensorProto.INT32, np.int32), (TensorProto.UINT8, np.uint8)):
        ints = make_model([node("Sign")], [("x", elem, ["batch", 3])], [("y", elem, None)])
        compare(ints, {"x": np.asarray([[0, 7, 9], [0, 1, 2]], dtype) * (1 if dtype == np.uint8 else -1)})
