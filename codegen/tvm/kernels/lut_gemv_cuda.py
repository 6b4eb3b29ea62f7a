"""Lookup-table GEMV for BCQ and ternary weights on NVIDIA GPUs (LUT-GEMM style, split over groups).

Same tables (``lut_gemv.table_compute``), same nibble-word weight layout (``packing.py``) and same
arithmetic as the CPU kernel: per (output row, group, bit plane) the ``G/4`` table lookups indexed
by the weight nibbles are summed, then scaled by ``alpha`` once (ShiftAddLLM Eq. 2-3; LUT-GEMM,
Park et al. 2024, Sec. 3). The inner loop is a shift, a mask, a table load and an add.

Thread mapping: ``threadIdx.x`` runs over ``ROWS_PER_CTA`` consecutive output rows, so one warp's
weight loads are 2 x 16 consecutive uint32 (whole 32-byte sectors: the CPU layout's 16-row blocks
coalesce as they are); ``blockIdx.y`` splits the groups of K (``split_for``: one group per thread
block up to ``MAX_SPLIT``) so that a batch-1 GEMV has thousands of small blocks and every thread
only a dozen independent weight loads, all issued up front (planes and words unrolled);
``blockIdx.z`` is the activation row. Each thread writes its partial sum to ``part[split, m, o]``;
the split sum and the bias are a small reduction kernel after it (dlight), which avoids
shared-memory synchronization in hand-written TIR. The tables (``rows x K x 4`` floats) are read
through the L1 cache by every thread of a block.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.kernels.packing import ROWS, SLOTS_PER_WORD, nibble_position, slot_layout

ROWS_PER_CTA = 64  # output rows per thread block (threadIdx.x)
MAX_SPLIT = 64  # most ways K is split (blockIdx.y)


def split_for(n_groups: int) -> int:
    """Split ways of the groups: one group per block up to ``MAX_SPLIT``."""
    return max(1, min(MAX_SPLIT, n_groups))


def thread_loops(serial: bool):
    """``bind(extent, thread)``: a GPU thread-binding loop, or a plain serial one for CPU checks."""

    def bind(extent, thread):
        return T.serial(extent) if serial else T.thread_binding(extent, thread=thread)

    return bind


def gemv_cuda_func(
    blocks: int, n_groups: int, planes: int, group_size: int, serial: bool = False, alpha_dtype: str = "float32"
) -> tirx.PrimFunc:
    """``part[t, m, 16*ob + l] = sum_{g = t mod split} sum_i alpha[ob,g,i,l] * sum_s lut[m,g,s,nibble]``.

    ``serial=True`` gives the same loops unbound (plain serial loops) so that the indexing and the
    arithmetic can be checked on a CPU; the GPU build binds them to blocks and threads.
    ``alpha_dtype``: the scales' storage type (``float16`` scales are widened to float32 as read).
    """
    slots, words = slot_layout(group_size)
    width = blocks * ROWS
    split = split_for(n_groups)
    rows_per_cta = min(ROWS_PER_CTA, width)
    ctas = -(-width // rows_per_cta)
    steps = -(-n_groups // split)
    bind = thread_loops(serial)

    def widen(value):
        return value if alpha_dtype == "float32" else T.Cast("float32", value)

    @T.prim_func(private=True)
    def gemv(
        lut_h: T.handle,
        w: T.Buffer((blocks, n_groups, planes, words, ROWS), "uint32"),
        alpha: T.Buffer((blocks, n_groups, planes, ROWS), alpha_dtype),
        part_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        rows = T.int64()
        lut = T.match_buffer(lut_h, (rows, n_groups, slots, ROWS), "float32")
        part = T.match_buffer(part_h, (split, rows, width), "float32")
        for m in bind(rows, "blockIdx.z"):
            for t in bind(split, "blockIdx.y"):
                for cta in bind(ctas, "blockIdx.x"):
                    for lane in bind(rows_per_cta, "threadIdx.x"):
                        acc = T.alloc_buffer((1,), "float32", scope="local")
                        plane = T.alloc_buffer((1,), "float32", scope="local")
                        acc[0] = T.float32(0)
                        if cta * rows_per_cta + lane < width:
                            for step in range(steps):
                                if step * split + t < n_groups:
                                    for i in T.unroll(planes):
                                        plane[0] = T.float32(0)
                                        for wi in T.unroll(words):
                                            for j in T.unroll(SLOTS_PER_WORD):
                                                plane[0] = (
                                                    plane[0]
                                                    + lut[
                                                        m,
                                                        step * split + t,
                                                        wi * SLOTS_PER_WORD + j,
                                                        T.Cast(
                                                            "int32",
                                                            T.bitwise_and(
                                                                T.shift_right(
                                                                    w[
                                                                        (cta * rows_per_cta + lane) // ROWS,
                                                                        step * split + t,
                                                                        i,
                                                                        wi,
                                                                        (cta * rows_per_cta + lane) % ROWS,
                                                                    ],
                                                                    T.uint32(4 * nibble_position(j)),
                                                                ),
                                                                T.uint32(15),
                                                            ),
                                                        ),
                                                    ]
                                                )
                                        acc[0] = acc[0] + plane[0] * widen(
                                            alpha[
                                                (cta * rows_per_cta + lane) // ROWS,
                                                step * split + t,
                                                i,
                                                (cta * rows_per_cta + lane) % ROWS,
                                            ]
                                        )
                            part[t, m, cta * rows_per_cta + lane] = acc[0]

    return gemv
