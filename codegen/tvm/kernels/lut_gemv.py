"""Lookup-table GEMV for binary-coded (BCQ) and ternary weights (T-MAC / LUT-GEMM style).

For every 4 consecutive activations ``x[c..c+3]`` of a row, a 16-entry float32 table holds all
``sum_j (+-1) x[c+j]`` (entry ``n``: bit ``j`` of ``n`` set -> ``+x``). One table is exactly one
AVX-512 register, so ``vpermps`` looks up 16 output rows at once: the 16 lanes of a nibble-word
vector (see ``packing.py``) shifted right by ``4j`` index the j-th table (``vpermps`` reads only
the low 4 bits). Per (row block, group, bit plane) the looked-up sums are accumulated, then scaled
by ``alpha`` once: ``y[o] = sum_g sum_i alpha[o,g,i] * sum_{k in g} B_i[o,k] x[k]`` (ShiftAddLLM
Eq. 2-3). Tables are float32, so the result matches the float reference up to summation order.
The inner loop has no multiply: a shift, a table permute and an add serve 64 weights.

Without AVX-512 the same loop runs with scalar table loads (correct, not fast).
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.kernels.packing import ROWS, SLOTS_PER_WORD, slot_layout


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


def gemv_func(blocks: int, n_groups: int, planes: int, group_size: int, avx512: bool) -> tirx.PrimFunc:
    """``y[m, 16*ob + l] = bias + sum_{g,i} alpha[ob,g,i,l] * sum_s lut[m,g,s, nibble(ob,g,i,s,l)]``."""
    slots, words = slot_layout(group_size)
    width = blocks * ROWS
    lanes = T.Ramp(0, 1, ROWS)

    def plane_sum(lut, w, m, ob, g, i):
        """The ``words * 8`` table lookups of one (group, plane) summed as a balanced tree (in registers)."""
        terms = []
        for wi in range(words):
            for j in range(SLOTS_PER_WORD):
                word = w[ob, g, i, wi, lanes]
                if j:
                    word = tirx.shift_right(word, tirx.Broadcast(tirx.const(4 * j, "uint32"), ROWS))
                index = tirx.reinterpret("int32x16", word)
                table = lut[m, g, wi * SLOTS_PER_WORD + j, lanes]
                terms.append(tirx.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.permvar.sf.512", table, index))
        while len(terms) > 1:
            terms = [terms[n] + terms[n + 1] if n + 1 < len(terms) else terms[n] for n in range(0, len(terms), 2)]
        return terms[0]

    # Row blocks per thread-iteration: their lookups share each table load (one load, several vpermps).
    tile_blocks = next(t for t in (4, 2, 1) if blocks % t == 0)

    if avx512:

        @T.prim_func(private=True)
        def gemv(
            lut_h: T.handle,
            w: T.Buffer((blocks, n_groups, planes, words, ROWS), "uint32"),
            alpha: T.Buffer((blocks, n_groups, planes, ROWS), "float32"),
            bias: T.Buffer((width,), "float32"),
            y_h: T.handle,
        ):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            rows = T.int64()
            lut = T.match_buffer(lut_h, (rows, n_groups, slots, ROWS), "float32")
            y = T.match_buffer(y_h, (rows, width), "float32")
            for tile in T.parallel(blocks // tile_blocks):
                for m in range(rows):
                    out = T.alloc_buffer((tile_blocks, ROWS), "float32", scope="local")
                    for r in T.unroll(tile_blocks):
                        out[r, lanes] = bias[T.Ramp((tile * tile_blocks + r) * ROWS, 1, ROWS)]
                    for g in range(n_groups):
                        for i in range(planes):
                            for r in T.unroll(tile_blocks):
                                out[r, lanes] = (
                                    out[r, lanes]
                                    + plane_sum(lut, w, m, tile * tile_blocks + r, g, i)
                                    * alpha[tile * tile_blocks + r, g, i, lanes]
                                )
                    for r in T.unroll(tile_blocks):
                        y[m, T.Ramp((tile * tile_blocks + r) * ROWS, 1, ROWS)] = out[r, lanes]

        return gemv

    @T.prim_func(private=True)
    def gemv_generic(
        lut_h: T.handle,
        w: T.Buffer((blocks, n_groups, planes, words, ROWS), "uint32"),
        alpha: T.Buffer((blocks, n_groups, planes, ROWS), "float32"),
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
                                        T.shift_right(w[ob, g, i, wi, l], T.uint32(4 * j)), T.uint32(15)
                                    )
                                    acc[l] = acc[l] + lut[m, g, wi * SLOTS_PER_WORD + j, T.Cast("int32", nibble)]
                        for l in range(ROWS):
                            out[l] = out[l] + acc[l] * alpha[ob, g, i, l]
                for l in range(ROWS):
                    y[m, ob * ROWS + l] = out[l]

    return gemv_generic


def bias_row(bias: np.ndarray | None, out_features: int) -> np.ndarray:
    blocks = -(-out_features // ROWS)
    padded = np.zeros(blocks * ROWS, np.float32)
    if bias is not None:
        padded[:out_features] = bias
    return padded
