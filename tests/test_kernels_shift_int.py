"""The integer dot-product lowering of shift_linear / shift_conv2d (codegen/tvm/kernels/shift_int.py).

The int16 weight encoding must reproduce ``sign * 2^(E - exponent)`` exactly (one plane, a negated
channel, several planes); the VNNI GEMM must equal the portable loop and numpy's int64 matmul for
every row count around its 3-row blocks and 48-row tasks; whole ops must equal the registry's
reference bit for bit (per-row / per-window int8 activations, NaN and inf rows).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from reshift import ir  # noqa: E402
from reshift.codegen.tvm import build, lower  # noqa: E402
from reshift.codegen.tvm.kernels import shift_int  # noqa: E402
from reshift.codegen.tvm.kernels.lowbit import kernel_flavor  # noqa: E402
from tests.helpers import random_shift_conv  # noqa: E402

RNG = np.random.default_rng(23)


def _weights(sign, exponent, bits):
    w = sign.astype(np.int64) << ((2**bits - 1) - exponent.astype(np.int64))
    return np.where(sign != 0, w, 0)


def _encode(sign, exponent, bits):
    weights = shift_int.encode_int16(sign, exponent, bits)
    return weights.code, weights.mult, weights


def test_narrow_channel_is_one_plane_with_a_power_of_two_multiplier():
    sign = np.array([[1, -1, 0, 1]], np.int8)
    exponent = np.array([[3, 5, 0, 9]], np.uint8)  # spread 6
    code, mult, _ = _encode(sign, exponent, 4)
    assert code.shape == (1, 1, 4) and mult.tolist() == [[2 ** (15 - 9)]]
    assert code[0, 0].tolist() == [64, -16, 0, 1]


@pytest.mark.parametrize("top_sign", [1, -1])
def test_spread_15_with_one_top_sign_fits_one_plane(top_sign):
    """+2^15 is no int16: a channel whose exponent-0 weights are all positive is negated."""
    sign = np.array([[top_sign, -1, 1, top_sign]], np.int8)
    exponent = np.array([[0, 15, 7, 0]], np.uint8)
    code, mult, weights = _encode(sign, exponent, 4)
    assert code.shape[0] == 1 and mult[0, 0] == -top_sign and not weights.wrapped[0].size
    assert np.array_equal(weights.decoded(), _weights(sign, exponent, 4))


def test_spread_15_with_both_top_signs_wraps_the_minority():
    """Top weights of both signs: the minority's +2^15 is stored as -2^15 and corrected by 65536 * q."""
    sign = np.array([[1, -1, 1, 1, 0], [1, 1, 1, 1, 1]], np.int8)
    exponent = np.array([[0, 0, 0, 15, 4], [2, 2, 2, 2, 2]], np.uint8)
    code, mult, weights = _encode(sign, exponent, 4)
    assert code.shape == (1, 2, 5) and mult[0, 0] == -1  # negated: the two positive tops become -2^15
    assert weights.wrapped[0].tolist() == [1] and code[0, 0, 1] == -(2**15)
    assert np.array_equal(weights.decoded(), _weights(sign, exponent, 4))


def test_spread_beyond_15_splits_into_planes():
    sign = np.array([[1, -1, 1, 0], [1, 1, 1, 1]], np.int8)
    exponent = np.array([[0, 20, 31, 4], [9, 9, 9, 9]], np.uint8)
    code, mult, weights = _encode(sign, exponent, 5)
    assert code.shape == (3, 2, 4)
    assert np.array_equal(weights.decoded(), _weights(sign, exponent, 5))
    assert not mult[1:, 1].any() and not code[1:, 1].any()  # the narrow channel has one plane


def test_random_codes_encode_exactly_at_4_and_5_bits():
    for bits in (4, 5):
        sign = RNG.integers(-1, 2, (40, 57)).astype(np.int8)
        exponent = RNG.integers(0, 2**bits, (40, 57)).astype(np.uint8)
        if bits == 5:  # keep 127 * |w| in int32, as the reference requires
            exponent = np.maximum(exponent, 8).astype(np.uint8)
        code, mult, weights = _encode(sign, exponent, bits)
        assert code.dtype == np.int16 and mult.dtype == np.int32
        assert code.shape[0] == (1 if bits == 4 else 2)  # spread <= 15 at 4 bits: one plane (+ wraps)
        assert np.array_equal(weights.decoded(), _weights(sign, exponent, bits))


def test_all_zero_channel():
    code, mult, _ = _encode(np.zeros((2, 3), np.int8), np.zeros((2, 3), np.uint8), 4)
    assert not code.any() and not mult.any()


def _cpu_build(func, vnni: bool):
    from reshift.codegen.tvm.targets import resolve_target

    target = resolve_target("cpu").target() if vnni else {"kind": "llvm"}
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)["main"]


needs_vnni = pytest.mark.skipif(not shift_int.has_vnni(), reason="host CPU without AVX-512 VNNI")


@pytest.mark.parametrize("vnni", [pytest.param(True, marks=needs_vnni), False], ids=["vnni", "portable"])
@pytest.mark.parametrize("blocks, k2", [(1, 3), (4, 37), (6, 8), (8, 1)])
def test_gemm_matches_numpy(blocks, k2, vnni):
    w = RNG.integers(-(2**15), 2**15, (blocks, k2, 16, 2)).astype(np.int16)
    fn = _cpu_build(shift_int.gemm_func(blocks, k2, vnni), vnni)
    w_mat = w.transpose(0, 2, 1, 3).reshape(blocks * 16, k2 * 2).astype(np.int64)
    for rows in (1, 2, 3, 4, 5, 47, 48, 49, 50, 97, 145) if vnni else (1, 5):
        a = RNG.integers(-127, 128, (rows, k2 * 2)).astype(np.int16)
        acc = tvm.runtime.tensor(np.zeros((rows, blocks * 16), np.int32))
        fn(tvm.runtime.tensor(a), tvm.runtime.tensor(w), acc)
        expected = (a.astype(np.int64) @ w_mat.T).astype(np.int32)  # int32 wrap-around, as the kernel
        np.testing.assert_array_equal(acc.numpy(), expected, err_msg=f"rows {rows}")


def _run(executable, x):
    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def _assert_same(actual, expected):
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize(
    "out, k, bits, low", [(1, 1, 4, 0), (17, 33, 4, 0), (64, 96, 4, 0), (130, 64, 4, 0), (20, 24, 5, 12)]
)
def test_shift_linear_is_bit_exact(out, k, bits, low):
    """Random codes: spread-15 channels with both top signs (wrapped columns); 5 bits: two planes."""
    b = ir.GraphBuilder("shift_linear")
    x = b.input("x", f"f32[N,{k}]")
    sign = RNG.integers(-1, 2, (out, k)).astype(np.int8)
    exponent = RNG.integers(low, 2**bits, (out, k)).astype(np.uint8)
    assert bits == 4 or shift_int.encode_int16(sign, exponent, bits).code.shape[0] == 2
    scale = (RNG.random(out) + 0.1).astype(np.float32)
    bias = RNG.standard_normal(out).astype(np.float32)
    y = b.shift_linear(
        x, b.constant(sign), b.constant(exponent), b.constant(scale), b.constant(bias), exponent_bits=bits
    )
    graph = b.build(y)
    executable = build(graph, "cpu").executable
    for rows in (1, 4, 50):
        xs = (RNG.standard_normal((rows, k)) * 3).astype(np.float32)
        if rows == 50:
            xs[3, 0], xs[7, -1] = np.nan, -np.inf
        _assert_same(_run(executable, xs), ir.interpret(graph, {"x": xs})[graph.outputs[0].name])


# (C, O, kernel, stride, padding (top, left, bottom, right), dilation)
CONVS = {
    "c16_o64_3x3": (16, 64, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    "c3_o20_7x7_s2": (3, 20, 7, (2, 2), (3, 3, 3, 3), (1, 1)),
    "c35_o33_1x1_s2": (35, 33, 1, (2, 2), (0, 0, 0, 0), (1, 1)),
    "c17_o16_3x3_d2_asym": (17, 16, 3, (1, 2), (2, 0, 1, 3), (2, 1)),
}


def _conv_graph(c, o, k, stride, padding, dilation, hw=(13, 11), spread=16, groups=1):
    b = ir.GraphBuilder("shift_conv")
    x = b.input("x", f"f32[N,{c},{hw[0]},{hw[1]}]")
    window = {"stride": stride, "padding": padding, "dilation": dilation}
    return b.build(random_shift_conv(b, RNG, x, c, o, k, spread, 4, groups=groups, **window))


@pytest.mark.parametrize("case", sorted(CONVS))
def test_shift_conv2d_is_bit_exact(case):
    graph = _conv_graph(*CONVS[case], spread=16 if case != "c16_o64_3x3" else 7)
    executable = build(graph, "cpu").executable
    for batch in (1, 2):
        x = (RNG.standard_normal((batch, *graph.inputs[0].shape[1:])) * 2).astype(np.float32)
        if batch == 2:
            x[1, 0, 5, 4] = np.nan
            x[1, -1, 0, 10] = np.inf
        expected = ir.interpret(graph, {"x": x})[graph.outputs[0].name]
        actual = _run(executable, x)
        _assert_same(actual, expected)
        if batch == 2:
            assert np.isnan(actual[1]).any() and np.isfinite(actual[0]).all()


# depthwise: (C, O, kernel, stride, padding, dilation); O = 2C is a channel multiplier of 2
DEPTHWISE = {
    "c16_3x3": (16, 16, 3, (1, 1), (1, 1, 1, 1), (1, 1)),
    "c5_o10_3x3_s2_asym": (5, 10, 3, (2, 2), (0, 1, 2, 1), (1, 1)),
    "c3_5x5_d2": (3, 3, 5, (1, 2), (4, 4, 4, 4), (2, 2)),
}


@pytest.mark.parametrize("case", sorted(DEPTHWISE))
def test_depthwise_shift_conv2d_is_bit_exact(case):
    c, o, k, stride, padding, dilation = DEPTHWISE[case]
    graph = _conv_graph(c, o, k, stride, padding, dilation, groups=c)
    assert "shift_conv2d_depthwise" in lower(graph).script(show_meta=False)
    executable = build(graph, "cpu").executable
    for batch in (1, 2):
        x = (RNG.standard_normal((batch, *graph.inputs[0].shape[1:])) * 2).astype(np.float32)
        if batch == 2:
            x[1, 0, 5, 4] = np.nan
            x[1, -1, 0, 10] = -np.inf
        expected = ir.interpret(graph, {"x": x})[graph.outputs[0].name]
        actual = _run(executable, x)
        _assert_same(actual, expected)
        if batch == 2:
            assert np.isnan(actual[1]).any() and np.isfinite(actual[0]).all()


def test_conv_lowers_to_the_integer_gemm_not_the_shift_gemv():
    script = lower(_conv_graph(*CONVS["c16_o64_3x3"])).script(show_meta=False)
    assert "shift_conv2d_codes" in script and ("shift_int16_gemm" in script or "shift_int16_conv_fused" in script)
    assert "shift_linear_gemv" not in script and "R.nn.conv2d" not in script


@pytest.mark.skipif(kernel_flavor() != "avx512" or not shift_int.has_vnni(), reason="host CPU without VNNI")
def test_vnni_instruction_in_the_machine_code():
    graph = _conv_graph(*CONVS["c35_o33_1x1_s2"])
    assembly = build(graph, "cpu").executable.mod.imports[0].inspect_source("asm")
    assert "vpdpwssd" in assembly


def test_arm64_build_compiles_the_portable_kernels():
    """No VNNI on arm64: the same lowering with the portable int16 loop (cross-compiled, not run)."""
    from reshift.codegen.tvm.targets import resolve_target

    pytest.importorskip("tvm")
    target = resolve_target("arm64")
    with target.target():
        script = lower(_conv_graph(*CONVS["c35_o33_1x1_s2"])).script(show_meta=False)
    assert "shift_int16_gemm" in script and "shift_int16_gemm_vnni" not in script
    build(_conv_graph(*CONVS["c35_o33_1x1_s2"]), "arm64")


def test_float64_reciprocal_quotient_is_the_float32_division():
    """The conv codes' ``float32(float64(x) * (1 / float64(s)))`` equals ``float32(x / s)`` (module docstring):
    random pairs, and x placed at the float32 neighbours of half-integer multiples of s."""
    s = (RNG.random(20000) * 10 + 1e-3).astype(np.float32)
    half = (RNG.integers(-127, 127, s.size) + 0.5).astype(np.float32)
    near = (half.astype(np.float64) * s).astype(np.float32)
    for x in (
        (RNG.standard_normal(s.size) * 50).astype(np.float32),
        near,
        np.nextafter(near, np.float32(np.inf)),
        np.nextafter(near, np.float32(-np.inf)),
    ):
        expected = x / s
        actual = (x.astype(np.float64) * (1.0 / s.astype(np.float64))).astype(np.float32)
        np.testing.assert_array_equal(actual, expected)


def _shift_conv(b, x, c, o, k, padding, groups=1, spread=16):
    window = {"stride": (1, 1), "padding": padding, "dilation": (1, 1)}
    return random_shift_conv(b, RNG, x, c, o, k, spread, 4, groups=groups, **window)


def _relax_part(script: str) -> str:
    return script[script.index("@R.function") :]


def _block_graph():
    """A ResNet basic block of shift convs: conv-relu-conv (a channel-last hand-off), + the input, relu;
    then a 1x1 conv read by two convs (both channel-last) and a depthwise conv + relu."""
    b = ir.GraphBuilder("shift_block")
    x = b.input("x", "f32[N,32,9,10]")
    h = b.relu(_shift_conv(b, x, 32, 32, 3, (1, 1, 1, 1)))
    h = b.relu(b.add(_shift_conv(b, h, 32, 32, 3, (1, 1, 1, 1)), x))
    p = _shift_conv(b, h, 32, 48, 1, (0, 0, 0, 0))
    left = _shift_conv(b, p, 48, 16, 3, (1, 1, 1, 1))
    right = b.relu(_shift_conv(b, p, 48, 16, 1, (0, 0, 0, 0)))
    d = b.relu(_shift_conv(b, b.add(left, right), 16, 16, 3, (1, 1, 1, 1), groups=16))
    return b.build(d)


@needs_vnni
def test_fused_epilogues_and_channel_last_hand_off_are_bit_exact():
    """The GEMM's epilogue computes ReLU, the residual add and the next ReLU, and hands channel-last
    values with their channel maxima to the shift convs reading them: one NHWC copy (the first conv's),
    no transpose, bit for bit the reference (NaN and inf rows included)."""
    graph = _block_graph()
    script = _relax_part(lower(graph).script(show_meta=False))
    assert script.count("R.call_tir(cls.shift_int16_conv_fused") == 5 and "R.permute_dims" not in script
    # NCHW -> NHWC copies: the graph input, and the residual block's output (also read by the add)
    assert script.count("R.call_tir(cls.shift_conv2d_prep") == 2
    assert "R.nn.relu" not in script and "R.add" not in script  # left + right: in right's epilogue
    executable = build(graph, "cpu").executable
    for batch in (1, 2):
        x = (RNG.standard_normal((batch, 32, 9, 10)) * 2).astype(np.float32)
        if batch == 2:
            x[1, 3, 4, 4] = np.nan
            x[1, 7, 0, 9] = np.inf
        expected = ir.interpret(graph, {"x": x})[graph.outputs[0].name]
        actual = _run(executable, x)
        _assert_same(actual, expected)
        if batch == 2:
            assert np.isnan(actual[1]).any() and np.isfinite(actual[0]).all()


@needs_vnni
def test_residual_add_fuses_into_the_conv_lowered_second():
    """``add(y, z)`` of two convs: ``y``'s conv cannot read ``z`` (not lowered yet), ``z``'s adds ``y``."""
    b = ir.GraphBuilder("late_residual")
    x = b.input("x", "f32[N,16,6,7]")
    y = _shift_conv(b, x, 16, 16, 3, (1, 1, 1, 1))
    z = _shift_conv(b, x, 16, 16, 1, (0, 0, 0, 0))
    graph = b.build(b.add(y, z))
    script = _relax_part(lower(graph).script(show_meta=False))
    assert "R.add" not in script and script.count("R.call_tir(cls.shift_int16_conv_fused") == 2
    x = RNG.standard_normal((2, 16, 6, 7)).astype(np.float32)
    _assert_same(_run(build(graph, "cpu").executable, x), ir.interpret(graph, {"x": x})[graph.outputs[0].name])
