"""Lowerings of ``conv3d`` and ``conv_transpose2d``/``3d`` (``ir/ops_nn.py``) to Relax's convolutions.

Relax's ``nn.conv3d`` (NCDHW/OIDHW) and ``nn.conv2d_transpose``/``conv3d_transpose`` (IOHW/IODHW) take padding as
begins then ends and ``output_padding`` at the end, as the IR does; the bias is a broadcast add.
Both legalize to TOPI's computes on CPU and get dlight schedules on CUDA.
"""

from __future__ import annotations

from tvm import relax

from reshift.codegen.tvm.kernels import conv_transpose_cpu
from reshift.codegen.tvm.lower import LowerContext, lowering, op
from reshift.ir.graph import Node


def _add_bias(ctx: LowerContext, y: relax.Expr, b: relax.Expr | None, rank: int) -> relax.Expr:
    return y if b is None else ctx.emit(op.add(y, op.reshape(b, (1, -1) + (1,) * (rank - 2))))


@lowering("conv3d")
def lower_conv3d(ctx: LowerContext, node: Node, x: relax.Expr, w: relax.Expr, b: relax.Expr | None) -> relax.Expr:
    attrs = node.attrs
    y = ctx.emit(
        op.nn.conv3d(
            x, w, strides=attrs["stride"], padding=attrs["padding"], dilation=attrs["dilation"], groups=attrs["groups"]
        )
    )
    return _add_bias(ctx, y, b, 5)


@lowering("conv_transpose2d", "conv_transpose3d")
def lower_conv_transpose(
    ctx: LowerContext, node: Node, x: relax.Expr, w: relax.Expr, b: relax.Expr | None
) -> relax.Expr:
    """Relax conv2d_transpose / conv3d_transpose (the registry's attributes are Relax's); on the CPU a
    ``kernel == stride`` one runs as a 1x1 conv kernel plus a depth-to-space copy (``conv_transpose_cpu``)."""
    fast = conv_transpose_cpu.conv_transpose2d(ctx, node, x) if node.op == "conv_transpose2d" else None
    if fast is not None:
        return fast
    attrs = node.attrs
    transpose = op.nn.conv2d_transpose if node.op == "conv_transpose2d" else op.nn.conv3d_transpose
    y = ctx.emit(
        transpose(
            x,
            w,
            strides=attrs["stride"],
            padding=attrs["padding"],
            output_padding=attrs["output_padding"],
            dilation=attrs["dilation"],
            groups=attrs["groups"],
        )
    )
    return _add_bias(ctx, y, b, node.inputs[0].type.rank)
