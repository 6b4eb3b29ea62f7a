"""ATen indexing on run-time index tensors (gather_nd / scatter_nd) and bicubic upsampling
(frontend/aten_index_ops.py) against torch eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reshift
from reshift.frontend import from_torch
from reshift.ir import interpret

from .helpers import relative_error


class Indexing(torch.nn.Module):
    """Every indexing form the converters map, on run-time data and index tensors."""

    def forward(self, x, rows, cols, v, index):
        picked = x[rows, cols]  # [3, 6]: two run-time index tensors
        inner = x[:, cols[:2], rows[:2]]  # a full slice before the index block
        put = x.clone()
        put[rows, cols] = v  # index_put
        added = x.index_put((rows,), v.unsqueeze(1).expand(3, 5, 6), accumulate=True)
        columns = x.clone()
        columns[:, rows] = 2.0  # index_put after a full slice, a broadcast scalar
        scattered = torch.scatter(x, 1, index, v.reshape(3, 1, 6).expand(3, 3, 6))
        filled = x.scatter(1, index, -1.0)
        summed = torch.scatter_add(x, 1, index, v.reshape(3, 1, 6).expand(3, 3, 6))
        biggest = x.scatter_reduce(1, index, v.reshape(3, 1, 6).expand(3, 3, 6), reduce="amax")
        gathered = torch.gather(x, 1, index)
        return picked, inner, put, added, columns, scattered, filled, summed, biggest, gathered


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, generator=g)
    rows, cols = torch.tensor([3, -4, 1]), torch.tensor([0, 4, -1])  # distinct pairs: index_put has no order
    index = torch.randint(0, 5, (3, 3, 4), generator=g)  # scatter's index: smaller than x on dims 0 and 2
    return x, rows, cols, torch.randn(3, 6, generator=g), index


def test_run_time_indexing_matches_torch():
    """Through the interpreter; the lowerings of these ops are built in test_codegen_tvm.py (graph_index)."""
    module, inputs = Indexing(), _inputs()
    graph = from_torch(module, inputs, dynamic_batch=False)  # the index tensors' dim 0 is no batch
    assert {"gather_nd", "scatter_nd", "gather_elements"} <= set(graph.op_histogram())
    with torch.no_grad():
        expected = [t.numpy() for t in module(*inputs)]
    feeds = {v.name: t.numpy() for v, t in zip(graph.inputs, inputs, strict=True)}
    ours = list(interpret(graph, feeds).values())
    for k, (want, got) in enumerate(zip(expected, ours, strict=True)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"output {k}")


class Bicubic(torch.nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options, self.mode = options, "bicubic"

    def forward(self, x):
        return F.interpolate(x, mode=self.mode, **self.options)


# the reference itself is checked against torch on more sizes in test_ops_index.py; these check the converter
BICUBIC = {
    "size_align_corners": dict(size=(9, 4), align_corners=True),
    "factor_2_half_pixel": dict(scale_factor=2.0, align_corners=False),
    "factor_1_3_half_pixel": dict(scale_factor=1.3, align_corners=False),  # sampled at 1 / 1.3, not 5 / 6
}


@pytest.mark.parametrize("case", sorted(BICUBIC))
def test_bicubic_matches_torch(case):
    module, x = Bicubic(**BICUBIC[case]), torch.randn(2, 3, 5, 7)
    graph = from_torch(module, (x,))
    assert graph.op_histogram() == {"resize2d": 1}
    got = interpret(graph, {graph.inputs[0].name: x.numpy()})[graph.outputs[0].name]
    with torch.no_grad():
        want = module(x).numpy()
    assert got.shape == want.shape and relative_error(got, want) < 1e-5


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_antialiased_interpolation_matches_torch(mode):
    module, x = Bicubic(size=(4, 9), antialias=True), torch.randn(1, 2, 11, 13)  # rows down, columns up
    module.mode = mode
    graph = from_torch(module, (x,))
    got = interpret(graph, {graph.inputs[0].name: x.numpy()})[graph.outputs[0].name]
    with torch.no_grad():
        assert relative_error(got, module(x).numpy()) < 1e-5


def test_bilinear_by_a_fractional_factor_samples_where_torch_does():
    module, x = torch.nn.Upsample(scale_factor=(1.3, 0.6), mode="bilinear"), torch.randn(1, 2, 5, 7)
    graph = from_torch(module, (x,))
    got = interpret(graph, {graph.inputs[0].name: x.numpy()})[graph.outputs[0].name]
    with torch.no_grad():
        assert relative_error(got, module(x).numpy()) < 1e-5


class MaskedPut(torch.nn.Module):
    def forward(self, x):
        y = x.clone()
        y[x > 0] = 0.0
        return y


def test_boolean_mask_index_put_is_refused():
    with pytest.raises(reshift.errors.ReshiftError, match="boolean mask"):
        from_torch(MaskedPut(), (torch.randn(2, 3),))
