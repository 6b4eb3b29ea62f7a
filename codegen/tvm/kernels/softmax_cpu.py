"""fp32 softmax over the last axis for CPU in three vectorized passes per row.

For each row (rows in parallel): the maximum as 16-lane vector maxima plus a scalar tail, then
``y = exp(x - max)`` with a 16-lane running sum, then ``y *= 1 / sum``. ``exp`` is the polynomial
of ``fast_math.exp_f32`` (LLVM's vector ``exp`` is 16 scalar libm calls). The row stays in L1 between
the passes. ``n`` (the row length) is static, the number of rows symbolic. The per-row buffers
hold 16 floats (well under the 1 KiB at which TVM moves local buffers to the heap).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.kernels.fast_math import exp_f32

LANES = 16


def softmax_func(n: int, stride: int | None = None, scale: float = 1.0) -> tirx.PrimFunc:
    """``y[r, :] = softmax(scale * x[r, :n])`` for ``x [rows, stride]`` (default ``stride = n``).

    ``stride > n`` reads the first ``n`` columns of wider rows (a matmul's output padded to whole
    vectors, cropped here instead of by a copy); ``scale > 0`` is an attention ``1/sqrt(d)`` folded in
    (``max(s x) = s max(x)``). ``x_again`` is ``x`` passed a second time: Relax's
    RewriteDataflowReshape asserts that a one-input PrimFunc without blocks is a reshape
    (tir_op_pattern_kind.cc HasReshapePattern).
    """
    if not scale > 0:
        raise ValueError(f"softmax scale must be positive, got {scale}")
    stride = stride or n
    vectors = n // LANES
    lanes = T.Ramp(0, 1, LANES)
    s_vec = T.Broadcast(T.float32(scale), LANES)
    s_one = T.float32(scale)

    @T.prim_func(private=True)
    def softmax(x_h: T.handle, x2_h: T.handle, y_h: T.handle):
        T.func_attr({"tir.noalias": False, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, stride), "float32")
        x_again = T.match_buffer(x2_h, (rows, stride), "float32")
        y = T.match_buffer(y_h, (rows, n), "float32")
        xf = T.decl_buffer((rows * stride,), "float32", data=x.data)
        yf = T.decl_buffer((rows * n,), "float32", data=y.data)
        for r in T.parallel(rows):
            vec = T.alloc_buffer((LANES,), "float32", scope="global")
            red = T.alloc_buffer((1,), "float32", scope="global")
            vec[lanes] = T.Broadcast(T.min_value("float32"), LANES)
            for v in range(vectors):
                vec[lanes] = T.max(vec[lanes], xf[T.Ramp(r * stride + v * LANES, 1, LANES)])
            red[0] = x_again[r, 0]
            for l in range(LANES):
                red[0] = T.max(red[0], vec[l])
            for t in range(vectors * LANES, n):
                red[0] = T.max(red[0], xf[r * stride + t])
            m = red[0] * s_one
            vec[lanes] = T.Broadcast(T.float32(0), LANES)
            for v in range(vectors):
                e = exp_f32(xf[T.Ramp(r * stride + v * LANES, 1, LANES)] * s_vec - T.Broadcast(m, LANES))
                yf[T.Ramp(r * n + v * LANES, 1, LANES)] = e
                vec[lanes] = vec[lanes] + e
            red[0] = T.float32(0)
            for t in range(vectors * LANES, n):
                yf[r * n + t] = exp_f32(xf[r * stride + t] * s_one - m)
                red[0] = red[0] + yf[r * n + t]
            for l in range(LANES):
                red[0] = red[0] + vec[l]
            s = T.float32(1) / red[0]
            for v in range(vectors):
                yf[T.Ramp(r * n + v * LANES, 1, LANES)] = yf[T.Ramp(r * n + v * LANES, 1, LANES)] * T.Broadcast(
                    s, LANES
                )
            for t in range(vectors * LANES, n):
                yf[r * n + t] = yf[r * n + t] * s

    return softmax
