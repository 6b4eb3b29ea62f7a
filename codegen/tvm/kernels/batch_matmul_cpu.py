"""fp32 batched matmul of two activations for CPU (attention scores ``q @ k^T`` and ``p @ v``).

``C[b] = A[b] @ B[b]`` with ``A [batch, M, K]`` and ``B [batch, K, W]`` (``W`` the output width
padded to a multiple of 16; the caller pads ``B`` and crops ``C``). The micro-kernel is the one of
``dense_cpu.py`` with the right operand read in place instead of packed: for each ``k`` the ``V``
16-wide vectors ``B[b, k, 16v : 16v + 16]`` are loaded once and ``R`` rows of ``A`` are broadcast
into ``R*V`` accumulators (``vfmadd231ps`` with an embedded broadcast). ``R*V*64 B`` stays under
1 KiB so the tile lives in registers. The (batch, column panel) pairs run in parallel; rows that
do not fill a tile run one at a time. ``M``, ``K`` and ``W`` are static, the batch is symbolic.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.kernels.dense_cpu import LANES, tile_shape


def padded_width(n: int) -> int:
    """The output width rounded up to whole 16-lane vectors."""
    return -(-n // LANES) * LANES


def batch_matmul_func(m: int, k: int, width: int) -> tirx.PrimFunc:
    """``c[b, i, j] = sum_k a[b, i, k] * b[b, k, j]`` for ``a [batch, m, k]``, ``b [batch, k, width]``."""
    blocks = width // LANES
    rows_tile, panels = tile_shape(blocks)
    rows_tile = min(rows_tile, max(1, m))
    groups = blocks // panels
    full = m - m % rows_tile
    lanes = T.Ramp(0, 1, LANES)
    zero = T.Broadcast(T.float32(0), LANES)

    @T.prim_func(private=True)
    def bmm(a_h: T.handle, b_h: T.handle, c_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        nb = T.int64()
        a = T.match_buffer(a_h, (nb, m, k), "float32")
        b = T.match_buffer(b_h, (nb, k, width), "float32")
        c = T.match_buffer(c_h, (nb, m, width), "float32")
        af = T.decl_buffer((nb * m * k,), "float32", data=a.data)
        bf = T.decl_buffer((nb * k * width,), "float32", data=b.data)
        cf = T.decl_buffer((nb * m * width,), "float32", data=c.data)
        for job in T.parallel(nb * groups):
            bi = job // groups
            t = job % groups
            for mo in range(full // rows_tile):
                acc = T.alloc_buffer((rows_tile, panels, LANES), "float32", scope="global")
                bv = T.alloc_buffer((panels, LANES), "float32", scope="global")
                for r in T.unroll(rows_tile):
                    for v in T.unroll(panels):
                        acc[r, v, lanes] = zero
                for kk in range(k):
                    for v in T.unroll(panels):
                        bv[v, lanes] = bf[T.Ramp((bi * k + kk) * width + (t * panels + v) * LANES, 1, LANES)]
                    for r in T.unroll(rows_tile):
                        for v in T.unroll(panels):
                            acc[r, v, lanes] = (
                                acc[r, v, lanes]
                                + T.Broadcast(af[(bi * m + mo * rows_tile + r) * k + kk], LANES) * bv[v, lanes]
                            )
                for r in T.unroll(rows_tile):
                    for v in T.unroll(panels):
                        cf[T.Ramp((bi * m + mo * rows_tile + r) * width + (t * panels + v) * LANES, 1, LANES)] = acc[
                            r, v, lanes
                        ]
            for mi in range(full, m):  # tail rows
                acc1 = T.alloc_buffer((panels, LANES), "float32", scope="global")
                for v in T.unroll(panels):
                    acc1[v, lanes] = zero
                for kk in range(k):
                    for v in T.unroll(panels):
                        acc1[v, lanes] = (
                            acc1[v, lanes]
                            + T.Broadcast(af[(bi * m + mi) * k + kk], LANES)
                            * bf[T.Ramp((bi * k + kk) * width + (t * panels + v) * LANES, 1, LANES)]
                        )
                for v in T.unroll(panels):
                    cf[T.Ramp((bi * m + mi) * width + (t * panels + v) * LANES, 1, LANES)] = acc1[v, lanes]

    return bmm
