"""Winograd F(2x2, 3x3) convs (kernels/conv2d_winograd_cpu.py) against the interpreter.

A chain of three 3x3 stride-1 convs runs through Winograd, each writing the next one's zero padded
input with its ReLU applied (asymmetric padding on the last), batch 1 and 3 through one
symbolic-batch build, within 1e-5 relative. Negative cases: every conv Winograd does not apply to
(stride, dilation, other kernel sizes, an odd output size, channels not in whole vectors) runs the
direct kernels, and ``RESHIFT_CONV=ocvec`` forces them.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from reshift.codegen.tvm import build, lower  # noqa: E402
from reshift.codegen.tvm.kernels import conv2d_winograd_cpu as winograd  # noqa: E402
from reshift.ir import GraphBuilder, interpret  # noqa: E402

RNG = np.random.default_rng(5)


def _conv(b, x, cin, cout, kernel=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1)):
    fan_in = cin * kernel[0] * kernel[1]
    w = b.constant((RNG.standard_normal((cout, cin, *kernel)) / np.sqrt(fan_in)).astype(np.float32))
    bias = b.constant(RNG.standard_normal(cout).astype(np.float32))
    return b.conv2d(x, w, bias, stride=stride, padding=padding, dilation=dilation, groups=1)


def _check(graph, shape, batches=(1, 3)):
    vm = relax.VirtualMachine(build(graph, "cpu").executable, tvm.cpu())
    for n in batches:
        x = RNG.standard_normal((n, *shape)).astype(np.float32)
        expected = interpret(graph, {"x": x})[graph.outputs[0].name]
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        error = np.abs(got.astype(np.float64) - expected).max() / np.abs(expected).max()
        assert error <= 1e-5, f"batch {n}: relative error {error:.3g}"


def test_winograd_chain_matches_interpreter():
    b = GraphBuilder("winograd_chain")
    x = b.input("x", "f32[N,16,12,12]")
    y = b.relu(_conv(b, x, 16, 32))
    y = b.relu(_conv(b, y, 32, 48))
    graph = b.build(_conv(b, y, 48, 16, padding=(2, 0, 0, 2)))
    script = lower(graph).script(show_meta=False)
    assert script.count("call_tir(cls.winograd_input") == 3
    assert len(re.findall(r"call_tir\(cls\.conv_pad_rows\d*,", script)) == 1  # only the graph input
    assert "conv2d_ocvec_f32" not in script
    _check(graph, (16, 12, 12))


@pytest.mark.parametrize(
    "case",
    [
        dict(cin=16, cout=32, stride=(2, 2)),
        dict(cin=16, cout=32, dilation=(2, 2), padding=(2, 2, 2, 2)),
        dict(cin=16, cout=32, kernel=(5, 5), padding=(2, 2, 2, 2)),
        dict(cin=16, cout=32, kernel=(1, 1), padding=(0, 0, 0, 0)),
        dict(cin=24, cout=32),
        dict(cin=16, cout=40),
        dict(cin=16, cout=32, padding=(1, 1, 0, 0)),  # 11x11 output: odd
    ],
    ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()),
)
def test_winograd_refuses_what_it_cannot_compute(case):
    cin, cout = case.pop("cin"), case.pop("cout")
    b = GraphBuilder("direct")
    x = b.input("x", f"f32[N,{cin},12,12]")
    graph = b.build(_conv(b, x, cin, cout, **case))
    assert "winograd_input" not in lower(graph).script(show_meta=False)
    _check(graph, (cin, 12, 12), batches=(2,))


def test_forcing_the_direct_kernel(monkeypatch):
    monkeypatch.setenv("RESHIFT_CONV", "ocvec")
    b = GraphBuilder("forced")
    x = b.input("x", "f32[N,16,12,12]")
    graph = b.build(_conv(b, x, 16, 32))
    script = lower(graph).script(show_meta=False)
    assert "winograd_input" not in script and "conv2d_ocvec_f32" in script


def test_transformed_filter_of_a_centre_tap():
    """``G g G^T`` of a filter that is 1 at the centre: the outer product of G's middle column."""
    w = np.zeros((16, 16, 3, 3), np.float32)
    w[0, 0, 1, 1] = 1
    u = winograd.transformed_filters(w)  # [16, 1, 16, 16]: tile position, panel, input channel, output lane
    expected = np.outer(winograd.G[:, 1], winograd.G[:, 1]).reshape(16)
    np.testing.assert_allclose(u[:, 0, 0, 0], expected)
    assert np.count_nonzero(u[:, 0, 1:, :]) == 0 and np.count_nonzero(u[:, 0, 0, 1:]) == 0
