"""The int8-table (T-MAC) BCQ / ternary GEMV: its numpy semantics, the kernels bit-exact against them,
the ``lut_dtype="int8"`` op variant through the graph lowering, and the LLM's ``decode_lut`` option."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from reshift.codegen.tvm.kernels.lut_gemv_int8 import (  # noqa: E402
    gemv_int8_func,
    has_int8_lut,
    int8_tables_func,
    table_shape,
)
from reshift.codegen.tvm.kernels.packing import ROWS, pack_bcq, pack_ternary  # noqa: E402
from reshift.errors import IRTypeError  # noqa: E402
from reshift.ir import GraphBuilder, interpret  # noqa: E402
from reshift.ir.ops_lowbit import (  # noqa: E402
    bcq_weight,
    int8_tables,
    lut_int8_rows,
    pack_signs,
    pack_trits,
    ternary_planes,
    ternary_weight,
)

RNG = np.random.default_rng(11)
needs_int8 = pytest.mark.skipif(not has_int8_lut(), reason="host CPU without AVX-512 BW + VBMI + VNNI")


def _build(func):
    from reshift.codegen.tvm.targets import resolve_target

    target = resolve_target("cpu").target()
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)["main"]


def _bcq(out: int, k: int, group: int, q: int):
    bits = pack_signs(np.where(RNG.random((q, out, k)) < 0.5, -1, 1))
    alpha = (RNG.random((out, -(-k // group), q)) + 0.05).astype(np.float16).astype(np.float32)
    return bits, alpha


# -- the numpy semantics ----------------------------------------------------------------------
def test_int8_tables_semantics():
    x = RNG.standard_normal((3, 70)).astype(np.float32)
    x[2] = 0  # an all-zero row: scale 0, table 0
    q, s = int8_tables(x, 32)
    assert q.shape == (3, 3, 8, 16) and q.dtype == np.int8 and s.shape == (3, 3)
    assert np.array_equal(q[..., ::-1], -q)  # T[15 - n] = -T[n], and rint is symmetric
    assert np.abs(q).max() == 127 and (q[2] == 0).all() and (s[2] == 0).all()
    # entry n of slot t is round(sum_j +-x / s); column 64 + 4 + j (group 2, slot 1): only 70 - 68 = 2 real
    v = x[0, 68:70]
    assert q[0, 2, 1, 0b11] == np.clip(np.rint((v[0] + v[1]) / s[0, 2]), -127, 127)
    assert (q[0, 2, 2:] == 0).all()  # slots past K read zero activations
    assert np.isclose(s[0, 0], max(np.abs(x[0, 4 * t : 4 * t + 4]).sum() for t in range(8)) / 127, rtol=1e-6)


@pytest.mark.parametrize("group", [128, 32])
def test_lut_int8_rows_is_close_to_the_float_product(group):
    out, k = 48, 300
    bits, alpha = _bcq(out, k, group, 3)
    x = RNG.standard_normal((4, k)).astype(np.float32)
    planes = np.unpackbits(bits, axis=-1, count=k, bitorder="little")
    y = lut_int8_rows(x, planes, alpha, group)
    dense = x @ bcq_weight(bits, alpha, group, k).T
    error = np.linalg.norm(y - dense) / np.linalg.norm(dense)
    assert 1e-4 < error < 0.02  # the table rounding: small, and not nothing
    x[1, 5] = np.inf
    assert np.isnan(lut_int8_rows(x, planes, alpha, group)[1]).all()


def test_bad_lut_dtype_is_refused():
    b = GraphBuilder("bad")
    x = b.input("x", "f32[2,8]")
    bits, alpha = _bcq(4, 8, 8, 2)
    with pytest.raises(IRTypeError, match="lut_dtype 'int4'"):
        b.build(
            b.bcq_linear(x, b.constant(bits), b.constant(alpha), None, group_size=8, in_features=8, lut_dtype="int4")
        )


# -- the kernels -----------------------------------------------------------------------------
@needs_int8
@pytest.mark.parametrize("out,k,group,q,rows", [(37, 300, 128, 3, 1), (64, 256, 64, 2, 3), (20, 131, 32, 4, 2)])
@pytest.mark.parametrize("alpha_dtype", ["float32", "float16"])
def test_int8_kernels_are_bit_exact(out, k, group, q, rows, alpha_dtype):
    bits, alpha = _bcq(out, k, group, q)
    words, alpha_packed = pack_bcq(bits, alpha, group, k, alpha_dtype)
    blocks, n_groups = words.shape[:2]
    x = RNG.standard_normal((rows, k)).astype(np.float32) * 3
    bias = RNG.standard_normal(blocks * ROWS).astype(np.float32)
    slots, tables = table_shape(group)
    lut = tvm.runtime.tensor(np.zeros((rows, n_groups, tables, 64), np.int8))
    scale = tvm.runtime.tensor(np.zeros((rows, n_groups), np.float32))
    _build(int8_tables_func(k, group))(tvm.runtime.tensor(x), lut, scale)
    q_ref, s_ref = int8_tables(x, group)
    got = lut.numpy().reshape(rows, n_groups, slots, 16)  # 4 slots' 16 entries per 64-byte table
    assert np.array_equal(got[:, :, : q_ref.shape[2]], q_ref) and np.array_equal(scale.numpy(), s_ref)
    y = tvm.runtime.tensor(np.zeros((rows, blocks * ROWS), np.float32))
    args = [tvm.runtime.tensor(a) for a in (words, alpha_packed, bias)]
    _build(gemv_int8_func(blocks, n_groups, q, group, alpha_dtype))(lut, scale, *args, y)
    planes = np.unpackbits(bits, axis=-1, count=k, bitorder="little")
    expected = lut_int8_rows(x, planes, alpha, group, bias[:out])
    assert np.array_equal(y.numpy()[:, :out], expected)


@needs_int8
@pytest.mark.parametrize("kind", ["bcq", "ternary"])
@pytest.mark.parametrize("rows", [1, 70])  # 70: past GEMM_MIN_ROWS, still the int8 semantics
def test_graph_op_variant_matches_interpreter(kind, rows):
    from reshift.codegen.tvm.build import build

    out, k, group = 40, 200, 64
    b = GraphBuilder(kind)
    x_in = b.input("x", f"f32[{rows},{k}]")
    bias = RNG.standard_normal(out).astype(np.float32)
    if kind == "bcq":
        bits, alpha = _bcq(out, k, group, 3)
        y = b.bcq_linear(x_in, b.constant(bits), b.constant(alpha), b.constant(bias), group_size=group,
                         in_features=k, lut_dtype="int8")  # fmt: skip
    else:
        trits = pack_trits(RNG.integers(-1, 2, (out, k)))
        scale = (RNG.random((out, -(-k // group))) + 0.1).astype(np.float16).astype(np.float32)
        y = b.ternary_linear(x_in, b.constant(trits), b.constant(scale), b.constant(bias), group_size=group,
                             in_features=k, lut_dtype="int8")  # fmt: skip
    graph = b.build(y)
    x = RNG.standard_normal((rows, k)).astype(np.float32)
    x[0, 3] = np.nan
    expected = interpret(graph, {"x": x})[graph.outputs[0].name]
    result = build(graph, target="cpu")
    got = relax.VirtualMachine(result.executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert np.isnan(got[0]).all() and np.isnan(expected[0]).all()
    assert np.array_equal(got[1:], expected[1:])
    if kind == "ternary":  # the two sign planes with +-scale/2 are the ternary weights
        planes, alpha = ternary_planes(trits, scale, k)
        w = np.zeros((out, k), np.float32)
        for i in range(2):
            w += (2 * planes[i].astype(np.float32) - 1) * np.repeat(alpha[:, :, i], group, axis=1)[:, :k]
        assert np.array_equal(w, ternary_weight(trits, scale, group, k))


def test_ternary_packing_matches_its_planes():
    out, k, group = 17, 100, 32
    trits = pack_trits(RNG.integers(-1, 2, (out, k)))
    scale = RNG.random((out, -(-k // group))).astype(np.float32)
    words, alpha = pack_ternary(trits, scale, group, k)
    planes, alpha_planes = ternary_planes(trits, scale, k)
    words2, alpha2 = pack_bcq(pack_signs(2 * planes.astype(np.int8) - 1), alpha_planes, group, k)
    assert np.array_equal(words, words2) and np.array_equal(alpha, alpha2)


def test_decode_lut_option_is_checked():
    import reshift.llm
    from reshift.errors import PassError

    with pytest.raises(PassError, match="decode_lut='int16'"):
        reshift.llm.compile("/nonexistent", pipeline="bcq", decode_lut="int16")
    with pytest.raises(PassError, match="CPU targets only"):
        reshift.llm.compile("/nonexistent", pipeline="bcq", target="cuda-sm90", decode_lut="int8")
    if not has_int8_lut():
        with pytest.raises(PassError, match="VBMI"):
            reshift.llm.compile("/nonexistent", pipeline="bcq", decode_lut="int8")


def test_int8_variant_has_no_dense_onnx_decomposition():
    from reshift.codegen.onnx import to_onnx
    from reshift.errors import CodegenError

    b = GraphBuilder("int8_onnx")
    x = b.input("x", "f32[2,16]")
    bits, alpha = _bcq(4, 16, 8, 2)
    graph = b.build(
        b.bcq_linear(x, b.constant(bits), b.constant(alpha), None, group_size=8, in_features=16, lut_dtype="int8")
    )
    with pytest.raises(CodegenError, match="no standard-ONNX"):
        to_onnx(graph)
    assert [n.op_type for n in to_onnx(graph, custom_ops="domain").graph.node] == ["bcq_linear"]
