"""cumsum, gather_elements, gather_nd, scatter_nd, resize2d (ir/ops_index.py) and the SDPA converter
against torch.

The numpy references are checked against the torch functions the aten converters map to them
(``torch.cumsum``, ``torch.gather``, advanced indexing, ``index_put``, ``F.interpolate(mode="bilinear"
/ "bicubic")``,
``F.scaled_dot_product_attention``); TVM agreement with the references is test_codegen_tvm.py's
``graph_index``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reshift
from reshift.errors import IRTypeError
from reshift.ir import GraphBuilder, get_op

from .helpers import relative_error

RNG = np.random.default_rng(0)


def reference(op: str, *inputs, **attrs):
    opdef = get_op(op)
    return opdef.reference(*inputs, **opdef.normalize_attrs(attrs))


def test_cumsum_matches_torch_and_onnx_modes():
    x = RNG.integers(-5, 5, (3, 6)).astype(np.int64)
    np.testing.assert_array_equal(reference("cumsum", x, axis=1), torch.cumsum(torch.from_numpy(x), 1).numpy())
    # ONNX CumSum's example: x = [1, 2, 3], exclusive -> [0, 1, 3], reverse -> [6, 5, 3], both -> [5, 3, 0]
    row = np.array([1.0, 2.0, 3.0], np.float32)
    np.testing.assert_array_equal(reference("cumsum", row, axis=0, exclusive=True), [0, 1, 3])
    np.testing.assert_array_equal(reference("cumsum", row, axis=0, reverse=True), [6, 5, 3])
    np.testing.assert_array_equal(reference("cumsum", row, axis=0, exclusive=True, reverse=True), [5, 3, 0])


def test_gather_elements_matches_torch_gather():
    x = RNG.standard_normal((3, 5, 4)).astype(np.float32)
    index = RNG.integers(0, 5, (3, 2, 4))
    expected = torch.gather(torch.from_numpy(x), 1, torch.from_numpy(index)).numpy()
    np.testing.assert_array_equal(reference("gather_elements", x, index, axis=1), expected)
    np.testing.assert_array_equal(reference("gather_elements", x, index - 5, axis=1), expected)  # negatives wrap
    with pytest.raises(IndexError, match="out of range"):
        reference("gather_elements", x, index + 5, axis=1)


@pytest.mark.parametrize("size", [(8, 12), (3, 5), (1, 1), (7, 4)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_resize2d_matches_torch_bilinear(size, align_corners):
    x = RNG.standard_normal((2, 3, 4, 6)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=align_corners).numpy()
    mode = "align_corners" if align_corners else "half_pixel"
    actual = reference("resize2d", x, size=size, coordinate_transformation=mode)
    assert actual.shape == expected.shape and relative_error(actual, expected) < 1e-6


def test_gather_nd_matches_torch_indexing():
    x = RNG.standard_normal((3, 4, 5, 2)).astype(np.float32)
    index = np.stack([RNG.integers(-3, 3, 6), RNG.integers(-4, 4, 6)], axis=1)
    expected = torch.from_numpy(x)[torch.from_numpy(index[:, 0]), torch.from_numpy(index[:, 1])].numpy()
    np.testing.assert_array_equal(reference("gather_nd", x, index), expected)
    per_batch = RNG.integers(-4, 4, (3, 7, 1))  # batch_dims=1: row b of x indexed by row b of index
    expected = np.stack([x[b][per_batch[b, :, 0]] for b in range(3)])
    np.testing.assert_array_equal(reference("gather_nd", x, per_batch, batch_dims=1), expected)
    with pytest.raises(IndexError, match=r"index 5 at position \[0, 1\] is out of range \[-5, 5\) for axis 2"):
        reference("gather_nd", x, np.array([[0, 5]]), batch_dims=1)


def test_scatter_nd_matches_torch_index_put():
    data = RNG.standard_normal((5, 3)).astype(np.float32)
    rows = np.array([[4], [-5], [2]])
    updates = RNG.standard_normal((3, 3)).astype(np.float32)
    put = torch.from_numpy(data).index_put((torch.from_numpy(rows[:, 0]),), torch.from_numpy(updates))
    np.testing.assert_array_equal(reference("scatter_nd", data, rows, updates), put.numpy())
    repeated = np.array([[1], [1], [-4]])  # row 1 three times: add sums, none keeps the last
    added = torch.from_numpy(data).index_put((torch.from_numpy(repeated[:, 0]),), torch.from_numpy(updates), True)
    np.testing.assert_allclose(reference("scatter_nd", data, repeated, updates, reduction="add"), added.numpy())
    np.testing.assert_array_equal(reference("scatter_nd", data, repeated, updates)[1], updates[2])
    product = reference("scatter_nd", data, repeated, updates, reduction="mul")[1]
    np.testing.assert_allclose(product, data[1] * updates[0] * updates[1] * updates[2], rtol=1e-6)
    with pytest.raises(IndexError, match="index -6 .* out of range"):
        reference("scatter_nd", data, np.array([[-6]]), updates[:1])


def test_scatter_and_gather_nd_types_are_checked():
    b = GraphBuilder("g")
    x, index = b.input("x", "f32[N,4]"), b.input("i", "i64[3,2]")
    with pytest.raises(IRTypeError, match=r"updates must be float32\[3\]"):
        b.scatter_nd(x, index, b.input("u", "f32[3,4]"))
    with pytest.raises(IRTypeError, match="reduction 'mean'"):
        b.scatter_nd(x, index, b.input("v", "f32[3]"), reduction="mean")
    with pytest.raises(IRTypeError, match="M = 3"):
        b.gather_nd(x, b.input("j", "i64[2,3]"))
    with pytest.raises(IRTypeError, match="indices must be an int32/int64"):
        b.gather_nd(x, b.input("f", "f32[2,1]"))


@pytest.mark.parametrize("size", [(9, 13), (3, 2), (1, 1), (5, 7)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_resize2d_cubic_matches_torch_bicubic(size, align_corners):
    x = RNG.standard_normal((2, 3, 5, 7)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x), size=size, mode="bicubic", align_corners=align_corners).numpy()
    mode = "align_corners" if align_corners else "half_pixel"
    actual = reference("resize2d", x, size=size, mode="cubic", coordinate_transformation=mode)
    assert actual.shape == expected.shape and relative_error(actual, expected) < 1e-5


def test_resize2d_refuses_an_unsupported_mode():
    builder = GraphBuilder("g")
    x = builder.input("x", "f32[N,1,4,4]")
    with pytest.raises(IRTypeError, match="mode 'lanczos' is not supported"):
        builder.resize2d(x, size=(8, 8), mode="lanczos")
    with pytest.raises(IRTypeError, match="tf_half_pixel_for_nn"):
        builder.resize2d(x, size=(8, 8), coordinate_transformation="tf_half_pixel_for_nn")


class _Attention(torch.nn.Module):
    """``F.scaled_dot_product_attention`` with the mask and flags of one test case."""

    def __init__(self, mask: torch.Tensor | None = None, **flags):
        super().__init__()
        self.mask, self.flags = mask, flags

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, **self.flags)


def _bool_mask_with_an_empty_row() -> torch.Tensor:
    mask = torch.from_numpy(RNG.random((1, 1, 5, 7)) < 0.6)
    mask[..., 2, :] = False  # torch gives zeros for a query that may attend to nothing
    return mask


@pytest.mark.parametrize(
    ("module", "kv_heads"),
    [
        (_Attention(), 4),
        (_Attention(is_causal=True), 4),
        (_Attention(_bool_mask_with_an_empty_row()), 4),
        (_Attention(torch.from_numpy(RNG.standard_normal((1, 1, 5, 7)).astype(np.float32))), 4),
        (_Attention(scale=0.3, enable_gqa=True), 2),
    ],
    ids=["plain", "causal", "bool_mask", "float_mask", "gqa_scale"],
)
def test_sdpa_converter_matches_torch(module, kv_heads):
    length = 5 if module.flags.get("is_causal") else 7
    q = torch.randn(2, 4, 5, 8)
    k, v = torch.randn(2, kv_heads, length, 8), torch.randn(2, kv_heads, length, 8)
    graph = reshift.frontend.from_torch(module, (q, k, v))
    assert "softmax" in graph.op_histogram()
    out = reshift.ir.interpret(graph, {v.name: x.numpy() for v, x in zip(graph.inputs, (q, k, v), strict=True)})
    with torch.no_grad():
        expected = module(q, k, v).numpy()
    assert relative_error(out[graph.outputs[0].name], expected) < 1e-5
