"""The int8 dot-product lowering of shift_linear (codegen/tvm/kernels/shift_int8.py).

The int8 encoding must reproduce ``sign * 2^(E - exponent)`` exactly (a narrow channel, a negated
spread-7 channel, an all-zero channel) and refuse what does not fit (a spread of 8, mixed signs at 7);
the lowered op must equal the registry's reference bit for bit on every row count (register-tile
tails), K not a multiple of 4, O not a multiple of 16, NaN / inf / zero rows; codes that do not fit
keep the int16 kernel; ``shift_levels=7`` produces codes that fit.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from reshift import ir, passes  # noqa: E402
from reshift.codegen.tvm import build, lower  # noqa: E402
from reshift.codegen.tvm.kernels import int8_gemm  # noqa: E402
from reshift.codegen.tvm.kernels.shift_int import encode_int8  # noqa: E402
from reshift.errors import PassError  # noqa: E402
from reshift.passes.shift import quantize_shift, shift_options  # noqa: E402
from tests.helpers import random_shift_conv  # noqa: E402

RNG = np.random.default_rng(31)
needs_vnni = pytest.mark.skipif(not int8_gemm.has_vnni(), reason="host CPU without AVX-512 VNNI")


def _weights(sign, exponent, bits):
    return np.where(sign != 0, sign.astype(np.int64) << ((2**bits - 1) - exponent.astype(np.int64)), 0)


def test_narrow_channel_codes_and_multiplier():
    sign = np.array([[1, -1, 0, 1]], np.int8)
    exponent = np.array([[1, 3, 0, 6]], np.uint8)  # spread 5
    weights = encode_int8(sign, exponent, 3)
    assert weights.code.tolist() == [[32, -8, 0, 1]] and weights.mult.tolist() == [2 ** (7 - 6)]


@pytest.mark.parametrize("top_sign", [1, -1])
def test_spread_7_with_one_top_sign_fits(top_sign):
    """+128 is no int8: a channel whose exponent-0 weights are all positive is negated."""
    sign = np.array([[top_sign, -1, top_sign]], np.int8)
    exponent = np.array([[0, 7, 0]], np.uint8)
    weights = encode_int8(sign, exponent, 3)
    assert weights.mult[0] == -top_sign and weights.code[0].tolist() == [-128, top_sign, -128]
    assert np.array_equal(weights.code * weights.mult[:, None], _weights(sign, exponent, 3))


@pytest.mark.parametrize(
    "sign, exponent",
    [([[1, -1, 1]], [[0, 0, 7]]), ([[1, 1]], [[0, 8]])],
    ids=["spread7_both_top_signs", "spread8"],
)
def test_codes_that_do_not_fit_are_refused(sign, exponent):
    assert encode_int8(np.array(sign, np.int8), np.array(exponent, np.uint8), 4) is None


def test_all_zero_channel():
    weights = encode_int8(np.zeros((2, 3), np.int8), np.zeros((2, 3), np.uint8), 3)
    assert not weights.code.any()


def _graph(out, k, sign, exponent, bits):
    b = ir.GraphBuilder("shift_linear_int8")
    x = b.input("x", f"f32[N,{k}]")
    scale = (RNG.random(out) + 0.1).astype(np.float32)
    bias = RNG.standard_normal(out).astype(np.float32)
    y = b.shift_linear(
        x, b.constant(sign), b.constant(exponent), b.constant(scale), b.constant(bias), exponent_bits=bits
    )
    return b.build(y)


def _fitting_codes(out, k, bits):
    """Per channel 7 consecutive exponents at a random offset; channel 0 spread 7 with negative top weights."""
    sign = RNG.integers(-1, 2, (out, k)).astype(np.int8)
    low = RNG.integers(0, 2**bits - 6, (out, 1))
    exponent = (low + RNG.integers(0, 7, (out, k))).astype(np.uint8)
    if k >= 2 and 2**bits - 1 >= 7:
        exponent[0] = RNG.integers(1, 7, k)
        exponent[0, :2] = [0, 7]
        sign[0, :2] = [-1, 1]
        sign[0][exponent[0] == 0] = -1
    assert encode_int8(sign, exponent, bits) is not None
    return sign, exponent


def _assert_same(actual, expected):
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_array_equal(actual, expected)


@needs_vnni
@pytest.mark.parametrize("out, k, bits", [(1, 1, 3), (17, 33, 3), (64, 96, 3), (130, 64, 3), (48, 70, 4)])
def test_shift_linear_is_bit_exact(out, k, bits):
    sign, exponent = _fitting_codes(out, k, bits)
    graph = _graph(out, k, sign, exponent, bits)
    assert "shift_int8_gemm_vnni" in lower(graph).script(show_meta=False)
    vm = relax.VirtualMachine(build(graph, "cpu").executable, tvm.cpu())
    for rows in (1, 2, 5, 15, 16, 31, 50):
        xs = (RNG.standard_normal((rows, k)) * 3).astype(np.float32)
        if rows == 50:
            xs[3, 0], xs[7, -1], xs[9] = np.nan, -np.inf, 0.0
        actual = vm["main"](tvm.runtime.tensor(xs)).numpy()
        _assert_same(actual, ir.interpret(graph, {"x": xs})[graph.outputs[0].name])


def test_codes_that_do_not_fit_keep_the_int16_kernel():
    sign = np.ones((16, 8), np.int8)
    exponent = np.tile(np.array([0, 8, 1, 2, 3, 4, 5, 6], np.uint8), (16, 1))  # spread 8
    script = lower(_graph(16, 8, sign, exponent, 4)).script(show_meta=False)
    assert "shift_int8_gemm" not in script and "shift_int16_gemm" in script


@needs_vnni
def test_vpdpbusd_in_the_machine_code():
    sign, exponent = _fitting_codes(32, 16, 3)
    assembly = build(_graph(32, 16, sign, exponent, 3), "cpu").executable.mod.imports[0].inspect_source("asm")
    assert "vpdpbusd" in assembly


def test_shift_levels_bound_the_exponents():
    w = RNG.standard_normal((40, 300))
    sign, exponent, scale = quantize_shift(w, 3, levels=7)
    assert exponent.max() <= 6 and encode_int8(sign, exponent, 3) is not None
    tiny = np.array([[1.0, 2.0**-6, 2.0**-7.2, 2.0**-7.9]])
    assert quantize_shift(tiny, 3, levels=7)[0].tolist() == [[1, 1, 0, 0]]  # below half of 2^-6: zero
    assert quantize_shift(tiny, 3, levels=8)[0].tolist() == [[1, 1, 1, 1]]  # all 8 levels: 2^-7 is one


def _mlp():
    b = ir.GraphBuilder("mlp")
    x = b.input("x", "f32[N,32]")
    h = b.linear(x, b.constant(RNG.standard_normal((48, 32)).astype(np.float32)), None)
    y = b.linear(h, b.constant(RNG.standard_normal((16, 48)).astype(np.float32)), None)
    return b.build(y)


def test_shift_levels_option_is_checked():
    with pytest.raises(PassError, match="shift_levels=9 must be in 1..8"):
        passes.run(_mlp(), "shift", skip=[], shift_bits=3, shift_levels=9)
    with pytest.raises(PassError, match="shift_bits=6 must be in 1..5"):
        passes.run(_mlp(), "moe", skip=[], shift_bits=6, calibration=[{"x": np.ones((4, 32), np.float32)}])
    g2, _ = passes.run(_mlp(), "shift", skip=[], shift_bits=3, shift_levels=7)
    shifts = [n for n in g2.nodes if n.op == "shift_linear"]
    assert len(shifts) == 2 and all(int(n.inputs[2].data.max()) <= 6 for n in shifts)


def test_default_codes_fit_the_int8_kernel_and_other_bits_keep_every_level():
    assert shift_options({}) == (3, 7)
    assert shift_options({"shift_bits": 4}) == (4, 16) and shift_options({"shift_bits": 3, "shift_levels": 8}) == (
        3,
        8,
    )
    sign, exponent, _ = quantize_shift(RNG.standard_normal((8, 500)))
    assert exponent.max() <= 6 and encode_int8(sign, exponent, 3) is not None


# (C, O, kernel, stride, padding (top, left, bottom, right)) of dense shift convs
CONVS = {
    "c16_o64_3x3": (16, 64, 3, (1, 1), (1, 1, 1, 1)),
    "c3_o32_7x7_s2": (3, 32, 7, (2, 2), (3, 3, 3, 3)),
    "c35_o32_1x1_s2": (35, 32, 1, (2, 2), (0, 0, 0, 0)),
}


def _conv_graph(c, o, k, stride, padding, relu_residual=False, chained=False, levels=7, bits=3):
    b = ir.GraphBuilder("shift_conv_int8")
    x = b.input("x", f"f32[N,{c},13,11]")

    def conv(v, cin, cout):
        window = {"stride": stride, "padding": padding, "dilation": (1, 1)}
        return random_shift_conv(b, RNG, v, cin, cout, k, levels, bits, **window)

    y = conv(x, c, o)
    if chained:  # the second conv reads the first one's channel-last output
        y = conv(b.relu(y), o, o)
    if relu_residual:
        y = b.relu(b.add(b.relu(y), x))
    return b.build(y)


def _check_conv(graph, c):
    vm = relax.VirtualMachine(build(graph, "cpu").executable, tvm.cpu())
    for n in (1, 2):
        xs = (RNG.standard_normal((n, c, 13, 11)) * 2).astype(np.float32)
        if n == 2:
            xs[1, 0, 2, 3], xs[0, -1, 5, 5] = np.nan, np.inf
        actual = vm["main"](tvm.runtime.tensor(xs)).numpy()
        _assert_same(actual, ir.interpret(graph, {"x": xs})[graph.outputs[0].name])


@needs_vnni
@pytest.mark.parametrize("case", sorted(CONVS))
def test_shift_conv2d_is_bit_exact(case):
    graph = _conv_graph(*CONVS[case])
    assert "shift_int8_conv_fused" in lower(graph).script(show_meta=False)
    _check_conv(graph, CONVS[case][0])


@needs_vnni
def test_fused_epilogue_and_channel_last_hand_off_are_bit_exact():
    residual = _conv_graph(16, 16, 3, (1, 1), (1, 1, 1, 1), relu_residual=True)
    chained = _conv_graph(16, 32, 3, (1, 1), (1, 1, 1, 1), chained=True)
    calls = [line for line in lower(chained)["main"].script(show_meta=False).splitlines() if "call_tir(" in line]
    assert sum("shift_conv2d_codes_u8" in line for line in calls) == 2
    assert sum("shift_conv2d_prep" in line for line in calls) == 1  # the second reads channel-last codes
    for graph in (residual, chained):
        _check_conv(graph, 16)


def test_conv_codes_that_do_not_fit_keep_the_int16_kernel():
    script = lower(_conv_graph(*CONVS["c16_o64_3x3"], levels=16, bits=4)).script(show_meta=False)
    assert "shift_int8_conv_fused" not in script and "shift_conv2d_codes_u8" not in script


def test_arm64_dotprod_build_runs_shift_linear_on_sdot():
    """``arm64-dotprod``: 7-level shift codes on the ``sdot`` GEMM (cross-built, not run here:
    ``test_edge.py`` checks it bit-exact on the emulated device); plain ``arm64`` keeps the int16 loop."""
    sign, exponent = _fitting_codes(40, 72, 3)
    graph = _graph(40, 72, sign, exponent, 3)

    def assembly(target: str) -> str:
        return build(graph, target).executable.mod.imports[0].inspect_source("asm")

    dotprod = assembly("arm64-dotprod")
    assert "int8_gemm_sdot:" in dotprod and "\tsdot\tv" in dotprod
    plain = assembly("arm64")
    assert "\tsdot\t" not in plain and "shift_int16_gemm:" in plain


def test_arm64_dotprod_dense_shift_conv_takes_the_sdot_gemm():
    """Dense shift convs on ``arm64-dotprod``: the uint8 window codes on the ``sdot`` GEMM; plain ``arm64``
    keeps the int16 codes and loop."""
    from reshift.codegen.tvm.targets import resolve_target

    graph = _conv_graph(*CONVS["c16_o64_3x3"])
    for target, int8 in (("arm64-dotprod", True), ("arm64", False)):
        with resolve_target(target).target():
            script = lower(graph).script(show_meta=False)
        assert ("shift_conv2d_codes_u8" in script and "int8_gemm_sdot" in script) == int8
        assert ("shift_int16_gemm" in script) == (not int8)
    assembly = build(graph, "arm64-dotprod").executable.mod.imports[0].inspect_source("asm")
    assert "\tsdot\tv" in assembly
