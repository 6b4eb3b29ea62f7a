"""``shift_conv2d`` as im2col + the shift-add GEMV of ``shift_linear`` (``lowbit.shift_matmul``).

Per group ``g`` a TE compute gathers the im2col matrix ``[N*OH*OW, C/groups*kh*kw]`` (rows over
``(n, oh, ow)``, columns over ``(c, i, j)``, zero where the window hangs over the padding), exactly
the rows of the registry reference (``ir.ops_lowbit.conv_patches``); ``shift_matmul`` quantizes each
row to int8, accumulates the shifts in int32 and rescales once per output. The groups' ``[rows,
O/groups]`` results are concatenated, the bias added, and the ``[N, OH, OW, O]`` view transposed to
NCHW. The batch may be symbolic; the spatial size is static (as the op's type inference requires).

The gather is a plain injective TE compute: the CPU pipeline parallelizes and vectorizes it like any
other (``schedule_cpu.py``), CUDA builds give it dlight's default GPU schedule. Groups run one
``shift_matmul`` each (a depthwise conv pads every 1-channel group to a 16-row weight block): correct,
not tuned.
"""

from __future__ import annotations

from tvm import relax, te, tirx

from reshift.codegen.tvm import lower_lowbit
from reshift.codegen.tvm.kernels.lowbit import shift_matmul
from reshift.codegen.tvm.lower import LowerContext, lowering, op
from reshift.ir.graph import Node


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


@lowering("shift_conv2d")
def lower_shift_conv2d(ctx: LowerContext, node: Node, x, sign, exponent, scale, bias) -> relax.Expr:
    a = node.attrs
    sign_np, exponent_np = lower_lowbit._constant(node, 1), lower_lowbit._constant(node, 2)
    groups, out_channels = a["groups"], sign_np.shape[0]
    per_group, channels = out_channels // groups, sign_np.shape[1]
    batch = ctx.shape(node.inputs[0])[0]
    oh, ow = (int(d) for d in node.outputs[0].shape[2:])
    rows = batch * oh * ow
    sign2, exponent2 = sign_np.reshape(out_channels, -1), exponent_np.reshape(out_channels, -1)
    parts = []
    for g in range(groups):
        cols = ctx.te(
            im2col_group,
            x,
            g,
            channels,
            sign_np.shape[2:],
            a["stride"],
            a["padding"],
            a["dilation"],
            (oh, ow),
            name="shift_conv2d_im2col",
        )
        lo, hi = g * per_group, (g + 1) * per_group
        scale_g = scale if groups == 1 else ctx.emit(op.strided_slice(scale, axes=[0], begin=[lo], end=[hi]))
        parts.append(shift_matmul(ctx, cols, rows, sign2[lo:hi], exponent2[lo:hi], scale_g, a["exponent_bits"]))
    y = parts[0] if groups == 1 else ctx.emit(op.concat(parts, axis=1))  # [rows, O]
    if bias is not None:
        y = ctx.emit(op.add(y, bias))
    y = ctx.emit(op.reshape(y, [batch, oh, ow, out_channels]))
    return ctx.emit(op.permute_dims(y, [0, 3, 1, 2]))
