"""The ``shiftadd_vit`` pipeline end to end on a tiny ViT: torch -> IR -> passes -> TVM, against the
reference interpreter of the rewritten graph (the compiled model must compute the same function)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")
torch = pytest.importorskip("torch")

import reshift  # noqa: E402
from examples.models.vit import VisionTransformer, init_transformer_weights  # noqa: E402
from reshift.ir import interpret  # noqa: E402


def _tiny_vit():
    torch.manual_seed(0)
    model = VisionTransformer(8, 4, 32, 1, 2, 5)
    init_transformer_weights(model)
    return model.eval()


def test_pipeline_rewrites_mlps_and_linears_and_compiles():
    model = _tiny_vit()
    x = torch.randn(2, 3, 8, 8)
    graph = reshift.frontend.from_torch(model, (x,))
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    cm = reshift.compile(graph, pipeline="shiftadd_vit", calibration=calib, moe_shift_share=0.5)
    ops = [n.op for n in cm.graph.nodes]
    assert ops.count("moe_linear") == 2  # fc1 and fc2
    assert ops.count("shift_linear") == 2  # qkv and proj; the head and the patch conv stay float
    shares = [f["shift_share"] for f in cm.report.details.values() if "shift_share" in f]
    assert len(shares) == 2 and all(0.3 < s < 0.7 for s in shares)
    xs = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    expected = interpret(cm.graph, {"x": xs})[cm.graph.outputs[0].name]
    actual = cm(xs)
    assert np.abs(actual - expected).max() <= 1e-4 * np.abs(expected).max()
