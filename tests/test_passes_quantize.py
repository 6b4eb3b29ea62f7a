"""quantize_uniform / int8_linear references and passes/quantize.py + passes/calibrate.py (W8A8..W4A4)."""

from __future__ import annotations

import numpy as np
import pytest

from reshift import ir, passes
from reshift.ir.builder import GraphBuilder
from reshift.ir.ops_quant import int8_linear_ref, quantize_uniform_ref
from reshift.passes.calibrate import quantize_weight, uniform_params, weight_scales

from .conftest import max_relative_error


def test_quantize_uniform_edges():
    x = np.array([0.0, 0.05, 0.15, 0.25, -0.35, 1e9, -1e9, np.inf, -np.inf, np.nan], np.float32)
    y = quantize_uniform_ref(x, (0.1,), (4.0,), 4, -1)
    # half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2; range [-4, 11] * 0.1; NaN stays NaN
    np.testing.assert_allclose(y[:5], np.float32([0.0, 0.0, 0.2, 0.2, -0.4]), atol=1e-7)
    np.testing.assert_allclose(y[5:9], np.float32([1.1, -0.4, 1.1, -0.4]), rtol=1e-6)
    assert np.isnan(y[9])
    powers = np.float32([0.125, 0.25, 0.5, 1.0])
    np.testing.assert_array_equal(quantize_uniform_ref(powers, (0.125,), (0.0,), 8, -1), powers)


def test_quantize_uniform_per_channel_and_signed():
    x = np.float32([[1.0, 1.0], [-1.0, -1.0]])
    y = quantize_uniform_ref(x, (0.5, 0.3), (0.0, 0.0), 4, 1, signed=True)
    np.testing.assert_allclose(y, np.float32([[1.0, 0.9], [-1.0, -0.9]]), rtol=1e-6)
    b = GraphBuilder()
    v = b.input("x", "f32[N,2]")
    with pytest.raises(Exception, match="zero points must be integers"):
        b.quantize_uniform(v, scale=(0.1,), zero_point=(0.5,))
    with pytest.raises(Exception, match="2 scales"):
        b.quantize_uniform(b.input("y", "f32[N,3]"), scale=(0.1, 0.2), zero_point=(0.0, 0.0))


def test_int8_linear_reference_is_exact_integer_kernel(rng):
    x = rng.standard_normal((3, 5, 40)).astype(np.float32)
    wq = rng.integers(-127, 128, (7, 40)).astype(np.int8)
    ws = rng.random(7).astype(np.float32) * 0.01
    bias = rng.standard_normal(7).astype(np.float32)
    x[1, 2, 3] = np.nan
    y = int8_linear_ref(x, wq, ws, bias, 0.03, 100, 8)
    xq = np.clip(np.rint(x / np.float32(0.03)) + 100, 0, 255) - 100
    expected = (xq.reshape(-1, 40).astype(np.float64) @ wq.T.astype(np.float64)) * (np.float32(0.03) * ws) + bias
    mask = ~np.isnan(x.reshape(-1, 40)).any(1)
    np.testing.assert_allclose(y.reshape(-1, 7)[mask], expected[mask], rtol=1e-6, atol=1e-6)
    assert np.all(np.isnan(y[1, 2])) and not np.isnan(y[1, 1]).any()


def test_uniform_params_and_weight_search(rng):
    scale, zp = uniform_params(-1.0, 3.0, 8)
    assert zp == 64 and abs(scale - 4 / 255) < 1e-7
    assert uniform_params(0.5, 2.0, 4)[1] == 0  # range always holds 0
    w = rng.standard_normal((16, 64))
    w[0, 0] = 20.0  # an outlier: MSE clipping shrinks that channel's range, minmax does not
    mse, mm = weight_scales(w, 4, "mse"), weight_scales(w, 4, "minmax")
    assert mse[0] < mm[0] and np.all(mse <= mm + 1e-12)
    for bits in (4, 6, 8):
        codes, scales = quantize_weight(w, bits)
        assert codes.dtype == np.int8 and np.abs(codes).max() <= 2 ** (bits - 1) - 1
        err = np.linalg.norm(codes * scales[:, None] - w) / np.linalg.norm(w)
        assert err < {4: 0.2, 6: 0.05, 8: 0.012}[bits]


def mlp_attention(rng, dim=16):
    """x -> LN -> linear -> (q @ k^T) softmax @ v -> linear -> GELU -> linear."""
    b = GraphBuilder("attn")
    x = b.input("x", f"f32[N,8,{dim}]")
    w = lambda o, i: b.constant((rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32))  # noqa: E731
    bias = lambda o: b.constant((0.1 * rng.standard_normal(o)).astype(np.float32))  # noqa: E731
    h = b.layer_norm(x, b.constant(np.ones(dim, np.float32)), b.constant(np.zeros(dim, np.float32)))
    q, k, v = (b.linear(h, w(dim, dim), bias(dim)) for _ in range(3))
    att = b.softmax(b.matmul(q, b.transpose(k, perm=(0, 2, 1))), axis=-1)
    o = b.linear(b.matmul(att, v), w(dim, dim), bias(dim))
    y = b.linear(b.gelu(b.linear(o, w(4 * dim, dim), bias(4 * dim))), w(dim, 4 * dim), bias(dim))
    return b.build(y)


def batches(rng, n, dim=16):
    return [{"x": rng.standard_normal((4, 8, dim)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("bits,bound", [(8, 0.05), (6, 0.25), (4, 0.8)])
def test_uniform_pipeline_error_and_structure(rng, bits, bound):
    g = mlp_attention(rng)
    calib, test = batches(rng, 3), batches(rng, 1)[0]
    g2, report = passes.run(g, f"w{bits}a{bits}", calibration=calib, skip=())
    ir.verify(g2)
    hist = g2.op_histogram()
    assert hist["int8_linear"] == 6 and "linear" not in hist and hist["quantize_uniform"] == 4
    ref, out = ir.interpret(g, test), ir.interpret(g2, test)
    err = max_relative_error(out[g2.outputs[0].name], ref[g.outputs[0].name])
    assert err < bound
    layer = next(d for d in report.details.values() if "w_bits" in d)
    assert layer["w_bits"] == bits and layer["a_bits"] == bits
    assert len([r for r in report.records if r.changed]) == 1  # a second round changes nothing
    qnode = next(n for n in g2.nodes if n.op == "int8_linear")
    assert qnode.inputs[1].dtype == "int8" and qnode.attrs["x_bits"] == bits


def test_default_skip_keeps_first_and_last_float(rng):
    g2, report = passes.run(mlp_attention(rng), "w8a8", calibration=batches(rng, 1))
    assert g2.op_histogram()["linear"] == 2
    assert any("first weight layer" in r.reason for r in report.refusals)


def test_quantization_needs_calibration(rng):
    with pytest.raises(Exception, match="calibration"):
        passes.run(mlp_attention(rng), "w8a8")


def test_unknown_method_is_named(rng):
    with pytest.raises(Exception, match="minmax, percentile or mse"):
        passes.run(mlp_attention(rng), "w8a8", calibration=batches(rng, 1), act_method="kl")


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_activation_methods(rng, method):
    g = mlp_attention(rng)
    g2, _ = passes.run(g, "w8a8", calibration=batches(rng, 2), act_method=method, skip=())
    test = batches(rng, 1)[0]
    assert (
        max_relative_error(ir.interpret(g2, test)[g2.outputs[0].name], ir.interpret(g, test)[g.outputs[0].name]) < 0.1
    )


def test_compiled_int8_kernel_and_quantizers_are_bit_exact(rng):
    """The TVM int8_linear (VNNI where the CPU has it) and quantizer lowerings match the references."""
    import reshift

    b = GraphBuilder("int8")
    x = b.input("x", "f32[N,5,40]")
    codes = rng.integers(-127, 128, (20, 40)).astype(np.int8)
    y = b.int8_linear(
        x,
        b.constant(codes),
        b.constant((rng.random(20) * 0.01).astype(np.float32)),
        b.constant(rng.standard_normal(20).astype(np.float32)),
        x_scale=0.02,
        x_zero_point=100,
    )
    u = b.quantize_uniform(y, scale=(0.05,), zero_point=(7.0,), bits=4)
    s = b.softmax(u)
    outs = [
        y,
        u,
        b.log2_quant(s, bits=4),
        b.log2_quant(s, bits=4, base_kind="adaptive", base=2 ** (12 / 16), scale=0.9),
    ]
    g = b.build(*outs)
    xin = (rng.standard_normal((3, 5, 40)) * 2).astype(np.float32)
    xin[0, 1, 2] = np.nan
    cm = reshift.compile(g, pipeline="none")
    for ref, out in zip(ir.interpret(g, {"x": xin}).values(), cm(xin), strict=True):
        np.testing.assert_array_equal(out, ref)


def test_compile_w8a8_pipeline_end_to_end(rng):
    import reshift

    g = mlp_attention(rng)
    calib, test = batches(rng, 2), batches(rng, 1)[0]
    cm = reshift.compile(g, pipeline="w8a8", calibration=calib)
    g2, _ = passes.run(g, "w8a8", calibration=calib)
    out = cm(test["x"])
    np.testing.assert_allclose(out, ir.interpret(g2, test)[g2.outputs[0].name], rtol=1e-4, atol=1e-5)
