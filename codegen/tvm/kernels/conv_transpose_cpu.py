"""fp32 ``conv_transpose2d`` whose kernel equals its stride (FPN / DB-head upsampling) as a 1x1 conv.

With ``kernel == stride`` the output windows do not overlap: every output pixel
``(i*s + a, j*s + b)`` receives exactly one input pixel ``(i, j)``,

    y[n, o, i*s + a, j*s + b] = bias[o] + sum_c x[n, c, i, j] * w[c, o, a, b]

which is a 1x1 conv with ``OC * s0 * s1`` output channels (filter ``w`` transposed to
``[(o, a, b), c]``) followed by a depth-to-space copy that adds the bias (pads crop the copy).
The 1x1 conv runs on ``cpu_lowering``'s conv kernels; Relax's legalized ``conv2d_transpose``
loops over the zero-stuffed input instead (PP-OCRv4 det: 54 of 86 ms single thread).
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te

from reshift.codegen.tvm.kernels import cpu_lowering
from reshift.codegen.tvm.lower import LowerContext
from reshift.ir.graph import Node, Value
from reshift.ir.types import TensorType


def applies(node: Node) -> bool:
    """Constant fp32 filter, kernel == stride, groups 1, dilation 1, no output padding, static spatial size."""
    attrs = node.attrs
    w = cpu_lowering._constant_f32(node, 1)
    if node.op != "conv_transpose2d" or not cpu_lowering.enabled() or w is None or node.inputs[0].dtype != "float32":
        return False
    usable, _ = cpu_lowering._optional_bias(node)
    return (
        usable
        and attrs["groups"] == 1
        and tuple(attrs["dilation"]) == (1, 1)
        and tuple(w.shape[2:]) == tuple(attrs["stride"])
        and not any(attrs["output_padding"])
        and all(isinstance(d, int) for d in node.inputs[0].shape[1:])
    )


def _depth_to_space(y: te.Tensor, bias: te.Tensor, oc: int, stride, pads, out_hw) -> te.Tensor:
    """``out[n, o, p, q] = y[n, (o*s0 + a)*s1 + b, i, j] + bias[o]`` with ``p + top = i*s0 + a``."""
    s0, s1 = stride
    top, left = pads[0], pads[1]

    def pixel(n, o, p, q):
        r, c = p + top, q + left
        return y[n, (o * s0 + r % s0) * s1 + c % s1, r // s0, c // s1] + bias[o]

    return te.compute((y.shape[0], oc, *out_hw), pixel, name="depth_to_space")


def conv_transpose2d(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr | None:
    """The 1x1-conv form of a ``kernel == stride`` transposed conv, or None when it does not apply."""
    if not applies(node):
        return None
    w = cpu_lowering._constant_f32(node, 1)
    _, bias = cpu_lowering._optional_bias(node)
    channels, oc, s0, s1 = w.shape
    filt = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(oc * s0 * s1, channels, 1, 1))
    source = node.inputs[0]
    wide = Value(f"{node.name}_1x1", TensorType((source.shape[0], oc * s0 * s1, *source.shape[2:]), "float32"))
    attrs = {"stride": (1, 1), "padding": (0, 0, 0, 0), "dilation": (1, 1), "groups": 1}
    conv = Node("conv2d", [source, Value(f"{node.name}_w1x1", TensorType(filt.shape), filt), None], [wide], attrs)
    y = cpu_lowering.conv2d(ctx, conv, x)
    if y is None:  # the conv kernels refused (e.g. RESHIFT_CONV forcing): Relax's own conv
        y = ctx.emit(relax.op.nn.conv2d(x, relax.const(filt)))
    b = relax.const(np.zeros(oc, np.float32) if bias is None else bias)
    out_hw = tuple(int(d) for d in node.outputs[0].shape[2:])
    return ctx.te(_depth_to_space, y, b, oc, (s0, s1), node.attrs["padding"], out_hw, name="depth_to_space")
