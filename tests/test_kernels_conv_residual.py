"""Residual add + ReLU in the fp32 conv kernels' epilogue (kernels/cpu_lowering.py ``_epilogue``).

ResNet's block end, ``relu(conv(x) + identity)``, runs as one kernel: the ocvec direct conv or the
Winograd output transform adds the residual and applies the ReLU in registers, so neither the conv
nor the add output is written. The fused result must equal, bit for bit, the same graph built with
the fusion blocked (the conv's output also a graph output), and match the interpreter. Negative
cases: a residual lowered after the conv (node order), one of another shape (broadcast), and an
add read twice stay separate ops and still give the right numbers.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from reshift.codegen.tvm import build, lower  # noqa: E402
from reshift.ir import GraphBuilder, interpret  # noqa: E402

RNG = np.random.default_rng(11)


def _conv(b, x, cin, cout, rng, kernel=(3, 3), padding=(1, 1, 1, 1)):
    fan_in = cin * kernel[0] * kernel[1]
    w = b.constant((rng.standard_normal((cout, cin, *kernel)) / np.sqrt(fan_in)).astype(np.float32))
    bias = b.constant(rng.standard_normal(cout).astype(np.float32))
    return b.conv2d(x, w, bias, stride=(1, 1), padding=padding, dilation=(1, 1), groups=1)


def _block(hw: int, blocked: bool = False, next_conv: bool = False, relu: bool = True):
    """``relu(conv2(relu(conv1(x))) + x)`` [+ a conv reading it]; ``blocked``: conv2's output is also
    an output, which keeps the add and ReLU separate ops (the reference); the same weights either way."""
    rng = np.random.default_rng(hw)
    b = GraphBuilder("block")
    x = b.input("x", f"f32[N,32,{hw},{hw}]")
    y = _conv(b, b.relu(_conv(b, x, 32, 32, rng)), 32, 32, rng)
    z = b.add(y, x)
    z = b.relu(z) if relu else z
    if next_conv:
        z = _conv(b, z, 32, 32, rng)
    b.output(z, "out")
    if blocked:
        b.output(y, "conv2")
    return b.build()


def _run(graph, x) -> np.ndarray:
    """The first output of the compiled ``graph`` on ``x``."""
    vm = relax.VirtualMachine(build(graph, "cpu").executable, tvm.cpu())
    result = vm["main"](tvm.runtime.tensor(x))
    return result.numpy() if hasattr(result, "numpy") else result[0].numpy()


def _check(graph, reference, hw):
    for n in (1, 2):
        x = RNG.standard_normal((n, 32, hw, hw)).astype(np.float32)
        got, ref = _run(graph, x), _run(reference, x)
        np.testing.assert_array_equal(got, ref)  # the fusion changes no bit
        expected = interpret(graph, {"x": x})["out"]
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize(
    "hw,kernel",
    [(8, "winograd_output"), (7, "conv2d_ocvec_f32")],  # an odd output size is not Winograd's
)
def test_add_and_relu_run_in_the_conv_kernel(hw, kernel):
    graph = _block(hw)
    script = lower(graph).script(show_meta=False)
    assert "R.add(" not in script and "R.nn.relu(" not in script, "the add / ReLU should be fused"
    assert kernel in script
    _check(graph, _block(hw, blocked=True), hw)


def test_the_reference_graph_keeps_them_separate():
    """The negative check behind the bit-exact comparison: a conv output that is also a graph output
    is materialized, and the add then runs as its own op."""
    script = lower(_block(8, blocked=True)).script(show_meta=False)
    assert "R.add(" in script


@pytest.mark.parametrize("hw", [8, 7])
def test_fused_block_writes_the_next_convs_padded_input(hw):
    graph = _block(hw, next_conv=True)
    script = lower(graph).script(show_meta=False)
    assert "R.add(" not in script and "R.nn.relu(" not in script
    _check(graph, _block(hw, blocked=True, next_conv=True), hw)


def test_add_without_relu_is_fused():
    graph = _block(8, relu=False)
    assert "R.add(" not in lower(graph).script(show_meta=False)
    _check(graph, _block(8, blocked=True, relu=False), 8)


def _unfusable(case: str):
    b = GraphBuilder(case)
    x = b.input("x", "f32[N,32,8,8]")
    y = _conv(b, x, 32, 32, RNG)
    if case == "residual_later":  # the residual's producer comes after the conv in node order
        z = b.add(y, b.sigmoid(x))
    elif case == "broadcast":
        z = b.add(y, b.constant(RNG.standard_normal((32, 1, 1)).astype(np.float32)))
    else:  # the add's output read twice: its ReLU is not the only reader
        s = b.add(y, x)
        z = b.add(b.relu(s), s)
    b.output(z, "out")
    return b.build()


@pytest.mark.parametrize("case", ["residual_later", "broadcast", "add_read_twice"])
def test_unfusable_adds_stay_correct(case):
    graph = _unfusable(case)
    script = lower(graph).script(show_meta=False)
    assert script.count("R.add(") == 1  # add_read_twice: the first add fused, its ReLU and the second not
    x = RNG.standard_normal((2, 32, 8, 8)).astype(np.float32)
    got = _run(graph, x)
    expected = interpret(graph, {"x": x})["out"]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
