"""The trainable ``moe_linear`` (codegen/torch/ops_moe.py): its forward is the reference's function, its
write-back re-codes the node exactly, the latency-aware balancing loss, and ``reshift.recover`` on a
mixture graph."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reshift  # noqa: E402
from reshift.codegen.torch import ops_moe, to_torch  # noqa: E402
from reshift.ir import interpret  # noqa: E402
from tests.test_moe import _calibration, _mlp_graph, _moe_graph  # noqa: E402


@pytest.fixture(autouse=True)
def _latencies(monkeypatch):
    """Known expert latencies instead of timing kernels (``layer_latency`` compiles and times them)."""
    monkeypatch.setattr(ops_moe, "layer_latency", lambda o, k, rows, bits, levels: {"mult": 1.0, "shift": 3.0})


def _run(module, graph, x):
    return module({"x": torch.from_numpy(x)})[graph.outputs[0].name].detach().numpy()


def test_forward_is_the_reference_and_write_back_is_exact():
    graph, *_ = _moe_graph(out=6, k=10, router_bias=0.2)
    x = np.random.default_rng(0).standard_normal((40, 10)).astype(np.float32)
    expected = interpret(graph, {"x": x})[graph.outputs[0].name]
    module = to_torch(graph)
    got = _run(module, graph, x)
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    back = module.to_graph()
    np.testing.assert_array_equal(interpret(back, {"x": x})[back.outputs[0].name], expected)


def test_balancing_loss_moves_tokens_to_the_faster_expert():
    """With the shift expert 3x slower, the loss is lowest at share 1/4 and its gradient lowers p."""
    graph, *_ = _moe_graph(out=6, k=10, router_bias=0.0)
    module = to_torch(graph)
    node_module = next(iter(module.node_modules.values()))
    x = np.random.default_rng(1).standard_normal((64, 10)).astype(np.float32)
    _run(module, graph, x)
    p = node_module._p
    a, b = (1 - p).sum() * 1.0, p.sum() * 3.0
    expected = ops_moe.BALANCE_WEIGHT * ((a - b) / (a + b)) ** 2
    loss = node_module.extra_loss()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    if float(p.mean()) > 0.25:
        loss.backward()
        assert float(node_module.b.grad) > 0  # descending lowers the router bias: fewer shift tokens


def test_recover_trains_a_mixture_and_writes_it_back():
    graph = _mlp_graph()
    calib = _calibration()
    data = _calibration(batches=4)
    g2, report = reshift.recover(graph, pipeline="moe", data=data, steps=6, lr=1e-3, calibration=calib, progress=False)
    assert [n.op for n in g2.nodes].count("moe_linear") == 2
    x = data[0]["x"]
    ref = interpret(graph, {"x": x})[graph.outputs[0].name]
    assert np.isfinite(interpret(g2, {"x": x})[g2.outputs[0].name]).all()
    assert ref.shape == interpret(g2, {"x": x})[g2.outputs[0].name].shape
