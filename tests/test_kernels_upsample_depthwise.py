"""The CPU kernels of PP-OCR-style nets against the interpreter: ``kernel == stride`` transposed
convs (kernels/conv_transpose_cpu.py) and depthwise convs (kernels/depthwise_cpu.py).

Symbolic batch (1 and 2 through one build), odd channel counts, pads that crop, no bias; within
1e-5 relative (max |diff| / max |reference|). Negative cases keep Relax's reference lowering.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from reshift.codegen.tvm import build, lower  # noqa: E402
from reshift.ir import GraphBuilder, interpret  # noqa: E402

RNG = np.random.default_rng(5)


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _check(graph, shape):
    vm = relax.VirtualMachine(build(graph, "cpu").executable, tvm.cpu())
    for batch in (1, 2):
        x = f32(batch, *shape)
        expected = interpret(graph, {"x": x})[graph.outputs[0].name]
        actual = vm["main"](tvm.runtime.tensor(x)).numpy()
        assert actual.shape == expected.shape
        error = np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max()
        assert error <= 1e-5, f"{graph.name} batch {batch}: relative error {error:.3g}"


# (in ch, out ch, h, w, stride == kernel, padding, bias)
TRANSPOSED = [
    (24, 24, 10, 10, (2, 2), (0, 0, 0, 0), False),  # PP-OCRv4 det's head
    (24, 1, 12, 8, (2, 2), (0, 0, 0, 0), True),
    (5, 7, 6, 9, (3, 2), (1, 0, 2, 1), True),  # pads crop the depth-to-space copy
]


@pytest.mark.parametrize("case", TRANSPOSED, ids=lambda c: f"{c[0]}-{c[1]}-s{c[4][0]}{c[4][1]}-p{sum(c[5])}")
def test_conv_transpose_as_1x1_matches_interpreter(case):
    c, oc, h, w, stride, padding, bias = case
    b = GraphBuilder("deconv")
    x = b.input("x", f"f32[N,{c},{h},{w}]")
    bias_value = b.constant(f32(oc)) if bias else None
    y = b.conv_transpose2d(x, b.constant(f32(c, oc, *stride)), bias_value, stride=stride, padding=padding)
    graph = b.build(y)
    assert "depth_to_space" in lower(graph).script()
    _check(graph, (c, h, w))


def test_conv_transpose_overlapping_keeps_relax():
    """kernel 3, stride 2: windows overlap, no 1x1 form."""
    b = GraphBuilder("deconv3")
    x = b.input("x", "f32[N,4,5,6]")
    graph = b.build(b.conv_transpose2d(x, b.constant(f32(4, 2, 3, 3)), None, stride=(2, 2), padding=(1, 1, 1, 1)))
    assert "depth_to_space" not in lower(graph).script()


# (channels, h, w, kernel, stride, padding, dilation, bias)
DEPTHWISE = [
    (16, 20, 20, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), True),
    (19, 10, 10, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), False),  # a row narrower than a vector
    (8, 17, 23, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), True),  # stride 2, odd sizes
    (5, 12, 40, (5, 5), (2, 2), (2, 2, 2, 2), (1, 1), True),
    (6, 9, 33, (3, 1), (1, 2), (0, 1, 2, 0), (2, 1), True),  # asymmetric padding, dilation
]


@pytest.mark.parametrize(
    "case", DEPTHWISE, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}-k{c[3][0]}{c[3][1]}-s{c[4][0]}{c[4][1]}"
)
def test_depthwise_matches_interpreter(case):
    c, h, w, kernel, stride, padding, dilation, bias = case
    b = GraphBuilder("depthwise")
    x = b.input("x", f"f32[N,{c},{h},{w}]")
    bias_value = b.constant(f32(c)) if bias else None
    y = b.conv2d(
        x, b.constant(f32(c, 1, *kernel)), bias_value, stride=stride, padding=padding, dilation=dilation, groups=c
    )
    graph = b.build(b.relu(y))
    assert "depthwise_conv2d_f32" in lower(graph).script()
    _check(graph, (c, h, w))


def test_grouped_conv_keeps_relax():
    """groups=2 with 4 channels per group is no depthwise conv."""
    b = GraphBuilder("grouped")
    x = b.input("x", "f32[N,8,6,6]")
    graph = b.build(b.conv2d(x, b.constant(f32(8, 4, 3, 3)), None, padding=(1, 1, 1, 1), groups=2))
    assert "depthwise_conv2d_f32" not in lower(graph).script()
    _check(graph, (8, 6, 6))


def test_sigmoid_polynomial_is_relatively_accurate():
    """The DB head's probability map: a few ulp relative to each output, tiny probabilities included
    (onnxruntime's is ~1.3e-7 absolute there), 0 (no subnormals) and 1 in the tails, NaN kept."""
    b = GraphBuilder("sigmoid")
    x = b.input("x", "f32[N,64]")
    graph = b.build(b.sigmoid(x))
    assert "sigmoid" in lower(graph).script() and "tir_sigmoid" not in lower(graph).script()
    vm = relax.VirtualMachine(build(graph, "cpu").executable, tvm.cpu())
    values = np.concatenate([np.linspace(-100, 100, 254, dtype=np.float32), [0.0, np.nan]]).reshape(4, 64)
    y = vm["main"](tvm.runtime.tensor(values.astype(np.float32))).numpy()
    exact = 1 / (1 + np.exp(-values.astype(np.float64)))
    finite = ~np.isnan(values)
    assert np.isnan(y[~finite]).all()
    tiny = np.finfo(np.float32).tiny  # below x = -87 the output would be subnormal: 0 instead
    assert (np.abs(y[finite] - exact[finite]) <= 4e-7 * exact[finite] + tiny).all()


def test_reductions_over_a_contiguous_axis_keep_lane_partials():
    """SE blocks' global average pool (and sum / max / min over the last axes): the generic schedule
    keeps one partial per SIMD lane (rfactor), then combines the lanes."""
    b = GraphBuilder("pool")
    x = b.input("x", "f32[N,6,5,32]")
    outs = [b.op(name, x, axes=(2, 3)) for name in ("reduce_mean", "reduce_sum", "reduce_max", "reduce_min")]
    graph = b.build(b.concat(*outs, b.op("reduce_mean", x, axes=(-1,)), axis=2))
    _check(graph, (6, 5, 32))


def test_a_block_the_generic_schedule_gives_up_on_is_recorded(monkeypatch):
    """A failing schedule leaves its block naive (still correct) and lands in SCHEDULE_FAILURES, so a
    hidden slow kernel can be found; the reduction block above schedules without failures."""
    from reshift.codegen.tvm import schedule_cpu

    b = GraphBuilder("pool_only")
    graph = b.build(b.op("reduce_mean", b.input("x", "f32[N,6,5,32]"), axes=(2, 3)))
    schedule_cpu.SCHEDULE_FAILURES.clear()
    _check(graph, (6, 5, 32))
    assert not schedule_cpu.SCHEDULE_FAILURES

    def refuse(*_):
        raise ValueError("cannot parallelize")

    monkeypatch.setattr(schedule_cpu, "_schedule_block", refuse)
    _check(graph, (6, 5, 32))
    assert any("ValueError: cannot parallelize" in f for f in schedule_cpu.SCHEDULE_FAILURES)
