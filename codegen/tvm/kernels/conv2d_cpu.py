"""fp32 conv2d for CPU as an implicit GEMM over a flattened, padded image (groups=1).

For stride 1 the output pixel ``(oh, ow)`` computed on the padded grid ``p = oh*Wp + ow`` reads
``xpad[c, p + kh*d*Wp + kw*d]``: for a fixed ``(c, kh, kw)`` consecutive pixels read consecutive
addresses, so 16 output pixels are one vector load, with no im2col copy. The ``Wp - OW`` columns
past the right edge are computed and cropped (waste ``2*pad/Wp``). For stride > 1 an im2col
``col[K, P]`` (``K = C*KH*KW``) is built first and the same kernel runs with a 1x1 "filter".
Weights are packed at build time as ``[OC/R, K, R]``, so the micro-kernel ``acc[r, v] +=
broadcast(w[oc0 + r, k]) * x[k, p0 + 16v : p0 + 16v + 16]`` reads them in order; ``R`` output
channels x ``V <= 3`` vectors of 16 pixels stay in registers (``R * V <= 15``, ``oc_tile``; the
direct-convolution register blocking of Georganas et al., "Anatomy of High-Performance Deep
Learning Convolutions on SIMD Architectures", SC'18, in NCHW). The loop over (image, oc block,
pixel tile) runs in parallel; whichever of weights or image is larger is the outer loop, so it is
streamed once.
The accumulator buffer must stay under 1 KiB: TVM puts larger per-thread buffers on the heap
(TVMBackendAllocWorkspace) and LLVM then keeps every accumulator in memory (6x slower).
"""

from __future__ import annotations

import math

import numpy as np
from tvm import te, tirx
from tvm.script import tirx as T

LANES = 16
OC_TILE = 4  # output channels per register tile when the caller does not choose (see ``oc_tile``)
SERIAL_WORK = 1 << 20  # multiply-adds per image (~20 us) below which a kernel's jobs run serially


def job_loop(work: int):
    """``T.parallel``, or ``T.serial`` for a kernel doing under ``SERIAL_WORK`` multiply-adds per image:
    a parallel launch is a barrier over every pool thread (microseconds, a whole time slice when the
    host is oversubscribed) for work that takes about as long (PP-OCR's SE convs on 1x1 maps)."""
    return T.parallel if work >= SERIAL_WORK else T.serial


MAX_ACCUMULATORS = 15  # 16 x 64-byte accumulators would be 1 KiB: TVM then moves them to the heap
_EFFICIENCY = {3: 1.0, 2: 0.9, 1: 0.6}  # relative FMA throughput of a tile of V pixel vectors


def pack_filters(w: np.ndarray, rows: int = OC_TILE) -> np.ndarray:
    """``float32 [OC, C, KH, KW]`` -> ``[ceil(OC/rows), C*KH*KW, rows]``, zero padded."""
    oc = w.shape[0]
    flat = w.reshape(oc, -1).astype(np.float32)
    blocks = -(-oc // rows)
    padded = np.zeros((blocks * rows, flat.shape[1]), np.float32)
    padded[:oc] = flat
    return np.ascontiguousarray(padded.reshape(blocks, rows, -1).transpose(0, 2, 1))


def oc_tile(panels: int) -> int:
    """Output channels per register tile for ``panels`` pixel vectors: as many as the accumulators allow.

    12 -> 15 accumulators for 3 pixel vectors, 8 -> 14 for 2 (the 7x7 and 14x14 layers), 15 for 1:
    each tap then loads ``panels`` pixel vectors and ``rows`` weight broadcasts per ``rows * panels``
    FMAs, so small images stop being load-bound.
    """
    return MAX_ACCUMULATORS // panels


def tile_efficiency(panels: int) -> float:
    """Relative FMA throughput of a register tile of ``panels`` pixel vectors."""
    return _EFFICIENCY[panels]


def pixel_tile(pixels: int) -> tuple[int, int]:
    """``(V, padded pixels)``: the vectors per tile that waste the least time on padding."""
    best = None
    for v in (3, 2, 1):
        padded = math.ceil(pixels / (LANES * v)) * LANES * v
        cost = padded / _EFFICIENCY[v]
        if best is None or cost < best[0]:
            best = (cost, v, padded)
    return best[1], best[2]


def conv_gemm_func(
    channels: int,
    kh: int,
    kw: int,
    dilation: int,
    row: int,
    plane: int,
    pixels: int,
    oc_blocks: int,
    panels: int,
    rt: int = OC_TILE,
) -> tirx.PrimFunc:
    """``y[n, oc, p] = b[oc] + sum_{c,i,j} w[oc/rt, (c*kh + i)*kw + j, oc%rt] * x[n, c, p + i*d*row + j*d]``.

    ``x`` is ``[n, channels, plane]`` (a padded image flattened, or im2col rows with kh = kw = 1),
    ``pixels`` a multiple of ``16*panels``; the batch ``n`` is symbolic.
    """
    k = channels * kh * kw
    width = oc_blocks * rt
    tiles = pixels // (LANES * panels)
    weights_outer = width * k > k * pixels  # stream the larger operand once
    lanes = T.Ramp(0, 1, LANES)
    jobs = job_loop(width * k * pixels)

    @T.prim_func(private=True)
    def conv(
        x_h: T.handle, w: T.Buffer((oc_blocks, k, rt), "float32"), b: T.Buffer((width,), "float32"), y_h: T.handle
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(x_h, (n, channels, plane), "float32")
        y = T.match_buffer(y_h, (n, width, pixels), "float32")
        xf = T.decl_buffer((n * channels * plane,), "float32", data=x.data)
        wf = T.decl_buffer((oc_blocks * k * rt,), "float32", data=w.data)
        yf = T.decl_buffer((n * width * pixels,), "float32", data=y.data)
        for job in jobs(n * oc_blocks * tiles):
            img = job // (oc_blocks * tiles)
            ob = T.Select(weights_outer, job % (oc_blocks * tiles) // tiles, job % oc_blocks)
            pt = T.Select(weights_outer, job % tiles, job % (oc_blocks * tiles) // oc_blocks)
            acc = T.alloc_buffer((rt, panels, LANES), "float32", scope="global")
            xv = T.alloc_buffer((panels, LANES), "float32", scope="global")
            for r in T.unroll(rt):
                for v in T.unroll(panels):
                    acc[r, v, lanes] = T.Broadcast(b[ob * rt + r], LANES)
            for c in range(channels):
                for i in range(kh):
                    for j in range(kw):
                        for v in T.unroll(panels):
                            xv[v, lanes] = xf[
                                T.Ramp(
                                    (img * channels + c) * plane
                                    + i * dilation * row
                                    + j * dilation
                                    + (pt * panels + v) * LANES,
                                    1,
                                    LANES,
                                )
                            ]
                        for r in T.unroll(rt):
                            for v in T.unroll(panels):
                                acc[r, v, lanes] = (
                                    acc[r, v, lanes]
                                    + T.Broadcast(wf[(ob * k + (c * kh + i) * kw + j) * rt + r], LANES) * xv[v, lanes]
                                )
            for r in T.unroll(rt):
                for v in T.unroll(panels):
                    yf[T.Ramp((img * width + ob * rt + r) * pixels + (pt * panels + v) * LANES, 1, LANES)] = acc[
                        r, v, lanes
                    ]

    return conv


def pad_rows(x: te.Tensor, pads: tuple[int, int, int, int], grid_rows: int) -> te.Tensor:
    """``x [n, c, h, w]`` zero padded (top, left, bottom, right) to ``[n, c, grid_rows, w + left + right]``.

    Rows past the bottom padding (up to ``grid_rows``) are zero too: the implicit GEMM reads past the
    last padded row. Reshaped to ``[n, c, grid_rows * row]`` (a view) it is the flat padded image.
    Four axes rather than one flat axis so that the copy keeps a plain inner loop over columns
    (no div/mod per element; see ``schedule_cpu._parallel_prefix``).
    """
    n, c, h, w = x.shape
    top, left, _bottom, right = pads
    zero = tirx.const(0, x.dtype)

    def value(b, ch, r, col):
        inside = tirx.all(r >= top, r < h + top, col >= left, col < w + left)
        src = x[b, ch, tirx.max(tirx.min(r - top, h - 1), 0), tirx.max(tirx.min(col - left, w - 1), 0)]
        return tirx.if_then_else(inside, src, zero)

    return te.compute((n, c, grid_rows, int(w) + left + right), value, name="conv_pad_rows")


def im2col(x: te.Tensor, kernel, stride, pads, dilation, out_hw, pixels: int) -> te.Tensor:
    """``col[n, (c, i, j), p]`` = the input under filter tap ``(i, j)`` for output pixel ``p`` (zero padded)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    oh, ow = out_hw
    zero = tirx.const(0, x.dtype)

    def value(b, kk, p):
        ch, i, j = kk // (kh * kw), kk % (kh * kw) // kw, kk % kw
        row = p // ow * stride[0] - pads[0] + i * dilation[0]
        col = p % ow * stride[1] - pads[1] + j * dilation[1]
        inside = tirx.all(p < oh * ow, row >= 0, row < h, col >= 0, col < w)
        return tirx.if_then_else(
            inside, x[b, ch, tirx.max(tirx.min(row, h - 1), 0), tirx.max(tirx.min(col, w - 1), 0)], zero
        )

    return te.compute((n, int(c) * kh * kw, pixels), value, name="conv_im2col")


def crop(y: te.Tensor, channels: int, out_hw: tuple[int, int], row: int) -> te.Tensor:
    """``y [n, OCp, pixels]`` on a grid of ``row`` columns -> ``[n, channels, oh, ow]``."""
    oh, ow = out_hw
    return te.compute((y.shape[0], channels, oh, ow), lambda b, o, i, j: y[b, o, i * row + j], name="conv_crop")


def im2col_func(
    channels: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    row: int,
    plane: int,
    out_hw: tuple[int, int],
    pixels: int,
) -> tirx.PrimFunc:
    """``col[n, (c, i, j), y*ow + x] = xpad[n, c, (y*s0 + i*d0)*row + x*s1 + j*d1]`` (zero past ``oh*ow``).

    ``xpad`` is the zero padded image flattened by ``pad_flat`` (``row`` padded columns), so no bounds
    checks or div/mod are left in the copy: each output row is ``ow // 16`` vector stores of a strided
    gather plus a scalar tail. The (image, tap) rows run in parallel. The root block is there because
    Relax's RewriteDataflowReshape asserts that the PrimFunc it inspects has one
    (tir_op_pattern_kind.cc HasReshapePattern fails on a block-free body).
    """
    kh, kw = kernel
    k = channels * kh * kw
    oh, ow = out_hw
    s0, s1 = stride
    d0, d1 = dilation
    vectors = ow // LANES

    @T.prim_func(private=True, s_tir=True)
    def im2col_copy(x_h: T.handle, col_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(x_h, (n, channels, plane), "float32")
        col = T.match_buffer(col_h, (n, k, pixels), "float32")
        with T.sblock("root"):
            xf = T.decl_buffer((n * channels * plane,), "float32", data=x.data)
            cf = T.decl_buffer((n * k * pixels,), "float32", data=col.data)
            for job in T.parallel(n * k):
                # meta_var: substituted, not bound; a named scalar in an s_tir block is a buffer,
                # allocated with TVMBackendAllocWorkspace in every job (silero's im2col: 2 -> 60 us)
                img = T.meta_var(job // k)
                kk = T.meta_var(job % k)
                src = T.meta_var(
                    (img * channels + kk // (kh * kw)) * plane + (kk % (kh * kw) // kw) * d0 * row + (kk % kw) * d1
                )
                dst = T.meta_var(job * pixels)
                for y in range(oh):
                    for xv in range(vectors):
                        cf[T.Ramp(dst + y * ow + xv * LANES, 1, LANES)] = xf[
                            T.Ramp(src + y * s0 * row + xv * LANES * s1, s1, LANES)
                        ]
                    for xs in range(vectors * LANES, ow):
                        cf[dst + y * ow + xs] = xf[src + y * s0 * row + xs * s1]
                for p in range(oh * ow, pixels):
                    cf[dst + p] = T.float32(0)

    return im2col_copy
