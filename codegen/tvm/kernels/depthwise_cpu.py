"""fp32 depthwise conv2d for CPU (groups == channels, one filter per channel), vectorized over columns.

MobileNet/PPLCNet blocks (PP-OCR) run a KxK depthwise conv per channel. Relax legalizes it to TOPI's
``group_conv2d_nchw``, which the generic schedule cannot parallelize (a reduction whose spatial loops
do not fuse). Here a job is one (image, channel) plane; for each output row a vector holds 16
consecutive output columns:

    acc[16] = b[c];  acc += w[c, i, j] * xpad[n, c, (r*s0 + i*d0) * Wp + (16t + 0..15)*s1 + j*d1]

reading the zero padded image flattened to ``[n, c, grid_rows * Wp]`` (``conv2d_cpu.pad_rows``: its
copy fuses with the producer's epilogue). The row is rounded up to whole vectors (``OWp`` columns,
the overhang reads the next row or the extra zero rows: junk that the crop drops), stride 1 as plain
unaligned loads, stride 2 as strided ones. The output ``[n, c, oh * OWp]`` is cropped by a TE
compute that fuses with the activation that follows (HardSwish, ReLU).
"""

from __future__ import annotations

import numpy as np
from tvm import relax, tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.kernels import conv2d_cpu, cpu_lowering
from reshift.codegen.tvm.lower import LowerContext
from reshift.ir.graph import Node

LANES = 16


def applies(node: Node) -> bool:
    """groups == in channels == out channels, constant fp32 filter, static spatial size."""
    w = cpu_lowering._constant_f32(node, 1)
    if node.op != "conv2d" or not cpu_lowering.enabled() or w is None or node.inputs[0].dtype != "float32":
        return False
    usable, _ = cpu_lowering._optional_bias(node)
    channels = node.inputs[0].shape[1]
    return (
        usable
        and node.attrs["groups"] == channels
        and w.shape[0] == channels
        and w.shape[1] == 1
        and all(isinstance(d, int) for d in node.inputs[0].shape[1:])
    )


def depthwise_func(
    channels: int, kernel, stride, dilation, row: int, plane: int, out_hw: tuple[int, int], width: int
) -> tirx.PrimFunc:
    """``y[n, c, r * width + q] = b[c] + sum_{i,j} w[c, i * kw + j] * x[n, c, (r*s0 + i*d0) * row + q*s1 + j*d1]``."""
    kh, kw = kernel
    s0, s1 = stride
    d0, d1 = dilation
    oh, _ = out_hw
    tiles = width // LANES
    taps = kh * kw
    out_plane = oh * width
    jobs = conv2d_cpu.job_loop(channels * taps * out_plane)

    @T.prim_func(private=True)
    def depthwise(
        x_h: T.handle, w: T.Buffer((channels, taps), "float32"), b: T.Buffer((channels,), "float32"), y_h: T.handle
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(x_h, (n, channels, plane), "float32")
        y = T.match_buffer(y_h, (n, channels, out_plane), "float32")
        xf = T.decl_buffer((n * channels * plane,), "float32", data=x.data)
        yf = T.decl_buffer((n * channels * out_plane,), "float32", data=y.data)
        for job in jobs(n * channels):
            c = job % channels
            acc = T.alloc_buffer((tiles, LANES), "float32", scope="global")
            for r in range(oh):
                for t in T.unroll(tiles):
                    acc[t, T.Ramp(0, 1, LANES)] = T.Broadcast(b[c], LANES)
                for i in T.unroll(kh):
                    for j in T.unroll(kw):
                        for t in T.unroll(tiles):
                            acc[t, T.Ramp(0, 1, LANES)] = (
                                acc[t, T.Ramp(0, 1, LANES)]
                                + T.Broadcast(w[c, i * kw + j], LANES)
                                * xf[T.Ramp(job * plane + (r * s0 + i * d0) * row + t * LANES * s1 + j * d1, s1, LANES)]
                            )
                for t in T.unroll(tiles):
                    yf[T.Ramp(job * out_plane + r * width + t * LANES, 1, LANES)] = acc[t, T.Ramp(0, 1, LANES)]

    return depthwise


def depthwise_conv2d(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr | None:
    """The depthwise kernel plus the crop to ``[n, c, oh, ow]``, or None when it does not apply."""
    if not applies(node):
        return None
    w = cpu_lowering._constant_f32(node, 1)
    _, bias = cpu_lowering._optional_bias(node)
    shape = ctx.shape(node.inputs[0])
    channels, h, wd = shape[1:]
    kh, kw = w.shape[2:]
    (s0, s1), (d0, d1) = node.attrs["stride"], node.attrs["dilation"]
    pads = node.attrs["padding"]
    oh, ow = (int(d) for d in node.outputs[0].shape[2:])
    width = -(-ow // LANES) * LANES
    row = wd + pads[1] + pads[3]
    last = ((oh - 1) * s0 + (kh - 1) * d0) * row + (width - 1) * s1 + (kw - 1) * d1  # furthest element read
    grid_rows = max(h + pads[0] + pads[2], last // row + 1)
    src = cpu_lowering._padded_flat(ctx, x, shape, pads, grid_rows, row)
    func = depthwise_func(channels, (kh, kw), (s0, s1), (d0, d1), row, grid_rows * row, (oh, ow), width)
    b = np.zeros(channels, np.float32) if bias is None else bias
    y = ctx.emit(
        relax.op.call_tir(
            ctx.bb.add_func(func, "depthwise_conv2d_f32"),
            [src, relax.const(np.ascontiguousarray(w.reshape(channels, kh * kw))), relax.const(b)],
            out_ty=relax.TensorType((shape[0], channels, oh * width), "float32"),
        )
    )
    return ctx.te(conv2d_cpu.crop, y, channels, (oh, ow), width, name="depthwise_crop")
