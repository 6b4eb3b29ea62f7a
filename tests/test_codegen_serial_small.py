"""codegen/tvm/serial_small.py: a parallel loop whose work is small in every call becomes serial."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from reshift.codegen.tvm.serial_small import MIN_PARALLEL_WORK, serial_small_parallel, work  # noqa: E402


@T.prim_func(private=True)
def scale_rows(x_h: T.handle, s: T.Buffer((64,), "float32"), y_h: T.handle):
    """Rows in parallel, 64 elements a row: the batch ``n`` is bound only by the caller's shapes.

    Two inputs: Relax's RewriteDataflowReshape takes a one-input block-free kernel for a reshape."""
    T.func_attr({"tir.noalias": True})
    n = T.int64()
    x = T.match_buffer(x_h, (n, 64), "float32")
    y = T.match_buffer(y_h, (n, 64), "float32")
    for i in T.parallel(n):
        for j in range(64):
            y[i, j] = x[i, j] * s[j]


def module(*batches) -> tvm.IRModule:
    """``main`` calls ``scale_rows`` once per batch size (an int, or a symbolic ``"m"``)."""
    bb = relax.BlockBuilder()
    params = [
        relax.Var(f"x{k}", relax.TensorType((tirx.Var("m", "int64") if b == "m" else b, 64), "float32"))
        for k, b in enumerate(batches)
    ]
    scale = relax.const(np.full(64, 2.0, np.float32))
    with bb.function("main", params):
        gv = bb.add_func(scale_rows, "scale_rows")
        with bb.dataflow():
            outs = [
                bb.emit(relax.op.call_tir(gv, [p, scale], out_ty=relax.TensorType(p.ty.shape, "float32")))
                for p in params
            ]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def loop_kind(mod: tvm.IRModule) -> tirx.ForKind:
    return mod["scale_rows"].body.kind


def test_small_static_calls_run_serially():
    assert loop_kind(module(4)) == tirx.ForKind.PARALLEL
    assert loop_kind(serial_small_parallel()(module(4, 8))) == tirx.ForKind.SERIAL  # 512 elements


def test_large_symbolic_or_mixed_calls_stay_parallel():
    big = MIN_PARALLEL_WORK // 64 + 1
    assert loop_kind(serial_small_parallel()(module(big))) == tirx.ForKind.PARALLEL
    assert loop_kind(serial_small_parallel()(module("m"))) == tirx.ForKind.PARALLEL  # batch known at run time
    assert loop_kind(serial_small_parallel()(module(4, big))) == tirx.ForKind.PARALLEL  # one call too big
    assert loop_kind(serial_small_parallel(min_work=1 << 30)(module(4, big))) == tirx.ForKind.SERIAL


def test_work_counts_vector_lanes_and_needs_every_extent():
    n = scale_rows.params[0].shape[0]  # a buffer parameter carries its shape
    assert work(scale_rows.body, {n: 3}) == 3 * 64
    assert work(scale_rows.body, {}) is None
    store = tirx.BufferStore(
        scale_rows.params[2], tirx.Broadcast(tirx.FloatImm("float32", 1.0), 16), [0, tirx.Ramp(0, 1, 16)]
    )
    assert work(store, {}) == 16


def test_serialized_build_runs(tmp_path):
    """The rewritten module still compiles and computes the same thing."""
    mod = serial_small_parallel()(module(4))
    executable = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = np.arange(256, dtype=np.float32).reshape(4, 64)
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x))[0].numpy(), 2 * x)
