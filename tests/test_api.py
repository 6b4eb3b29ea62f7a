"""reshift.compile from a torch module, an ONNX path or proto, and an IR graph; CompiledModel behaviour."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import reshift
from reshift.errors import ArtifactError, InputError, ModelLoadError
from reshift.ir import Graph, interpret, parse
from tests.system_tools import require_tool


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _onnx_model(rng) -> onnx.ModelProto:
    w = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])],
        "gemm_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        initializer=[w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def convnet():
    torch.manual_seed(0)
    model = ConvNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def test_compile_torch_module_matches_eager_and_interpreter(convnet):
    x = torch.randn(2, 3, 8, 8)
    cm = reshift.compile(convnet, (x,))
    assert isinstance(cm, reshift.CompiledModel) and isinstance(cm.graph, Graph)
    assert "batch_norm" not in cm.graph.op_histogram()  # the exact pipeline folded it
    assert cm.report is not None and cm.target == "cpu"
    x3 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        eager = convnet(x3).numpy()
    out = cm(x3.numpy())
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, eager, rtol=1e-4, atol=1e-5)
    reference = interpret(cm.graph, {cm.graph.inputs[0].name: x3.numpy()})
    np.testing.assert_allclose(out, next(iter(reference.values())), rtol=1e-4, atol=1e-5)
    torch_out = cm(x3)
    assert isinstance(torch_out, torch.Tensor)
    np.testing.assert_allclose(torch_out.numpy(), eager, rtol=1e-4, atol=1e-5)


def test_compile_onnx_path_and_proto(tmp_path, rng):
    proto = _onnx_model(rng)
    path = tmp_path / "gemm_relu.onnx"
    onnx.save(proto, path)
    x = rng.standard_normal((4, 4)).astype(np.float32)
    reference = interpret(reshift.frontend.from_onnx(proto), {"x": x})["y"]
    for source in (str(path), path, proto):
        cm = reshift.compile(source)
        np.testing.assert_allclose(cm(x), reference, rtol=1e-5, atol=1e-6)


def test_compile_graph_save_and_load(tmp_path, rng):
    graph = parse(
        """
        graph tiny(%x: f32[N,4]) {
          const %w: f32[2,4] = [0.5, -1.0, 0.25, 2.0, 1.0, 0.0, -0.5, 0.75]
          %y: f32[N,2] = linear(%x, %w, _) @fc
          %z: f32[N,2] = gelu(%y) @act
          return %z
        }
        """
    )
    cm = reshift.compile(graph, pipeline="exact")
    x = rng.standard_normal((3, 4)).astype(np.float32)
    expected = interpret(graph, {"x": x})["z"]
    np.testing.assert_allclose(cm(x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cm(x=x), expected, rtol=1e-5, atol=1e-6)
    stats = cm.benchmark(x, repeat=3, warmup=1)
    assert stats["median_ms"] > 0 and stats["p90_ms"] >= stats["min_ms"]
    out_dir = cm.save(tmp_path / "tiny")
    assert cm.meta["so_sha256"] and cm.meta["graph_sha256"]
    loaded = reshift.load(out_dir)
    np.testing.assert_allclose(loaded(x), expected, rtol=1e-5, atol=1e-6)


def test_missing_example_inputs_is_an_input_error(convnet):
    with pytest.raises(InputError, match="needs example_inputs"):
        reshift.compile(convnet)


def test_bad_sources(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        reshift.compile(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="cannot compile a int"):
        reshift.compile(3)


def test_cross_compiled_model_saves_but_does_not_run_here(tmp_path, rng):
    require_tool("aarch64-linux-gnu-gcc")
    cm = reshift.compile(_onnx_model(rng), target="arm64")
    with pytest.raises(ArtifactError, match="aarch64"):
        cm(np.ones((1, 4), np.float32))
    out_dir = cm.save(tmp_path / "arm")
    assert (out_dir / "model.so").read_bytes()[:4] == b"\x7fELF"
    with pytest.raises(ArtifactError, match="aarch64"):
        reshift.load(out_dir)
