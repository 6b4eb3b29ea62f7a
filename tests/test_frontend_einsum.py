"""Einsum (frontend/einsum.py) through ONNX and ATen, against numpy.einsum, onnxruntime and torch.

Each ONNX case is one ``Einsum`` node with a symbolic batch, compared at batch 2 and 3 (the
interpreter against onnxruntime and numpy.einsum); the torch cases go through ``aten.einsum``.
Negative cases check that a malformed equation, mismatched sizes or a diagonal over a symbolic
size are refused with a reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from reshift.codegen.tvm.build import build
from reshift.errors import ModelLoadError
from reshift.frontend import from_torch
from reshift.frontend.einsum import EinsumError, parse_equation
from reshift.frontend.onnx import from_onnx
from reshift.ir import interpret
from tests.test_codegen_tvm import run_vm
from tests.test_frontend_onnx import make_model, run_ort, x_of
from tests.test_frontend_torch import check_against_eager

F = TensorProto.FLOAT

# name -> (equation, operand shapes; "N" is the symbolic batch, a tuple-less entry a constant weight)
CASES = {
    "batched_matmul": ("bij,bjk->bik", [("N", 3, 4), ("N", 4, 5)]),
    "attention_scores": ("bhqd,bhkd->bhqk", [("N", 2, 3, 4), ("N", 2, 5, 4)]),
    "attention_values": ("bhqk,bhkd->bqhd", [("N", 2, 3, 5), ("N", 2, 5, 4)]),
    "outer": ("bi,bj->bij", [("N", 3), ("N", 4)]),
    "hadamard_sum": ("bij,bij->b", [("N", 3, 4), ("N", 3, 4)]),
    "transpose": ("bij->bji", [("N", 3, 4)]),
    "reduce": ("bij->bi", [("N", 3, 4)]),
    "implicit_output": ("bij,jk", [("N", 3, 4), (4, 5)]),
    "weight": ("bsh,hd->bsd", [("N", 3, 4), "w"]),
    "ellipsis": ("...ij,...jk->...ik", [("N", 2, 3, 4), ("N", 2, 4, 5)]),
    "broadcast_size_one": ("bij,bkj->bik", [("N", 3, 4), ("N", 1, 4)]),
    "three_operands": ("bi,ij,jk->bk", [("N", 3), (3, 4), (4, 2)]),
    "diagonal": ("bii->bi", [("N", 3, 3)]),
    "trace_then_matmul": ("bjii,jk->bk", [("N", 4, 3, 3), (4, 2)]),
    "implicit_trace": ("bii", [("N", 3, 3)]),
}
W = x_of(4, 6, seed=9)


def _shapes(shapes, batch):
    return [W.shape if s == "w" else tuple(batch if d == "N" else d for d in s) for s in shapes]


def _model(equation, shapes):
    names = [f"x{i}" for i in range(len(shapes))]
    inputs = [(n, F, list(s)) for n, s in zip(names, shapes, strict=True) if s != "w"]
    initializers = [(n, W) for n, s in zip(names, shapes, strict=True) if s == "w"]
    out = np.einsum(equation, *[np.zeros(s, np.float32) for s in _shapes(shapes, 1)]).shape
    node = helper.make_node("Einsum", names, ["y"], name="einsum_node", equation=equation)
    return make_model([node], inputs, [("y", F, ["N", *out[1:]])], initializers, opset=17)


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_einsum_matches_onnxruntime_and_numpy(name):
    equation, shapes = CASES[name]
    model = _model(equation, shapes)
    graph = from_onnx(model)
    for batch in (2, 3):
        concrete = _shapes(shapes, batch)
        arrays = [W if s == "w" else x_of(*concrete[i], seed=i) for i, s in enumerate(shapes)]
        feeds = {f"x{i}": a for i, (s, a) in enumerate(zip(shapes, arrays, strict=True)) if s != "w"}
        ours = interpret(graph, feeds)["y"]
        want = np.einsum(equation, *arrays)
        np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours, run_ort(model, feeds)[0], rtol=1e-5, atol=1e-5)


def test_constant_weight_becomes_linear_and_plain_forms_need_no_transpose():
    ops = lambda name: [n.op for n in from_onnx(_model(*CASES[name])).nodes]  # noqa: E731
    assert ops("weight") == ["linear"]
    assert ops("batched_matmul") == ops("ellipsis") == ["matmul"]
    assert ops("reduce") == ["reduce_sum"]


def test_broadcast_ellipsis_of_different_ranks_matches_numpy():
    """onnxruntime refuses ellipses of different ranks; numpy and torch broadcast them."""
    model = _model("...ij,...jk->...ik", [("N", 1, 3, 4), (5, 4, 2)])
    graph = from_onnx(model)
    a, b = x_of(2, 1, 3, 4), x_of(5, 4, 2, seed=1)
    np.testing.assert_allclose(interpret(graph, {"x0": a, "x1": b})["y"], np.einsum("...ij,...jk->...ik", a, b), 1e-5)


def test_einsum_builds_and_runs_on_cpu():
    graph = from_onnx(_model(*CASES["attention_values"]))
    result = build(graph, "cpu")
    feeds = {"x0": x_of(3, 2, 3, 5), "x1": x_of(3, 2, 5, 4, seed=1)}
    (actual,) = run_vm(result.executable, graph, feeds)
    np.testing.assert_allclose(actual, interpret(graph, feeds)["y"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "equation, ranks, message",
    [
        ("ij,jk->ik", [2], "2 operand terms for 1 operands"),
        ("ijk->ij", [2], "names 3 axes, the operand has rank 2"),
        ("ij->ik", [2], "output label 'k' appears in no operand"),
        ("ij->ii", [2], "names a label twice"),
        ("i1->i", [2], "subscripts are letters"),
    ],
)
def test_equation_errors(equation, ranks, message):
    with pytest.raises(EinsumError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_equation(equation, ranks)


def test_diagonal_is_exact_next_to_infinities():
    """A gather, not a mask: the infinities off the diagonal never reach the result."""
    model = _model(*CASES["diagonal"])
    x = np.where(np.eye(3, dtype=bool), x_of(2, 3, 3), np.float32(np.inf))
    np.testing.assert_array_equal(interpret(from_onnx(model), {"x0": x})["y"], np.einsum("bii->bi", x))


def test_onnx_diagonal_over_a_symbolic_size_is_refused_naming_the_node():
    node = helper.make_node("Einsum", ["x"], ["y"], name="trace_node", equation="ii->i")
    model = make_model([node], [("x", F, ["N", "N"])], [("y", F, ["N"])])
    with pytest.raises(ModelLoadError, match="trace_node.*diagonal of label 'i' in operand 0 needs two equal static"):
        from_onnx(model)


def test_onnx_mismatched_sizes_are_refused():
    node = helper.make_node("Einsum", ["x", "z"], ["y"], name="bad_sizes", equation="bij,bjk->bik")
    model = make_model([node], [("x", F, ["N", 3, 4]), ("z", F, ["N", 5, 2])], [("y", F, ["N", 3, 2])])
    with pytest.raises(ModelLoadError, match="bad_sizes.*label 'j' is 4 in one operand and 5 in operand 1"):
        from_onnx(model)


# -- aten.einsum -----------------------------------------------------------------------------------
class Einsums(torch.nn.Module):
    def forward(self, q, k):
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k)
        mixed = torch.einsum("bhqk,bhkd->bqhd", scores.softmax(-1), k)
        traces = torch.einsum("bhqq->bh", scores[..., :3])
        return scores, mixed, torch.einsum("...d,...d->...", q, q), torch.einsum("bhqd->bdq", q), traces


def test_aten_einsum_matches_eager():
    module = Einsums()
    graph = from_torch(module, (torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)))
    assert "einsum" not in {n.op for n in graph.nodes} and "matmul" in {n.op for n in graph.nodes}
    for batch in (1, 3):
        check_against_eager(graph, module, (torch.randn(batch, 2, 3, 4), torch.randn(batch, 2, 3, 4)))


def test_bfloat16_einsum_keeps_its_dtype():
    """numpy's bfloat16 matmul answers float32; the matmul reference casts back (ONNX backend case)."""
    node = helper.make_node("Einsum", ["x", "z"], ["y"], equation="bij,bjk->bik")
    bf16 = TensorProto.BFLOAT16
    model = make_model([node], [("x", bf16, [5, 2, 3]), ("z", bf16, [5, 3, 4])], [("y", bf16, [5, 2, 4])])
    x, z = (x_of(*shape, seed=i).astype("bfloat16") for i, shape in enumerate([(5, 2, 3), (5, 3, 4)]))
    y = interpret(from_onnx(model), {"x": x, "z": z})["y"]
    assert y.dtype == x.dtype
    np.testing.assert_allclose(y.astype(np.float32), np.matmul(x, z).astype(np.float32), rtol=1e-2)
