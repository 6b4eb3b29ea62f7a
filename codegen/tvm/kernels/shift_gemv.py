"""Shift-add GEMV for power-of-two weights (DeepShift-PS): exact int32 ``sum_k sign * (q_k << s)``.

Weights are one signed byte per weight (``packing.pack_shift``), blocked by 16 output rows so one
load feeds 16 rows. Per byte ``c``: ``s = c & 63`` (``vpsllvd`` by 32 gives 0, which encodes sign 0),
and the term ``q << s`` is added, or subtracted where ``c < 0`` (a masked ``vpsubd`` from zero, then
``vpaddd``): a shift and two adds; no multiply. The int32 wrap-around is the reference's own (it
refuses weights whose bound exceeds int32), and addition modulo 2^32 is associative: the result is
bit-exact in any order.

Rows are register-blocked, 8 at a time, then 4, 2, 1 for the rest (any symbolic row count): one
weight load and its decode (zero-extend, mask, sign mask) serve every row of the block, so a row
costs a broadcast load, a shift and two adds per 16 weights. The accumulators live in a
``global``-scope buffer under 1 KiB, which TVM puts on the stack and LLVM keeps in registers (a
``local`` one becomes a heap workspace that is stored on every update).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.kernels.packing import ROWS

ROW_BLOCK = 8  # activation rows per weight load (the largest block; 4, 2, 1 serve the rest)
TILE = 2  # output blocks of 16 per thread-iteration (and per broadcast activation, where registers allow)
STACK_BYTES = 1024  # TVM's limit for a stack buffer


def _sub_tile(n_rows: int, tile: int) -> int:
    """Output blocks per accumulator buffer of ``n_rows`` rows: the most that divide ``tile`` and stay on the stack."""
    return next(t for t in range(tile, 0, -1) if tile % t == 0 and n_rows * t * ROWS * 4 < STACK_BYTES)


def _shift_add(total: tirx.PrimExpr, code: tirx.PrimExpr, q: tirx.PrimExpr) -> tirx.PrimExpr:
    """``total + (c < 0 ? -(q << s) : q << s)`` on 16 lanes: ``vpsllvd``, then a masked add and a masked sub."""
    c = tirx.Cast("int32x16", code)
    count = tirx.bitwise_and(c, tirx.Broadcast(tirx.const(63, "int32"), ROWS))
    shifted = tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.psllv.d.512", tirx.Broadcast(q, ROWS), count)
    return tirx.Select(c < tirx.Broadcast(tirx.const(0, "int32"), ROWS), total - shifted, total + shifted)


def shift_gemv_func(
    blocks: int, in_features: int, avx512: bool, row_block: int = ROW_BLOCK, tile: int = TILE
) -> tirx.PrimFunc:
    """``acc[m, 16*ob + l] = sum_k term(code[ob, k, l], q[m, k])`` in int32."""
    width = blocks * ROWS
    if avx512:
        return _shift_gemv_avx512(blocks, in_features, row_block, next(t for t in (tile, 2, 1) if blocks % t == 0))

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


def _shift_gemv_avx512(blocks: int, in_features: int, row_block: int, tile: int) -> tirx.PrimFunc:
    width = blocks * ROWS
    lanes = T.Ramp(0, 1, ROWS)

    def rows_block(n_rows: int):
        """``n_rows`` activation rows from ``m0`` against the ``tile`` output blocks of tile ``t``."""
        sub = _sub_tile(n_rows, tile)

        @T.macro
        def block(code, q, acc, t, m0):
            for st in range(tile // sub):
                total = T.alloc_buffer((n_rows * sub, ROWS), "int32", scope="global")
                for i in T.unroll(n_rows * sub):
                    total[i, lanes] = T.Broadcast(T.int32(0), ROWS)
                for k in range(in_features):
                    for b in T.unroll(sub):
                        for r in T.unroll(n_rows):
                            total[r * sub + b, lanes] = _shift_add(
                                total[r * sub + b, lanes], code[t * tile + st * sub + b, k, lanes], q[m0 + r, k]
                            )
                for b in T.unroll(sub):
                    for r in T.unroll(n_rows):
                        acc[m0 + r, T.Ramp((t * tile + st * sub + b) * ROWS, 1, ROWS)] = total[r * sub + b, lanes]

        return block

    assert row_block in (1, 2, 4, 8), row_block
    main, four, two, one = rows_block(row_block), rows_block(4), rows_block(2), rows_block(1)

    @T.prim_func(private=True)
    def shift_gemv(code: T.Buffer((blocks, in_features, ROWS), "int8"), q_h: T.handle, acc_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        q = T.match_buffer(q_h, (rows, in_features), "int32")
        acc = T.match_buffer(acc_h, (rows, width), "int32")
        for t in T.parallel(blocks // tile):
            for mb in range(rows // row_block):
                main(code, q, acc, t, mb * row_block)
            if row_block > 4:
                if rows % 8 >= 4:
                    four(code, q, acc, t, rows // 8 * 8)
            if row_block > 2:
                if rows % 4 >= 2:
                    two(code, q, acc, t, rows // 4 * 4)
            if row_block > 1:
                if rows % 2 == 1:
                    one(code, q, acc, t, rows - 1)

    return shift_gemv
