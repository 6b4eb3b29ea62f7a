"""topk, isnan, isinf (ir/ops_select.py): reference edges, ONNX against onnxruntime, ATen against eager,
and the CUDA build (built here, not run: no GPU is needed).

TopK's ties are the point: ONNX and onnxruntime return equal values lowest index first, and so must
the reference, the TVM lowering (tests/test_codegen_tvm.py::graph_select) and the CUDA kernel's build.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from reshift.codegen.tvm.build import _host_block, build
from reshift.errors import IRTypeError, ModelLoadError
from reshift.frontend import from_torch
from reshift.frontend.onnx import from_onnx
from reshift.ir import GraphBuilder, get_op, interpret
from tests.test_frontend_onnx import make_model, run_ort
from tests.test_frontend_torch import check_against_eager

F, I64 = TensorProto.FLOAT, TensorProto.INT64
SPECIAL = np.array([[0.0, -0.0, np.nan, np.inf, -np.inf, 3.4e38, -1.0, 1e-45]], np.float32)


def topk(x, k, axis=-1, largest=True):
    return get_op("topk").reference(x, k=k, axis=axis % x.ndim, largest=largest, sorted=True)


def test_topk_ties_lower_index_first():
    x = np.array([1, 3, 3, 2, 3, 1], np.float32)
    values, indices = topk(x, 4)
    assert values.tolist() == [3, 3, 3, 2] and indices.tolist() == [1, 2, 4, 3]
    values, indices = topk(x, 3, largest=False)
    assert values.tolist() == [1, 1, 2] and indices.tolist() == [0, 5, 3]
    ints = np.array([[5, -7, 5], [np.iinfo(np.int64).min, 0, 0]], np.int64)  # no negation overflow
    assert topk(ints, 2)[1].tolist() == [[0, 2], [1, 2]]
    assert topk(ints, 1, largest=False)[1].tolist() == [[1], [0]]


def test_topk_matches_torch_without_ties_along_any_axis():
    x = np.random.default_rng(0).permutation(60).reshape(3, 4, 5).astype(np.float32)
    for axis in (0, 1, -1):
        for largest in (True, False):
            want = torch.topk(torch.from_numpy(x), 2, dim=axis, largest=largest)
            values, indices = topk(x, 2, axis, largest)
            np.testing.assert_array_equal(values, want.values.numpy())
            np.testing.assert_array_equal(indices, want.indices.numpy())


@pytest.mark.parametrize(
    "type_, k, axis, message",
    [
        ("f32[N,5]", 0, -1, r"k=0 must be in \[1, 5\]"),
        ("f32[N,5]", 6, 1, r"k=6 must be in \[1, 5\]"),
        ("f32[N,5]", 1, 0, "axis 0 of .* is symbolic"),
        ("f32[N,5]", 1, 2, "axis"),
        ("bool[4]", 1, 0, "topk: input must be"),
    ],
)
def test_topk_type_errors(type_, k, axis, message):
    b = GraphBuilder("bad")
    with pytest.raises(IRTypeError, match=message):
        b.topk(b.input("x", type_), k=k, axis=axis)


def test_value_class_references_at_the_edges():
    assert get_op("isnan").reference(SPECIAL).tolist() == [[False, False, True, False, False, False, False, False]]
    isinf = get_op("isinf").reference
    both, positive, negative = (isinf(SPECIAL, p, n) for p, n in ((True, True), (True, False), (False, True)))
    assert np.flatnonzero(both).tolist() == [3, 4] and np.flatnonzero(positive).tolist() == [3]
    assert np.flatnonzero(negative).tolist() == [4] and not isinf(SPECIAL, False, False).any()
    with pytest.raises(IRTypeError, match="isnan"):
        GraphBuilder("ints").isnan(GraphBuilder("ints").input("x", "i64[3]"))


# -- ONNX ------------------------------------------------------------------------------------------
def _topk_model(k_input=True, elem=F, **attrs):
    inputs, inits = [("x", elem, ["N", 5, 6])], []
    if k_input:
        inits = [("k", np.array([3], np.int64))]
    else:
        inputs.append(("k", I64, [1]))
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk_node", **attrs)
    outs = [("values", elem, None), ("indices", I64, None)]
    return make_model([node], inputs, outs, inits)


@pytest.mark.parametrize(
    "attrs", [{}, {"axis": 1, "largest": 0}, {"axis": -2, "largest": 1, "sorted": 1}], ids=["last", "smallest", "axis"]
)
@pytest.mark.parametrize("elem", [F, I64], ids=["f32", "i64"])
def test_onnx_topk_matches_onnxruntime_with_ties(attrs, elem):
    model = _topk_model(elem=elem, **attrs)
    graph = from_onnx(model)
    for batch in (2, 3):
        x = np.random.default_rng(batch).integers(-2, 3, (batch, 5, 6))  # five values: many ties
        feeds = {"x": x.astype(np.float32 if elem == F else np.int64)}
        for ours, want in zip(interpret(graph, feeds).values(), run_ort(model, feeds), strict=True):
            np.testing.assert_array_equal(ours, want)
            assert ours.dtype == want.dtype


def test_onnx_topk_with_run_time_k_is_refused_with_a_reason():
    with pytest.raises(ModelLoadError, match="topk_node.*K .* computed at run time.*make K a constant"):
        from_onnx(_topk_model(k_input=False))


def test_onnx_isnan_isinf_match_onnxruntime():
    nodes = [
        helper.make_node("IsNaN", ["x"], ["nan"]),
        helper.make_node("IsInf", ["x"], ["inf"]),
        helper.make_node("IsInf", ["x"], ["pos"], detect_negative=0),
        helper.make_node("IsInf", ["x"], ["neg"], detect_positive=0),
    ]
    outs = [(name, TensorProto.BOOL, None) for name in ("nan", "inf", "pos", "neg")]
    model = make_model(nodes, [("x", F, ["N", 8])], outs)
    feeds = {"x": np.concatenate([SPECIAL, -SPECIAL])}
    for ours, want in zip(interpret(from_onnx(model), feeds).values(), run_ort(model, feeds), strict=True):
        np.testing.assert_array_equal(ours, want)


# -- ATen ------------------------------------------------------------------------------------------
class Select(torch.nn.Module):
    def forward(self, x, ids):
        top = torch.topk(x, 2, dim=1, largest=False)
        masked = torch.where(torch.isnan(x.log()), 0.0, x) + torch.isinf(1 / x).float() + torch.isneginf(-1 / x)
        return top.values, top.indices, torch.topk(x, 3).indices, masked, torch.isnan(ids) | torch.isinf(ids)


def test_aten_topk_isnan_isinf_match_eager():
    """Without ties: torch's CPU topk orders equal values its own way (not lowest index first)."""
    module = Select()
    graph = from_torch(module, (torch.randn(2, 4, 5), torch.arange(6).reshape(2, 3)))
    assert {"topk", "isnan", "isinf"} <= {n.op for n in graph.nodes}
    for batch in (1, 3):
        x = (torch.randperm(20 * batch) - 10).float().reshape(batch, 4, 5)  # a zero (inf), negatives (NaN)
        check_against_eager(graph, module, (x, torch.arange(3 * batch).reshape(batch, 3)))


# -- CUDA ------------------------------------------------------------------------------------------
def test_cuda_build_has_device_kernels_for_topk_and_isnan():
    b = GraphBuilder("select_cuda")
    x = b.input("x", "f32[N,64]")
    values, indices = b.topk(x, k=4)
    graph = b.build(values, indices, b.isnan(x), b.isinf(x, detect_negative=False))
    cuda = build(graph, "cuda-sm90")
    source = next(m for m in cuda.executable.mod.imports[0].imports if m.kind == "cuda").inspect_source()
    assert "__global__" in source and "topk" in source


def test_hand_threaded_gpu_kernel_counts_as_bound():
    """topi.cuda.topk launches its threads itself inside one block; a plain unbound block still fails."""
    script = """
def main(a: T.Buffer((4,), "float32")):
    with T.sblock("topk_gpu"):
        with T.launch_thread("threadIdx.x", 4) as tx:
            a[tx] = T.float32(0)
    with T.sblock("side"):
        a[0] = T.float32(1)
"""
    assert _host_block(script) == 'with T.sblock("side"):'
    assert _host_block(script.split('    with T.sblock("side")')[0]) is None


def test_sdpa_onnx_export_with_a_bool_mask_imports():
    """torch.onnx's sdpa with a bool mask guards the softmax with IsNaN (MiniLM's default export);
    a fully masked row is where it acts (NaN -> 0), compared with onnxruntime."""
    import io

    import torch.nn.functional as F

    class Attention(torch.nn.Module):
        def forward(self, q, keep):
            return F.scaled_dot_product_attention(q, q, q, attn_mask=keep[:, None, None, :].bool())

    q, keep = torch.randn(3, 2, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    buffer = io.BytesIO()
    axes = {"q": {0: "N"}, "keep": {0: "N"}}
    names = {"input_names": ["q", "keep"], "output_names": ["y"], "dynamic_axes": axes}
    torch.onnx.export(Attention(), (q, keep), buffer, dynamo=False, opset_version=17, **names)
    model = onnx.load_from_string(buffer.getvalue())
    assert "IsNaN" in {n.op_type for n in model.graph.node}
    graph = from_onnx(model)
    feeds = {"q": q.numpy(), "keep": keep.numpy()}
    (ours,), (want,) = interpret(graph, feeds).values(), run_ort(model, feeds)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-6)
    assert not np.isnan(ours).any() and not ours[2].any()
