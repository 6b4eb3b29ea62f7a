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


def random_int8_linear(b: GraphBuilder, x, rng, **attrs):
    """An int8_linear 40 -> 20 with random int8 codes, per-channel scales and bias."""
    codes = rng.integers(-127, 128, (20, 40)).astype(np.int8)
    return b.int8_linear(
        x,
        b.constant(codes),
        b.constant((rng.random(20) * 0.01).astype(np.float32)),
        b.constant(rng.standard_normal(20).astype(np.float32)),
        **attrs,
    )


def test_compiled_int8_kernel_and_quantizers_are_bit_exact(rng):
    """The TVM int8_linear (VNNI where the CPU has it) and quantizer lowerings match the references."""
    import reshift

    b = GraphBuilder("int8")
    x = b.input("x", "f32[N,5,40]")
    y = random_int8_linear(b, x, rng, x_scale=0.02, x_zero_point=100)
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


def test_int8_linear_row_granularity_reference_edges(rng):
    """Per-row dynamic scales: all-zero rows, all-positive rows (zero point 0), NaN rows."""
    x = rng.standard_normal((4, 40)).astype(np.float32)
    x[0] = 0.0
    x[1] = np.abs(x[1]) + 1.0
    x[3, 5] = np.nan
    wq = rng.integers(-127, 128, (9, 40)).astype(np.int8)
    ws = (rng.random(9) * 0.01).astype(np.float32)
    y = int8_linear_ref(x, wq, ws, None, 1.0, 0, 8, "row")
    assert np.all(y[0] == 0) and np.all(np.isnan(y[3])) and not np.isnan(y[:3]).any()
    s = np.float32(x[1].max()) / np.float32(255)  # lo = 0, so z = 0 and the top value hits 255
    expected = (np.clip(np.rint(x[1] / s), 0, 255) @ wq.T.astype(np.float64)) * (s * ws)
    np.testing.assert_allclose(y[1], expected, rtol=1e-6)
    with pytest.raises(Exception, match="x_granularity"):
        b = GraphBuilder("bad")
        b.build(b.int8_linear(b.input("x", "f32[2,40]"), b.constant(wq), b.constant(ws), x_granularity="col"))


def test_row_granularity_and_smoothing_reduce_error(rng):
    g = mlp_attention(rng)
    calib, test = batches(rng, 2), batches(rng, 1)[0]
    ref = ir.interpret(g, test)[g.outputs[0].name]
    errs = {}
    for label, opts in {"tensor": {}, "row": {"act_granularity": "row"}, "smooth": {"smooth_alpha": 0.5}}.items():
        g2, report = passes.run(g, "w6a6", calibration=calib, skip=(), **opts)
        errs[label] = max_relative_error(ir.interpret(g2, test)[g2.outputs[0].name], ref)
        if label == "row":
            assert all(n.attrs["x_granularity"] == "row" for n in g2.nodes if n.op == "int8_linear")
        if label == "smooth":
            assert report.details and g2.op_histogram()["mul"] >= 1
    assert errs["row"] < 0.25 and errs["smooth"] < 0.25  # random weights have no outlier channels to win on


def test_smoothing_alone_is_exact(rng):
    """x diag(s)^-1 (W diag(s))^T = x W^T: the migration by itself changes no output (1e-5)."""
    from reshift.passes.pattern import match
    from reshift.passes.quant_common import LINEAR
    from reshift.passes.quantize import smooth_activations
    from reshift.passes.rules import RuleStats

    g = mlp_attention(rng)
    calib, test = batches(rng, 2), batches(rng, 1)[0]
    g2 = g.copy()
    ms = [match(LINEAR, n, g2.producers()) for n in g2.nodes if n.op == "linear"]
    stats = RuleStats()
    smooth_activations(g2, calib, ms, {"smooth_alpha": 0.5}, stats)
    ir.verify(g2)
    assert stats.matches["smooth_activation"] == 4  # LN -> q,k,v share one; attention out; fc1; fc2
    ref, out = ir.interpret(g, test)[g.outputs[0].name], ir.interpret(g2, test)[g2.outputs[0].name]
    assert max_relative_error(out, ref) < 1e-5


def test_compiled_row_granularity_kernel_is_bit_exact(rng):
    import reshift

    b = GraphBuilder("int8_rows")
    x = b.input("x", "f32[N,5,40]")
    y = random_int8_linear(b, x, rng, x_granularity="row")
    g = b.build(y)
    xin = (rng.standard_normal((3, 5, 40)) * 2).astype(np.float32)
    xin[0, 1, 2] = np.nan
    xin[1, 0] = 0.0
    xin[2, 3] = np.abs(xin[2, 3])
    np.testing.assert_array_equal(reshift.compile(g, pipeline="none")(xin), ir.interpret(g, {"x": xin})[y.name])


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_qdq_onnx_export_runs_in_onnxruntime(rng, granularity):
    """w6a6 (narrow grids) and w8a8 graphs export as standard QuantizeLinear/DequantizeLinear."""
    import onnx
    import onnxruntime as ort

    from reshift.codegen.onnx import to_onnx

    g = mlp_attention(rng)
    calib, test = batches(rng, 2), batches(rng, 1)[0]
    for pipeline in ("w8a8", "w6a6"):
        g2, _ = passes.run(g, pipeline, calibration=calib, skip=(), act_granularity=granularity)
        for mode in ("decompose", "domain"):
            model = to_onnx(g2, custom_ops=mode)
            onnx.checker.check_model(model)
            ops = {n.op_type for n in model.graph.node}
            assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops
            assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
        opts = ort.SessionOptions()  # EXTENDED fuses DQ(int8 W) + MatMul into MatMulNBits, which
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # requantizes x its own way
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": test["x"]})[0]
        ref = ir.interpret(g2, test)[g2.outputs[0].name]
        assert max_relative_error(out, ref) < 1e-3, pipeline


def test_qdq_export_quantizer_edges(rng):
    import onnxruntime as ort

    from reshift.codegen.onnx import to_onnx

    b = GraphBuilder("qdq")
    x = b.input("x", "f32[N,6]")
    outs = [
        b.quantize_uniform(x, scale=(0.1,), zero_point=(3.0,), bits=4),
        b.quantize_uniform(x, scale=(0.05,), zero_point=(0.0,), bits=8, signed=True),
        b.quantize_uniform(x, scale=tuple(float(v) for v in np.linspace(0.01, 0.2, 6)), zero_point=(0.0,) * 6),
    ]
    g = b.build(*outs)
    xin = np.array([[0.0, -0.0, 1e9, -1e9, 0.25, -6.35], [0.05, 0.15, -0.15, 12.7, -12.7, 3.0]], np.float32)
    sess = ort.InferenceSession(to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    for out, ref in zip(sess.run(None, {"x": xin}), ir.interpret(g, {"x": xin}).values(), strict=True):
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_default_activation_granularity_is_row_at_8_bits_tensor_below(rng):
    """w8a8 quantizes activations per token at run time by default (LLM int8 runtimes; MiniLM W8A8
    needs it for cosine >= 0.995); w6a6/w4a4 keep static per-tensor scales; both stay selectable."""
    g, calib = mlp_attention(rng), batches(rng, 2)
    for pipeline, options, expected in [
        ("w8a8", {}, "row"),
        ("w8a8", {"act_granularity": "tensor"}, "tensor"),
        ("w6a6", {}, "tensor"),
        ("w4a4", {"act_granularity": "row"}, "row"),
    ]:
        g2, report = passes.run(g, pipeline, calibration=calib, skip=(), **options)
        modes = {n.attrs["x_granularity"] for n in g2.nodes if n.op == "int8_linear"}
        assert modes == {expected}, (pipeline, options)
        assert all(d["x_granularity"] == expected for d in report.details.values() if "w_bits" in d and "a_bits" in d)
    with pytest.raises(Exception, match="act_granularity"):
        passes.run(g, "w8a8", calibration=calib, act_granularity="col")
