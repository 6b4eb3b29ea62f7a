"""Lookup-table GEMV for binary-coded (BCQ) and ternary weights (T-MAC / LUT-GEMM style).

For every 4 consecutive activations ``x[c..c+3]`` of a row, a 16-entry float32 table holds all
``sum_j (+-1) x[c+j]`` (entry ``n``: bit ``j`` of ``n`` set -> ``+x``). One table is exactly one
AVX-512 register, so ``vpermps`` looks up 16 output rows at once: the 16 lanes of a nibble-word
vector (see ``packing.py``) shifted right by ``4j`` index the j-th table (``vpermps`` reads only
the low 4 bits). Per (row block, group, bit plane) the looked-up sums are accumulated, then scaled
by ``alpha`` once: ``y[o] = sum_g sum_i alpha[o,g,i] * sum_{k in g} B_i[o,k] x[k]`` (ShiftAddLLM
Eq. 2-3). Tables are float32, so the result matches the float reference up to summation order.
The inner loop has no multiply: a shift, a table permute and an add serve 64 weights.

Several activation rows (batch > 1) are register-blocked, 8 at a time, then 4, 2, 1 for the rest:
each nibble word is loaded and shifted once and looked up in every row's table, so a row costs
one ``vpermps`` and one add per 64 weights. That is the bound of this scheme: ``vpermps`` issues
once per cycle (port 5) and the adds fill port 0. A single row keeps the balanced tree per
(block, group, plane), whose table loads several output blocks share.

Without AVX-512 the same loop runs with scalar table loads (correct, not fast).
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.kernels.packing import ROWS, SLOTS_PER_WORD, nibble_position, slot_layout


def table_compute(x: te.Tensor, in_features: int, group_size: int) -> te.Tensor:
    """``lut[m, g, s, n] = sum_j (bit j of n ? x : -x)[g*G + 4s + j]`` (0 outside the group or K)."""
    n_groups = -(-in_features // group_size)
    slots, _ = slot_layout(group_size)

    def entry(m, g, s, n):
        total = None
        for j in range(4):
            within = 4 * s + j
            col = g * group_size + within
            ok = tirx.all(within < group_size, col < in_features)
            value = tirx.if_then_else(ok, x[m, tirx.min(col, in_features - 1)], tirx.const(0, "float32"))
            term = tirx.if_then_else(tirx.bitwise_and(tirx.shift_right(n, j), 1) == 1, value, -value)
            total = term if total is None else total + term
        return total

    return te.compute((x.shape[0], n_groups, slots, ROWS), entry, name="lut")


ROW_BLOCK = 8  # activation rows per weight load (the largest block; 4, 2, 1 serve the rest)
# TVM puts a ``global``-scope buffer below this size on the stack, where LLVM keeps it in registers;
# a larger one, or any ``local`` one, becomes a heap workspace that is stored on every update.
STACK_BYTES = 1024


def _sub_tile(n_rows: int, tile: int) -> int:
    """Output blocks per accumulator set of ``n_rows`` rows: the most that divide ``tile`` and stay in registers."""
    return next(t for t in range(tile, 0, -1) if tile % t == 0 and n_rows * t * ROWS * 4 < STACK_BYTES)


def _lookup(lut, w, m, ob, g, i, wi, j) -> tirx.PrimExpr:
    """``lut[m, g, 8 wi + j, slot j's nibble of w[ob, g, i, wi]]`` for 16 rows: a shift and a ``vpermps``."""
    lanes = tirx.Ramp(0, 1, ROWS)
    word = w[ob, g, i, wi, lanes]
    if not (isinstance(j, int) and j == 0):
        word = tirx.shift_right(word, tirx.Broadcast(tirx.Cast("uint32", 4 * nibble_position(j)), ROWS))
    index = tirx.reinterpret("int32x16", word)
    table = lut[m, g, wi * SLOTS_PER_WORD + j, lanes]
    return tirx.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.permvar.sf.512", table, index)


def _lookups(lut, w, m, ob, g, i, words: int) -> list:
    """The ``words * 8`` table lookups of one (row, block, group, plane)."""
    return [_lookup(lut, w, m, ob, g, i, wi, j) for wi in range(words) for j in range(SLOTS_PER_WORD)]


def _tree_sum(terms: list) -> tirx.PrimExpr:
    """A balanced tree, so that the adds of one row overlap."""
    while len(terms) > 1:
        terms = [terms[n] + terms[n + 1] if n + 1 < len(terms) else terms[n] for n in range(0, len(terms), 2)]
    return terms[0]


def _alpha16(alpha, ob, g, i) -> tirx.PrimExpr:
    """The 16 rows' ``alpha[ob, g, i]`` as float32 (``vcvtph2ps`` from float16 storage)."""
    value = alpha[ob, g, i, tirx.Ramp(0, 1, ROWS)]
    return value if alpha.dtype == "float32" else tirx.Cast("float32x16", value)


def gemv_func(
    blocks: int,
    n_groups: int,
    planes: int,
    group_size: int,
    avx512: bool,
    row_block: int = ROW_BLOCK,
    alpha_dtype: str = "float32",
) -> tirx.PrimFunc:
    """``y[m, 16*ob + l] = bias + sum_{g,i} alpha[ob,g,i,l] * sum_s lut[m,g,s, nibble(ob,g,i,s,l)]``;
    ``alpha`` float32 or float16 (half the scale bytes; converted to float32 in the kernel)."""
    assert alpha_dtype in ("float32", "float16"), alpha_dtype
    slots, words = slot_layout(group_size)
    width = blocks * ROWS
    # Row blocks per thread-iteration: their lookups share each table load (one load, several vpermps).
    tile_blocks = next(t for t in (4, 2, 1) if blocks % t == 0)

    if avx512:
        return _gemv_avx512(blocks, n_groups, planes, slots, words, tile_blocks, row_block, alpha_dtype)

    @T.prim_func(private=True)
    def gemv_generic(
        lut_h: T.handle,
        w: T.Buffer((blocks, n_groups, planes, words, ROWS), "uint32"),
        alpha: T.Buffer((blocks, n_groups, planes, ROWS), alpha_dtype),
        bias: T.Buffer((width,), "float32"),
        y_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        lut = T.match_buffer(lut_h, (rows, n_groups, slots, ROWS), "float32")
        y = T.match_buffer(y_h, (rows, width), "float32")
        for ob in T.parallel(blocks):
            for m in range(rows):
                out = T.alloc_buffer((ROWS,), "float32", scope="local")
                acc = T.alloc_buffer((ROWS,), "float32", scope="local")
                for l in range(ROWS):
                    out[l] = bias[ob * ROWS + l]
                for g in range(n_groups):
                    for i in range(planes):
                        for l in range(ROWS):
                            acc[l] = T.float32(0)
                        for wi in range(words):
                            for j in range(SLOTS_PER_WORD):
                                for l in range(ROWS):
                                    nibble = T.bitwise_and(
                                        T.shift_right(w[ob, g, i, wi, l], T.uint32(4 * nibble_position(j))),
                                        T.uint32(15),
                                    )
                                    acc[l] = acc[l] + lut[m, g, wi * SLOTS_PER_WORD + j, T.Cast("int32", nibble)]
                        for l in range(ROWS):
                            out[l] = out[l] + acc[l] * T.Cast("float32", alpha[ob, g, i, l])
                for l in range(ROWS):
                    y[m, ob * ROWS + l] = out[l]

    return gemv_generic


def bias_row(bias: np.ndarray | None, out_features: int) -> np.ndarray:
    blocks = -(-out_features // ROWS)
    padded = np.zeros(blocks * ROWS, np.float32)
    if bias is not None:
        padded[:out_features] = bias
    return padded


def _gemv_avx512(
    blocks: int, n_groups: int, planes: int, slots: int, words: int, tile: int, row_block: int, alpha_dtype: str
) -> tirx.PrimFunc:
    """Register-blocked rows: each nibble word is loaded and shifted once for ``n_rows`` rows' tables."""
    width = blocks * ROWS
    lanes = T.Ramp(0, 1, ROWS)

    def one_row(n_rows: int):
        """Batch 1 (and an odd last row): per (block, group, plane) one balanced tree of lookups."""
        sub = _sub_tile(n_rows, tile)

        @T.macro
        def block(lut, w, alpha, bias, y, t, m0):
            for st in range(tile // sub):
                out = T.alloc_buffer((sub, ROWS), "float32", scope="local")
                for b in T.unroll(sub):
                    out[b, lanes] = bias[T.Ramp((t * tile + st * sub + b) * ROWS, 1, ROWS)]
                for g in range(n_groups):
                    for i in range(planes):
                        for b in T.unroll(sub):
                            out[b, lanes] = out[b, lanes] + _tree_sum(
                                _lookups(lut, w, m0, t * tile + st * sub + b, g, i, words)
                            ) * _alpha16(alpha, t * tile + st * sub + b, g, i)
                for b in T.unroll(sub):
                    y[m0, T.Ramp((t * tile + st * sub + b) * ROWS, 1, ROWS)] = out[b, lanes]

        return block

    def rows_block(n_rows: int):
        """``n_rows`` rows: per nibble slot, one shifted word serves every row's table (a ``vpermps`` each).

        Groups outermost, so that the rows' tables of a group (``n_rows`` x 2 KiB at G = 128) stay in L1
        across the tile's blocks and planes; the word loop innermost, so that LLVM does not hoist the
        (block- and plane-invariant) table loads out of it into spilled registers.
        """
        sub = _sub_tile(n_rows, tile)

        @T.macro
        def block(lut, w, alpha, bias, y, t, m0):
            out = T.alloc_buffer((n_rows * tile, ROWS), "float32", scope="global")
            part = T.alloc_buffer((n_rows * sub, ROWS), "float32", scope="global")
            for b in T.unroll(tile):
                for r in T.unroll(n_rows):
                    out[r * tile + b, lanes] = bias[T.Ramp((t * tile + b) * ROWS, 1, ROWS)]
            for g in range(n_groups):
                for st in range(tile // sub):
                    for i in range(planes):
                        for x in T.unroll(n_rows * sub):
                            part[x, lanes] = T.Broadcast(T.float32(0), ROWS)
                        for wi in range(words):
                            for j in T.unroll(SLOTS_PER_WORD):
                                for b in T.unroll(sub):
                                    for r in T.unroll(n_rows):
                                        part[r * sub + b, lanes] = part[r * sub + b, lanes] + _lookup(
                                            lut, w, m0 + r, t * tile + st * sub + b, g, i, wi, j
                                        )
                        for b in T.unroll(sub):
                            for r in T.unroll(n_rows):
                                out[r * tile + st * sub + b, lanes] = out[r * tile + st * sub + b, lanes] + part[
                                    r * sub + b, lanes
                                ] * _alpha16(alpha, t * tile + st * sub + b, g, i)
            for b in T.unroll(tile):
                for r in T.unroll(n_rows):
                    y[m0 + r, T.Ramp((t * tile + b) * ROWS, 1, ROWS)] = out[r * tile + b, lanes]

        return block

    assert row_block in (1, 2, 4, 8), row_block
    main, four, two, one = rows_block(row_block), rows_block(4), rows_block(2), one_row(1)

    @T.prim_func(private=True)
    def gemv(
        lut_h: T.handle,
        w: T.Buffer((blocks, n_groups, planes, words, ROWS), "uint32"),
        alpha: T.Buffer((blocks, n_groups, planes, ROWS), alpha_dtype),
        bias: T.Buffer((width,), "float32"),
        y_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        lut = T.match_buffer(lut_h, (rows, n_groups, slots, ROWS), "float32")
        y = T.match_buffer(y_h, (rows, width), "float32")
        for t in T.parallel(blocks // tile):
            for mb in range(rows // row_block):
                main(lut, w, alpha, bias, y, t, mb * row_block)
            if row_block > 4:
                if rows % 8 >= 4:
                    four(lut, w, alpha, bias, y, t, rows // 8 * 8)
            if row_block > 2:
                if rows % 4 >= 2:
                    two(lut, w, alpha, bias, y, t, rows // 4 * 4)
            if row_block > 1:
                if rows % 2 == 1:
                    one(lut, w, alpha, bias, y, t, rows - 1)

    return gemv
