"""Shift-add GEMV for power-of-two weights (DeepShift-PS): exact int32 ``sum_k sign * (q_k << s)``.

Weights are one signed byte per weight (``packing.pack_shift``), blocked by 16 output rows so one
``vpmovsxbd`` load feeds 16 rows. Per byte ``c``: ``s = c & 63`` (``vpsllvd`` by 32 gives 0, which
encodes sign 0), ``neg = c >> 31`` after sign extension, and the term is
``((q << s) ^ neg) - neg``: shift, xor, subtract, add; no multiply. The int32 wrap-around is the
reference's own (it refuses weights whose bound exceeds int32), so the result is bit-exact.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.kernels.packing import ROWS


def shift_gemv_func(blocks: int, in_features: int, avx512: bool) -> tirx.PrimFunc:
    """``acc[m, 16*ob + l] = sum_k term(code[ob, k, l], q[m, k])`` in int32."""
    width = blocks * ROWS
    lanes = T.Ramp(0, 1, ROWS)

    if avx512:

        @T.prim_func(private=True)
        def shift_gemv(code: T.Buffer((blocks, in_features, ROWS), "int8"), q_h: T.handle, acc_h: T.handle):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            rows = T.int64()
            q = T.match_buffer(q_h, (rows, in_features), "int32")
            acc = T.match_buffer(acc_h, (rows, width), "int32")
            for ob in T.parallel(blocks):
                for m in range(rows):
                    total = T.alloc_buffer((ROWS,), "int32", scope="local")
                    total[lanes] = T.Broadcast(T.int32(0), ROWS)
                    for k in range(in_features):
                        c = T.Cast("int32x16", code[ob, k, lanes])
                        neg = T.shift_right(c, T.Broadcast(T.int32(31), ROWS))
                        shifted = T.call_llvm_pure_intrin(
                            "int32x16",
                            "llvm.x86.avx512.psllv.d.512",
                            T.Broadcast(q[m, k], ROWS),
                            T.bitwise_and(c, T.Broadcast(T.int32(63), ROWS)),
                        )
                        total[lanes] = total[lanes] + (T.bitwise_xor(shifted, neg) - neg)
                    acc[m, T.Ramp(ob * ROWS, 1, ROWS)] = total[lanes]

        return shift_gemv

    @T.prim_func(private=True)
    def shift_gemv_generic(code: T.Buffer((blocks, in_features, ROWS), "int8"), q_h: T.handle, acc_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        q = T.match_buffer(q_h, (rows, in_features), "int32")
        acc = T.match_buffer(acc_h, (rows, width), "int32")
        for ob in T.parallel(blocks):
            for m in range(rows):
                total = T.alloc_buffer((ROWS,), "int32", scope="local")
                for l in range(ROWS):
                    total[l] = T.int32(0)
                for k in range(in_features):
                    for l in range(ROWS):
                        c = T.Cast("int32", code[ob, k, l])
                        s = T.bitwise_and(c, T.int32(63))
                        neg = T.shift_right(c, T.int32(31))
                        shifted = T.if_then_else(s < 32, T.shift_left(q[m, k], T.min(s, 31)), T.int32(0))
                        total[l] = total[l] + (T.bitwise_xor(shifted, neg) - neg)
                for l in range(ROWS):
                    acc[m, ob * ROWS + l] = total[l]

    return shift_gemv_generic
