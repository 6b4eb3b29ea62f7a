"""shift_linear and shift_conv2d (the kernel specifications) and passes/shift.py: edges, rules, refusals,
GPT-2, a small conv net."""

from __future__ import annotations

import numpy as np
import pytest

from reshift import ir, passes
from reshift.errors import ExecutionError, IRTypeError
from reshift.ir.numpy_kernels import conv2d
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
    with pytest.raises(ExecutionError, match="int32") as info:  # the node named, the reference's ValueError chained
        ir.interpret(g, {"x": np.ones((1, k), np.float32)})
    assert isinstance(info.value.__cause__, ValueError)
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


# -- shift_conv2d: the reference -----------------------------------------------------------------
def conv_spec_float64(x, sign, exponent, scale, bias, stride, padding, dilation, groups, bits=4):
    """shift_conv2d as documented, by explicit loops: each output pixel's window of each group is one
    row, quantized to int8 (padding zeros included), times the power-of-two filter, in float64."""
    n, c, h, w = x.shape
    o, cg, kh, kw = sign.shape
    top, left, bottom, right = padding
    oh = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    filt = scale[:, None, None, None] * sign * 2.0 ** -exponent.astype(np.float64)
    y = np.zeros((n, o, oh, ow))
    per = o // groups
    for b, g, i, j in np.ndindex(n, groups, oh, ow):
        patch = np.zeros((cg, kh, kw))
        for ci, di, dj in np.ndindex(cg, kh, kw):
            yy, xx = i * stride[0] + di * dilation[0] - top, j * stride[1] + dj * dilation[1] - left
            if 0 <= yy < h and 0 <= xx < w:
                patch[ci, di, dj] = x[b, g * cg + ci, yy, xx]
        s = np.abs(patch).max() / 127
        q = np.clip(np.rint(patch / (s if s > 0 else 1)), -127, 127) * s
        if not np.isfinite(patch).all():
            q = np.full_like(patch, np.nan)
        y[b, g * per : (g + 1) * per, i, j] = np.tensordot(filt[g * per : (g + 1) * per], q, 3)
    return y + (0 if bias is None else bias[None, :, None, None])


def shift_conv_graph(rng, c=4, o=6, k=3, groups=2, hw=(7, 6), bias=True, bits=4, **attrs):
    b = ir.GraphBuilder("shift_conv")
    x = b.input("x", f"f32[N,{c},{hw[0]},{hw[1]}]")
    shape = (o, c // groups, k, k)
    y = b.shift_conv2d(
        x,
        b.constant(rng.integers(-1, 2, shape).astype(np.int8), "sign"),
        b.constant(rng.integers(0, 2**bits, shape).astype(np.uint8), "exponent"),
        b.constant(rng.random(o).astype(np.float32) + 0.5, "scale"),
        b.constant(rng.standard_normal(o).astype(np.float32), "bias") if bias else None,
        groups=groups,
        exponent_bits=bits,
        **attrs,
    )
    return b.build(y)


def _conv_args(g):
    node = g.nodes[0]
    arrays = [v.data if v is not None else None for v in node.inputs[1:]]
    window = [node.attrs[k] for k in ("stride", "padding", "dilation", "groups")]
    return arrays, window


@pytest.mark.parametrize(
    "attrs",
    [
        {"groups": 1, "k": 3, "padding": (1, 1, 1, 1)},
        {"groups": 2, "k": 3, "stride": (2, 1), "padding": (0, 1, 2, 1), "dilation": (2, 1)},
        {"groups": 4, "c": 4, "o": 4, "k": 5, "padding": (2, 2, 2, 2), "stride": (2, 2), "bias": False},
        {"groups": 1, "k": 1, "o": 1},
    ],
)
def test_shift_conv_reference_matches_the_spec(rng, attrs):
    g = shift_conv_graph(rng, **attrs)
    x = rng.standard_normal((2, *g.inputs[0].shape[1:])).astype(np.float32) * 3
    arrays, window = _conv_args(g)
    got = ir.interpret(g, {"x": x})[g.outputs[0].name]
    assert got.dtype == np.float32 and got.shape == g.outputs[0].type.concrete_shape({"N": 2})
    np.testing.assert_allclose(got, conv_spec_float64(x, *arrays, *window), rtol=1e-5, atol=1e-5)


def test_shift_conv_reference_is_exact_for_power_of_two_filters_and_integer_activations(rng):
    """1x1 windows whose largest |input| is 127 quantize to themselves: the float conv, exactly."""
    g = shift_conv_graph(rng, c=3, o=5, k=1, groups=1, stride=(2, 2))
    x = rng.integers(-126, 127, (2, 3, 7, 6)).astype(np.float32)
    x[:, 0] = 127
    g.constants["scale"].data = (2.0 ** rng.integers(-3, 3, 5)).astype(np.float32)  # exact float32 rescale
    (sign, exponent, scale, bias), window = _conv_args(g)
    filt = scale[:, None, None, None].astype(np.float64) * sign * 2.0 ** -exponent.astype(np.float64)
    expected = conv2d(x.astype(np.float64), filt, bias.astype(np.float64), *window).astype(np.float32)
    np.testing.assert_array_equal(ir.interpret(g, {"x": x})[g.outputs[0].name], expected)


def test_shift_conv_reference_nan_and_inf_reach_only_their_windows_and_group(rng):
    g = shift_conv_graph(rng, c=4, o=6, k=3, groups=2, padding=(1, 1, 1, 1))
    x = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)
    x[0, 1, 3, 2] = np.nan  # group 0 (channels 0-1) -> outputs 0-2 around (3, 2)
    x[1, 3, 0, 0] = -np.inf  # group 1 -> outputs 3-5 around the corner
    y = ir.interpret(g, {"x": x})[g.outputs[0].name]
    expected = np.zeros(y.shape, bool)
    expected[0, 0:3, 2:5, 1:4] = True
    expected[1, 3:6, 0:2, 0:2] = True
    np.testing.assert_array_equal(np.isnan(y), expected)


def test_shift_conv_reference_zero_input_gives_bias(rng):
    g = shift_conv_graph(rng, padding=(1, 0, 2, 1))
    y = ir.interpret(g, {"x": np.zeros((1, 4, 7, 6), np.float32)})[g.outputs[0].name]
    np.testing.assert_array_equal(y, np.broadcast_to(g.constants["bias"].data[None, :, None, None], y.shape))


def test_shift_conv_reference_refuses_weights_that_overflow_int32():
    b = ir.GraphBuilder()
    x = b.input("x", "f32[N,24,5,5]")  # K = 24 * 5 * 5 = 600: 127 * 600 * 2^15 > 2^31 - 1
    shape = (2, 24, 5, 5)
    y = b.shift_conv2d(
        x,
        b.constant(np.ones(shape, np.int8)),
        b.constant(np.zeros(shape, np.uint8)),
        b.constant(np.ones(2, np.float32)),
    )
    with pytest.raises(ExecutionError, match="shift_conv2d: .*int32"):
        ir.interpret(b.build(y), {"x": np.ones((1, 24, 5, 5), np.float32)})


@pytest.mark.parametrize(
    "sign, exponent, scale, attrs, message",
    [
        ("f32[4,2,3,3]", "u8[4,2,3,3]", "f32[4]", {"groups": 2}, "sign must be int8"),
        ("i8[4,2,3,3]", "u8[4,2,3,1]", "f32[4]", {"groups": 2}, "exponent must be uint8"),
        ("i8[4,2,3,3]", "u8[4,2,3,3]", "f32[3]", {"groups": 2}, "scale must be float32"),
        ("i8[4,2,3,3]", "u8[4,2,3,3]", "f32[4]", {"groups": 1}, "sign i8"),
        ("i8[4,4,3,3]", "u8[4,4,3,3]", "f32[4]", {"exponent_bits": 6}, "exponent_bits 6"),
        ("i8[4,36]", "u8[4,36]", "f32[4]", {}, "sign must have rank 4"),
    ],
)
def test_shift_conv_type_errors_name_the_argument(sign, exponent, scale, attrs, message):
    b = ir.GraphBuilder()
    x = b.input("x", "f32[N,4,5,5]")
    ins = [b.input(name, t) for name, t in (("sign", sign), ("exponent", exponent), ("scale", scale))]
    with pytest.raises(IRTypeError, match=f"shift_conv2d.*{message}"):
        b.shift_conv2d(x, *ins, **attrs)


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
        assert layer["bits"] == 4 and layer["error_kind"] == "output" and 0 < layer["error"] < 0.3
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
    g2, report = passes.run(g, "shift", skip=[], shift_bits=4)
    assert "int32" in report.refusals[0].reason and "linear" in g2.op_histogram()
    g2, report = passes.run(g, "shift", skip=[])  # the default 3 bits: 127 * 600 * 2^7 fits
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


# -- the pass on convs ------------------------------------------------------------------------------
CONV_NET = """
graph convnet(%x: f32[N,3,10,9]) {
  const %w0: f32[8,3,3,3] = ...
  const %w1: f32[12,4,3,3] = ...
  const %b1: f32[12] = ...
  const %w2: f32[12,1,3,3] = ...
  const %w3: f32[5,12,1,1] = ...
  %h0: f32[N,8,10,9] = conv2d(%x, %w0, _) {padding=[1, 1, 1, 1]} @conv0
  %r0: f32[N,8,10,9] = relu(%h0) @relu0
  %h1: f32[N,12,3,5] = conv2d(%r0, %w1, %b1) {stride=[2, 2], padding=[0, 1, 0, 1], dilation=[2, 1], groups=2} @conv1
  %r1: f32[N,12,3,5] = relu(%h1) @relu1
  %h2: f32[N,12,3,5] = conv2d(%r1, %w2, _) {padding=[1, 1, 1, 1], groups=12} @conv2
  %h3: f32[N,5,3,5] = conv2d(%h2, %w3, _) @conv3
  return %h3
}
"""


def conv_net(rng, **weights):
    from tests.helpers import parse

    return parse(CONV_NET, rng, **weights)


def node_named(graph, name):
    return next(n for n in graph.nodes if n.name == name)


def test_shift_pass_rewrites_convs_keeping_window_attributes(rng):
    g = conv_net(rng)
    calib = [{"x": rng.standard_normal((3, 3, 10, 9)).astype(np.float32)} for _ in range(2)]
    inputs = {"x": rng.standard_normal((2, 3, 10, 9)).astype(np.float32)}
    g2, report = passes.run(g, "shift", calibration=calib, inputs=inputs, shift_depthwise=True)
    ir.verify(g2)
    assert g2.op_histogram() == {"conv2d": 2, "shift_conv2d": 2, "relu": 2}
    assert report.matches == {"conv_to_shift": 2}
    reasons = {r.node: r.reason for r in report.refusals}
    assert "first" in reasons["conv0"] and "last" in reasons["conv3"]
    new = {n.inputs[1].name.removesuffix("_sign"): n for n in g2.nodes if n.op == "shift_conv2d"}
    for name in ("conv1", "conv2"):
        old, node = node_named(g, name), new[name]
        assert {k: node.attrs[k] for k in old.attrs} == old.attrs and node.attrs["exponent_bits"] == 3
        w = old.inputs[1].data
        sign, exponent, scale = quantize_shift(w.reshape(len(w), -1))
        np.testing.assert_array_equal(node.inputs[1].data, sign.reshape(w.shape))
        np.testing.assert_array_equal(node.inputs[2].data, exponent.reshape(w.shape))
        np.testing.assert_array_equal(node.inputs[3].data, scale)
        assert (node.inputs[4] is None) == (old.inputs[2] is None)
        assert report.details[name]["error_kind"] == "output" and 0 < report.details[name]["error"] < 0.3
    assert report.max_error < 0.3


def test_depthwise_convs_stay_float_unless_asked(rng):
    g2, report = passes.run(conv_net(rng), "shift", skip=[])
    assert {n.name for n in g2.nodes if n.op == "conv2d"} == {"conv2"}  # the depthwise one
    assert "depthwise conv kept float32" in {r.node: r.reason for r in report.refusals}["conv2"]
    g2, _ = passes.run(conv_net(rng), "shift", skip=[], shift_depthwise=True)
    assert g2.op_histogram()["shift_conv2d"] == 4


def test_conv_output_error_is_the_error_on_im2col_rows(rng):
    """The reported conv error, measured with float convs, is the linear error on the im2col rows."""
    from reshift.ir.ops_lowbit import conv_patches
    from reshift.passes.quant_common import relative_conv_error, relative_output_error

    x = rng.standard_normal((2, 4, 7, 6))
    w = rng.standard_normal((6, 2, 3, 3))
    attrs = {"stride": (2, 1), "padding": (1, 0, 2, 1), "dilation": (1, 2), "groups": 2}
    w_hat = shift_weight(*quantize_shift(w.reshape(6, -1))).reshape(w.shape)
    rows, _ = conv_patches(x, (3, 3), attrs["stride"], attrs["padding"], attrs["dilation"], 2)
    flat, flat_hat = w.reshape(2, 3, -1), w_hat.reshape(2, 3, -1)
    ref = np.concatenate([rows[g] @ flat[g].T for g in range(2)], 1)
    err = np.concatenate([rows[g] @ (flat[g] - flat_hat[g]).T for g in range(2)], 1)
    expected = np.linalg.norm(err) / np.linalg.norm(ref)
    assert relative_conv_error(w, w_hat, x, attrs) == pytest.approx(expected, rel=1e-9)
    weight_only = relative_output_error(w.reshape(6, -1), w_hat.reshape(6, -1), None)
    assert relative_conv_error(w, w_hat, None, attrs) == pytest.approx(weight_only)


def test_shift_pass_refuses_convs_and_says_why(rng):
    b = ir.GraphBuilder()
    x = b.input("x", "f32[N,4,6,6]")
    tied = b.constant(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "tied")
    h = b.relu(b.conv2d(x, tied, None, padding=(1, 1, 1, 1), name="conv_a"))
    h = b.conv2d(h, tied, None, padding=(1, 1, 1, 1), name="conv_b")
    _, report = passes.run(b.build(h), "shift", skip=[])
    assert "%tied is shared with conv_b" in {r.node: r.reason for r in report.refusals}["conv_a"]

    b = ir.GraphBuilder()
    x, w = b.input("x", "f32[N,3,5,5]"), b.input("w", "f32[4,3,3,3]")
    _, report = passes.run(b.build(b.conv2d(x, w, None, name="conv")), "shift", skip=[])
    assert "not a constant" in report.refusals[0].reason

    g2, report = passes.run(conv_net(rng), "shift", skip=["conv2"])
    assert g2.op_histogram()["shift_conv2d"] == 3
    assert "skip pattern 'conv2'" in {r.node: r.reason for r in report.refusals}["conv2"]


def test_shift_pass_refuses_convs_that_overflow_int32():
    b = ir.GraphBuilder()
    x = b.input("x", "f32[N,24,6,6]")  # K = 24*5*5 = 600 > 516: all-ones filters overflow at shift_bits=4
    g = b.build(b.conv2d(x, b.constant(np.ones((2, 24, 5, 5), np.float32)), None, name="wide"))
    g2, report = passes.run(g, "shift", skip=[], shift_bits=4)
    assert "K = C/groups*kh*kw = 24*5*5 = 600" in report.refusals[0].reason and "int32" in report.refusals[0].reason
    assert g2.op_histogram() == {"conv2d": 1}
    g2, _ = passes.run(g, "shift", skip=[])  # the default 3 bits: 127 * 600 * 2^7 fits
    assert g2.op_histogram() == {"shift_conv2d": 1}


def test_shift_pass_handles_convs_and_linears_together(rng):
    b = ir.GraphBuilder("mixed")
    x = b.input("x", "f32[N,2,4,4]")
    h = b.conv2d(x, b.constant(rng.standard_normal((4, 2, 3, 3)).astype(np.float32)), None, padding=(1, 1, 1, 1))
    h = b.reshape(b.relu(h), shape=("N", 64))
    y = b.linear(h, b.constant(rng.standard_normal((3, 64)).astype(np.float32)), None)
    g2, report = passes.run(b.build(y), "shift", skip=[])
    assert g2.op_histogram()["shift_conv2d"] == 1 and g2.op_histogram()["shift_linear"] == 1
    assert report.matches == {"conv_to_shift": 1, "linear_to_shift": 1}
