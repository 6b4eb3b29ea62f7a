"""Row-wise ``max |x|`` on NVIDIA GPUs: one thread block per row, a cross-thread reduction.

The low-bit lowerings need ``max_k |x[m, k]|`` per activation row (the int8 scale of the shift
kernel, the non-finite-row guard of the LUT kernels). TVM 0.27's dlight rules schedule a ``sum``
over the last axis with a cross-thread reduction but not a ``max``, which falls back to one thread
per row looping over all of K: measured 70 µs for K = 4096 on an H200 (benchmarks/cuda_check.py),
more than the GEMV itself. Here the K loop is split so that ``THREADS`` threads each reduce a
strided slice and TVM's cross-thread reduction (warp shuffles) combines them.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

THREADS = 256  # threads per row (threadIdx.x)


def row_absmax_cuda_func(in_features: int) -> tirx.PrimFunc:
    """``amax[m, 0] = max_k |x[m, k]|`` for a symbolic number of rows; a row holding NaN gives +inf.

    Callers treat a non-finite ``amax`` as "this row is not finite" (NaN outputs), as the CPU path does.
    """
    rows = tirx.Var("rows", "int64")
    x = te.placeholder((rows, in_features), "float32", name="x")
    k = te.reduce_axis((0, in_features), name="k")
    inf = tirx.const(float("inf"), "float32")

    def magnitude(m, kk):  # NaN counts as +inf: CUDA's max() would drop it and hide a NaN row
        return tirx.if_then_else(tirx.isnan(x[m, kk]), inf, te.abs(x[m, kk]))

    amax = te.compute((rows, 1), lambda m, _: te.max(magnitude(m, k), axis=k), name="amax")
    sch = s_tir.Schedule(te.create_prim_func([x, amax]))
    block = sch.get_sblock("amax")
    m, unit, kk = sch.get_loops(block)
    k_outer, k_inner = sch.split(kk, [None, THREADS])
    sch.reorder(m, unit, k_inner, k_outer)
    sch.bind(m, "blockIdx.x")
    sch.bind(k_inner, "threadIdx.x")
    return sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)
