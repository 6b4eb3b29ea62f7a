"""int8 kernels: the fused VNNI int8_linear (quantize prologue + register-blocked GEMM + rescale), the
int8_conv2d op (reference, type checks, VNNI implicit GEMM and portable lowering, ONNX QDQ export)
and the w8a8 rule that turns dense convs into it."""

import numpy as np
import pytest

import reshift
from reshift import ir, passes
from reshift.ir.builder import GraphBuilder
from reshift.ir.ops_quant import int8_conv2d_ref

from .conftest import max_relative_error


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def _int8_linear_graph(rng, k, out, granularity, bias=True):
    b = GraphBuilder("int8")
    x = b.input("x", f"f32[N,3,{k}]")
    codes = rng.integers(-127, 128, (out, k)).astype(np.int8)
    scales = (rng.random(out) * 0.01 + 1e-3).astype(np.float32)
    bias_v = b.constant(rng.standard_normal(out).astype(np.float32)) if bias else None
    y = b.int8_linear(
        x, b.constant(codes), b.constant(scales), bias_v, x_scale=0.02, x_zero_point=100, x_granularity=granularity
    )
    return b.build(y)


@pytest.mark.parametrize(
    "k,out,granularity,bias",
    [(40, 20, "tensor", True), (33, 48, "row", True), (384, 64, "row", False), (64, 37, "tensor", False)],
)
def test_fused_int8_linear_is_bit_exact(rng, k, out, granularity, bias):
    """Rows that fill no whole register tile, K not a multiple of 16 or 4, O not of 16; NaN, inf,
    all-zero and all-positive rows."""
    g = _int8_linear_graph(rng, k, out, granularity, bias)
    x = (rng.standard_normal((7, 3, k)) * 2).astype(np.float32)
    x[0, 1, 2] = np.nan
    x[1, 0, 0] = np.inf
    x[2, 2] = 0.0
    x[3, 1] = np.abs(x[3, 1]) + 1.0
    cm = reshift.compile(g, pipeline="none")
    ref = ir.interpret(g, {"x": x})[g.outputs[0].name]
    np.testing.assert_array_equal(cm(x), ref)
    assert np.isnan(ref[0, 1]).all() and not np.isnan(ref[0, 0]).any()


def test_int8_conv2d_reference_matches_float_conv_of_codes(rng):
    """acc is the float conv of (q - z) with the codes; zero padding adds nothing; NaN images are NaN."""
    x = rng.standard_normal((2, 5, 7, 6)).astype(np.float32)
    wq = rng.integers(-127, 128, (8, 5, 3, 3)).astype(np.int8)
    ws = (rng.random(8) * 0.01).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    args = dict(stride=(2, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1, x_bits=8)
    y = int8_conv2d_ref(x, wq, ws, bias, x_scale=0.05, x_zero_point=128, **args)
    q = np.clip(np.rint(x / np.float32(0.05)) + 128, 0, 255) - 128
    from reshift.ir.numpy_kernels import conv2d

    expected = conv2d(q.astype(np.float64), wq.astype(np.float64), None, (2, 1), (1, 1, 1, 1), (1, 1), 1)
    expected = expected * (np.float32(0.05) * ws)[None, :, None, None] + bias[None, :, None, None]
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    x[1, 2, 3, 4] = np.nan
    y = int8_conv2d_ref(x, wq, ws, bias, x_scale=0.05, x_zero_point=128, **args)
    assert np.isnan(y[1]).all() and not np.isnan(y[0]).any()


@pytest.mark.parametrize(
    "attrs,message",
    [
        ({"x_bits": 9}, "x_bits"),
        ({"x_zero_point": 300}, "x_zero_point"),
        ({"x_scale": 0.0}, "x_scale"),
        ({"groups": 3}, "groups"),
    ],
)
def test_int8_conv2d_type_check_refuses(rng, attrs, message):
    b = GraphBuilder("bad")
    x = b.input("x", "f32[1,4,8,8]")
    wq = b.constant(rng.integers(-127, 128, (16, 4, 3, 3)).astype(np.int8))
    with pytest.raises(Exception, match=message):
        b.build(b.int8_conv2d(x, wq, b.constant(np.ones(16, np.float32)), **attrs))
    with pytest.raises(Exception, match="int8"):
        b2 = GraphBuilder("bad_w")
        x2 = b2.input("x", "f32[1,4,8,8]")
        b2.build(
            b2.int8_conv2d(x2, b2.constant(np.ones((16, 4, 3, 3), np.float32)), b2.constant(np.ones(16, np.float32)))
        )


def test_compiled_int8_conv2d_is_bit_exact(rng):
    """VNNI implicit GEMM (16-channel panels: stride 2, dilation 2, 1x1, uneven padding, tail pixels)
    and the portable path (20 output channels), in one build; NaN and inf inputs."""
    b = GraphBuilder("convs")
    x = b.input("x", "f32[N,6,11,13]")
    outs = []
    for out, k, stride, pad, dil in [
        (32, 3, 2, (1, 1, 1, 1), 1),
        (16, 3, 1, (2, 1, 0, 2), 2),
        (48, 1, 1, (0,) * 4, 1),
        (20, 3, 1, (1,) * 4, 1),
    ]:
        codes = rng.integers(-127, 128, (out, 6, k, k)).astype(np.int8)
        outs.append(
            b.int8_conv2d(
                x,
                b.constant(codes),
                b.constant((rng.random(out) * 0.01).astype(np.float32)),
                b.constant(rng.standard_normal(out).astype(np.float32)),
                stride=(stride, stride),
                padding=pad,
                dilation=(dil, dil),
                x_scale=0.03,
                x_zero_point=90,
            )
        )
    g = b.build(*outs)
    xin = (rng.standard_normal((3, 6, 11, 13)) * 2).astype(np.float32)
    xin[1, 0, 2, 3] = np.nan
    xin[2, 5, 10, 12] = np.inf
    cm = reshift.compile(g, pipeline="none")
    for ref, out in zip(ir.interpret(g, {"x": xin}).values(), cm(xin), strict=True):
        np.testing.assert_array_equal(out, ref)


def _small_cnn(rng):
    b = GraphBuilder("cnn")
    x = b.input("x", "f32[N,3,16,16]")

    def conv(h, cin, cout, stride=1, groups=1):
        w = b.constant((rng.standard_normal((cout, cin // groups, 3, 3)) * 0.3).astype(np.float32))
        bias = b.constant((rng.standard_normal(cout) * 0.1).astype(np.float32))
        return b.conv2d(h, w, bias, stride=(stride, stride), padding=(1, 1, 1, 1), groups=groups)

    h = b.relu(conv(x, 3, 16))
    h = b.relu(conv(h, 16, 32, 2))
    h = b.add(b.relu(conv(h, 32, 32)), h)
    h = b.relu(conv(h, 32, 32, groups=32))
    h = b.relu(conv(h, 32, 32, groups=4))
    return b.build(conv(h, 32, 16))


def test_w8a8_quantizes_dense_and_depthwise_convs_within_bound(rng):
    g = _small_cnn(rng)
    calib = [{"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(2)]
    g2, report = passes.run(g, "w8a8", calibration=calib)
    hist = g2.op_histogram()
    assert hist["int8_conv2d"] == 3 and hist["conv2d"] == 3  # two dense, one depthwise
    reasons = {r.node: r.reason for r in report.refusals}
    assert "first weight layer" in reasons["conv2d_0"] and "last weight layer" in reasons["conv2d_5"]
    assert "groups=4" in reasons["conv2d_4"] and "conv2d_3" not in reasons
    assert next(n for n in g2.nodes if n.name == "conv2d_3").attrs["groups"] == 32
    q = next(n for n in g2.nodes if n.op == "int8_conv2d")
    assert q.inputs[1].dtype == "int8" and q.attrs["x_bits"] == 8
    test = {"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)}
    ref = ir.interpret(g, test)[g.outputs[0].name]
    assert max_relative_error(ir.interpret(g2, test)[g2.outputs[0].name], ref) < 0.05
    g3, _ = passes.run(g, "w8a8", calibration=calib, quantize_convs=False)
    assert "int8_conv2d" not in g3.op_histogram()
    cm = reshift.compile(g2, pipeline="none")  # the float convs around the int8 ones round differently
    np.testing.assert_allclose(cm(test["x"]), ir.interpret(g2, test)[g2.outputs[0].name], rtol=1e-4, atol=1e-4)


def test_int8_conv2d_onnx_qdq_export_runs_in_onnxruntime(rng, tmp_path):
    import onnxruntime as ort

    from reshift.codegen.onnx import to_onnx

    g = _small_cnn(rng)
    calib = [{"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)}]
    g2, _ = passes.run(g, "w8a8", calibration=calib)
    to_onnx(g2, tmp_path / "q.onnx")
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    out = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    # QDQ is the same arithmetic up to float32 rounding of the dequantized operands and the sums
    assert max_relative_error(out, ir.interpret(g2, {"x": x})[g2.outputs[0].name]) < 1e-3


def test_int8_conv_chain_requantizes_in_the_epilogue(rng):
    """conv -> relu -> conv, conv -> conv (stride 2) and conv -> relu -> add: the first two kernels write
    the next conv's quantized padded input (no float tensor between them), the last fuses only the
    ReLU; outputs bit-exact, and an image with a NaN is NaN through the chain."""
    from reshift.codegen.tvm import resolve_target
    from reshift.codegen.tvm.lower import lower

    b = GraphBuilder("chain")
    x = b.input("x", "f32[N,8,12,11]")

    h = b.relu(_int8_conv(b, rng, x, 8, 16))
    h = _int8_conv(b, rng, h, 16, 32, s=2, zp=3, scale=0.05)
    h = b.relu(_int8_conv(b, rng, h, 32, 16, k=1, p=0, zp=120, scale=0.04))
    g = b.build(b.add(h, h))
    with resolve_target("cpu").target():
        names = sorted(gv.name_hint for gv in lower(g).functions)
    if "int8_conv_quantize" in names:  # VNNI host: one input quantization, two requantizing convs
        assert names.count("int8_conv_quantize") == 1 and sum("int8_conv_requant" in n for n in names) == 2
    xin = (rng.standard_normal((3, 8, 12, 11)) * 2).astype(np.float32)
    xin[1, 0, 2, 3] = np.nan
    ref = ir.interpret(g, {"x": xin})[g.outputs[0].name]
    out = reshift.compile(g, pipeline="none")(xin)
    np.testing.assert_array_equal(out, ref)
    assert np.isnan(out[1]).all() and not np.isnan(out[0]).any()


def _int8_conv(b, rng, h, cin, cout, k=3, s=1, p=1, groups=1, zp=90, scale=0.03, dil=1):
    codes = rng.integers(-127, 128, (cout, cin // groups, k, k)).astype(np.int8)
    return b.int8_conv2d(
        h,
        b.constant(codes),
        b.constant((rng.random(cout) * 0.001).astype(np.float32)),
        b.constant(rng.standard_normal(cout).astype(np.float32)),
        stride=(s, s),
        padding=(p, p, p, p),
        dilation=(dil, dil),
        groups=groups,
        x_scale=scale,
        x_zero_point=zp,
    )


def test_int8_depthwise_conv_is_bit_exact_alone_and_in_a_chain(rng):
    """Depthwise int8_conv2d (groups == C == O): stride 1 and 2, dilation 2, uneven padding, rows that
    fill no whole 14-pixel tile; alone (float in, float out) and between pointwise convs (quantized
    input written by the producer, the next conv's input written by it); NaN images stay NaN."""
    from reshift.codegen.tvm import resolve_target
    from reshift.codegen.tvm.lower import lower

    b = GraphBuilder("dw")
    x = b.input("x", "f32[N,32,17,19]")
    alone = [
        _int8_conv(b, rng, x, 32, 32, groups=32),
        _int8_conv(b, rng, x, 32, 32, s=2, groups=32, zp=3),
        _int8_conv(b, rng, x, 32, 32, k=3, p=2, dil=2, groups=32, zp=200, scale=0.05),
        _int8_conv(b, rng, x, 32, 32, k=5, p=0, groups=32),
    ]
    h = b.relu(_int8_conv(b, rng, x, 32, 48, k=1, p=0))
    h = b.relu(_int8_conv(b, rng, h, 48, 48, groups=48, zp=0, scale=0.05))
    h = _int8_conv(b, rng, h, 48, 48, s=2, groups=48, zp=0, scale=0.3)
    h = b.relu(_int8_conv(b, rng, h, 48, 16, k=1, p=0, zp=120, scale=0.5))
    g = b.build(*alone, h)
    with resolve_target("cpu").target():
        names = [gv.name_hint for gv in lower(g).functions]
    if "int8_conv_quantize" in names:  # VNNI host: the chain's depthwise convs read and write int8
        assert sum("int8_dwconv_vnni" in n for n in names) == 4
        assert sum("int8_dwconv_requant" in n for n in names) == 2
    xin = (rng.standard_normal((3, 32, 17, 19)) * 2).astype(np.float32)
    xin[1, 0, 2, 3] = np.nan
    xin[2, 5, 10, 12] = np.inf
    cm = reshift.compile(g, pipeline="none")
    refs = list(ir.interpret(g, {"x": xin}).values())
    outs = cm(xin)
    for ref, out in zip(refs, outs, strict=True):
        np.testing.assert_array_equal(out, ref)
    assert np.isnan(outs[-1][1]).all() and not np.isnan(outs[-1][0]).any()
    assert len(np.unique(outs[-1][0])) > 30 and (outs[-1][0] > 0).mean() > 0.2  # not saturated or all zero


def test_portable_int8_depthwise_conv_is_bit_exact(rng):
    """24 channels (no whole 16-channel panels): Relax's grouped int32 conv, same bits as the reference."""
    b = GraphBuilder("dw24")
    x = b.input("x", "f32[N,24,9,9]")
    g = b.build(_int8_conv(b, rng, x, 24, 24, s=2, groups=24))
    xin = (rng.standard_normal((2, 24, 9, 9)) * 2).astype(np.float32)
    ref = ir.interpret(g, {"x": xin})[g.outputs[0].name]
    np.testing.assert_array_equal(reshift.compile(g, pipeline="none")(xin), ref)


def test_int8_conv2d_w_diag_is_the_centre_tap_and_type_checked(rng):
    """w_diag adds to the centre tap of wq[o, o] (beyond the int8 range); refused where there is no
    such tap (groups, C != O, even kernel) or with the wrong dtype."""
    x = rng.standard_normal((2, 16, 6, 7)).astype(np.float32)
    wq = rng.integers(-127, 128, (16, 16, 3, 3)).astype(np.int8)
    ws = (rng.random(16) * 0.01).astype(np.float32)
    diag = rng.integers(-3000, 3000, 16).astype(np.int32)
    args = dict(stride=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1, x_scale=0.05, x_zero_point=7, x_bits=8)
    y = int8_conv2d_ref(x, wq, ws, None, diag, **args)
    wide = wq.astype(np.int32)
    wide[np.arange(16), np.arange(16), 1, 1] += diag
    q = np.clip(np.rint(x / np.float32(0.05)) + 7, 0, 255) - 7
    qp = np.pad(q, ((0, 0), (0, 0), (1, 1), (1, 1)))
    full = sum(
        np.einsum("nchw,oc->nohw", qp[:, :, i : i + 6, j : j + 7], wide[:, :, i, j]) for i in range(3) for j in range(3)
    )
    np.testing.assert_array_equal(y, full.astype(np.float32) * (np.float32(0.05) * ws)[None, :, None, None])
    b = GraphBuilder("bad")
    xv = b.input("x", "f32[N,16,6,7]")
    good = dict(x_scale=0.05, x_zero_point=7, padding=(1, 1, 1, 1))
    with pytest.raises(Exception, match="w_diag"):
        b.int8_conv2d(xv, b.constant(wq), b.constant(ws), None, b.constant(diag.astype(np.int64)), **good)
    with pytest.raises(Exception, match="w_diag needs groups=1"):
        b.int8_conv2d(xv, b.constant(wq[:, :8]), b.constant(ws), None, b.constant(diag), groups=2, **good)
    with pytest.raises(Exception, match="odd kernel"):
        b.int8_conv2d(xv, b.constant(wq[:, :, :2, :2]), b.constant(ws), None, b.constant(diag), **good)


def test_compiled_int8_conv2d_with_w_diag_is_bit_exact(rng):
    """VNNI: a w_diag conv reading its own quantized input (stride 2), one reading a producer's
    requantized input and requantizing for the next; portable: 20 channels; NaN images."""
    b = GraphBuilder("diag")
    x = b.input("x", "f32[N,32,13,11]")

    def conv(h, c, s=1, zp=90, scale=0.03, diag=True):
        codes = rng.integers(-127, 128, (c, c, 3, 3)).astype(np.int8)
        d = b.constant(rng.integers(-20000, 20000, c).astype(np.int32)) if diag else None
        return b.int8_conv2d(
            h,
            b.constant(codes),
            b.constant((rng.random(c) * 1e-4).astype(np.float32)),
            b.constant(rng.standard_normal(c).astype(np.float32)),
            d,
            stride=(s, s),
            padding=(1, 1, 1, 1),
            x_scale=scale,
            x_zero_point=zp,
        )

    alone = conv(x, 32, s=2)
    h = b.relu(conv(x, 32, diag=False))
    h = b.relu(conv(h, 32, zp=0, scale=0.05))
    h = conv(h, 32, zp=0, scale=0.2)
    b2 = GraphBuilder("diag20")
    x2 = b2.input("x", "f32[N,20,9,9]")
    codes20 = rng.integers(-127, 128, (20, 20, 3, 3)).astype(np.int8)
    y20 = b2.int8_conv2d(
        x2,
        b2.constant(codes20),
        b2.constant((rng.random(20) * 1e-3).astype(np.float32)),
        None,
        b2.constant(rng.integers(-9000, 9000, 20).astype(np.int32)),
        padding=(1, 1, 1, 1),
        x_scale=0.04,
        x_zero_point=100,
    )
    for g, shape in ((b.build(alone, h), (3, 32, 13, 11)), (b2.build(y20), (2, 20, 9, 9))):
        xin = (rng.standard_normal(shape) * 2).astype(np.float32)
        xin[1, 0, 2, 3] = np.nan
        cm = reshift.compile(g, pipeline="none")
        outs = cm(xin)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for ref, out in zip(ir.interpret(g, {"x": xin}).values(), outs, strict=True):
            np.testing.assert_array_equal(out, ref)
            assert np.isnan(out[1]).all() and not np.isnan(out[0]).any()


def _fused_repvgg_like(rng, identity: float):
    """Convs whose filters carry a fused identity branch: ``W = W3 + I * identity`` at the centre tap."""
    b = GraphBuilder("repvgg_like")
    x = b.input("x", "f32[N,16,12,12]")
    h = x
    for _ in range(5):
        w = (rng.standard_normal((16, 16, 3, 3)) * 0.05).astype(np.float32)
        w[np.arange(16), np.arange(16), 1, 1] += identity
        bias = (rng.standard_normal(16) * 0.1).astype(np.float32)
        h = b.relu(b.conv2d(h, b.constant(w), b.constant(bias), padding=(1, 1, 1, 1)))
    return b.build(h)


def test_w8a8_keeps_a_fused_identity_branch_off_the_int8_grid(rng, tmp_path):
    """RepVGG-style filters (a centre tap ~20x the rest): with one int8 grid per channel over the fused
    filter the output error was ~0.1 (RepVGG-A0: 0.13 vs onnxruntime's 0.014 on the unfused model);
    the centre taps as w_diag codes bring it to the int8 level. Plain filters keep plain codes."""
    g = _fused_repvgg_like(rng, identity=1.0)
    calib = [{"x": np.abs(rng.standard_normal((2, 16, 12, 12))).astype(np.float32)} for _ in range(2)]
    g2, report = passes.run(g, "w8a8", calibration=calib)
    convs = [n for n in g2.nodes if n.op == "int8_conv2d"]
    assert len(convs) == 3 and all(n.inputs[4] is not None for n in convs)
    assert all(report.details[n.name]["identity_codes"] for n in convs)
    test = {"x": np.abs(rng.standard_normal((2, 16, 12, 12))).astype(np.float32)}
    ref = ir.interpret(g, test)[g.outputs[0].name]
    assert max_relative_error(ir.interpret(g2, test)[g2.outputs[0].name], ref) < 0.02  # 0.046 on one grid
    import onnxruntime as ort

    from reshift.codegen.onnx import to_onnx

    to_onnx(g2, tmp_path / "diag.onnx")  # w_diag exported as a dequantized centre-tap Add on the weight
    sess = ort.InferenceSession(str(tmp_path / "diag.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: test["x"]})[0]
    assert max_relative_error(out, ir.interpret(g2, test)[g2.outputs[0].name]) < 1e-3
    plain, rep = passes.run(_fused_repvgg_like(rng, identity=0.0), "w8a8", calibration=calib)
    assert not any(rep.details[n.name]["identity_codes"] for n in plain.nodes if n.op == "int8_conv2d")
    assert all(n.inputs[4] is None for n in plain.nodes if n.op == "int8_conv2d")


def test_arm64_dotprod_build_runs_the_gemm_on_sdot(rng):
    """``arm64-dotprod``: the int8 GEMM is ``sdot`` (cross-built, not run: ``test_edge.py`` runs it on the
    emulated device); plain ``arm64`` (no dot product, e.g. Cortex-A72) keeps the portable loop."""
    pytest.importorskip("tvm")
    from reshift.codegen.tvm.build import build

    g = _int8_linear_graph(rng, 33, 48, "row")

    def assembly(target: str) -> str:
        return build(g, target).executable.mod.imports[0].inspect_source("asm")

    dotprod = assembly("arm64-dotprod")
    assert "int8_gemm_sdot:" in dotprod and "\tsdot\tv" in dotprod
    plain = assembly("arm64")
    assert "\tsdot\t" not in plain and "int8_gemm_sdot" not in plain


def test_arm64_dotprod_dense_convs_take_the_sdot_gemm(rng):
    """Dense int8 convs on ``arm64-dotprod``: im2col + the sdot GEMM; a depthwise conv stays portable."""
    from reshift.codegen.tvm.lower import lower
    from reshift.codegen.tvm.targets import resolve_target
    from reshift.ir.builder import GraphBuilder

    b = GraphBuilder("convs")
    h = _int8_conv(b, rng, b.input("x", "f32[1,8,6,6]"), 8, 16)
    g = b.build(_int8_conv(b, rng, h, 16, 16, groups=16))
    for target, expected in (("arm64-dotprod", 1), ("arm64", 0)):
        with resolve_target(target).target():
            script = lower(g).script(show_meta=False)
        assert script.count("int8_conv_im2col(") == expected and script.count("int8_gemm_sdot(") == expected


def test_sdot_offsets_undo_the_signed_activation_bytes(rng):
    """The identity ``gemm_sdot_func`` relies on: ``sum_k q w = 128 sum_k w + sum_k (q - 128) w``, with
    ``q - 128`` the byte whose top bit is flipped (padded rows get offset 0)."""
    from reshift.codegen.tvm.kernels.int8_gemm import sdot_offsets

    q = rng.integers(0, 256, (5, 40)).astype(np.uint8)
    w = rng.integers(-127, 128, (20, 40)).astype(np.int8)
    signed = (q ^ 0x80).view(np.int8).astype(np.int64)
    offsets = sdot_offsets(w, 32)
    np.testing.assert_array_equal(offsets[20:], 0)
    via_sdot = offsets[:20] + signed @ w.astype(np.int64).T
    np.testing.assert_array_equal(via_sdot, q.astype(np.int64) @ w.astype(np.int64).T)
