"""BCQ GEMM for many activation rows (prefill, batches): dequantize a weight tile in L1, then FMA.

The lookup-table GEMV (``lut_gemv.py``) spends ``q`` table permutes and adds per 64 weights *per
row*; at prefill (hundreds of rows) that is more work than a dense fp32 GEMM. Here the packed
weights are decoded once per tile and reused by every row: for a thread's ``V`` output blocks
(16 rows each) and one group of ``G`` input columns, ``W[16 ob + l, g G + c] = sum_i (bit
``column_bit(c)`` of words[ob, g, i, c // 32, l] ? +alpha : -alpha)[ob, g, i, l]`` (ShiftAddLLM Eq. 2, summed in plane
order as ``ops_lowbit.bcq_weight``: the same float32 weights as the reference) is written into a
``[V, G, 16]`` float32 tile (32 KiB at V = 4, G = 128, in L1); one vector test and one blend per
16 weights and plane. The tile then feeds the register-blocked micro-kernel of ``dense_cpu.py``
(BLIS, Goto & van de Geijn 2008): ``R x V`` accumulators of 16 lanes, ``acc[r, v] += x[m0 + r, k]
* tile[v, k]`` with an embedded broadcast. Rows go in blocks of ``ROW_BLOCK`` whose partial sums
stay in L2 across the groups, so the decode of a tile is amortized over up to ``ROW_BLOCK`` rows.

The packed operands are those of the GEMV (``words`` uint32, ``alpha`` float32/float16, ``bias``),
so one set of parameters serves both kernels; the caller picks one per call by the row count.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.kernels.packing import ROWS, column_bit, slot_layout

ROW_BLOCK = 192  # rows per weight-tile decode; their partial sums (192 x V x 16 floats) stay in L2
KB_WORDS = 2  # 64 decoded columns per K block: a 16 KiB tile at V = 4 leaves L1 room for the rows of x
HALF_ACCUMULATORS = 12  # vectors per accumulator buffer (< 1 KiB stays on the stack, i.e. in registers)
GEMM_MIN_ROWS = 64  # below this the LUT GEMV is faster (benchmarks/bcq_kernels.py: between 32 and 128 rows)


def tile_shape(blocks: int) -> tuple[int, int]:
    """``(R, V)``: rows (two accumulator buffers of ``R / 2``) and 16-row output blocks per register tile."""
    panels = next(v for v in (4, 3, 2, 1) if blocks % v == 0)
    return 2 * (HALF_ACCUMULATORS // panels), panels


def _weight(words, alpha, ob, g, wi, c, planes: int) -> tirx.PrimExpr:
    """16 rows of ``W[:, g G + 32 wi + c]`` from the bit planes: ``sum_i (bit ? alpha_i : -alpha_i)``."""
    lanes = tirx.Ramp(0, 1, ROWS)
    mask = tirx.Broadcast(tirx.shift_left(tirx.const(1, "uint32"), tirx.Cast("uint32", column_bit(c))), ROWS)
    zero = tirx.Broadcast(tirx.const(0, "uint32"), ROWS)
    total = None
    for i in range(planes):
        a = alpha[ob, g, i, lanes]
        if alpha.dtype != "float32":
            a = tirx.Cast("float32x16", a)
        bit = tirx.NE(tirx.bitwise_and(words[ob, g, i, wi, lanes], mask), zero)
        term = tirx.Select(bit, a, -a)
        total = term if total is None else total + term
    return total


def gemm_func(
    blocks: int, n_groups: int, planes: int, group_size: int, in_features: int, alpha_dtype: str = "float32"
) -> tirx.PrimFunc:
    """``y[m, 16*ob + l] = bias + sum_k x[m, k] * W[16*ob + l, k]`` with ``W`` decoded from ``words``/``alpha``
    (``x [rows, K]``, rows symbolic)."""
    _, words_per_group = slot_layout(group_size)
    kw = min(KB_WORDS, words_per_group)  # words (32 columns each) per decoded K block
    k_blocks = -(-words_per_group // kw)
    cols = kw * 32
    width = blocks * ROWS
    rows_tile, panels = tile_shape(blocks)
    half = rows_tile // 2
    k, gs = in_features, group_size
    lanes = T.Ramp(0, 1, ROWS)

    @T.macro
    def decode(tile, words, alpha, t, g, kb):
        for v in range(panels):
            for wi in range(T.min(kw, words_per_group - kb * kw)):
                for c in T.unroll(32):
                    tile[v, wi * 32 + c, lanes] = _weight(words, alpha, t * panels + v, g, kb * kw + wi, c, planes)

    @T.prim_func(private=True)
    def bcq_gemm(
        x_h: T.handle,
        words: T.Buffer((blocks, n_groups, planes, words_per_group, ROWS), "uint32"),
        alpha: T.Buffer((blocks, n_groups, planes, ROWS), alpha_dtype),
        bias: T.Buffer((width,), "float32"),
        y_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        x2 = T.match_buffer(x_h, (rows, k), "float32")
        y = T.match_buffer(y_h, (rows, width), "float32")
        xf = T.decl_buffer((rows * k,), "float32", data=x2.data)
        for t in T.parallel(blocks // panels):
            tile = T.alloc_buffer((panels, cols, ROWS), "float32", scope="global")
            for mb in range(-(-rows // ROW_BLOCK)):
                m_end = T.min(rows, mb * ROW_BLOCK + ROW_BLOCK)
                n_tiles = (m_end - mb * ROW_BLOCK) // rows_tile
                for gk in range(n_groups * k_blocks):
                    g = gk // k_blocks
                    k0 = g * gs + gk % k_blocks * cols  # first input column of this K block
                    decode(tile, words, alpha, t, g, gk % k_blocks)
                    kn = T.max(T.min(T.min(cols, (g + 1) * gs - k0), k - k0), 0)
                    for mo in range(n_tiles):
                        m0 = mb * ROW_BLOCK + mo * rows_tile
                        acc_a = T.alloc_buffer((half, panels, ROWS), "float32", scope="global")
                        acc_b = T.alloc_buffer((half, panels, ROWS), "float32", scope="global")
                        wv = T.alloc_buffer((panels, ROWS), "float32", scope="global")
                        for r in T.unroll(half):
                            for v in T.unroll(panels):
                                acc_a[r, v, lanes] = T.if_then_else(
                                    gk == 0,
                                    bias[T.Ramp((t * panels + v) * ROWS, 1, ROWS)],
                                    y[m0 + r, T.Ramp((t * panels + v) * ROWS, 1, ROWS)],
                                )
                                acc_b[r, v, lanes] = T.if_then_else(
                                    gk == 0,
                                    bias[T.Ramp((t * panels + v) * ROWS, 1, ROWS)],
                                    y[m0 + half + r, T.Ramp((t * panels + v) * ROWS, 1, ROWS)],
                                )
                        for kk in range(kn):
                            for v in T.unroll(panels):
                                wv[v, lanes] = tile[v, kk, lanes]
                            for r in T.unroll(half):
                                for v in T.unroll(panels):
                                    acc_a[r, v, lanes] = (
                                        acc_a[r, v, lanes]
                                        + T.Broadcast(xf[(m0 + r) * k + k0 + kk], ROWS) * wv[v, lanes]
                                    )
                            for r in T.unroll(half):
                                for v in T.unroll(panels):
                                    acc_b[r, v, lanes] = (
                                        acc_b[r, v, lanes]
                                        + T.Broadcast(xf[(m0 + half + r) * k + k0 + kk], ROWS) * wv[v, lanes]
                                    )
                        for r in T.unroll(half):
                            for v in T.unroll(panels):
                                y[m0 + r, T.Ramp((t * panels + v) * ROWS, 1, ROWS)] = acc_a[r, v, lanes]
                                y[m0 + half + r, T.Ramp((t * panels + v) * ROWS, 1, ROWS)] = acc_b[r, v, lanes]
                    for m in range(mb * ROW_BLOCK + n_tiles * rows_tile, m_end):  # rows short of a tile
                        acc1 = T.alloc_buffer((panels, ROWS), "float32", scope="global")
                        for v in T.unroll(panels):
                            acc1[v, lanes] = T.if_then_else(
                                gk == 0,
                                bias[T.Ramp((t * panels + v) * ROWS, 1, ROWS)],
                                y[m, T.Ramp((t * panels + v) * ROWS, 1, ROWS)],
                            )
                        for kk in range(kn):
                            for v in T.unroll(panels):
                                acc1[v, lanes] = (
                                    acc1[v, lanes] + T.Broadcast(xf[m * k + k0 + kk], ROWS) * tile[v, kk, lanes]
                                )
                        for v in T.unroll(panels):
                            y[m, T.Ramp((t * panels + v) * ROWS, 1, ROWS)] = acc1[v, lanes]

    return bcq_gemm
