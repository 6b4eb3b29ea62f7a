"""The polynomial exp / erf of codegen/tvm/kernels/fast_math.py against numpy, edges included."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import te  # noqa: E402

from reshift.codegen.tvm.kernels.fast_math import erf_f32, exp_f32, silu_f32, tanh_f32  # noqa: E402

EDGES = [0.0, -0.0, 1e-30, -1e-30, np.inf, -np.inf, np.nan, 4.0, -4.0, 88.3, -87.0, -100.0, 100.0]


def _run(fn, x: np.ndarray, lanes: int = 1) -> np.ndarray:
    """``fn`` applied elementwise, as scalars or as ``lanes``-wide vectors (the softmax kernel's use)."""
    n = x.size
    X = te.placeholder((n,), "float32")
    Y = te.compute((n,), lambda i: fn(X[i]))
    sch = tvm.s_tir.Schedule(te.create_prim_func([X, Y]))
    if lanes > 1:
        (loop,) = sch.get_loops(sch.get_sblock("compute"))
        sch.vectorize(sch.split(loop, [None, lanes])[1])
    lib = tvm.compile(sch.mod, {"kind": "llvm"})
    y = tvm.runtime.tensor(np.zeros(n, np.float32))
    lib["main"](tvm.runtime.tensor(x), y)
    return y.numpy()


@pytest.mark.parametrize("lanes", [1, 16])
def test_exp_within_an_ulp_or_two(lanes):
    x = np.linspace(-87.0, 88.3, 4096 * 4, dtype=np.float32)
    y = _run(exp_f32, x, lanes)
    expected = np.exp(x.astype(np.float64))
    assert np.max(np.abs(y - expected) / expected) < 3e-7


def test_exp_edges():
    x = np.array(EDGES, np.float32)
    y = _run(exp_f32, x)
    assert y[0] == 1 and y[1] == 1 and y[4] == np.inf and y[5] == 0 and np.isnan(y[6])
    assert y[11] == 0 and y[12] == np.inf  # below the smallest normal result: 0; above the largest: inf


@pytest.mark.parametrize("lanes", [1, 16])
def test_erf_within_5e7(lanes):
    x = np.linspace(-6.0, 6.0, 4096 * 4, dtype=np.float32)
    y = _run(erf_f32, x, lanes)
    expected = np.array([math.erf(v) for v in x.astype(np.float64)])
    assert np.max(np.abs(y - expected)) < 5e-7  # float32 erf near 1 is 6e-8 per ulp: a few ulp


def test_erf_edges():
    x = np.array(EDGES, np.float32)
    y = _run(erf_f32, x)
    assert y[0] == 0 and y[4] == 1 and y[5] == -1 and np.isnan(y[6])
    assert y[7] == pytest.approx(math.erf(4.0), abs=1e-7) and y[8] == pytest.approx(-math.erf(4.0), abs=1e-7)


@pytest.mark.parametrize("lanes", [1, 16])
def test_tanh_within_a_few_ulp(lanes):
    """Relative error near 0 too (the polynomial branch), and both branches around |x| = 0.625."""
    x = np.concatenate([np.linspace(-12.0, 12.0, 4096 * 4), np.geomspace(1e-8, 0.7, 512)]).astype(np.float32)
    y = _run(tanh_f32, x, lanes)
    expected = np.tanh(x.astype(np.float64))
    assert np.max(np.abs(y - expected) / np.maximum(np.abs(expected), 1e-30)) < 5e-7


def test_tanh_edges():
    x = np.array(EDGES, np.float32)
    y = _run(tanh_f32, x)
    assert y[0] == 0 and y[2] == np.float32(1e-30) and y[4] == 1 and y[5] == -1 and np.isnan(y[6])
    assert y[12] == 1 and y[11] == -1


@pytest.mark.parametrize("lanes", [1, 16])
def test_silu_matches_x_sigmoid_x(lanes):
    x = np.linspace(-40.0, 40.0, 4096, dtype=np.float32)
    y = _run(silu_f32, x, lanes)
    expected = x.astype(np.float64) / (1 + np.exp(-x.astype(np.float64)))
    assert np.max(np.abs(y - expected) / np.maximum(np.abs(expected), 1e-30)) < 1e-6
    edges = _run(silu_f32, np.array([-np.inf, np.inf, np.nan, -100.0], np.float32))
    assert np.isnan(edges[0]) or edges[0] == 0  # -inf * 0: numpy's x*sigmoid(x) is nan too
    assert edges[1] == np.inf and np.isnan(edges[2]) and edges[3] == 0
