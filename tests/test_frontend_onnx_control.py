"""ONNX ``If`` (folded when its condition is known), frozen inputs, and ``LSTM``/``GRU`` unrolled.

Every case is compared with onnxruntime on the same inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from reshift.errors import ModelLoadError, UnsupportedOpError
from reshift.frontend import from_onnx
from reshift.ir import interpret

F, I64 = TensorProto.FLOAT, TensorProto.INT64
RNG = np.random.default_rng(0)


def checked(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run_ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_matches_ort(model, feeds, graph_feeds=None, rtol=1e-5):
    graph = from_onnx(model) if graph_feeds is None else graph_feeds[0]
    ours = list(interpret(graph, feeds if graph_feeds is None else graph_feeds[1]).values())
    for got, want in zip(ours, run_ort(model, feeds), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-5)


def if_model() -> onnx.ModelProto:
    """y = x * 2 if rate == 16000 else x + 1, the condition computed from an int64 input."""
    two = numpy_helper.from_array(np.float32(2.0), "two")
    one = numpy_helper.from_array(np.float32(1.0), "one")
    then_branch = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["t"])], "then", [], [helper.make_tensor_value_info("t", F, [2, 3])]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["e"])], "else", [], [helper.make_tensor_value_info("e", F, [2, 3])]
    )
    nodes = [
        helper.make_node("Equal", ["rate", "k16"], ["is16"]),
        helper.make_node("If", ["is16"], ["y"], then_branch=then_branch, else_branch=else_branch),
    ]
    graph = helper.make_graph(
        nodes,
        "if_case",
        [helper.make_tensor_value_info("x", F, [2, 3]), helper.make_tensor_value_info("rate", I64, [])],
        [helper.make_tensor_value_info("y", F, [2, 3])],
        [two, one, numpy_helper.from_array(np.int64(16000), "k16")],
    )
    return checked(graph)


@pytest.mark.parametrize("rate", [16000, 8000])
def test_if_with_a_frozen_input_takes_one_branch(rate):
    model = if_model()
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    graph = from_onnx(model, input_values={"rate": np.int64(rate)})
    assert [v.name for v in graph.inputs] == ["x"]
    assert_matches_ort(model, {"x": x, "rate": np.array(rate, np.int64)}, (graph, {"x": x}))


def test_if_on_a_run_time_condition_is_refused_with_what_to_do():
    with pytest.raises(ModelLoadError, match=r"\(If\).*condition is computed at run time.*input_values"):
        from_onnx(if_model())


def test_input_values_must_name_inputs_and_fit_their_dtype():
    with pytest.raises(ModelLoadError, match=r"input_values names \['sr'\]"):
        from_onnx(if_model(), input_values={"sr": 16000})
    with pytest.raises(ModelLoadError, match=r"input_values\['rate'\] is float64; the input is int64"):
        from_onnx(if_model(), input_values={"rate": 1.5})


def test_unsupported_op_inside_the_taken_branch_is_named():
    model = if_model()
    then_branch = next(a.g for a in model.graph.node[1].attribute if a.name == "then_branch")
    then_branch.node[0].CopyFrom(helper.make_node("Hardmax", ["x"], ["t"]))
    with pytest.raises(UnsupportedOpError, match="Hardmax"):
        from_onnx(model, input_values={"rate": 16000})


def rnn_model(op: str, seq: int, batch: int, inp: int, hidden: int, direction: str, **extra) -> onnx.ModelProto:
    """One LSTM/GRU node with random weights, the initial state as graph inputs."""
    gates = 4 if op == "LSTM" else 3
    dirs = 2 if direction == "bidirectional" else 1
    scale = 0.5
    w = (scale * RNG.standard_normal((dirs, gates * hidden, inp))).astype(np.float32)
    r = (scale * RNG.standard_normal((dirs, gates * hidden, hidden))).astype(np.float32)
    b = (scale * RNG.standard_normal((dirs, 2 * gates * hidden))).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"))]
    names = ["X", "W", "R", "B", "", "h0"] + (["c0"] if op == "LSTM" else [])
    inputs = [
        helper.make_tensor_value_info("X", F, [seq, batch, inp]),
        helper.make_tensor_value_info("h0", F, [dirs, batch, hidden]),
    ]
    if op == "LSTM":
        inputs.append(helper.make_tensor_value_info("c0", F, [dirs, batch, hidden]))
        if extra.pop("peephole", False):
            inits.append(
                numpy_helper.from_array((scale * RNG.standard_normal((dirs, 3 * hidden))).astype(np.float32), "P")
            )
            names.append("P")
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(op, names, outputs, hidden_size=hidden, direction=direction, **extra)
    shapes = {"Y": [seq, dirs, batch, hidden], "Y_h": [dirs, batch, hidden], "Y_c": [dirs, batch, hidden]}
    out_info = [helper.make_tensor_value_info(n, F, shapes[n]) for n in outputs]
    return checked(helper.make_graph([node], op.lower(), inputs, out_info, inits))


def rnn_feeds(op, seq, batch, inp, hidden, dirs, zero_state=False):
    feeds = {"X": RNG.standard_normal((seq, batch, inp)).astype(np.float32)}
    state = np.zeros if zero_state else lambda s: RNG.standard_normal(s)
    feeds["h0"] = state((dirs, batch, hidden)).astype(np.float32)
    if op == "LSTM":
        feeds["c0"] = state((dirs, batch, hidden)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_rnn_matches_onnxruntime(op, direction):
    model = rnn_model(op, seq=4, batch=2, inp=5, hidden=3, direction=direction)
    assert_matches_ort(model, rnn_feeds(op, 4, 2, 5, 3, 2 if direction == "bidirectional" else 1))


def test_lstm_peephole_and_gru_linear_before_reset():
    assert_matches_ort(rnn_model("LSTM", 3, 2, 4, 3, "forward", peephole=True), rnn_feeds("LSTM", 3, 2, 4, 3, 1))
    assert_matches_ort(rnn_model("GRU", 3, 2, 4, 3, "forward", linear_before_reset=1), rnn_feeds("GRU", 3, 2, 4, 3, 1))


@pytest.mark.parametrize("op, extra", [("LSTM", {}), ("GRU", {}), ("GRU", {"linear_before_reset": 1})])
def test_rnn_without_initial_state(op, extra):
    """No initial_h/initial_c: the first step drops the recurrent terms (zero state)."""
    model = rnn_model(op, 3, 2, 4, 3, "forward", **dict(extra))
    node = model.graph.node[0]
    del node.input[5:]  # drop h0 (and c0)
    del model.graph.input[1:]
    onnx.checker.check_model(model)
    x = RNG.standard_normal((3, 2, 4)).astype(np.float32)
    assert_matches_ort(model, {"X": x})


def test_rnn_refuses_what_it_does_not_unroll():
    model = rnn_model("LSTM", 3, 2, 4, 3, "forward", clip=1.0)
    with pytest.raises(ModelLoadError, match=r"\(LSTM\).*clip attribute is not supported"):
        from_onnx(model)
    model = rnn_model("GRU", 3, 2, 4, 3, "forward", activations=["Relu", "Tanh"])
    with pytest.raises(ModelLoadError, match=r"\(GRU\).*activations \['Relu', 'Tanh'\] are not supported"):
        from_onnx(model)


def test_default_activations_spelled_out_are_accepted():
    model = rnn_model("GRU", 3, 2, 4, 3, "forward", activations=["Sigmoid", "Tanh"])
    assert_matches_ort(model, rnn_feeds("GRU", 3, 2, 4, 3, 1))
