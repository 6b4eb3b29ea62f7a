"""ATen converters of frontend/aten_nn_ops.py (and SELU through aten.elu) against torch eager."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from reshift.frontend import from_torch
from reshift.ir import interpret


class Sign(torch.nn.Module):
    def forward(self, x):
        return torch.sign(x)


MODULES = {
    "selu": (torch.nn.SELU(), (2, 3, 8)),
    "instance_norm": (torch.nn.InstanceNorm2d(3, affine=True), (2, 3, 4, 5)),
    "batch_norm_batch_stats": (torch.nn.BatchNorm1d(4, track_running_stats=False), (2, 4, 6)),
    "max_pool3d": (
        torch.nn.MaxPool3d((2, 3, 2), stride=(2, 1, 2), padding=1, dilation=(1, 1, 2), ceil_mode=True),
        (2, 3, 5, 6, 7),
    ),
    "avg_pool3d": (
        torch.nn.AvgPool3d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
        (2, 3, 6, 5, 6),
    ),
    "local_response_norm": (torch.nn.LocalResponseNorm(3, alpha=1e-2), (2, 6, 4, 5)),
    "sign": (Sign(), (2, 3, 4)),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_matches_eager(name):
    module, shape = MODULES[name]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    if name == "sign":
        x.view(-1)[:2] = torch.tensor([0.0, float("nan")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = from_torch(module.eval(), (x,))
    for batch in (2, 3):  # the batch stays symbolic
        xb = torch.cat([x] * 2)[:batch] if batch != 2 else x
        got = interpret(graph, {graph.inputs[0].name: xb.numpy()})[graph.outputs[0].name]
        want = module(xb).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pool3d_and_instance_norm_build_for_cpu():
    import reshift

    model = torch.nn.Sequential(
        torch.nn.InstanceNorm3d(2), torch.nn.MaxPool3d(2, ceil_mode=True), torch.nn.AvgPool3d(2)
    )
    x = torch.randn(2, 2, 5, 6, 7, generator=torch.Generator().manual_seed(1))
    compiled = reshift.compile(model.eval(), (x,), target="cpu")
    np.testing.assert_allclose(compiled(x.numpy()), model(x).numpy(), rtol=1e-5, atol=1e-6)
