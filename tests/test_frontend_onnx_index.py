"""ONNX Gather, GatherElements, GatherND, ScatterND, ScatterElements and CumSum on run-time data and indices
(frontend/onnx_ops_index.py, ir/ops_index.py) against onnxruntime, interpreted and built for cpu, and
the ONNX package's own node test cases for these ops and Resize.

Negative cases: a constant index out of range is refused naming the node; a run-time one is an
``ExecutionError`` in the interpreter, and the compiled kernels clamp it (they never read or write
outside a tensor).
"""

from __future__ import annotations

import functools
import importlib

import numpy as np
import pytest
from onnx import TensorProto, helper

import reshift
from reshift.errors import ExecutionError, ModelLoadError
from reshift.frontend.onnx import from_onnx
from reshift.ir import interpret
from tests.test_frontend_onnx import make_model, run_ort, x_of

F, I64 = TensorProto.FLOAT, TensorProto.INT64
RNG = np.random.default_rng(0)

NODES = [
    helper.make_node("Gather", ["x", "gi"], ["gather_axis1"], axis=1),
    helper.make_node("Gather", ["x", "gi"], ["gather_last"], axis=-1),
    helper.make_node("GatherElements", ["x", "ei"], ["gather_elements"], axis=2),
    helper.make_node("GatherElements", ["x", "ei"], ["gather_elements_rows"], axis=1),
    helper.make_node("GatherND", ["x", "ni"], ["gather_nd_batch"], batch_dims=1),
    helper.make_node("GatherND", ["d", "si"], ["gather_nd_rows"]),
    helper.make_node("GatherND", ["d", "pi"], ["gather_nd_points"]),
    *(
        helper.make_node("ScatterND", ["d", "si", "su"], [f"scatter_{r}"], reduction=r)
        for r in ("none", "add", "mul", "max", "min")
    ),
    helper.make_node("ScatterND", ["d", "pi", "pu"], ["scatter_points"], reduction="add"),
    helper.make_node("CumSum", ["x", "axis"], ["cumsum"], exclusive=1),
    *(  # a repeated target combines in order
        helper.make_node(
            "ScatterElements", ["x", "ei", "gather_elements"], [f"scatter_elements_{r}"], axis=1, reduction=r
        )
        for r in ("add", "max")
    ),
]
OUTPUTS = [n.output[0] for n in NODES]


def index_model():
    inputs = [
        ("x", F, ["b", 5, 6]),
        ("d", F, [5, 6]),
        ("gi", I64, [2, 3]),
        ("ei", I64, ["b", 4, 3]),
        ("ni", I64, ["b", 4, 2]),
        ("si", I64, [3, 1]),
        ("su", F, [3, 6]),
        ("pi", I64, [4, 2]),
        ("pu", F, [4]),
    ]
    return make_model(NODES, inputs, [(o, F, None) for o in OUTPUTS], [("axis", np.asarray(1, np.int64))], opset=18)


def feeds(batch: int) -> dict[str, np.ndarray]:
    return {
        "x": x_of(batch, 5, 6, seed=batch),
        "d": x_of(5, 6, seed=9),
        "gi": RNG.integers(-5, 5, (2, 3)),  # negatives count from the end (axis 1 has 5, the last 6)
        "ei": RNG.integers(-5, 5, (batch, 4, 3)),  # smaller than x on the other axes, as ONNX allows
        "ni": RNG.integers(-5, 5, (batch, 4, 2)),
        "si": np.array([[3], [-5], [1]]),  # distinct rows: reduction none has no order to respect
        "su": x_of(3, 6, seed=3),
        "pi": np.array([[0, 1], [4, -1], [0, 1], [-2, 3]]),  # a repeated point accumulates under add
        "pu": x_of(4, seed=4),
    }


def test_run_time_indices_match_onnxruntime_interpreted_and_built():
    model = index_model()
    graph = from_onnx(model)
    assert {"gather_elements", "gather_nd", "scatter_nd", "cumsum", "gather"} <= set(graph.op_histogram())
    compiled = reshift.compile(model, target="cpu")
    for batch in (1, 3):
        inputs = feeds(batch)
        want = run_ort(model, inputs)
        ours = interpret(graph, inputs)
        built = compiled(**inputs)
        built = built if isinstance(built, (list, tuple)) else [built]
        for name, expected, got, compiled_out in zip(OUTPUTS, want, ours.values(), built, strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, err_msg=f"{name} (interpreter)")
            np.testing.assert_allclose(compiled_out, expected, rtol=1e-6, atol=1e-6, err_msg=f"{name} (cpu build)")


def _gather_elements_model(indices: np.ndarray | None = None):
    inits = [] if indices is None else [("i", indices)]
    inputs = [("x", F, ["b", 5])] + ([("i", I64, ["b", 2])] if indices is None else [])
    node = helper.make_node("GatherElements", ["x", "i"], ["y"], axis=1, name="pick_node")
    return make_model([node], inputs, [("y", F, None)], inits)


def test_a_constant_index_out_of_range_is_refused_naming_the_node():
    with pytest.raises(ModelLoadError, match=r"pick_node.*GatherElements index 5 is out of range"):
        from_onnx(_gather_elements_model(np.array([[0, 5]], np.int64)))
    scatter = helper.make_node("ScatterND", ["d", "i", "u"], ["y"], name="put_node")
    model = make_model(
        [scatter], [("d", F, [4, 3]), ("u", F, [1, 3])], [("y", F, None)], [("i", np.array([[-5]], np.int64))]
    )
    with pytest.raises(ModelLoadError, match=r"put_node.*ScatterND index -5 is out of range"):
        from_onnx(model)


def test_a_run_time_index_out_of_range_fails_in_the_interpreter_and_is_clamped_when_compiled():
    model = _gather_elements_model()
    x, indices = x_of(2, 5), np.array([[0, 7], [-9, 4]])
    with pytest.raises(ExecutionError, match=r"pick_node.*gather_elements.*index -9 out of range \[-5, 5\)"):
        interpret(from_onnx(model), {"x": x, "i": indices})
    got = reshift.compile(model, target="cpu")(x=x, i=indices)
    np.testing.assert_array_equal(got, [[x[0, 0], x[0, 4]], [x[1, 0], x[1, 4]]])  # 7 -> 4, -9 + 5 -> 0


def test_scatter_nd_reduction_is_checked():
    scatter = helper.make_node("ScatterND", ["d", "i", "u"], ["y"], name="put_node", reduction="none")
    scatter.attribute[0].s = b"average"
    model = make_model([scatter], [("d", F, [4, 3]), ("i", I64, [1, 1]), ("u", F, [1, 3])], [("y", F, [4, 3])])
    with pytest.raises(ModelLoadError, match=r"put_node.*reduction 'average' is not supported"):
        from_onnx(model)


@functools.cache
def _onnx_node_cases(module: str) -> list:
    """The ONNX package's own node test cases of one operator module (model, inputs, expected outputs)."""
    from onnx.backend.test.case import node as cases

    before = len(cases._NodeTestCases)
    importlib.import_module(f"onnx.backend.test.case.node.{module}")  # its exports append the cases
    return [c for c in cases._NodeTestCases[before:] if "expanded" not in c.name]


# what stays refused, each for a reason the converter names
REFUSED = {
    "downsample_scales_linear_align_corners": "are not whole output sizes",  # align_corners ignores 1 / scale
    "downsample_scales_cubic_align_corners": "are not whole output sizes",
}


@pytest.mark.parametrize(
    "module", ["gather", "gatherelements", "gathernd", "scatternd", "scatterelements", "cumsum", "resize"]
)
def test_onnx_node_test_cases(module):
    """Every case ONNX ships for the op matches its expected outputs, or is refused with its reason."""
    checked = 0
    for case in _onnx_node_cases(module):
        (inputs, outputs), names = case.data_sets[0], [i.name for i in case.model.graph.input]
        feeds = dict(zip(names, inputs, strict=True))
        frozen = {n: feeds.pop(n) for n in names[1:]} if module in ("resize", "cumsum") else {}  # sizes, axis
        reason = next((why for key, why in REFUSED.items() if key in case.name), None)
        if reason is not None and module == "resize":
            with pytest.raises(ModelLoadError, match=reason):
                from_onnx(case.model, input_values=frozen)
            continue
        got = list(interpret(from_onnx(case.model, input_values=frozen), feeds).values())
        for have, want in zip(got, outputs, strict=True):
            np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6, err_msg=case.name)
        checked += 1
    assert checked >= {"resize": 37}.get(module, 1)  # resize: 37 of its cases run, the rest are refused
