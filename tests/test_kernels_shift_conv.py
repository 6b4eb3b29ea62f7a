"""The shift_conv2d lowering (codegen/tvm/kernels/shift_conv.py) against the registry's numpy reference.

Odd shapes on purpose: C not a multiple of 16, O = 1 and 17, 1x1/3x3/5x5 windows, stride and dilation
2, asymmetric padding, groups 2 and depthwise, batch 1 and 3 through one symbolic-batch build, NaN
and inf pixels. The integer path is bit-exact; only the float rescale may round differently (1e-6).
Then a small conv net through the ``shift`` pipeline, compiled, against the interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from reshift import ir, passes  # noqa: E402
from reshift.codegen.tvm import LOWERINGS, build, lower  # noqa: E402
from reshift.codegen.tvm.kernels import shift_conv  # noqa: E402

RNG = np.random.default_rng(11)

# (C, O, kernel, groups, stride, padding (top, left, bottom, right), dilation, bias)
CASES = {
    "c5_o17_3x3": (5, 17, 3, 1, (1, 1), (1, 1, 1, 1), (1, 1), True),
    "c3_o1_1x1_s2": (3, 1, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), False),
    "c6_o4_5x5_g2_s2_d2_asym": (6, 4, 5, 2, (2, 2), (2, 1, 0, 3), (2, 2), True),
    "depthwise_c4_3x3_d2_asym": (4, 4, 3, 4, (1, 2), (0, 1, 1, 0), (2, 1), True),
}


def shift_conv_graph(c, o, k, groups, stride, padding, dilation, bias, hw=(11, 10), bits=4):
    b = ir.GraphBuilder("shift_conv")
    x = b.input("x", f"f32[N,{c},{hw[0]},{hw[1]}]")
    shape = (o, c // groups, k, k)
    y = b.shift_conv2d(
        x,
        b.constant(RNG.integers(-1, 2, shape).astype(np.int8)),
        b.constant(RNG.integers(0, 2**bits, shape).astype(np.uint8)),
        b.constant((RNG.random(o) + 0.1).astype(np.float32)),
        b.constant(RNG.standard_normal(o).astype(np.float32)) if bias else None,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        exponent_bits=bits,
    )
    return b.build(y)


def run(executable, x: np.ndarray) -> np.ndarray:
    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def assert_matches(actual: np.ndarray, expected: np.ndarray) -> None:
    """Same shape and NaN positions; elsewhere within 1e-6 of the largest output (exact in practice)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    finite = ~np.isnan(expected)
    scale = max(float(np.abs(expected[finite]).max(initial=0.0)), 1e-30)
    assert np.abs(actual[finite].astype(np.float64) - expected[finite]).max(initial=0.0) <= 1e-6 * scale


def test_lowering_is_registered_by_the_kernel_module():
    assert LOWERINGS["shift_conv2d"] is shift_conv.lower_shift_conv2d


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference(case):
    graph = shift_conv_graph(*CASES[case])
    executable = build(graph, "cpu").executable
    for batch in (1, 3):
        x = (RNG.standard_normal((batch, *graph.inputs[0].shape[1:])) * 2).astype(np.float32)
        if batch == 3:  # NaN and inf pixels: NaN outputs wherever their window (and group) reaches
            x[1, 0, 4:6, 4:6] = np.nan  # a 2x2 block: every stride/dilation pattern reads some of it
            x[2, -1, 0, 9] = np.inf
            x[2, 0, 10, 0] = -np.inf
        expected = ir.interpret(graph, {"x": x})[graph.outputs[0].name]
        actual = run(executable, x)
        assert_matches(actual, expected)
        if batch == 3:
            assert np.isnan(actual[1]).any() and np.isfinite(actual[0]).all()


def test_lowering_is_multiplication_free():
    """The filter is never decoded to a float conv: im2col, then the shift-add GEMV."""
    script = lower(shift_conv_graph(*CASES["c6_o4_5x5_g2_s2_d2_asym"])).script(show_meta=False)
    assert "shift_conv2d_patch_codes" in script and "shift_linear_gemv" in script
    assert "R.nn.conv2d" not in script and "R.matmul" not in script


def test_cuda_build_compiles():
    """No GPU here: the CUDA build must still compile, every kernel bound to threads (build.py checks)."""
    executable = build(shift_conv_graph(*CASES["c6_o4_5x5_g2_s2_d2_asym"]), "cuda-sm90").executable
    device = [m for m in executable.mod.imports[0].imports if m.kind == "cuda"]
    source = device[0].inspect_source()
    assert "shift_conv2d_im2col" in source and "shift_linear_gemv_cuda" in source


def small_conv_net():
    """conv-bn-relu, grouped strided conv, depthwise conv, 1x1 conv, pooling, classifier."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=(1, 2), dilation=(1, 2), groups=12),
        nn.ReLU(),
        nn.Conv2d(12, 17, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(17, 10),
    ).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net, torch.randn(1, 3, 12, 12)


def test_conv_net_through_shift_pipeline_compiles_and_matches_interpreter():
    from reshift import frontend

    net, example = small_conv_net()
    graph = frontend.from_torch(net, (example,))
    name = graph.inputs[0].name
    calib = [{name: RNG.standard_normal((4, 3, 12, 12)).astype(np.float32)}]
    inputs = {name: RNG.standard_normal((2, 3, 12, 12)).astype(np.float32)}
    g2, report = passes.run(graph, "exact+shift", calibration=calib, inputs=inputs, shift_depthwise=True)
    ops = g2.op_histogram()
    assert ops["shift_conv2d"] == 3 and ops["conv2d"] == 1 and ops["linear"] == 1  # first and last stay float
    assert report.max_error < 0.2
    executable = build(g2, "cpu").executable
    x = inputs[name]
    expected = ir.interpret(g2, inputs)[g2.outputs[0].name]
    actual = run(executable, x)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
