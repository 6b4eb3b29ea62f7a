"""shift_linear (the kernel specification) and passes/shift.py: edges, rule, refusals, GPT-2."""

from __future__ import annotations

import numpy as np
import pytest

from reshift import ir, passes
from reshift.ir.ops_lowbit import quantize_rows_int8, shift_accumulator_bound
from reshift.passes.shift import quantize_shift, shift_weight

SHIFT = """
graph shift(%x: f32[N,4]) {
  const %sign: i8[2,4] = [1, -1, 0, 1, -1, 1, 1, 0]
  const %exponent: u8[2,4] = [0, 1, 0, 15, 3, 2, 0, 0]
  const %scale: f32[2] = [0.5, 2.0]
  const %bias: f32[2] = [1.0, -1.0]
  %y: f32[N,2] = shift_linear(%x, %sign, %exponent, %scale, %bias) {exponent_bits=4} @shift
  return %y
}
"""


def shift_graph():
    return ir.parse(SHIFT)


def spec_float64(x, sign, exponent, scale, bias, bits=4):
    """The documented semantics, written independently in float64."""
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
    s = np.max(np.abs(x2), axis=1) / 127
    q = np.clip(np.rint(x2 / np.where(s > 0, s, 1)[:, None]), -127, 127)
    w = scale[:, None] * sign * 2.0 ** -exponent.astype(np.float64)
    return (q * s[:, None]) @ w.T + bias


def test_shift_reference_is_exact_for_power_of_two_weights_and_integer_activations():
    g = shift_graph()
    x = np.array([[127, -3, 5, 64], [-127, 0, 1, 2]], np.float32)  # max |row| = 127: q = x exactly
    w = shift_weight(*(g.constants[n].data for n in ("sign", "exponent", "scale")))
    y = ir.interpret(g, {"x": x})["y"]
    np.testing.assert_array_equal(y, (x.astype(np.float64) @ w.T + [1.0, -1.0]).astype(np.float32))


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_shift_reference_matches_the_spec(rng, batch):
    g = shift_graph()
    x = rng.standard_normal((batch, 4)).astype(np.float32) * 3
    args = [g.constants[n].data for n in ("sign", "exponent", "scale", "bias")]
    np.testing.assert_allclose(ir.interpret(g, {"x": x})["y"], spec_float64(x, *args), rtol=1e-6, atol=1e-6)


def test_int8_row_quantization_rounds_half_to_even_and_handles_zero_rows():
    q, s, finite = quantize_rows_int8(np.array([[127, 0.5, 1.5, -2.5], [0, 0, 0, 0]], np.float32))
    np.testing.assert_array_equal(q, [[127, 0, 2, -2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(s, [1.0, 0.0])
    assert finite.all()


def test_shift_reference_nan_and_inf_rows_give_nan_rows_only():
    g = shift_graph()
    x = np.array([[1, np.nan, 0, 0], [1, 2, 3, 4], [np.inf, 0, 0, 0]], np.float32)
    y = ir.interpret(g, {"x": x})["y"]
    assert np.isnan(y[0]).all() and np.isnan(y[2]).all() and np.isfinite(y[1]).all()


def test_shift_reference_zero_input_gives_bias():
    y = ir.interpret(shift_graph(), {"x": np.zeros((2, 4), np.float32)})["y"]
    np.testing.assert_array_equal(y, [[1.0, -1.0]] * 2)


def test_shift_reference_refuses_weights_that_overflow_int32():
    k = 600  # 127 * 600 * 2^15 > 2^31 - 1
    b = ir.GraphBuilder()
    x = b.input("x", f"f32[N,{k}]")
    y = b.shift_linear(
        x,
        b.constant(np.ones((1, k), np.int8)),
        b.constant(np.zeros((1, k), np.uint8)),
        b.constant(np.ones(1, np.float32)),
    )
    g = b.build(y)
    with pytest.raises(ValueError, match="int32"):
        ir.interpret(g, {"x": np.ones((1, k), np.float32)})
    assert shift_accumulator_bound(np.ones((1, 516), np.int8), np.zeros((1, 516), np.uint8), 4)[0] <= 2**31 - 1


def test_quantize_shift_edges():
    w = np.array([[1.0, -0.5, 0.25, 2.0**-15, 2.0**-17, 0.0, -(2.0**-0.5) * 1.01, 2.0**-0.5 * 0.99]])
    sign, exponent, scale = quantize_shift(w, 4)
    assert scale[0] == 1.0
    np.testing.assert_array_equal(sign[0], [1, -1, 1, 1, 0, 0, -1, 1])
    np.testing.assert_array_equal(exponent[0, :4], [0, 1, 2, 15])
    assert exponent[0, 6] == 0 and exponent[0, 7] == 1  # log-domain rounding: boundary at 2^-0.5
    exact = w[:, :4]
    np.testing.assert_array_equal(shift_weight(*quantize_shift(exact, 4)), exact)  # powers of two are exact
    sign, exponent, scale = quantize_shift(np.zeros((2, 3)), 4)
    assert not sign.any() and not scale.any()
    assert quantize_shift(np.array([[1.0, 0.01]]), 2)[1].max() <= 3


# -- the pass ---------------------------------------------------------------------------------
def mlp(rng, widths=(16, 32, 32, 24, 8), shared=False):
    b = ir.GraphBuilder("mlp")
    h = b.input("x", f"f32[N,{widths[0]}]")
    weights = []
    for i in range(len(widths) - 1):
        if shared and i == 2:
            w = weights[1]
        else:
            w = b.constant((rng.standard_normal((widths[i + 1], widths[i])) * 0.3).astype(np.float32), f"fc{i}.weight")
        weights.append(w)
        h = b.linear(
            h, w, b.constant(rng.standard_normal(widths[i + 1]).astype(np.float32), f"fc{i}.bias"), name=f"fc{i}"
        )
        h = b.relu(h) if i < len(widths) - 2 else h
    return b.build(h)


def calibration(rng, width=16, batches=3, rows=32):
    return [{"x": rng.standard_normal((rows, width)).astype(np.float32)} for _ in range(batches)]


def test_shift_pass_on_mlp_keeps_first_and_last_and_reports_errors(rng):
    g = mlp(rng)
    inputs = {"x": rng.standard_normal((5, 16)).astype(np.float32)}
    g2, report = passes.run(g, "shift", calibration=calibration(rng), inputs=inputs)
    ir.verify(g2)
    assert g2.op_histogram()["shift_linear"] == 2 and g2.op_histogram()["linear"] == 2
    assert report.matches == {"linear_to_shift": 2}
    reasons = {r.node: r.reason for r in report.refusals}
    assert "first" in reasons["fc0"] and "last" in reasons["fc3"]
    details = report.details
    assert set(details) == {"fc1", "fc2"}
    for layer in details.values():
        assert layer["bits"] == 5 and layer["error_kind"] == "output" and 0 < layer["error"] < 0.3
    assert report.max_error < 0.3
    assert report.records[0].macs[1] < report.records[0].macs[0]
    assert "shift_weights fc1" in str(report)


def test_shift_pass_options_bits_and_skip(rng):
    g = mlp(rng)
    g2, report = passes.run(g, "shift", shift_bits=2, skip=["fc2*"])
    nodes = [n for n in g2.nodes if n.op == "shift_linear"]
    assert len(nodes) == 3 and all(n.attrs["exponent_bits"] == 2 for n in nodes)
    assert all(n.inputs[2].data.max() <= 3 for n in nodes)
    assert "skip pattern 'fc2*'" in {r.node: r.reason for r in report.refusals}["fc2"]
    assert report.details["fc1"]["error_kind"] == "weight"


def test_shift_pass_refusals(rng):
    g = mlp(rng, widths=(16, 32, 32, 32, 8), shared=True)
    _, report = passes.run(g, "shift", skip=[])
    assert "shared with" in {r.node: r.reason for r in report.refusals}["fc1"]

    b = ir.GraphBuilder()
    x, w = b.input("x", "f32[N,4]"), b.input("w", "f32[3,4]")
    g = b.build(b.linear(x, w, None, name="fc"))
    _, report = passes.run(g, "shift", skip=[])
    assert "not a constant" in report.refusals[0].reason

    k = 600
    b = ir.GraphBuilder()
    x = b.input("x", f"f32[N,{k}]")
    g = b.build(b.linear(x, b.constant(np.ones((2, k), np.float32)), None, name="wide"))
    g2, report = passes.run(g, "shift", skip=[])
    assert "int32" in report.refusals[0].reason and "linear" in g2.op_histogram()
    g2, report = passes.run(g, "shift", skip=[], shift_bits=3)  # 127 * 600 * 2^7 fits
    assert g2.op_histogram() == {"shift_linear": 1}


@pytest.fixture(scope="module")
def gpt2():
    from examples.models import MODELS
    from reshift import frontend

    spec = MODELS["gpt2"]
    graph = frontend.from_torch(spec.build(), spec.example_inputs(1))
    calib = [{"input_ids": spec.example_inputs(2, seed=s)[0].numpy()} for s in (1, 2)]
    return graph, calib, {"input_ids": spec.example_inputs(2, seed=7)[0].numpy()}


def test_shift_pass_on_gpt2(gpt2):
    graph, calib, inputs = gpt2
    g2, report = passes.run(graph, "shift", calibration=calib, inputs=inputs)
    assert g2.op_histogram()["shift_linear"] == 7
    reasons = {r.node: r.reason for r in report.refusals}
    assert len(reasons) == 2 and any("lm_head" in r or "shared" in r or "last" in r for r in reasons.values())
    errors = {name: d["error"] for name, d in report.details.items()}
    print("gpt2 shift per-layer output error:", {k: round(v, 4) for k, v in errors.items()}, report.max_error)
    assert len(errors) == 7 and max(errors.values()) < 0.3
    assert report.max_error < 0.5
