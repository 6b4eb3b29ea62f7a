"""The ``moe_linear`` token-dispatch kernel (codegen/tvm/kernels/moe_dispatch.py) against the registry's
reference: one symbolic-row build, row counts 1..40 (the data-dependent expert row counts hit the
shift GEMV's 8/4/2/1 row blocks and the dense tail), all rows to one expert, NaN and zero rows.
Routing and shift rows bit-exact, multiplication rows within 1e-5 relative."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from reshift.codegen.tvm import build, lower  # noqa: E402
from reshift.codegen.tvm.kernels import int8_gemm  # noqa: E402
from reshift.ir import GraphBuilder, interpret  # noqa: E402
from reshift.ir.ops_moe import routes  # noqa: E402

RNG = np.random.default_rng(11)


def _graph(out: int, k: int, router_bias: float, lead: str = "N", bits: int = 4):
    """Random shift codes: at 4 bits the int16 kernel's, at 3 bits exponents 0..6 (the int8 kernel's)."""
    b = GraphBuilder("moe")
    x = b.input("x", f"f32[{lead},{k}]")
    consts = [
        RNG.integers(-127, 128, k).astype(np.int8),
        np.array([0.003], np.float32),
        np.array([router_bias], np.float32),
        RNG.standard_normal((out, k)).astype(np.float32),
        RNG.integers(-1, 2, (out, k)).astype(np.int8),
        RNG.integers(0, 16 if bits == 4 else 7, (out, k)).astype(np.uint8),
        RNG.random(out).astype(np.float32),
        RNG.standard_normal(out).astype(np.float32),
    ]
    return b.build(b.moe_linear(x, *[b.constant(c) for c in consts], exponent_bits=bits)), consts


def _check(graph, consts, vm, x):
    expected = interpret(graph, {"x": x})[graph.outputs[0].name]
    actual = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert actual.shape == expected.shape
    rows = x.reshape(-1, x.shape[-1])
    to_shift = routes(rows, *consts[:3]).reshape(x.shape[:-1])
    np.testing.assert_array_equal(actual[to_shift], expected[to_shift])
    mult = ~to_shift
    if mult.any():
        e, a = expected[mult], actual[mult]
        finite = np.isfinite(e).all(axis=-1)
        assert np.array_equal(np.isnan(a[~finite]), np.isnan(e[~finite]))
        if finite.any():
            assert np.abs(a[finite] - e[finite]).max() <= 1e-5 * np.abs(e[finite]).max()
    return to_shift


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("shape", [(37, 70), (1, 5)], ids=lambda s: "x".join(map(str, s)))
def test_dispatch_matches_reference(shape, bits):
    out, k = shape
    graph, consts = _graph(out, k, 0.0, bits=bits)
    vm = relax.VirtualMachine(build(graph, "cpu").executable, tvm.cpu())
    shares = []
    for rows in (1, 3, 8, 17, 40):
        shares.append(_check(graph, consts, vm, RNG.standard_normal((rows, k)).astype(np.float32)).mean())
    assert 0 < np.mean(shares) < 1  # both experts ran


@pytest.mark.parametrize("router_bias", [-1e30, 1e30])
def test_all_rows_to_one_expert(router_bias):
    graph, consts = _graph(20, 24, router_bias)
    vm = relax.VirtualMachine(build(graph, "cpu").executable, tvm.cpu())
    to_shift = _check(graph, consts, vm, RNG.standard_normal((9, 24)).astype(np.float32))
    assert to_shift.all() == (router_bias > 0) and to_shift.any() == (router_bias > 0)


def test_nan_zero_rows_and_leading_dims():
    graph, consts = _graph(20, 24, 0.5, lead="2,7")
    x = RNG.standard_normal((2, 7, 24)).astype(np.float32)
    x[0, 1, 3] = np.nan
    x[1, 2, 5] = np.inf
    x[1, 4] = 0.0
    vm = relax.VirtualMachine(build(graph, "cpu").executable, tvm.cpu())
    to_shift = _check(graph, consts, vm, x)
    assert not to_shift[0, 1] and not to_shift[1, 2] and to_shift[1, 4]


@pytest.mark.parametrize("bits", [4, 3])
def test_each_expert_runs_its_own_kernel_on_its_rows(bits):
    """The dispatch partitions the rows: one dense GEMM and one shift kernel, no per-row select of both;
    7-level codes (3 bits here) take the int8 kernel where the CPU has VNNI."""
    graph, _ = _graph(20, 24, 0.0, bits=bits)
    names = {gv.name_hint for gv in lower(graph).functions}
    assert {"moe_partition", "dense_packed_f32", "moe_route"} <= names
    shift_kernels = {n for n in names if n.startswith(("shift_int16_gemm", "shift_int8_gemm"))}
    assert len(shift_kernels) == 1  # shift_linear's CPU kernel (int8 or int16 dot products)
    shift_kernel = shift_kernels.pop()
    assert shift_kernel.startswith("shift_int8" if bits == 3 and int8_gemm.has_vnni() else "shift_int16")
    lines = lower(graph)["main"].script(show_meta=False).splitlines()
    dense = next(line for line in lines if "call_tir(dense_packed_f32" in line)
    shift = next(line for line in lines if f"call_tir({shift_kernel}" in line)
    assert "(moe_rows_mult, 32)" in dense and "(N - moe_rows_mult, 32)" in shift
