"""Packed-weight fp32 GEMM for ``linear`` and ``matmul`` with a constant right operand (CPU).

The weight ``W [N, K]`` is packed at build time into panels ``[ceil(N/16), K, 16]`` (zero padded),
so the 16 outputs of one panel are one 64-byte vector per ``k``. The micro-kernel keeps a tile of
``R`` rows x ``V`` panels (``R*V`` accumulators of 16 lanes) in registers:
``acc[r, v] += broadcast(x[m0 + r, k]) * Wp[j0 + v, k, :]`` (LLVM emits ``vfmadd231ps`` with an
embedded broadcast), the bias seeds the accumulators, and the output panels run in parallel.
This is the BLIS/GotoBLAS loop nest (Goto & van de Geijn 2008, Fig. 8): each thread owns ``V``
panels; rows go in blocks of ``ROW_BLOCK``, K in blocks of ``kc``: by default the whole K up to
``FULL_K`` (the tile's weight panels are re-read from L2 by every row tile, each output is written
once), deeper K in blocks whose weight panels fit half of L1, the row block's partial sums in ``y``
(re-read per K block) staying in L2. The default tile is 5 x 3 (else 7 x 2, 15 x 1): the knob
search preferred those 14-15-accumulator tiles and the unblocked K over the earlier 3 x 4 tile
with L1-sized K blocks on ViT-S's GEMMs on both a Zen 4 and a Xeon host
(``benchmarks/tune_kernels.py``; at K = 1536, 5.1 vs 8.3 ms for the same tile with L1 blocks). Rows
that do not fill a tile run as a one-row tail (which is also the batch-1 GEMV).

Knobs (``KNOBS``, searched per shape by ``codegen/tvm/tune_knobs.py``): ``rows_tile`` x ``panels``
(the register tile), ``kc`` (K block depth) and ``row_block`` (rows per L2 block). Every choice
adds the products of one output in the same order (bias, then ``k = 0 .. K-1``), so all of them
give bit-identical results; only the speed differs.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from reshift.codegen.tvm import knobs as knob_db

LANES = 16
ACCUMULATORS = 15  # R*V*64 B must stay under 1 KiB: larger local buffers go to the heap, not registers
L1_WEIGHT_BYTES = 24 * 1024  # weight panels of one K block: half of a 48 KiB L1 (x rows and y share the rest)
FULL_K = 2048  # the deepest K the default runs unblocked (3 panels x 2048 x 64 B = 384 KiB of L2)
ROW_BLOCK = 192  # rows whose partial sums (192 x 64 floats) stay in L2 across the K blocks


def pack_panels(w: np.ndarray) -> np.ndarray:
    """``float32 [N, K]`` -> ``[ceil(N/16), K, 16]`` panels, zero padded."""
    n, k = w.shape
    blocks = -(-n // LANES)
    padded = np.zeros((blocks * LANES, k), np.float32)
    padded[:n] = w
    return np.ascontiguousarray(padded.reshape(blocks, LANES, k).transpose(0, 2, 1))


def tile_shape(blocks: int, panel_order: tuple[int, ...] = (4, 3, 2, 1)) -> tuple[int, int]:
    """``(R, V)``: rows and 16-wide panels per register tile, ``V`` the first of ``panel_order`` dividing
    ``blocks``."""
    panels = next(v for v in panel_order if blocks % v == 0)
    return max(1, ACCUMULATORS // panels), panels


def k_block(k: int, panels: int) -> int:
    """Depth of one K block: its ``panels x kc`` weight vectors fill about half of a 48 KiB L1."""
    kc = L1_WEIGHT_BYTES // (panels * LANES * 4)
    blocks = -(-k // kc)
    return -(-k // blocks)  # equal blocks


def default_tile(blocks: int) -> tuple[int, int]:
    """``(R, V)`` of the default GEMM tile: 5 x 3, else 7 x 2, else 15 x 1 (the first whose panels divide
    ``blocks``): 14-15 accumulators, fewest loads per FMA first."""
    return tile_shape(blocks, (3, 2, 1))


def default_knobs(shape: knob_db.Shape) -> knob_db.Knobs:
    """The hand-picked choice: :func:`default_tile`; K unblocked up to ``FULL_K`` (the tile's weight panels
    stream from L2 and each output is written once), else K blocks filling half of L1."""
    rows_tile, panels = default_tile(shape["blocks"])
    kc = shape["k"] if shape["k"] <= FULL_K else k_block(shape["k"], panels)
    return {"rows_tile": rows_tile, "panels": panels, "kc": kc, "row_block": ROW_BLOCK}


def check_knobs(shape: knob_db.Shape, knobs: knob_db.Knobs) -> str | None:
    rows_tile, panels, kc, row_block = (knobs[n] for n in ("rows_tile", "panels", "kc", "row_block"))
    if not 1 <= panels <= 4 or shape["blocks"] % panels:
        return f"panels={panels} must be 1..4 and divide the {shape['blocks']} column panels"
    if not 1 <= rows_tile or rows_tile * panels > ACCUMULATORS:
        return f"a {rows_tile}x{panels} tile needs more than {ACCUMULATORS} accumulator registers"
    if not 1 <= kc <= shape["k"]:
        return f"kc={kc} must be in 1..K={shape['k']}"
    if row_block < rows_tile:
        return f"row_block={row_block} is smaller than the {rows_tile}-row tile"
    return None


def candidate_knobs(shape: knob_db.Shape) -> list[knob_db.Knobs]:
    """Register tiles for each panel count dividing ``blocks`` (full and 2/3 height), K unblocked or
    in L1-sized blocks, and the row block halved or doubled around the default tile."""
    default = default_knobs(shape)
    found = [default]
    for panels in (4, 3, 2, 1):
        if shape["blocks"] % panels:
            continue
        full = ACCUMULATORS // panels
        for rows_tile in dict.fromkeys((full, max(1, (2 * full) // 3))):
            for kc in dict.fromkeys((k_block(shape["k"], panels), shape["k"])):
                found.append({"rows_tile": rows_tile, "panels": panels, "kc": kc, "row_block": ROW_BLOCK})
    for row_block in (ROW_BLOCK // 2, ROW_BLOCK * 2):
        found.append({**default, "row_block": row_block})
    unique = {tuple(sorted(c.items())): c for c in found if check_knobs(shape, c) is None}
    return list(unique.values())


def instance(shape: knob_db.Shape, knobs: knob_db.Knobs, rng: np.random.Generator) -> knob_db.Instance:
    lead = (shape["batches"],) if shape["batches"] > 1 else ()
    blocks, k, rows = shape["blocks"], shape["k"], shape["rows"]
    x = rng.standard_normal((*lead, rows, k)).astype(np.float32)
    w = rng.standard_normal((*lead, blocks, k, LANES)).astype(np.float32)
    b = rng.standard_normal((*lead, blocks * LANES)).astype(np.float32)
    func = dense_func(k, blocks, shape["batches"], knobs)
    return knob_db.Instance(func, [x, w, b], [((*lead, rows, blocks * LANES), "float32")])


KNOBS = knob_db.register(knob_db.KnobSpace("dense_f32", default_knobs, candidate_knobs, check_knobs, instance))


def dense_func(k: int, blocks: int, batches: int = 1, knobs: knob_db.Knobs | None = None) -> tirx.PrimFunc:
    """``y[e, m, 16*j + l] = b[e, 16*j + l] + sum_k x[e, m, k] * w[e, j, k, l]`` for ``x [batches, rows, k]``
    (rows symbolic): ``batches`` independent GEMMs with their own packed weights (16 for a Winograd
    conv's transformed tiles), run in parallel with the column panels. One GEMM (a linear) drops
    the ``e`` axis from every buffer. ``knobs``: see :data:`KNOBS` (default: :func:`default_knobs`)."""
    width = blocks * LANES
    knobs = knobs or default_knobs({"k": k, "blocks": blocks})
    rows_tile, panels, kc = knobs["rows_tile"], knobs["panels"], knobs["kc"]
    k_blocks = -(-k // kc)
    tiles_per_mb = max(1, knobs["row_block"] // rows_tile)
    lanes = T.Ramp(0, 1, LANES)

    lead = (batches,) if batches > 1 else ()  # one GEMM keeps the plain 2-D interface (no reshapes around it)

    @T.prim_func(private=True)
    def dense(
        x_h: T.handle,
        w: T.Buffer((*lead, blocks, k, LANES), "float32"),
        bias: T.Buffer((*lead, width), "float32"),
        y_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        x3 = T.match_buffer(x_h, (*lead, rows, k), "float32")
        y3 = T.match_buffer(y_h, (*lead, rows, width), "float32")
        for job in T.parallel(batches * (blocks // panels)):
            e = job // (blocks // panels)
            t = job % (blocks // panels)
            xf = T.decl_buffer((rows * k,), "float32", data=x3.data, elem_offset=e * rows * k)
            wf = T.decl_buffer((blocks * k * LANES,), "float32", data=w.data, elem_offset=e * blocks * k * LANES)
            y = T.decl_buffer((rows, width), "float32", data=y3.data, elem_offset=e * rows * width)
            b = T.decl_buffer((width,), "float32", data=bias.data, elem_offset=e * width)
            for mb in range(-(-(rows // rows_tile) // tiles_per_mb)):  # row blocks: their y tiles stay in L2
                for kb in range(k_blocks):  # the K block's weight panels stay in L1 across all row tiles
                    for mo in range(mb * tiles_per_mb, T.min(rows // rows_tile, mb * tiles_per_mb + tiles_per_mb)):
                        acc = T.alloc_buffer((rows_tile, panels, LANES), "float32", scope="global")
                        wv = T.alloc_buffer((panels, LANES), "float32", scope="global")
                        for r in T.unroll(rows_tile):
                            for v in T.unroll(panels):
                                acc[r, v, lanes] = T.if_then_else(
                                    kb == 0,
                                    b[T.Ramp((t * panels + v) * LANES, 1, LANES)],
                                    y[mo * rows_tile + r, T.Ramp((t * panels + v) * LANES, 1, LANES)],
                                )
                        for kk in range(kb * kc, T.min(k, kb * kc + kc)):
                            for v in T.unroll(panels):
                                wv[v, lanes] = wf[T.Ramp(((t * panels + v) * k + kk) * LANES, 1, LANES)]
                            for r in T.unroll(rows_tile):
                                for v in T.unroll(panels):
                                    acc[r, v, lanes] = (
                                        acc[r, v, lanes]
                                        + T.Broadcast(xf[(mo * rows_tile + r) * k + kk], LANES) * wv[v, lanes]
                                    )
                        for r in T.unroll(rows_tile):
                            for v in T.unroll(panels):
                                y[mo * rows_tile + r, T.Ramp((t * panels + v) * LANES, 1, LANES)] = acc[r, v, lanes]
            for m in range(rows - rows % rows_tile, rows):  # tail rows (the whole GEMV at batch 1)
                acc1 = T.alloc_buffer((panels, LANES), "float32", scope="global")
                for v in T.unroll(panels):
                    acc1[v, lanes] = b[T.Ramp((t * panels + v) * LANES, 1, LANES)]
                for kk in range(k):
                    for v in T.unroll(panels):
                        acc1[v, lanes] = (
                            acc1[v, lanes]
                            + T.Broadcast(xf[m * k + kk], LANES)
                            * wf[T.Ramp(((t * panels + v) * k + kk) * LANES, 1, LANES)]
                        )
                for v in T.unroll(panels):
                    y[m, T.Ramp((t * panels + v) * LANES, 1, LANES)] = acc1[v, lanes]

    return dense
