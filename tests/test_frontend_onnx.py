"""ONNX frontend: op semantics at several opsets vs onnxruntime, load errors, reference models."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from reshift.errors import ModelLoadError, UnsupportedOpError
from reshift.frontend.onnx import ONNX_CONVERTERS, from_onnx
from reshift.ir import interpret, verify

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def make_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    """A checked model from ``(name, elem_type, shape)`` input/output triples."""
    graph = helper.make_graph(
        nodes,
        "case",
        [helper.make_tensor_value_info(*spec) for spec in inputs],
        [helper.make_tensor_value_info(*spec) for spec in outputs],
        [numpy_helper.from_array(np.asarray(a), name) for name, a in initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for output in model.graph.output:  # outputs given without a shape take the inferred one
        if not output.type.tensor_type.HasField("shape") and output.name in known:
            output.type.CopyFrom(known[output.name].type)
    onnx.checker.check_model(model)
    return model


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def compare(model: onnx.ModelProto, feeds: dict, rtol: float = 1e-5) -> None:
    graph = from_onnx(model)
    verify(graph)
    ours = list(interpret(graph, feeds).values())
    for got, want in zip(ours, run_ort(model, feeds), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        if want.dtype == bool or np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got, want)
        else:
            assert np.max(np.abs(got - want)) <= rtol * max(np.max(np.abs(want)), 1e-30)


def x_of(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ints(*values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


# -- op cases: (nodes, initializers, input shape with "N", output rank); compared at batch 2 and 3
def _axes_input_or_attr(op, opset, axes, **attrs):
    if opset >= 18 or op == "ReduceSum":
        return [helper.make_node(op, ["x", "axes"], ["y"], **attrs)], [("axes", ints(*axes))]
    return [helper.make_node(op, ["x"], ["y"], axes=axes, **attrs)], []


def case_reduce(op, opset, keepdims=1):
    return _axes_input_or_attr(op, opset, [-1, 2], keepdims=keepdims)


def case_split(opset):
    if opset >= 18:
        node = helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)
        return [node, helper.make_node("Concat", ["c", "a"], ["y"], axis=1)], []
    node = helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1)
    return [node, helper.make_node("Mul", ["a", "b"], ["y"])], [("sizes", ints(3, 3))]


def case_squeeze(opset):
    nodes = [
        helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
        helper.make_node("Relu", ["u"], ["r"]),
        helper.make_node("Squeeze", ["r", "ax"], ["y"]),
    ]
    return nodes, [("ax", ints(1, -1))]


def case_shape_chain(opset):
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape over the symbolic batch (exporter style)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axis0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1", "two"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    return nodes, [("zero", np.asarray(0, np.int64)), ("axis0", ints(0)), ("minus1", ints(-1)), ("two", ints(2))]


def case_expand_computed(opset):
    """The legacy exporter's ``expand(B, -1, -1)``: ConstantOfShape + Equal + Where on a shape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "z", "one"], ["b"]),
        helper.make_node("Concat", ["b", "m1", "m1", "m1"], ["want"], axis=0),
        helper.make_node("ConstantOfShape", ["four"], ["ones"], value=helper.make_tensor("v", I64, [1], [1])),
        helper.make_node("Mul", ["ones", "m1"], ["neg"]),
        helper.make_node("Equal", ["want", "neg"], ["is_neg"]),
        helper.make_node("Where", ["is_neg", "ones", "want"], ["shape"]),
        helper.make_node("Expand", ["token", "shape"], ["tokens"]),
        helper.make_node("Concat", ["tokens", "x"], ["y"], axis=1),
    ]
    inits = [("z", ints(0)), ("one", ints(1)), ("m1", ints(-1)), ("four", ints(4)), ("token", x_of(1, 1, 6, 4))]
    return nodes, inits


def case_range_mask(opset):
    """Range + Trilu + Where on constants, folded at conversion time (a causal mask)."""
    nodes = [
        helper.make_node("Range", ["z", "four", "one"], ["r"]),
        helper.make_node("Unsqueeze", ["r", "ax"], ["row"]),
        helper.make_node("Less", ["r", "row"], ["lower"]),
        helper.make_node("Where", ["lower", "big", "zerof"], ["mask"]),
        helper.make_node("Trilu", ["mask"], ["tri"], upper=0),
        helper.make_node("Add", ["x", "tri"], ["y"]),
    ]
    inits = [("z", np.asarray(0, np.int64)), ("four", np.asarray(4, np.int64)), ("one", np.asarray(1, np.int64))]
    inits += [("ax", ints(1)), ("big", np.asarray(-1e4, np.float32)), ("zerof", np.asarray(0, np.float32))]
    return nodes, inits


def one(op, *inputs, **attrs):
    return lambda opset: ([helper.make_node(op, ["x", *inputs], ["y"], **attrs)], [])


OP_CASES = {
    "reduce_mean": (lambda o: case_reduce("ReduceMean", o), (2, 3, 6, 4)),
    "reduce_max_nokeep": (lambda o: case_reduce("ReduceMax", o, keepdims=0), (2, 3, 6, 4)),
    "reduce_sum": (lambda o: case_reduce("ReduceSum", o), (2, 3, 6, 4)),
    "reduce_l2": (lambda o: case_reduce("ReduceL2", o), (2, 3, 6, 4)),
    "split": (case_split, (2, 6, 4)),
    "squeeze_unsqueeze": (case_squeeze, (2, 3, 4)),
    "shape_chain": (case_shape_chain, (2, 3, 4)),
    "expand_computed": (case_expand_computed, (2, 3, 6, 4)),
    "range_mask": (case_range_mask, (2, 3, 4, 4)),
    "softmax": (one("Softmax", axis=1), (2, 5, 3)),
    "flatten": (one("Flatten", axis=1), (2, 3, 4, 2)),
    "transpose": (one("Transpose", perm=[0, 2, 1]), (2, 3, 4)),
    "hardswish": (one("HardSwish"), (2, 8)),
    "leaky_relu": (one("LeakyRelu", alpha=0.1), (2, 8)),
    "erf_tanh": (
        lambda o: ([helper.make_node("Erf", ["x"], ["e"]), helper.make_node("Tanh", ["e"], ["y"])], []),
        (2, 8),
    ),
    "global_avg_pool": (one("GlobalAveragePool"), (2, 3, 5, 5)),
    "max_pool_ceil": (one("MaxPool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), (2, 3, 8, 8)),
    "avg_pool_pad": (one("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0), (2, 3, 6, 6)),
    "conv_same": (one("Conv", "w", auto_pad="SAME_UPPER", strides=[2, 2], group=1), (2, 4, 7, 7)),
}
OPSET_PAIRS = [13, 18, 21]
MIN_OPSET = {"hardswish": 14, "range_mask": 14}


@pytest.mark.parametrize("opset", OPSET_PAIRS)
@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_op_semantics_match_onnxruntime(case, opset):
    build, shape = OP_CASES[case]
    nodes, inits = build(opset)
    if case == "conv_same":
        inits = [("w", x_of(5, 4, 3, 3, seed=1))]
    if case in MIN_OPSET and opset < MIN_OPSET[case]:
        pytest.skip(f"{case} needs opset {MIN_OPSET[case]}")
    out_shape = ["n", 6, 2] if case == "shape_chain" else None  # opset 13 cannot infer it
    model = make_model(nodes, [("x", F, ["batch", *shape[1:]])], [("y", F, out_shape)], inits, opset)
    for batch in (2, 3):
        compare(model, {"x": x_of(batch, *shape[1:])})


def test_batch_symbol_is_kept():
    nodes, inits = case_shape_chain(17)
    graph = from_onnx(make_model(nodes, [("x", F, [None, 3, 4])], [("y", F, None)], inits))
    assert graph.inputs[0].shape == ("N", 3, 4)
    assert graph.outputs[0].shape == ("N", 6, 2)
    assert "shape" not in graph.op_histogram()  # the chain folded into one static reshape
    assert [n.op for n in graph.nodes] == ["reshape"]


def test_static_ops_at_several_opsets():
    """Gemm (transB, alpha, beta), Slice (negative step), Pad, Clip, Gather, Cast, Gelu, LayerNorm."""
    w, c = x_of(5, 4, seed=1), x_of(5, seed=2)
    for opset in (17, 20, 21):
        nodes = [
            helper.make_node("Gemm", ["x", "w", "c"], ["g"], transB=1, alpha=0.5, beta=2.0),
            helper.make_node("Slice", ["g", "st", "en", "ax", "sp"], ["s"]),
            helper.make_node("Pad", ["s", "pads", "pv"], ["p"]),
            helper.make_node("Clip", ["p", "lo", "hi"], ["cl"]),
            helper.make_node("LayerNormalization", ["cl", "lw", "lb"], ["ln"], epsilon=1e-5),
            helper.make_node("Gelu" if opset >= 20 else "Erf", ["ln"], ["ge"]),
            helper.make_node("Gather", ["ge", "idx"], ["ga"], axis=1),
            helper.make_node("Cast", ["ga"], ["ci"], to=TensorProto.INT32),
            helper.make_node("Cast", ["ci"], ["y"], to=F),
        ]
        inits = [("w", w), ("c", c), ("st", ints(-1)), ("en", ints(-100)), ("ax", ints(1)), ("sp", ints(-2))]
        inits += [("pads", ints(0, 1, 0, 2)), ("pv", np.asarray(0.5, np.float32))]
        inits += [("lo", np.asarray(-0.5, np.float32)), ("hi", np.asarray(0.7, np.float32))]
        inits += [("lw", x_of(6, seed=3)), ("lb", x_of(6, seed=4)), ("idx", ints(0, 5, -1, 2))]
        model = make_model(nodes, [("x", F, [3, 4])], [("y", F, None)], inits, opset)
        compare(model, {"x": 3 * x_of(3, 4)})


def test_equal_where_and_int_inputs():
    nodes = [
        helper.make_node("Equal", ["ids", "zero"], ["pad"]),
        helper.make_node("Not", ["pad"], ["keep"]),
        helper.make_node("Cast", ["keep"], ["kf"], to=F),
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Unsqueeze", ["kf", "ax"], ["k3"]),
        helper.make_node("Mul", ["emb", "k3"], ["y"]),
    ]
    inits = [("zero", np.asarray(0, np.int64)), ("table", x_of(10, 4)), ("ax", ints(-1))]
    model = make_model(nodes, [("ids", I64, ["b", 5])], [("y", F, None)], inits)
    compare(model, {"ids": np.random.default_rng(0).integers(0, 10, (3, 5))})


# -- errors ---------------------------------------------------------------------------------------
def _small_model(opset=17) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    return make_model(nodes, [("x", F, ["N", 64])], [("y", F, None)], [("w", x_of(64, 512))], opset)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.onnx: no such file"):
        from_onnx(tmp_path / "nope.onnx")


def test_truncated_file(tmp_path):
    data = _small_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cut.onnx") as info:
        from_onnx(path)
    assert "truncated" in str(info.value)


def test_not_a_protobuf(tmp_path):
    path = tmp_path / "text.onnx"
    path.write_text("this is not a model\n" * 50)
    with pytest.raises(ModelLoadError, match="text.onnx"):
        from_onnx(str(path))


def test_invalid_model_fails_checker(tmp_path):
    model = _small_model()
    model.graph.node[0].input[1] = "undefined_weight"
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match="bad.onnx: invalid ONNX model"):
        from_onnx(path)


@pytest.mark.parametrize("opset", [22, 30])
def test_unsupported_opset(opset):
    model = _small_model()
    model.opset_import[0].version = opset
    with pytest.raises(ModelLoadError, match=f"opset {opset} is not supported"):
        from_onnx(model)


def test_unsupported_ops_are_all_listed_with_counts():
    nodes = [
        helper.make_node("NonMaxSuppression", ["x", "x"], ["a"], name="nms_1"),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("NonZero", ["r"], ["v"], name="nonzero_1"),
        helper.make_node("NonZero", ["r"], ["v2"], name="nonzero_2"),
    ]
    model = make_model(nodes, [("x", F, [1, 4, 4])], [("v", TensorProto.INT64, None)])
    with pytest.raises(UnsupportedOpError) as info:
        from_onnx(model)
    assert info.value.unsupported == {"NonMaxSuppression": ["nms_1"], "NonZero": ["nonzero_1", "nonzero_2"]}
    assert "NonZero x2" in str(info.value) and "NonMaxSuppression x1" in str(info.value)


def test_converter_table_covers_reference_ops():
    needed = (
        "Conv BatchNormalization Relu MaxPool AveragePool GlobalAveragePool Flatten Gemm MatMul Add Sub Mul Div Pow"
    )
    needed += " Sqrt Erf Tanh Exp Reshape Transpose Concat Split Slice Gather Squeeze Unsqueeze Softmax"
    needed += " LayerNormalization ReduceMean ReduceSum ReduceMax Where Equal Cast Expand Shape ConstantOfShape Range"
    needed += " Identity Dropout Gelu Constant Not And Less Greater Clip Sigmoid Neg Trilu Pad"
    assert not set(needed.split()) - set(ONNX_CONVERTERS)


# -- reference models ---------------------------------------------------------------------------
# (model, opset, dynamo): the legacy exporter works for every model (NOTES_ops.md); gpt2 also
# through the dynamo exporter at opset 18, where it is valid.
EXPORTS = [
    ("resnet18", 13, False),
    ("repvgg_a0_train", 17, False),
    ("repvgg_a0_deploy", 17, False),
    ("repvgg_grouped_stage", 17, False),
    ("mobileone_s0", 17, False),
    ("vit_s16", 17, False),
    ("swin_block", 21, False),
    ("minilm", 17, False),
    ("minilm_builtin_mask", 17, False),  # the 2-D mask into BERT: transformers' int64 mask arithmetic
    ("gpt2", 17, False),
    ("gpt2", 18, True),
]
LIGHT = {"repvgg_grouped_stage", "swin_block", "gpt2", "repvgg_a0_deploy"}


@pytest.fixture(scope="session")
def onnx_exports(tmp_path_factory):
    """Exported model files, cached for the session: ``(name, opset, dynamo) -> Path``."""
    directory = tmp_path_factory.mktemp("onnx_exports")
    cache: dict[tuple, Path] = {}

    def export(name: str, opset: int, dynamo: bool) -> Path:
        key = (name, opset, dynamo)
        if key not in cache:
            cache[key] = export_model(name, opset, dynamo, directory)
        return cache[key]

    return export


def export_model(name: str, opset: int, dynamo: bool, directory: Path) -> Path:
    import torch

    from examples.models import MODELS

    spec = MODELS[name]
    model, args = spec.build(), spec.example_inputs(2)
    path = directory / f"{name}_{opset}_{'dynamo' if dynamo else 'legacy'}.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=64)
            torch.onnx.export(
                model, args, str(path), input_names=list(spec.input_names), opset_version=opset,
                dynamo=True, dynamic_shapes=tuple({0: batch} for _ in args), verbose=False,
            )  # fmt: skip
        else:
            torch.onnx.export(
                model, args, str(path), input_names=list(spec.input_names), output_names=["output"],
                opset_version=opset, dynamo=False, dynamic_axes={n: {0: "batch"} for n in spec.input_names},
            )  # fmt: skip
    return path


def _model_param(entry):
    marks = () if entry[0] in LIGHT else (pytest.mark.slow,)
    return pytest.param(*entry, id=f"{entry[0]}-opset{entry[1]}{'-dynamo' if entry[2] else ''}", marks=marks)


@pytest.mark.parametrize("name,opset,dynamo", [_model_param(e) for e in EXPORTS])
def test_reference_model_matches_onnxruntime(onnx_exports, name, opset, dynamo):
    from examples.models import MODELS

    spec = MODELS[name]
    path = onnx_exports(name, opset, dynamo)
    graph = from_onnx(path)
    verify(graph)
    assert graph.inputs[0].shape[0] == "N"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        feeds = {n: t.numpy() for n, t in zip(spec.input_names, spec.example_inputs(batch), strict=False)}
        for got, want in zip(interpret(graph, feeds).values(), session.run(None, feeds), strict=True):
            assert got.shape == want.shape
            assert np.max(np.abs(got - want)) <= spec.rtol * np.max(np.abs(want)), (name, batch)


def _batch_size_nodes():
    return [
        helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
        helper.make_node("Squeeze", ["s", "ax0"], ["n"]),
        helper.make_node("Range", ["z", "n", "one"], ["rows"]),
    ]


def test_range_over_batch_becomes_arange():
    """``arange(batch)`` (row indices, different per row) stays a run-time ``arange`` node."""
    nodes = _batch_size_nodes() + [
        helper.make_node("Cast", ["rows"], ["rf"], to=F),
        helper.make_node("Unsqueeze", ["rf", "ax1"], ["col"]),
        helper.make_node("Add", ["x", "col"], ["y"]),
    ]
    inits = [("ax0", ints(0)), ("ax1", ints(1)), ("z", np.asarray(0, np.int64)), ("one", np.asarray(1, np.int64))]
    model = make_model(nodes, [("x", F, ["b", 4])], [("y", F, ["b", 4])], inits)
    assert "arange" in from_onnx(model).op_histogram()
    for batch in (1, 3):
        compare(model, {"x": x_of(batch, 4)})


def test_batch_invariant_mask_is_folded_through_probes():
    """A mask built from ``arange(batch)`` with ops reshift has no run-time form (CumSum) but
    whose rows do not depend on the batch folds to an expanded constant."""
    nodes = _batch_size_nodes() + [
        helper.make_node("Mul", ["rows", "z"], ["zeros"]),
        helper.make_node("Unsqueeze", ["zeros", "ax1"], ["col"]),
        helper.make_node("Add", ["col", "steps"], ["grid"]),
        helper.make_node("CumSum", ["grid", "ax1"], ["cum"]),
        helper.make_node("Cast", ["cum"], ["cf"], to=F),
        helper.make_node("Add", ["x", "cf"], ["y"]),
    ]
    inits = [("ax0", ints(0)), ("ax1", ints(1)), ("z", np.asarray(0, np.int64))]
    inits += [("one", np.asarray(1, np.int64)), ("steps", ints(1, 2, 3, 4).reshape(1, 4))]
    model = make_model(nodes, [("x", F, ["b", 4])], [("y", F, ["b", 4])], inits)
    graph = from_onnx(model)
    assert "arange" not in graph.op_histogram() and graph.inputs[0].shape == ("N", 4)
    for batch in (1, 2, 5):
        compare(model, {"x": x_of(batch, 4)})
