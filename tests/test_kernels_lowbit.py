"""The multiplication-free kernels (codegen/tvm/kernels/) against the registry's numpy references.

Odd sizes on purpose: K not a multiple of 8 or of the group size, group sizes not a multiple of 4,
one output row, batch 1/3/5/8/17 through one symbolic-batch build (the AVX-512 kernels block rows
by 8, then 4, 2, 1: every remainder path runs). Float paths within 1e-5 relative
(max |diff| / max |reference|); shift_linear's integer accumulation bit-exact.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from reshift.codegen.tvm import LOWERINGS, build  # noqa: E402
from reshift.codegen.tvm.kernels import lowbit  # noqa: E402
from reshift.codegen.tvm.kernels.packing import nibble_words, pack_shift  # noqa: E402
from reshift.ir import GraphBuilder, interpret  # noqa: E402
from reshift.ir.ops_lowbit import pack_signs, pack_trits  # noqa: E402

RNG = np.random.default_rng(7)
SHAPES = [(1, 5, 4, 2), (37, 70, 16, 3), (20, 131, 128, 4), (33, 200, 6, 1)]  # (out, in, group, q)


def _graph(kind: str, out: int, k: int, group: int, q: int):
    b = GraphBuilder(kind)
    x = b.input("x", f"f32[N,{k}]")
    bias = b.constant(RNG.standard_normal(out).astype(np.float32))
    n_groups = -(-k // group)
    if kind == "bcq":
        bits = pack_signs(np.where(RNG.random((q, out, k)) < 0.5, -1, 1))
        alpha = RNG.random((out, n_groups, q)).astype(np.float32)
        y = b.bcq_linear(x, b.constant(bits), b.constant(alpha), bias, group_size=group, in_features=k)
    elif kind == "ternary":
        trits = pack_trits(RNG.integers(-1, 2, (out, k)))
        y = b.ternary_linear(
            x,
            b.constant(trits),
            b.constant(RNG.random((out, n_groups)).astype(np.float32)),
            None,
            group_size=group,
            in_features=k,
        )
    else:
        sign = RNG.integers(-1, 2, (out, k)).astype(np.int8)
        exponent = RNG.integers(0, 16, (out, k)).astype(np.uint8)
        y = b.shift_linear(
            x, b.constant(sign), b.constant(exponent), b.constant(RNG.random(out).astype(np.float32)), bias
        )
    return b.build(y)


def _run(executable, x: np.ndarray) -> np.ndarray:
    return relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def test_kernels_replace_reference_lowerings():
    for name in ("bcq_linear", "ternary_linear", "shift_linear"):
        assert LOWERINGS[name].__module__ == lowbit.__name__


@pytest.mark.parametrize("kind", ["bcq", "ternary", "shift"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(kind, shape):
    graph = _graph(kind, *shape)
    executable = build(graph, "cpu").executable
    for batch in (1, 3, 5, 8, 17):
        x = RNG.standard_normal((batch, shape[1])).astype(np.float32)
        expected = interpret(graph, {"x": x})[graph.outputs[0].name]
        actual = _run(executable, x)
        assert actual.shape == expected.shape
        if kind == "shift":  # the int32 accumulation is exact; the float rescale is the reference's own sequence
            np.testing.assert_array_equal(actual, expected)
        else:
            error = np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max()
            assert error <= 1e-5, f"{kind} {shape} batch {batch}: relative error {error:.3g}"


@pytest.mark.parametrize("kind", ["bcq", "ternary"])
def test_static_many_rows_run_the_gemm(kind):
    """A linear with a static row count of GEMM_MIN_ROWS or more lowers to the tile-decoding GEMM (no table)."""
    from reshift.codegen.tvm import lower
    from reshift.codegen.tvm.kernels.bcq_gemm import GEMM_MIN_ROWS

    b = GraphBuilder(kind)
    x = b.input("x", f"f32[{GEMM_MIN_ROWS + 3},70]")
    if kind == "bcq":
        bits = b.constant(pack_signs(np.where(RNG.random((2, 20, 70)) < 0.5, -1, 1)))
        y = b.bcq_linear(
            x, bits, b.constant(RNG.random((20, 5, 2)).astype(np.float32)), None, group_size=16, in_features=70
        )
    else:
        trits = b.constant(pack_trits(RNG.integers(-1, 2, (20, 70))))
        y = b.ternary_linear(
            x, trits, b.constant(RNG.random((20, 5)).astype(np.float32)), None, group_size=16, in_features=70
        )
    graph = b.build(y)
    names = [gv.name_hint for gv in lower(graph).functions]
    assert f"{kind}_linear_gemm" in names and not any("lut" in n for n in names)
    xv = RNG.standard_normal((GEMM_MIN_ROWS + 3, 70)).astype(np.float32)
    xv[4, 7] = np.inf
    expected = interpret(graph, {"x": xv})[graph.outputs[0].name]
    actual = _run(build(graph, "cpu").executable, xv)
    assert np.isnan(actual[4]).all()
    finite = np.delete(np.arange(len(xv)), 4)
    error = np.abs(actual[finite] - expected[finite]).max() / np.abs(expected[finite]).max()
    assert error <= 1e-5


def test_weights_stay_packed():
    """The module holds the nibble words as uint32 constants, never a float32 copy of W."""
    from reshift.codegen.tvm import lower

    graph = _graph("bcq", 32, 64, 32, 3)
    script = lower(graph).script(show_meta=False)
    assert "uint32" in script and "bcq_linear_lut_gemv" in script
    assert "R.matmul" not in script


def test_float16_scales_are_stored_in_half_the_bytes_with_the_same_result():
    """Scales that are float16 values (as reshift.llm stores them) reach the kernel as float16, and the
    result still matches the float32 reference; a scale float16 cannot hold keeps float32."""
    from reshift.codegen.tvm.kernels.packing import alpha_dtype_for

    graph = _graph("bcq", 37, 300, 128, 3)
    alpha = graph.nodes[-1].inputs[2]
    alpha.data = alpha.data.astype(np.float16).astype(np.float32)  # exactly representable
    assert alpha_dtype_for(alpha.data) == "float16"
    from reshift.codegen.tvm import lower

    gemv = next(f for gv, f in lower(graph).functions.items() if gv.name_hint == "bcq_linear_lut_gemv")
    assert "float16" in gemv.script()  # the alpha buffer
    executable = build(graph, "cpu").executable
    x = RNG.standard_normal((9, 300)).astype(np.float32)
    expected = interpret(graph, {"x": x})[graph.outputs[0].name]
    error = np.abs(_run(executable, x).astype(np.float64) - expected).max() / np.abs(expected).max()
    assert error <= 1e-5
    assert alpha_dtype_for(np.array([1.0, 1.0 + 2.0**-20], np.float32)) == "float32"
    assert alpha_dtype_for(np.array([7e4], np.float32)) == "float32"  # past float16's range


def test_packing_layouts():
    planes = np.zeros((1, 17, 40), np.uint8)
    planes[0, 16, 33] = 1  # row 16 -> block 1 lane 0; column 33 -> group 1 (G=32), word 0, bit 1
    words = nibble_words(planes, 32)
    assert words.shape == (2, 2, 1, 1, 16)
    assert words[1, 1, 0, 0, 0] == 2 and words.sum() == 2
    code = pack_shift(np.array([[1, -1, 0]], np.int8), np.array([[0, 3, 5]], np.uint8), 4)
    assert code.shape == (1, 3, 16)
    assert [int(v) for v in code[0, :, 0]] == [15, np.int8(np.uint8(0x80 | 12)), 32]


def _cpu_build(func, avx512: bool = False):
    """``func`` built for the host; ``avx512`` needs the host's mcpu for the intrinsics."""
    from reshift.codegen.tvm.targets import resolve_target

    target = resolve_target("cpu").target() if avx512 else {"kind": "llvm"}
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)["main"]


# -- the row-blocked AVX-512 kernels against the portable loops, every row count up to 2 full blocks + 7
needs_avx512 = pytest.mark.skipif(lowbit.kernel_flavor() != "avx512", reason="host CPU without AVX-512")
ROW_COUNTS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 17, 23)


@needs_avx512
@pytest.mark.parametrize("alpha_dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    "blocks, n_groups, planes, group", [(1, 2, 3, 32), (3, 3, 2, 128), (6, 2, 4, 64), (8, 1, 1, 8)]
)
def test_lut_avx512_kernel_matches_portable_kernel(blocks, n_groups, planes, group, alpha_dtype):
    from reshift.codegen.tvm.kernels.lut_gemv import gemv_func
    from reshift.codegen.tvm.kernels.packing import ROWS, slot_layout

    slots, words = slot_layout(group)
    w = RNG.integers(0, 2**32, (blocks, n_groups, planes, words, ROWS), dtype=np.uint64).astype(np.uint32)
    alpha = RNG.standard_normal((blocks, n_groups, planes, ROWS)).astype(alpha_dtype)
    bias = RNG.standard_normal(blocks * ROWS).astype(np.float32)
    fast = _cpu_build(gemv_func(blocks, n_groups, planes, group, avx512=True, alpha_dtype=alpha_dtype), avx512=True)
    portable = _cpu_build(gemv_func(blocks, n_groups, planes, group, avx512=False, alpha_dtype=alpha_dtype))
    for rows in ROW_COUNTS:
        lut = RNG.standard_normal((rows, n_groups, slots, ROWS)).astype(np.float32)
        args = [tvm.runtime.tensor(a) for a in (lut, w, alpha, bias)]
        actual, expected = (tvm.runtime.tensor(np.zeros((rows, blocks * ROWS), np.float32)) for _ in range(2))
        fast(*args, actual)
        portable(*args, expected)
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-5, atol=1e-4, err_msg=f"rows {rows}")


@pytest.mark.parametrize("alpha_dtype", ["float32", "float16"])
@pytest.mark.parametrize("out, k, group, q", [(64, 256, 128, 3), (48, 300, 128, 2), (37, 70, 6, 4), (16, 33, 32, 1)])
def test_bcq_gemm_matches_reference(out, k, group, q, alpha_dtype):
    """The tile-decoding GEMM (prefill) on the GEMV's packed operands: 4, 3, 2 and 1 output blocks per tile,
    K past the last full group, groups not a multiple of 32 columns, rows in full register tiles, short
    tails and across the 192-row block."""
    from reshift.codegen.tvm.kernels.bcq_gemm import ROW_BLOCK, gemm_func, tile_shape
    from reshift.codegen.tvm.kernels.packing import ROWS, pack_bcq
    from reshift.ir.ops_lowbit import bcq_weight

    bits = pack_signs(np.where(RNG.random((q, out, k)) < 0.5, -1, 1))
    alpha = RNG.standard_normal((out, -(-k // group), q)).astype(alpha_dtype).astype(np.float32)
    words, alpha_packed = pack_bcq(bits, alpha, group, k, alpha_dtype)
    blocks, n_groups = words.shape[:2]
    bias = np.zeros(blocks * ROWS, np.float32)
    bias[:out] = RNG.standard_normal(out)
    weight = bcq_weight(bits, alpha, group, k).astype(np.float64)
    gemm = _cpu_build(gemm_func(blocks, n_groups, q, group, k, alpha_dtype), avx512=lowbit.kernel_flavor() == "avx512")
    rows_tile = tile_shape(blocks)[0]
    for rows in (1, rows_tile - 1, rows_tile, 2 * rows_tile + 1, ROW_BLOCK + rows_tile + 3):
        x = RNG.standard_normal((rows, k)).astype(np.float32)
        y = tvm.runtime.tensor(np.zeros((rows, blocks * ROWS), np.float32))
        gemm(*[tvm.runtime.tensor(a) for a in (x, words, alpha_packed, bias)], y)
        expected = x.astype(np.float64) @ weight.T + bias[:out]
        error = np.abs(y.numpy()[:, :out] - expected).max() / np.abs(expected).max()
        assert error <= 1e-5, f"rows {rows}: relative error {error:.3g}"
        np.testing.assert_array_equal(y.numpy()[:, out:], 0)  # padding rows: zero bits' +-alpha are 0


@needs_avx512
@pytest.mark.parametrize("blocks, k", [(1, 5), (3, 300), (4, 77)])
def test_shift_avx512_kernel_matches_portable_kernel_bit_exactly(blocks, k):
    from reshift.codegen.tvm.kernels.packing import ROWS
    from reshift.codegen.tvm.kernels.shift_gemv import shift_gemv_func

    sign = RNG.integers(-1, 2, (blocks * ROWS, k)).astype(np.int8)
    code = tvm.runtime.tensor(pack_shift(sign, RNG.integers(0, 32, sign.shape).astype(np.uint8), 5))  # wraps
    fast = _cpu_build(shift_gemv_func(blocks, k, avx512=True), avx512=True)
    portable = _cpu_build(shift_gemv_func(blocks, k, avx512=False))
    for rows in ROW_COUNTS:
        q = tvm.runtime.tensor(RNG.integers(-127, 128, (rows, k)).astype(np.int32))
        actual, expected = (tvm.runtime.tensor(np.zeros((rows, blocks * ROWS), np.int32)) for _ in range(2))
        fast(code, q, actual)
        portable(code, q, expected)
        np.testing.assert_array_equal(actual.numpy(), expected.numpy(), err_msg=f"rows {rows}")


# -- CUDA kernels: their loops run unbound on the CPU here (no GPU in CI); the GPU check is
# benchmarks/cuda_check.py, run where a GPU is lent.
@pytest.mark.parametrize("blocks, n_groups, planes, group", [(1, 1, 1, 32), (5, 3, 2, 128), (9, 11, 4, 64)])
def test_cuda_lut_kernel_matches_cpu_kernel(blocks, n_groups, planes, group):
    from reshift.codegen.tvm.kernels.lut_gemv import gemv_func
    from reshift.codegen.tvm.kernels.lut_gemv_cuda import gemv_cuda_func, split_for
    from reshift.codegen.tvm.kernels.packing import ROWS, slot_layout

    slots, words = slot_layout(group)
    rows = 3
    lut = RNG.standard_normal((rows, n_groups, slots, ROWS)).astype(np.float32)
    w = RNG.integers(0, 2**32, (blocks, n_groups, planes, words, ROWS), dtype=np.uint64).astype(np.uint32)
    alpha = RNG.standard_normal((blocks, n_groups, planes, ROWS)).astype(np.float32)
    zeros = np.zeros(blocks * ROWS, np.float32)
    part = tvm.runtime.tensor(np.zeros((split_for(n_groups), rows, blocks * ROWS), np.float32))
    _cpu_build(gemv_cuda_func(blocks, n_groups, planes, group, serial=True))(
        *[tvm.runtime.tensor(a) for a in (lut, w, alpha)], part
    )
    expected = tvm.runtime.tensor(np.zeros((rows, blocks * ROWS), np.float32))
    _cpu_build(gemv_func(blocks, n_groups, planes, group, avx512=False))(
        *[tvm.runtime.tensor(a) for a in (lut, w, alpha, zeros)], expected
    )
    np.testing.assert_allclose(part.numpy().sum(0), expected.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("blocks, k", [(1, 5), (3, 300), (2, 1000)])
def test_cuda_shift_kernel_matches_cpu_kernel_bit_exactly(blocks, k):
    from reshift.codegen.tvm.kernels.packing import ROWS
    from reshift.codegen.tvm.kernels.shift_gemv import shift_gemv_func
    from reshift.codegen.tvm.kernels.shift_gemv_cuda import shift_gemv_cuda_func, shift_split_for

    rows = 2
    sign = RNG.integers(-1, 2, (blocks * ROWS, k)).astype(np.int8)
    code = pack_shift(sign, RNG.integers(0, 32, sign.shape).astype(np.uint8), 5)  # shifts up to 31: wraps
    q = RNG.integers(-127, 128, (rows, k)).astype(np.int32)
    part = tvm.runtime.tensor(np.zeros((shift_split_for(k), rows, blocks * ROWS), np.int32))
    _cpu_build(shift_gemv_cuda_func(blocks, k, serial=True))(tvm.runtime.tensor(code), tvm.runtime.tensor(q), part)
    expected = tvm.runtime.tensor(np.zeros((rows, blocks * ROWS), np.int32))
    _cpu_build(shift_gemv_func(blocks, k, avx512=False))(tvm.runtime.tensor(code), tvm.runtime.tensor(q), expected)
    total = part.numpy().astype(np.int64).sum(0)
    np.testing.assert_array_equal(((total + 2**31) % 2**32 - 2**31).astype(np.int32), expected.numpy())


@pytest.mark.parametrize("kind", ["bcq", "ternary", "shift"])
def test_cuda_build_keeps_weights_packed(kind):
    """A CUDA build runs reshift's GPU kernels on packed weights, not a decoded float32 matmul."""
    executable = build(_graph(kind, 40, 70, 16, 2), "cuda-sm90").executable
    device = [m for m in executable.mod.imports[0].imports if m.kind == "cuda"]
    source = device[0].inspect_source()
    assert "_gemv_cuda" in source and "blockIdx.z" in source  # the activation row
    assert "row_absmax_cuda" in source and "__shfl_down_sync" in source  # cross-thread row max, not serial
    assert "matmul" not in source


@pytest.mark.parametrize("kind", ["bcq", "ternary", "shift"])
def test_non_finite_rows_give_nan_like_the_reference(kind):
    """A row holding NaN or inf gives NaN outputs; LLVM's max() drops NaN, so the int8 scale must not use it."""
    graph = _graph(kind, 20, 70, 16, 2)
    x = RNG.standard_normal((3, 70)).astype(np.float32)
    x[1, 5], x[2, 9] = np.nan, np.inf
    expected = interpret(graph, {"x": x})[graph.outputs[0].name]
    actual = _run(build(graph, "cpu").executable, x)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    assert np.isnan(actual[1]).all() and np.isnan(actual[2]).all()
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5, atol=1e-5 * np.abs(expected[0]).max())
