"""The registry's numpy references against torch on the cases where they are easy to get wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reshift.ir import OPS, get_op
from reshift.ir.numpy_kernels import erf


def run(op: str, *inputs, **attrs):
    opdef = get_op(op)
    return opdef.reference(*inputs, **opdef.normalize_attrs(attrs))


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@pytest.mark.parametrize(
    "stride,padding,dilation,groups",
    [
        ((1, 1), (1, 1, 1, 1), (1, 1), 1),
        ((2, 2), (0, 1, 2, 1), (1, 1), 2),
        ((1, 2), (2, 2, 2, 2), (2, 2), 4),
        ((3, 3), (0, 0, 0, 0), (1, 1), 8),
    ],
)
def test_conv2d_matches_torch(rng, stride, padding, dilation, groups):
    x = rng.standard_normal((2, 8, 11, 9)).astype(np.float32)
    w = rng.standard_normal((16, 8 // groups, 3, 3)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    top, left, bottom, right = padding
    expected = F.conv2d(F.pad(t(x), (left, right, top, bottom)), t(w), t(b), stride, 0, dilation, groups).numpy()
    got = run("conv2d", x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("count_include_pad", [False, True])
def test_avg_pool_matches_torch(rng, ceil_mode, count_include_pad):
    x = rng.standard_normal((1, 3, 10, 7)).astype(np.float32)
    expected = F.avg_pool2d(t(x), 3, 2, 1, ceil_mode=ceil_mode, count_include_pad=count_include_pad).numpy()
    got = run(
        "avg_pool2d",
        x,
        kernel=(3, 3),
        stride=(2, 2),
        padding=(1, 1, 1, 1),
        ceil_mode=ceil_mode,
        count_include_pad=count_include_pad,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_matches_torch(rng, ceil_mode):
    x = rng.standard_normal((2, 3, 11, 8)).astype(np.float32)
    expected = F.max_pool2d(t(x), 3, 2, 1, ceil_mode=ceil_mode).numpy()
    got = run("max_pool2d", x, kernel=(3, 3), stride=(2, 2), padding=(1, 1, 1, 1), ceil_mode=ceil_mode)
    np.testing.assert_array_equal(got, expected)


def test_erf_and_gelu_accuracy():
    x = np.concatenate([np.linspace(-6, 6, 2001), [0.0, 1e-8, -1e-8, 1e-4, 0.4999, 0.5001]]).astype(np.float32)
    np.testing.assert_allclose(erf(x), torch.erf(t(x)).numpy(), rtol=2e-6, atol=2e-7)
    np.testing.assert_allclose(run("gelu", x), F.gelu(t(x)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        run("gelu", x, approximate="tanh"), F.gelu(t(x), approximate="tanh").numpy(), rtol=1e-5, atol=1e-6
    )


def test_layer_norm_and_softmax(rng):
    x = rng.standard_normal((2, 5, 8)).astype(np.float32) * 3 + 1
    w, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    expected = F.layer_norm(t(x), (8,), t(w), t(b), 1e-6).numpy()
    np.testing.assert_allclose(run("layer_norm", x, w, b, eps=1e-6), expected, rtol=1e-5, atol=1e-5)
    big = np.array([[1000.0, 1001.0, -np.inf]], np.float32)
    np.testing.assert_allclose(run("softmax", big, axis=-1), torch.softmax(t(big), -1).numpy(), rtol=1e-6)


def test_batch_norm_matches_torch(rng):
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    scale, bias, mean = (rng.standard_normal(4).astype(np.float32) for _ in range(3))
    var = rng.random(4).astype(np.float32) + 0.1
    expected = F.batch_norm(t(x), t(mean), t(var), t(scale), t(bias), False, 0.0, 1e-3).numpy()
    np.testing.assert_allclose(run("batch_norm", x, scale, bias, mean, var, eps=1e-3), expected, rtol=1e-5, atol=1e-5)


def test_slice_gather_split_pad(rng):
    x = rng.standard_normal((4, 6, 5)).astype(np.float32)
    got = run("slice", x, starts=(1, -1), ends=(100, -6), axes=(1, 2), steps=(2, -2))
    np.testing.assert_array_equal(got, x[:, 1:100:2, -1:-6:-2])
    idx = np.array([[0, 3], [-1, 2]], np.int64)
    np.testing.assert_array_equal(run("gather", x, idx, axis=1), np.take(x, idx, axis=1))
    with pytest.raises(IndexError):
        run("gather", x, np.array([6]), axis=1)
    a, b = run("split", x, axis=1, sizes=(2, 4))
    assert a.shape == (4, 2, 5) and b.shape == (4, 4, 5)
    padded = run("pad", x, pads=(0, 1, 0, 0, 2, 1), value=-1.0)
    np.testing.assert_array_equal(padded, F.pad(t(x), (0, 1, 1, 2, 0, 0), value=-1.0).numpy())


def test_integer_division_truncates_like_torch():
    a, b = np.array([7, -7, 9], np.int64), np.array([2, 2, -4], np.int64)
    np.testing.assert_array_equal(run("div", a, b), torch.div(t(a), t(b), rounding_mode="trunc").numpy())


def test_every_op_has_docs_and_reference():
    for name, opdef in OPS.items():
        assert opdef.doc, name
        assert callable(opdef.reference) and callable(opdef.infer), name
