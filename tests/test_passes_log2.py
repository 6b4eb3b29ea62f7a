"""log2_quant reference (log2, log-sqrt2, adaptive) and passes/log2.py (RepQ-ViT, AdaLog)."""

from __future__ import annotations

import numpy as np
import pytest

from reshift import ir, passes
from reshift.ir.builder import GraphBuilder
from reshift.ir.ops_quant import SQRT2, fraction_table, largest_floor_exponent, log2_quant_ref
from reshift.passes.log2 import GELU_SHIFT

from .conftest import max_relative_error
from .test_passes_quantize import batches, mlp_attention

ADAPTIVE_BASE = 2 ** (12 / 16)


@pytest.mark.parametrize("kind,base", [("log2", 2.0), ("log_sqrt2", 2.0), ("adaptive", ADAPTIVE_BASE)])
def test_exact_levels_zero_nan_negative(kind, base):
    powers = np.float32([1.0, 0.5, 0.25, 0.125])
    y = log2_quant_ref(powers, 4, kind, base, 1.0, 16)
    if kind != "adaptive":
        np.testing.assert_array_equal(y, powers)  # exact powers of two are levels
    else:
        np.testing.assert_array_equal(y[0], 1.0)
    special = np.float32([0.0, -0.17, -5.0, np.nan, np.inf, 3.0])
    z = log2_quant_ref(special, 4, kind, base, 1.0, 16)
    np.testing.assert_array_equal(z[:3], 0.0)  # zero and negatives map to the zero level
    assert np.isnan(z[3])
    np.testing.assert_array_equal(z[4:], 1.0)  # above the top level: clamp to scale


def test_log_sqrt2_odd_codes_use_one_sqrt2_multiply():
    x = np.float32([2**-0.5, 2**-1.5, 2**-2.5])
    y = log2_quant_ref(x, 4, "log_sqrt2", 2.0, 1.0, 16)
    np.testing.assert_array_equal(y, np.float32([0.5 * SQRT2, 0.25 * SQRT2, 0.125 * SQRT2]))


def test_values_below_smallest_level():
    # 4 bits: codes 0..14 are levels, 15 is zero; log2 smallest level 2^-14
    y = log2_quant_ref(np.float32([2**-14, 2**-14.4, 2**-14.6, 2**-20]), 4, "log2", 2.0, 1.0, 16)
    np.testing.assert_array_equal(y, np.float32([2**-14, 2**-14, 0.0, 0.0]))
    y = log2_quant_ref(np.float32([2**-7, 2**-7.6]), 4, "log_sqrt2", 2.0, 1.0, 16)
    np.testing.assert_array_equal(y, np.float32([2**-7, 0.0]))  # log-sqrt2 reaches only 2^-7


def test_adaptive_levels_come_from_the_fraction_table():
    table = fraction_table(16)
    assert table[0] == 1.0 and abs(table[8] - 2**-0.5) < 1e-7
    levels = log2_quant_ref(
        ADAPTIVE_BASE ** -np.arange(15, dtype=np.float64).astype(np.float32), 4, "adaptive", ADAPTIVE_BASE, 1.0, 16
    )
    expected = np.float32([np.ldexp(np.float32(1), -(q * 12 // 16)) * table[(q * 12) % 16] for q in range(15)])
    np.testing.assert_array_equal(levels, expected)
    b = GraphBuilder()
    with pytest.raises(Exception, match="adaptive base"):
        b.log2_quant(b.input("x", "f32[2]"), base_kind="adaptive", base=1.3)


def test_log2_quant_scale():
    y = log2_quant_ref(np.float32([4.0, 2.0, 1.0]), 3, "log2", 2.0, 4.0, 16)
    np.testing.assert_array_equal(y, np.float32([4.0, 2.0, 1.0]))


def test_repq_log2_softmax_pass(rng):
    g = mlp_attention(rng)
    g2, report = passes.run(g, "w4a4_log2", calibration=batches(rng, 2), skip=())
    hist = g2.op_histogram()  # log2_quant -> matmul <- quantize_uniform(V) fused into log2_matmul
    assert hist["log2_matmul"] == 1 and hist["quantize_uniform"] == 2 and "log2_quant" not in hist
    node = next(n for n in g2.nodes if n.op == "log2_matmul")
    assert node.attrs["base_kind"] == "log_sqrt2" and node.attrs["bits"] == 4 and node.attrs["v_bits"] == 4
    assert report.matches["log2_matmul"] == 1
    assert ir.interpret(g2, batches(rng, 1)[0])  # runs
    from reshift.passes.quantize import quantizer_table

    table = quantizer_table(g2, report, batches(rng, 1)[0])  # what `reshift inspect` prints
    row = next(line for line in table.splitlines() if "log2_matmul" in line)
    assert "log_sqrt2 codes x V int4" in row and float(row.rstrip(" |").split("|")[-1]) < 0.5


def test_adalog_pass_softmax_and_gelu_bias_reparam(rng):
    g = mlp_attention(rng)
    calib, test = batches(rng, 2), batches(rng, 1)[0]
    # alone (weights float) the GELU shift and bias compensation are exact up to the quantizer
    g_log, report = passes.run(g, "adalog", calibration=calib, a_bits=8)
    assert report.matches == {"log2_softmax": 1, "log2_gelu_bias_reparam": 1}
    assert (
        max_relative_error(ir.interpret(g_log, test)[g.outputs[0].name], ir.interpret(g, test)[g.outputs[0].name])
        < 0.05
    )
    gelu_q = next(d for k, d in report.details.items() if "gelu" in k)
    assert gelu_q["shift"] == GELU_SHIFT and gelu_q["output_error"] < 0.05
    g4, _ = passes.run(g, "w4a4_adalog", calibration=calib, skip=())
    hist = g4.op_histogram()
    assert hist["linear"] == 1  # fc2 reads log2 activations: weight-only quantized
    assert hist["log2_quant"] == 1 and hist["log2_matmul"] == 1  # post-GELU; attention as shifts and adds


def test_log2_quant_onnx_decomposition_and_domain(rng):
    """Default export: a float64 decomposition onnxruntime runs; ``custom_ops="domain"``: one ai.reshift node."""
    import onnx
    import onnxruntime as ort

    from reshift.codegen.onnx import to_onnx

    b = GraphBuilder("log2")
    x = b.input("x", "f32[N,16]")
    outs = [
        b.log2_quant(x, bits=4),
        b.log2_quant(x, bits=4, base_kind="log2", scale=0.5),
        b.log2_quant(x, bits=6, base_kind="adaptive", base=2 ** (11 / 16), scale=0.9),
    ]
    g = b.build(*outs)
    xin = rng.random((3, 16)).astype(np.float32)
    xin[0, :6] = [0.0, -0.3, 1.0, 0.5, 2.0**-20, np.nan]
    model = to_onnx(g)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for out, ref in zip(sess.run(None, {"x": xin}), ir.interpret(g, {"x": xin}).values(), strict=True):
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    domain = to_onnx(g, custom_ops="domain")
    onnx.checker.check_model(domain)
    assert [n.domain for n in domain.graph.node if n.op_type == "log2_quant"] == ["ai.reshift"] * 3


# -- log2_quant -> matmul fused into log2_matmul ---------------------------------------------------
def tiny_vit_graph():
    import torch

    import reshift
    from examples.models.vit import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(16, 4, 48, 1, 3, 10).eval()  # 17 tokens, 3 heads of 16
    return reshift.frontend.from_torch(model, (torch.randn(2, 3, 16, 16),))


def _unfused_and_fused(g, pipeline, calib, **options):
    from reshift.passes import PASSES, PassContext, PassManager, pipeline_passes

    unfused, _ = PassManager([p for p in pipeline_passes(pipeline) if p.name != "fuse_log2_matmul"]).run(
        g, PassContext(calib, options)
    )
    fused, report = PassManager([PASSES["fuse_log2_matmul"]]).run(unfused, PassContext(calib, options))
    return unfused, fused, report


@pytest.mark.parametrize("pipeline", ["w4a4_log2", "w4a4_repq", "w4a4_adalog"])
def test_fused_log2_matmul_matches_fake_quant_on_tiny_vit_attention(rng, pipeline):
    """On a 3-head ViT block the fused kernel reproduces the fake-quant attention (float32 rounding),
    log-sqrt2 and AdaLog's adaptive base alike."""
    g = tiny_vit_graph()
    calib = [{g.inputs[0].name: rng.standard_normal((4, 3, 16, 16)).astype(np.float32)} for _ in range(2)]
    test = {g.inputs[0].name: rng.standard_normal((3, 3, 16, 16)).astype(np.float32)}
    unfused, fused, report = _unfused_and_fused(g, pipeline, calib)
    assert report.matches == {"log2_matmul": 1}
    fused_producers = fused.producers()
    assert not any(
        n.op == "matmul" and getattr(fused_producers.get(n.inputs[0]), "op", None) == "log2_quant" for n in fused.nodes
    )
    node = next(n for n in fused.nodes if n.op == "log2_matmul")
    producers = unfused.producers()
    matmul = next(
        n
        for n in unfused.nodes
        if n.op == "matmul" and producers.get(n.inputs[0]) and producers[n.inputs[0]].op == "log2_quant"
    )
    a = ir.interpret(fused, test, return_all=True)[node.outputs[0].name]
    b = ir.interpret(unfused, test, return_all=True)[matmul.outputs[0].name]
    assert a.shape == b.shape == (3, 3, 17, 16)
    assert max_relative_error(a, b) < 1e-5
    out_f, out_u = ir.interpret(fused, test), ir.interpret(unfused, test)
    name = g.outputs[0].name
    assert max_relative_error(out_f[name], out_u[name]) < 1e-3  # later 4-bit requantization may flip a code


def test_fuse_log2_matmul_refuses_with_reasons(rng):
    """Float V (no quantizer) stays fake-quant; 6-bit log-sqrt2 codes (their smallest level 2^-31
    overflows int32 shifts) fuse with a floor, an 8-bit one over 40,000 tokens (floor below 2^-8) does
    not; adaptive bases fuse."""
    from reshift.passes import PASSES, PassContext, PassManager

    g, calib = mlp_attention(rng), batches(rng, 2)
    fuse = PassManager([PASSES["log2_a4"], PASSES["fuse_log2_matmul"]])
    g_float_v, report = fuse.run(g, PassContext(calib, {}))
    assert "log2_matmul" not in g_float_v.op_histogram() and g_float_v.op_histogram()["log2_quant"] == 1
    assert any("is not quantized" in r.reason for r in report.refusals)
    unfused6, g6, report6 = _unfused_and_fused(g, "w6a6_log2", calib, skip=())
    (node6,) = [n for n in g6.nodes if n.op == "log2_matmul"]
    tokens = node6.inputs[0].shape[-1]
    assert node6.attrs["bits"] == 6
    assert node6.attrs["floor_exponent"] == largest_floor_exponent(node6.attrs["v_bits"], tokens)
    name = g.outputs[0].name
    x = batches(rng, 1)[0]
    assert max_relative_error(ir.interpret(g6, x)[name], ir.interpret(unfused6, x)[name]) < 1e-3
    b = GraphBuilder("long")
    p, v = b.input("p", "f32[1,40000,40000]"), b.input("v", "f32[1,40000,8]")
    vq = b.quantize_uniform(v, scale=(0.05,), zero_point=(128.0,), bits=8)
    long = b.build(b.matmul(b.log2_quant(p, bits=8, base_kind="log2"), vq))
    _, report_long = PassManager([PASSES["fuse_log2_matmul"]]).run(long, PassContext(None, {}))
    assert report_long.matches == {}
    assert any("would drop attention mass" in r.reason for r in report_long.refusals)
    _, g_ada, report_ada = _unfused_and_fused(g, "w4a4_log2", calib, skip=(), base_kind="adaptive")
    node = next(n for n in g_ada.nodes if n.op == "log2_matmul")
    assert node.attrs["base_kind"] == "adaptive" and report_ada.matches == {"log2_matmul": 1}


def test_log2_matmul_onnx_decomposition_and_domain(rng):
    import onnx
    import onnxruntime as ort

    from reshift.codegen.onnx import to_onnx

    b = GraphBuilder("log2_mm")
    p, v = b.input("p", "f32[N,2,7,7]"), b.input("v", "f32[N,2,7,8]")
    y = b.log2_matmul(p, v, bits=4, v_scale=0.05, v_zero_point=7, v_bits=4)
    y_ada = b.log2_matmul(
        p, v, bits=4, base_kind="adaptive", base=2 ** (11 / 16), v_scale=0.05, v_zero_point=7, v_bits=4
    )
    y_floor = b.log2_matmul(p, v, bits=8, base_kind="log2", floor_exponent=3, v_scale=0.05, v_zero_point=7, v_bits=4)
    g = b.build(b.add(b.add(y, y_ada), y_floor))
    logits = rng.standard_normal((3, 2, 7, 7))
    pin = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    feeds = {"p": pin, "v": rng.standard_normal((3, 2, 7, 8)).astype(np.float32)}
    model = to_onnx(g)
    onnx.checker.check_model(model)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert max_relative_error(out, ir.interpret(g, feeds)[g.outputs[0].name]) < 1e-5
    domain = to_onnx(g, custom_ops="domain")
    assert [n.domain for n in domain.graph.node if n.op_type == "log2_matmul"] == ["ai.reshift"] * 3
    from reshift.frontend import from_onnx

    floors = sorted(n.attrs["floor_exponent"] for n in from_onnx(domain).nodes if n.op == "log2_matmul")
    assert floors == [-1, -1, 3]
