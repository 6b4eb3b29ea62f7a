"""``moe_linear`` (ir/ops_moe.py) and the ``moe_mlp`` pass (passes/moe.py): the routing rule at its
edges (ties, NaN, zero rows, all-one-expert), type errors, and the pass's rewrite, router fit and
refusals, each checked with the reference interpreter."""

from __future__ import annotations

import numpy as np
import pytest

import reshift
from reshift.errors import NodeTypeError, PassError
from reshift.ir import GraphBuilder, interpret
from reshift.ir.ops_lowbit import shift_rows
from reshift.ir.ops_moe import multiplications_removed, routes, shift_rows_blas
from reshift.passes.moe import fit_router, mlp_roles
from reshift.passes.shift import quantize_shift

RNG = np.random.default_rng(3)


def _moe_graph(out=5, k=8, router=None, router_scale=0.01, router_bias=0.0, bias=True):
    b = GraphBuilder("moe")
    x = b.input("x", f"f32[N,{k}]")
    w = RNG.standard_normal((out, k)).astype(np.float32)
    sign, exponent, scale = quantize_shift(w)
    router = RNG.integers(-127, 128, k).astype(np.int8) if router is None else router
    y = b.moe_linear(
        x,
        b.constant(np.asarray(router, np.int8)),
        b.constant(np.array([router_scale], np.float32)),
        b.constant(np.array([router_bias], np.float32)),
        b.constant(w),
        b.constant(sign),
        b.constant(exponent),
        b.constant(scale),
        b.constant(RNG.standard_normal(out).astype(np.float32)) if bias else None,
    )
    return b.build(y), w, (sign, exponent, scale)


def _consts(graph):
    return [v.data for v in graph.constants.values()]


def test_rows_go_to_the_expert_the_router_picks():
    graph, w, (sign, exponent, scale) = _moe_graph()
    router, rscale, rbias, *_, bias = _consts(graph)
    x = RNG.standard_normal((40, 8)).astype(np.float32)
    y = interpret(graph, {"x": x})[graph.outputs[0].name]
    to_shift = routes(x, router, rscale, rbias)
    assert 0 < to_shift.sum() < len(x)  # both experts serve rows
    np.testing.assert_array_equal(y[to_shift], shift_rows(x[to_shift], sign, exponent, scale, 4) + bias)
    np.testing.assert_allclose(y[~to_shift], x[~to_shift] @ w.T + bias, rtol=1e-6, atol=1e-6)


def test_tie_goes_to_the_multiplication_expert():
    """``d = 0`` (zero router, zero bias) routes every row to the float expert; ``bias > 0`` every row to shift."""
    zero = np.zeros(8, np.int8)
    x = RNG.standard_normal((6, 8)).astype(np.float32)
    graph, w, _ = _moe_graph(router=zero, router_bias=0.0, bias=False)
    assert not routes(x, zero, np.float32([0.01]), np.float32([0.0])).any()
    np.testing.assert_allclose(interpret(graph, {"x": x})[graph.outputs[0].name], x @ w.T, rtol=1e-6, atol=1e-6)
    graph, w, (sign, exponent, scale) = _moe_graph(router=zero, router_bias=1e-30, bias=False)
    np.testing.assert_array_equal(
        interpret(graph, {"x": x})[graph.outputs[0].name], shift_rows(x, sign, exponent, scale, 4)
    )


def test_router_threshold_is_exact():
    """A row scoring exactly ``-router_bias`` stays with the multiplication expert; one ulp above goes to shift."""
    router = np.zeros(8, np.int8)
    router[0] = 1
    x = np.zeros((2, 8), np.float32)
    x[:, 0] = 127.0  # s = 1, q = 127 -> p = 127 * router_scale
    scale = np.float32([0.5])
    p = np.float32(127) * np.float32(0.5)
    assert not routes(x[:1], router, scale, np.float32([-p]))[0]
    assert routes(x[:1], router, scale, np.float32([-np.nextafter(p, np.float32(0))]))[0]


def test_nan_and_zero_rows():
    graph, w, _ = _moe_graph(router_bias=5.0)
    router, rscale, rbias, *_ = _consts(graph)
    x = RNG.standard_normal((3, 8)).astype(np.float32)
    x[0, 2] = np.nan
    x[1] = 0.0
    mask = routes(x, router, rscale, rbias)
    assert not mask[0] and mask[1]  # NaN row: float expert; zero row: d = router_bias > 0
    y = interpret(graph, {"x": x})[graph.outputs[0].name]
    assert np.isnan(y[0]).all()
    np.testing.assert_array_equal(y[1], _consts(graph)[-1])  # shift of a zero row is 0, plus the bias


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.__setitem__(0, np.zeros(8, np.int32)), "router must be int8"),
        (lambda c: c.__setitem__(0, np.zeros(7, np.int8)), "router must be int8"),
        (lambda c: c.__setitem__(1, np.ones(2, np.float32)), "router_scale"),
        (lambda c: c.__setitem__(4, np.zeros((5, 8), np.uint8)), "sign must be int8"),
        (lambda c: c.__setitem__(3, np.zeros((5, 7), np.float32)), "must end in the 7 input features"),
    ],
)
def test_type_errors_name_the_operand(change, message):
    graph, *_ = _moe_graph()
    consts = _consts(graph)
    change(consts)
    b = GraphBuilder("bad")
    x = b.input("x", "f32[N,8]")
    with pytest.raises(NodeTypeError, match=message):
        b.moe_linear(x, *[b.constant(c) for c in consts])


def test_blas_shift_rows_are_the_reference_bit_for_bit():
    """The float64-BLAS integer matmul equals shift_rows' int64 one, near the int32 bound too."""
    k = 516  # 127 * 2^15 * 516 < 2^31: the largest always-safe K at exponent_bits 4
    sign = np.ones((3, k), np.int8)
    sign[1, ::2] = -1
    exponent = np.zeros((3, k), np.uint8)
    exponent[2] = RNG.integers(0, 16, k)
    x = RNG.standard_normal((7, k)).astype(np.float32)
    x[0] = 1.0  # every code 127: |acc| = 127 * 2^15 * 516
    x[3, 5] = np.nan
    scale = RNG.random(3).astype(np.float32)
    np.testing.assert_array_equal(shift_rows_blas(x, sign, exponent, scale, 4), shift_rows(x, sign, exponent, scale, 4))


def test_multiplications_removed():
    assert multiplications_removed(0.0, 64, 32) == pytest.approx(-2 * 32 / (64 * 32))
    assert multiplications_removed(1.0, 64, 32) == pytest.approx(1 - (64 + 64) / (64 * 32))
    assert multiplications_removed(0.5, 64, 32) == pytest.approx(0.5 - (0.5 * 64 + 64) / (64 * 32))


# -- the pass -----------------------------------------------------------------------------------
def _mlp_graph(k=12, hidden=24, act="gelu", extra_reader=False):
    b = GraphBuilder("mlp")
    x = b.input("x", f"f32[N,{k}]")

    def lin(v, o, i, name):
        return b.linear(
            v,
            b.constant(RNG.standard_normal((o, i)).astype(np.float32) / np.float32(np.sqrt(i)), f"{name}_w"),
            b.constant(RNG.standard_normal(o).astype(np.float32) * 0.1, f"{name}_b"),
        )

    h = lin(x, hidden, k, "fc1")
    a = getattr(b, act)(h)
    y = b.add(lin(a, k, hidden, "fc2"), x)
    out = lin(y, 3, k, "head")
    outputs = [out, b.relu(a)] if extra_reader else [out]
    return b.build(*outputs)


def _calibration(k=12, batches=3, rows=64):
    return [{"x": RNG.standard_normal((rows, k)).astype(np.float32)} for _ in range(batches)]


def test_mlp_linears_become_mixtures_and_the_report_says_the_share():
    graph = _mlp_graph()
    assert sorted(mlp_roles(graph).values()) == ["fc1", "fc2"]
    g2, report = reshift.passes.run(graph, "moe", calibration=_calibration(), moe_shift_share=0.25)
    ops = [n.op for n in g2.nodes]
    assert ops.count("moe_linear") == 2 and ops.count("linear") == 1  # the head is not an MLP linear
    assert any("not an MLP linear" in r.reason for r in report.refusals)
    for facts in report.details.values():
        assert facts["shift_share"] == pytest.approx(0.25, abs=1 / 192)
        assert facts["mults_removed"] == pytest.approx(
            multiplications_removed(
                facts["shift_share"], 12 if facts["role"] == "fc2" else 24, 24 if facts["role"] == "fc2" else 12
            )
        )
        assert facts["error"] < facts["error_all_shift"]  # the router keeps the worst tokens multiplied
    x = RNG.standard_normal((16, 12)).astype(np.float32)
    ref = interpret(graph, {"x": x})[graph.outputs[0].name]
    got = interpret(g2, {"x": x})[g2.outputs[0].name]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.2


def test_share_zero_keeps_the_float_model():
    graph = _mlp_graph()
    g2, report = reshift.passes.run(graph, "moe", calibration=_calibration(), moe_shift_share=0.0)
    assert all(f["shift_share"] == 0.0 for f in report.details.values())
    x = _calibration()[0]["x"]
    ref = interpret(graph, {"x": x})[graph.outputs[0].name]
    np.testing.assert_allclose(interpret(g2, {"x": x})[g2.outputs[0].name], ref, rtol=1e-5, atol=1e-5)


def test_latency_option_sets_the_balanced_share():
    """ShiftAddViT's latency-aware balance: t_m (1 - share) = t_s share."""
    graph = _mlp_graph()
    latency = {"mult": 1.0, "shift": 3.0}
    _, report = reshift.passes.run(graph, "moe", calibration=_calibration(), expert_latency=latency)
    assert all(f["target_share"] == pytest.approx(0.25) for f in report.details.values())
    with pytest.raises(PassError, match="positive"):
        reshift.passes.run(graph, "moe", calibration=_calibration(), expert_latency={"mult": 0, "shift": 1})
    with pytest.raises(PassError, match="moe_shift_share"):
        reshift.passes.run(graph, "moe", calibration=_calibration(), moe_shift_share=1.5)


def test_router_prefers_tokens_the_shift_expert_codes_well():
    """Tokens along a direction the shift code gets wrong are labelled 'multiply', and the probe learns it."""
    k = 16
    x = RNG.standard_normal((400, k))
    x[:200, 0] += 8.0  # half the tokens: a large component on feature 0
    errors = np.where(np.arange(400) < 200, 1.0, 0.1)  # ... where the shift expert is bad
    router, rscale, rbias = fit_router(x, errors, 0.5)
    mask = routes(x.astype(np.float32), router, rscale, rbias)
    assert mask[200:].mean() > 0.95 and mask[:200].mean() < 0.05


def test_refusals():
    graph = _mlp_graph()
    _, report = reshift.passes.run(graph, "moe")
    reasons = [r.reason for r in report.refusals]
    assert sum("calibration" in r for r in reasons) == 2
    _, report = reshift.passes.run(_mlp_graph(extra_reader=True), "moe", calibration=_calibration())
    assert not report.matches  # the activation feeds a second reader: not an MLP chain
    _, report = reshift.passes.run(graph, "moe", calibration=_calibration(), skip=["fc1*"])
    assert report.matches == {"linear_to_moe": 1}
    assert any("skip pattern" in r.reason for r in report.refusals)
    _, report = reshift.passes.run(_mlp_graph(act="relu"), "moe", calibration=_calibration())
    assert report.matches == {"linear_to_moe": 2}


def test_shiftadd_vit_pipeline_shifts_the_rest():
    graph = _mlp_graph()
    g2, report = reshift.passes.run(graph, "shiftadd_vit", calibration=_calibration())
    ops = sorted(n.op for n in g2.nodes)
    assert ops.count("moe_linear") == 2
    assert "shift_linear" not in ops  # the only other linear is the last weight layer (kept float)
    assert report.details  # per-layer facts of both passes


@pytest.mark.parametrize("bias", [True, False])
def test_onnx_decomposition_and_custom_domain(bias):
    """Standard ONNX (both experts, a per-row Where) runs in onnxruntime with the reference's routing;
    the ai.reshift domain form reads back into the same op."""
    ort = pytest.importorskip("onnxruntime")
    from reshift.codegen.onnx import CUSTOM_DOMAIN, to_onnx
    from reshift.frontend import from_onnx

    graph, *_ = _moe_graph(out=6, k=10, router_bias=0.3, bias=bias)
    x = RNG.standard_normal((13, 10)).astype(np.float32)
    expected = interpret(graph, {"x": x})[graph.outputs[0].name]
    model = to_onnx(graph)
    assert all(n.domain == "" for n in model.graph.node)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    domain = to_onnx(graph, custom_ops="domain")
    assert [n.op_type for n in domain.graph.node if n.domain == CUSTOM_DOMAIN] == ["moe_linear"]
    back = from_onnx(domain)
    np.testing.assert_array_equal(interpret(back, {"x": x})[back.outputs[0].name], expected)
