"""ir/ops_nn.py: conv3d and conv_transpose2d/3d references against torch, type inference, torch frontend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reshift import ir
from reshift.errors import IRTypeError
from reshift.ir.ops_nn import conv3d, conv_transpose


@pytest.mark.parametrize(
    "stride, padding, dilation, groups",
    [((1, 1, 1), (0,) * 6, (1, 1, 1), 1), ((2, 1, 3), (1, 0, 2, 0, 1, 1), (1, 2, 1), 2)],
)
def test_conv3d_matches_torch(rng, stride, padding, dilation, groups):
    x = rng.standard_normal((2, 4, 6, 7, 8)).astype(np.float32)
    w = rng.standard_normal((6, 4 // groups, 2, 3, 2)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    front, top, left, back, bottom, right = padding
    xp = F.pad(torch.from_numpy(x), (left, right, top, bottom, front, back))
    want = F.conv3d(xp, torch.from_numpy(w), torch.from_numpy(b), stride=stride, dilation=dilation, groups=groups)
    got = conv3d(x, w, b, stride, padding, dilation, groups)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "stride, padding, output_padding, dilation, groups",
    [
        ((1, 1), (0, 0, 0, 0), (0, 0), (1, 1), 1),
        ((2, 3), (1, 2, 1, 2), (1, 2), (1, 2), 2),
        ((3, 2), (0, 0, 0, 0), (2, 1), (1, 1), 4),
    ],
)
def test_conv_transpose2d_matches_torch(rng, stride, padding, output_padding, dilation, groups):
    x = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    b = rng.standard_normal(3 * groups).astype(np.float32)
    want = F.conv_transpose2d(
        torch.from_numpy(x),
        torch.from_numpy(w),
        torch.from_numpy(b),
        stride=stride,
        padding=padding[:2],  # torch pads symmetrically: these cases are symmetric
        output_padding=output_padding,
        dilation=dilation,
        groups=groups,
    )
    got = conv_transpose(x, w, b, stride, padding, output_padding, dilation, groups)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_conv_transpose3d_matches_torch(rng):
    x = rng.standard_normal((2, 4, 3, 4, 5)).astype(np.float32)
    w = rng.standard_normal((4, 2, 2, 3, 2)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    attrs = {"stride": (2, 1, 2), "output_padding": (1, 0, 1), "dilation": (1, 2, 1), "groups": 2}
    want = F.conv_transpose3d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), padding=(1, 0, 1), **attrs)
    got = conv_transpose(x, w, b, padding=(1, 0, 1, 1, 0, 1), **attrs)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_conv_transpose2d_asymmetric_padding_crops_the_full_output(rng):
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    w = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    full = conv_transpose(x, w, None, (2, 2), (0, 0, 0, 0), (0, 0), (1, 1), 1)
    cropped = conv_transpose(x, w, None, (2, 2), (1, 0, 2, 3), (0, 0), (1, 1), 1)
    np.testing.assert_array_equal(cropped, full[:, :, 1:-2, 0:-3])


def test_inferred_shapes_and_refusals():
    b = ir.GraphBuilder("g")
    x = b.input("x", "f32[N,4,5,6]")
    y = b.conv_transpose2d(
        x,
        b.constant(np.zeros((4, 3, 3, 3), np.float32)),
        None,
        stride=(2, 2),
        padding=(1, 1, 1, 1),
        output_padding=(1, 0),
    )
    assert str(y.type) == "f32[N,3,10,11]"
    v = b.input("v", "f32[N,4,5,6,7]")
    z = b.conv3d(v, b.constant(np.zeros((8, 2, 3, 3, 3), np.float32)), None, stride=(1, 2, 2), groups=2)
    assert str(z.type) == "f32[N,8,3,2,3]"
    with pytest.raises(IRTypeError, match="output_padding .* below its stride or dilation"):
        b.conv_transpose2d(x, b.constant(np.zeros((4, 3, 3, 3), np.float32)), None, output_padding=(1, 0))
    with pytest.raises(IRTypeError, match="disagree with groups=3"):
        b.conv3d(v, b.constant(np.zeros((6, 2, 1, 1, 1), np.float32)), None, groups=3)
    with pytest.raises(IRTypeError, match="dtypes differ"):
        b.conv3d(v, b.constant(np.zeros((6, 4, 1, 1, 1), np.float16)), None)


@pytest.mark.parametrize(
    "module, shape",
    [
        (
            torch.nn.Conv3d(4, 6, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1), groups=2),
            (2, 4, 5, 6, 7),
        ),
        (torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 4, 5, 6)),
        (
            torch.nn.ConvTranspose3d(4, 2, (2, 3, 2), stride=(2, 1, 2), padding=(1, 0, 1), output_padding=(1, 0, 0)),
            (2, 4, 3, 4, 5),
        ),
        (torch.nn.ConvTranspose1d(3, 2, 4, stride=3, padding=1, output_padding=2, dilation=1), (2, 3, 7)),
    ],
    ids=["conv3d", "conv_transpose2d", "conv_transpose3d", "conv_transpose1d"],
)
def test_torch_convolutions_convert(module, shape):
    from reshift.frontend import from_torch

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    graph = from_torch(module.eval(), (x,))
    want = module(x).detach().numpy()
    got = ir.interpret(graph, {graph.inputs[0].name: x.numpy()})[graph.outputs[0].name]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
