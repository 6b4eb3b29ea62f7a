"""Shift-add GEMV for power-of-two weights on NVIDIA GPUs: exact int32 ``sum_k sign * (q_k << s)``.

The weight bytes and the term are the CPU kernel's (``shift_gemv.py``, DeepShift-PS): per byte
``c``, ``s = c & 63`` (32 encodes sign 0), ``neg = c >> 31`` after sign extension, and the term is
``((q << s) ^ neg) - neg``. CUDA's ``<<`` by 32 is undefined, so ``s >= 32`` selects 0 explicitly.

Thread mapping as in ``lut_gemv_cuda.py``: ``threadIdx.x`` over consecutive output rows (one
warp reads two 16-byte runs of the row-blocked weight bytes per column), ``blockIdx.y`` splits K
into ranges of at least ``MIN_CHUNK`` columns (at most ``MAX_SPLIT`` of them), ``blockIdx.z`` is
the activation row; the column loop is unrolled by ``UNROLL`` so that loads overlap. int32 partial
sums go to ``part[split, m, o]`` and are summed by a small kernel after it (int32 addition is
associative modulo 2^32, so the split keeps the result bit-exact).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.kernels.lut_gemv_cuda import MAX_SPLIT, ROWS_PER_CTA, thread_loops
from reshift.codegen.tvm.kernels.packing import ROWS

MIN_CHUNK = 64  # fewest columns per split range
UNROLL = 8  # columns per unrolled step


def shift_split_for(in_features: int) -> int:
    """Split ways of K: ranges of at least ``MIN_CHUNK`` columns, at most ``MAX_SPLIT`` ranges."""
    return max(1, min(MAX_SPLIT, in_features // MIN_CHUNK))


def shift_gemv_cuda_func(blocks: int, in_features: int, serial: bool = False) -> tirx.PrimFunc:
    """``part[t, m, 16*ob + l] = sum_{k in range t} term(code[ob, k, l], q[m, k])`` in int32.

    ``serial=True`` leaves the loops unbound so that a CPU build can check the arithmetic.
    """
    width = blocks * ROWS
    split = shift_split_for(in_features)
    chunk = -(-in_features // split)
    steps = -(-chunk // UNROLL)
    rows_per_cta = min(ROWS_PER_CTA, width)
    ctas = -(-width // rows_per_cta)
    bind = thread_loops(serial)

    @T.prim_func(private=True)
    def shift_gemv(code: T.Buffer((blocks, in_features, ROWS), "int8"), q_h: T.handle, part_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        q = T.match_buffer(q_h, (rows, in_features), "int32")
        part = T.match_buffer(part_h, (split, rows, width), "int32")
        for m in bind(rows, "blockIdx.z"):
            for t in bind(split, "blockIdx.y"):
                for cta in bind(ctas, "blockIdx.x"):
                    for lane in bind(rows_per_cta, "threadIdx.x"):
                        total = T.alloc_buffer((1,), "int32", scope="local")
                        total[0] = T.int32(0)
                        if cta * rows_per_cta + lane < width:
                            for step in range(steps):
                                for u in T.unroll(UNROLL):
                                    if step * UNROLL + u < chunk and t * chunk + step * UNROLL + u < in_features:
                                        c = T.Cast(
                                            "int32",
                                            code[
                                                (cta * rows_per_cta + lane) // ROWS,
                                                t * chunk + step * UNROLL + u,
                                                (cta * rows_per_cta + lane) % ROWS,
                                            ],
                                        )
                                        s = T.bitwise_and(c, T.int32(63))
                                        neg = T.shift_right(c, T.int32(31))
                                        shifted = T.if_then_else(
                                            s < 32,
                                            T.shift_left(q[m, t * chunk + step * UNROLL + u], T.min(s, 31)),
                                            T.int32(0),
                                        )
                                        total[0] = total[0] + (T.bitwise_xor(shifted, neg) - neg)
                            part[t, m, cta * rows_per_cta + lane] = total[0]

    return shift_gemv
