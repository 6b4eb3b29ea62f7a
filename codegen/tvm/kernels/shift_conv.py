"""``shift_conv2d`` as im2col + the shift-add GEMV of ``shift_linear`` (``lowbit.shift_matmul``).

Per group ``g`` a TE compute gathers the im2col matrix ``[N*OH*OW, C/groups*kh*kw]`` (rows over
``(n, oh, ow)``, columns over ``(c, i, j)``, zero where the window hangs over the padding), exactly
the rows of the registry reference (``ir.ops_lowbit.conv_patches``); ``shift_matmul`` quantizes each
row to int8, accumulates the shifts in int32 and rescales once per output. The groups' ``[rows,
O/groups]`` results are concatenated, the bias added, and the ``[N, OH, OW, O]`` view transposed to
NCHW. The batch may be symbolic; the spatial size is static (as the op's type inference requires).

On CPUs two kernels per group (:func:`quantize_patches_funcs`) gather each row's window, one for
its ``max |x|`` (the row scale), one for the int8 codes, without a float im2col matrix (the
generic gather, abs-max and quantize kernels took 5x longer on a 64-channel 56x56 conv).
CUDA builds keep the gather as a plain injective TE compute under dlight's default GPU schedule.
Groups run one shift GEMV each (a depthwise conv pads every 1-channel group to a 16-row weight
block): correct, not tuned.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx
from tvm.script import tirx as T

from reshift.codegen.tvm import lower_lowbit
from reshift.codegen.tvm.kernels import shift_int, shift_int8
from reshift.codegen.tvm.kernels.lowbit import kernel_flavor, shift_matmul, shift_matmul_int8
from reshift.codegen.tvm.lower import LowerContext, lowering, op
from reshift.ir.graph import Node
from reshift.ir.ops_lowbit import INT8_QMAX


def im2col_group(
    x: te.Tensor, group: int, channels: int, kernel, stride, padding, dilation, out_hw: tuple[int, int]
) -> te.Tensor:
    """``col[(n*OH + oh)*OW + ow, (c*kh + i)*kw + j] = x[n, group*channels + c, oh*s0 + i*d0 - top,
    ow*s1 + j*d1 - left]``, 0 outside the image (``channels`` per group)."""
    n, _, h, w = x.shape
    kh, kw = kernel
    oh, ow = out_hw
    top, left = padding[0], padding[1]
    zero = tirx.const(0, x.dtype)

    def value(r, k):
        img, pix = r // (oh * ow), r % (oh * ow)
        c, tap = k // (kh * kw), k % (kh * kw)
        y = (pix // ow) * stride[0] + (tap // kw) * dilation[0] - top
        xx = (pix % ow) * stride[1] + (tap % kw) * dilation[1] - left
        inside = tirx.all(y >= 0, y < h, xx >= 0, xx < w)
        return tirx.if_then_else(inside, x[img, group * channels + c, y, xx], zero)

    return te.compute((n * oh * ow, channels * kh * kw), value, name="im2col")


def quantize_patches_funcs(
    in_channels: int,
    hw: tuple[int, int],
    group: int,
    channels: int,
    kernel,
    stride,
    padding,
    dilation,
    out_hw: tuple[int, int],
) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    """Two kernels for group ``group``'s im2col rows of ``x [n, in_channels, h, w]``: ``(x, x) -> s``
    and ``(x, s) -> q``, as ``lower_lowbit.int8_code`` and ``row_absmax`` define them:
    ``s[r] = max|row| / 127`` (+inf for a row holding NaN or inf), ``q[r, col] = clip(rint(x / s),
    -127, 127)`` (0 when ``s`` is 0 or not finite). Both gather the window; no float im2col matrix
    is written. ``x`` is passed (and read) twice: Relax's RewriteDataflowReshape takes a PrimFunc
    that reads one input and has no blocks for a reshape (see ``softmax_cpu.py``)."""
    h, w = hw
    kh, kw = kernel
    oh, ow = out_hw
    top, left = padding[0], padding[1]
    k = channels * kh * kw
    inf = T.float32(np.inf)

    def window(x, img, oy, ox, c, i, j):
        """The input under tap ``(i, j)`` of row ``(img, oy, ox)``, channel ``c`` of the group (0 in the padding)."""
        yy = oy * stride[0] + i * dilation[0] - top
        xx = ox * stride[1] + j * dilation[1] - left
        inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
        clamped = x[img, group * channels + c, tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)]
        return tirx.if_then_else(inside, clamped, tirx.const(0, "float32"))

    @T.prim_func(private=True)
    def patch_scales(x_h: T.handle, x2_h: T.handle, s_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(x_h, (n, in_channels, h, w), "float32")
        x_again = T.match_buffer(x2_h, (n, in_channels, h, w), "float32")
        s = T.match_buffer(s_h, (n * oh * ow, 1), "float32")
        for r in T.parallel(n * oh * ow):
            red = T.alloc_buffer((1,), "float32", scope="global")
            red[0] = T.float32(0)
            for c, i, j in T.grid(channels, kh, kw):
                v = window(x, r // (oh * ow), r % (oh * ow) // ow, r % ow, c, i, j)
                again = window(x_again, r // (oh * ow), r % (oh * ow) // ow, r % ow, c, i, j)  # the same value
                red[0] = T.max(red[0], T.if_then_else(T.isnan(again), inf, T.fabs(v)))
            s[r, 0] = red[0] / T.float32(INT8_QMAX)

    @T.prim_func(private=True)
    def patch_codes(x_h: T.handle, s_h: T.handle, q_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(x_h, (n, in_channels, h, w), "float32")
        s = T.match_buffer(s_h, (n * oh * ow, 1), "float32")
        q = T.match_buffer(q_h, (n * oh * ow, k), "int32")
        for r in T.parallel(n * oh * ow):
            for c, i, j in T.grid(channels, kh, kw):
                v = window(x, r // (oh * ow), r % (oh * ow) // ow, r % ow, c, i, j)
                q[r, (c * kh + i) * kw + j] = lower_lowbit.int8_code(v, s[r, 0])

    return patch_scales, patch_codes


@lowering("shift_conv2d")
def lower_shift_conv2d(ctx: LowerContext, node: Node, x, sign, exponent, scale, bias) -> relax.Expr:
    a = node.attrs
    sign_np, exponent_np = lower_lowbit._constant(node, 1), lower_lowbit._constant(node, 2)
    groups, out_channels = a["groups"], sign_np.shape[0]
    if kernel_flavor() != "gpu" and groups == 1:  # per-window int8 / int16 codes + an integer dot-product GEMM
        return shift_int8.shift_conv_cpu(ctx, node, x, sign_np, exponent_np, scale, bias)
    if kernel_flavor() != "gpu" and sign_np.shape[1] == 1 and groups == int(node.inputs[0].shape[1]):  # depthwise
        return shift_int.shift_depthwise_int(ctx, node, x, sign_np, exponent_np, scale, bias)
    per_group, channels = out_channels // groups, sign_np.shape[1]
    batch = ctx.shape(node.inputs[0])[0]
    oh, ow = (int(d) for d in node.outputs[0].shape[2:])
    rows = batch * oh * ow
    sign2, exponent2 = sign_np.reshape(out_channels, -1), exponent_np.reshape(out_channels, -1)
    k_area = sign_np.shape[2] * sign_np.shape[3]
    parts = []
    for g in range(groups):
        window = (g, channels, sign_np.shape[2:], a["stride"], a["padding"], a["dilation"], (oh, ow))
        lo, hi = g * per_group, (g + 1) * per_group
        scale_g = scale if groups == 1 else ctx.emit(op.strided_slice(scale, axes=[0], begin=[lo], end=[hi]))
        codes = (sign2[lo:hi], exponent2[lo:hi], scale_g, a["exponent_bits"])
        if kernel_flavor() == "gpu":
            cols = ctx.te(im2col_group, x, *window, name="shift_conv2d_im2col")
            parts.append(shift_matmul(ctx, cols, rows, *codes))
            continue
        in_shape = node.inputs[0].shape
        scales, codes_of = quantize_patches_funcs(int(in_shape[1]), (int(in_shape[2]), int(in_shape[3])), *window)
        gv_s = ctx.bb.add_func(scales, "shift_conv2d_patch_scales")
        s = ctx.emit(relax.op.call_tir(gv_s, [x, x], out_ty=relax.TensorType((rows, 1), "float32")))
        gv_q = ctx.bb.add_func(codes_of, "shift_conv2d_patch_codes")
        q = ctx.emit(relax.op.call_tir(gv_q, [x, s], out_ty=relax.TensorType((rows, channels * k_area), "int32")))
        parts.append(shift_matmul_int8(ctx, q, s, rows, *codes))
    y = parts[0] if groups == 1 else ctx.emit(op.concat(parts, axis=1))  # [rows, O]
    if bias is not None:
        y = ctx.emit(op.add(y, bias))
    y = ctx.emit(op.reshape(y, [batch, oh, ow, out_channels]))
    return ctx.emit(op.permute_dims(y, [0, 3, 1, 2]))
