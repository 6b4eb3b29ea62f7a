"""Routing of fp32 ``linear`` / ``matmul`` / ``conv2d`` / ``softmax`` / ``gelu`` / ``layer_norm`` to the CPU kernels.

``dense_cpu.py`` (packed-weight GEMM), ``conv2d_ocvec_cpu.py`` (direct conv vectorized over output
channels) or ``conv2d_cpu.py`` (implicit GEMM over the padded image, vectorized over pixels; the
conv kernel doing less work is chosen per conv), ``softmax_cpu.py``, ``layer_norm_cpu.py`` and the
polynomial GELU replace the generic schedule of ``schedule_cpu.py`` for these ops on LLVM targets.
Each function returns ``None`` when its kernel does not apply (a non-constant weight, groups, another
dtype, a GPU target, or ``RESHIFT_GENERIC_KERNELS=1`` for comparisons), and the reference lowering
runs instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, te, tirx

from reshift.codegen.tvm import knobs as knob_db
from reshift.codegen.tvm.kernels import (
    batch_matmul_cpu,
    conv2d_cpu,
    conv2d_ocvec_cpu,
    dense_cpu,
    layer_norm_cpu,
    softmax_cpu,
)
from reshift.codegen.tvm.kernels import conv2d_winograd_cpu as winograd
from reshift.codegen.tvm.kernels.fast_math import exp_f32, gelu_f32, gelu_tanh_f32, tanh_f32
from reshift.codegen.tvm.lower import ABSORBED, LowerContext, op, product
from reshift.ir.graph import Node, Value


def enabled() -> bool:
    """The kernels apply to LLVM (CPU) targets; no current target means the host CPU."""
    if os.environ.get("RESHIFT_GENERIC_KERNELS", "") not in ("", "0"):
        return False
    target = tvm.target.Target.current(allow_none=True)
    return target is None or target.kind.name == "llvm"


def _constant_f32(node: Node, index: int) -> np.ndarray | None:
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is None or not value.is_constant or value.dtype != "float32":
        return None
    return np.asarray(value.data, np.float32)


def _optional_bias(node: Node, index: int = 2) -> tuple[bool, np.ndarray | None]:
    """``(usable, bias)``: no bias input is usable (None); a bias must be a constant fp32 tensor."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return True, None
    bias = _constant_f32(node, index)
    return bias is not None, bias


def _rows(ctx: LowerContext, value) -> tuple[list, object, int]:
    """``(shape, rows, n)``: the value's shape, the product of its leading dims (maybe symbolic), the last dim."""
    shape = ctx.shape(value)
    return shape, product(shape[:-1]), shape[-1]


def _dense(ctx: LowerContext, node: Node, x: relax.Expr, w: np.ndarray, bias: np.ndarray | None) -> relax.Expr:
    """``x [..., K] @ w.T + bias`` with ``w [N, K]`` through the packed GEMM."""
    out, k = w.shape
    packed = dense_cpu.pack_panels(w)
    blocks = packed.shape[0]
    b = np.zeros(blocks * dense_cpu.LANES, np.float32)
    if bias is not None:
        b[:out] = bias
    shape, rows, _ = _rows(ctx, node.inputs[0])
    lead = shape[:-1]
    x2 = ctx.emit(op.reshape(x, (rows, k)))
    gv = ctx.bb.add_func(dense_cpu.dense_func(k, blocks, 1, dense_knobs(rows, k, blocks, 1)), "dense_packed_f32")
    y = ctx.emit(
        relax.op.call_tir(
            gv, [x2, relax.const(packed), relax.const(b)], out_ty=relax.TensorType((rows, blocks * 16), "float32")
        )
    )
    if blocks * dense_cpu.LANES != out:
        y = ctx.emit(op.strided_slice(y, axes=[1], begin=[0], end=[out]))
    return ctx.emit(op.reshape(y, [*lead, out]))


def dense_knobs(rows, k: int, blocks: int, batches: int) -> dict | None:
    """The GEMM's knobs from the tuning database (``codegen/tvm/knobs.py``); None (the default) for symbolic rows."""
    if not isinstance(rows, int):
        return None
    return knob_db.choose("dense_f32", {"rows": rows, "k": k, "blocks": blocks, "batches": batches})


def dense_linear(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr | None:
    w = _constant_f32(node, 1)
    usable, bias = _optional_bias(node)
    if not enabled() or w is None or w.ndim != 2 or node.inputs[0].dtype != "float32" or not usable:
        return None
    return _dense(ctx, node, x, w, bias)


def dense_matmul(ctx: LowerContext, node: Node, a: relax.Expr) -> relax.Expr | None:
    b = _constant_f32(node, 1)
    if not enabled() or b is None or b.ndim != 2 or node.inputs[0].dtype != "float32" or node.inputs[0].type.rank < 2:
        return None
    return _dense(ctx, node, a, np.ascontiguousarray(b.T), None)


def _pad_last(b: te.Tensor, width: int) -> te.Tensor:
    n = b.shape[-1]
    zero = tirx.const(0, b.dtype)
    return te.compute(
        (*b.shape[:-1], width),
        lambda i, kk, j: tirx.if_then_else(j < n, b[i, kk, tirx.min(j, n - 1)], zero),
        name="bmm_pad",
    )


@dataclass(frozen=True)
class SoftmaxRows:
    """A softmax input held as ``[rows, stride]`` (rows padded to whole vectors), still to be scaled."""

    stride: int
    scale: float


def _scaled_softmax_reader(ctx: LowerContext, node: Node) -> tuple[Value, float, Node | None] | None:
    """``(softmax input, scale, mul or None)`` when ``node``'s output is read only by a last-axis
    softmax, directly or through one multiply by a positive scalar constant (attention's
    ``softmax(q k^T * d^-1/2)``); else None."""
    value, scale, mul = node.outputs[0], 1.0, None
    reader = ctx.only_reader(value)
    if reader is not None and reader.op == "mul":
        other = reader.inputs[1] if reader.inputs[0] is value else reader.inputs[0]
        if not (other.is_constant and other.data.size == 1 and other.dtype == "float32"):
            return None
        scale, mul, value = float(other.data.reshape(())), reader, reader.outputs[0]
        if reader.outputs[0].shape != node.outputs[0].shape or not scale > 0:
            return None
        reader = ctx.only_reader(value)
    if reader is None or reader.op != "softmax" or not softmax_input_ok(reader):
        return None
    return value, scale, mul


def softmax_input_ok(node: Node) -> bool:
    """Whether the softmax kernel runs ``node``: fp32, last axis, static row length."""
    value = node.inputs[0]
    return (
        enabled()
        and value.dtype == "float32"
        and value.type.rank >= 1
        and node.attrs["axis"] in (-1, value.type.rank - 1)
        and isinstance(value.shape[-1], int)
    )


def batch_matmul(ctx: LowerContext, node: Node, a: relax.Expr, b: relax.Expr) -> relax.Expr | None:
    """``matmul`` of two fp32 activations of rank >= 3 with equal batch dims and static ``M, K, N``."""
    va, vb = node.inputs[0], node.inputs[1]
    if not enabled() or va.is_constant or vb.is_constant or va.dtype != "float32" or vb.dtype != "float32":
        return None
    if va.type.rank < 3 or va.type.rank != vb.type.rank or list(va.shape[:-2]) != list(vb.shape[:-2]):
        return None
    m, k = va.shape[-2:]
    k2, n = vb.shape[-2:]
    if not all(isinstance(d, int) and d > 0 for d in (m, k, n)) or k != k2:
        return None
    lead = ctx.shape(va)[:-2]
    batch = product(lead)
    a3 = ctx.emit(op.reshape(a, (batch, m, k)))
    b3 = ctx.emit(op.reshape(b, (batch, k, n)))
    width = batch_matmul_cpu.padded_width(n)
    if width != n:
        b3 = ctx.te(_pad_last, b3, width, name="bmm_pad")
    gv = ctx.bb.add_func(batch_matmul_cpu.batch_matmul_func(m, k, width), "batch_matmul_f32")
    y = ctx.emit(relax.op.call_tir(gv, [a3, b3], out_ty=relax.TensorType((batch, m, width), "float32")))
    softmax_input = _scaled_softmax_reader(ctx, node)
    if softmax_input is not None:  # the softmax kernel crops the padded rows and applies the scale
        value, scale, mul = softmax_input
        if mul is not None:
            ctx.fused[mul] = [ABSORBED]
        ctx.padded[value] = (ctx.emit(op.reshape(y, (batch * m, width))), SoftmaxRows(width, scale))
        return ABSORBED
    if width != n:
        y = ctx.emit(op.strided_slice(y, axes=[2], begin=[0], end=[n]))
    return ctx.emit(op.reshape(y, [*lead, m, n]))


def layer_norm(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr | None:
    """fp32 LayerNorm over the last axis (static length) with constant (or absent) affine parameters."""
    value = node.inputs[0]
    if not enabled() or value.dtype != "float32" or value.type.rank < 1 or not isinstance(value.shape[-1], int):
        return None
    if node.attrs["axis"] % value.type.rank != value.type.rank - 1:
        return None
    d = value.shape[-1]
    params = []
    for index, default in ((1, 1.0), (2, 0.0)):
        present = len(node.inputs) > index and node.inputs[index] is not None
        data = _constant_f32(node, index) if present else np.full(d, default, np.float32)
        if data is None:
            return None
        params.append(relax.const(np.ascontiguousarray(data.reshape(d))))
    shape, rows, _ = _rows(ctx, value)
    x2 = ctx.emit(op.reshape(x, (rows, d)))
    gv = ctx.bb.add_func(layer_norm_cpu.layer_norm_func(d, float(node.attrs["eps"])), "layer_norm_f32")
    y = ctx.emit(relax.op.call_tir(gv, [x2, *params], out_ty=relax.TensorType((rows, d), "float32")))
    return ctx.emit(op.reshape(y, shape))


def softmax(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr | None:
    """fp32 softmax over the last axis (static length) through the three-pass row kernel."""
    value = node.inputs[0]
    if not softmax_input_ok(node):
        return None
    shape, rows, n = _rows(ctx, value)
    if value in ctx.padded:  # a matmul's padded output, scale not yet applied
        x2, layout = ctx.padded[value]
        func = softmax_cpu.softmax_func(n, layout.stride, layout.scale)
    else:
        x2, func = ctx.emit(op.reshape(x, (rows, n))), softmax_cpu.softmax_func(n)
    gv = ctx.bb.add_func(func, "softmax_f32")
    y = ctx.emit(relax.op.call_tir(gv, [x2, x2], out_ty=relax.TensorType((rows, n), "float32")))
    return ctx.emit(op.reshape(y, shape))


def _padded_flat(ctx: LowerContext, x: relax.Expr, shape: list, pads, grid_rows: int, row: int) -> relax.Expr:
    """The zero padded image as ``[n, c, grid_rows * row]``: a 4-D copy (``pad_rows``), then a view."""
    padded = ctx.te(conv2d_cpu.pad_rows, x, pads, grid_rows, name="conv_pad_rows")
    return ctx.emit(op.reshape(padded, (shape[0], shape[1], grid_rows * row)))


def _gelu_erf(x: te.Tensor) -> te.Tensor:
    """``0.5 x (1 + erf(x / sqrt2))`` with the vectorizable ``erf`` of ``fast_math``."""
    return te.compute(x.shape, lambda *i: gelu_f32(x[i]), "gelu")


def _gelu_tanh(x: te.Tensor) -> te.Tensor:
    """The tanh GELU with the polynomial ``exp`` of ``fast_math`` (``fast_math.gelu_tanh_f32``)."""
    return te.compute(x.shape, lambda *i: gelu_tanh_f32(x[i]), "gelu_tanh")


def tanh(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr | None:
    """fp32 ``tanh`` with the vectorizable polynomial of ``fast_math`` (GPT-2's tanh GELU, written out)."""
    if not enabled() or node.inputs[0].dtype != "float32":
        return None
    return ctx.te(lambda t: te.compute(t.shape, lambda *i: tanh_f32(t[i]), "tanh"), x, name="tanh")


def sigmoid(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr | None:
    """fp32 ``1 / (1 + e^-x)`` with the polynomial ``exp`` (a few ulp, relative, also near 0 and 1):
    libm's ``expf`` is one call per element (PP-OCR det's 320x320 probability map: 1.2 ms)."""
    if not enabled() or node.inputs[0].dtype != "float32":
        return None
    one = tirx.const(1, "float32")
    return ctx.te(lambda t: te.compute(t.shape, lambda *i: one / (one + exp_f32(-t[i])), "sigmoid"), x, name="sigmoid")


def gelu(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr | None:
    """fp32 GELU (exact or tanh) with polynomial ``erf`` / ``exp`` that vectorize (libm's do not)."""
    if not enabled() or node.inputs[0].dtype != "float32":
        return None
    fn = _gelu_tanh if node.attrs["approximate"] == "tanh" else _gelu_erf
    return ctx.te(fn, x, name=fn.__name__.lstrip("_"))


def _prefer_ocvec(oc: int, out_hw: tuple[int, int], stride, dilation, row: int) -> bool:
    """Whether the output-channel-vectorized kernel does less work than the pixel-vectorized one.

    Work is counted in computed (pixel, channel) pairs over the register-tile efficiency; the pixel
    kernel computes the padded grid rounded to whole vectors (and a strided conv adds an im2col copy).
    ``RESHIFT_CONV=pixel|ocvec`` forces one (for comparisons).
    """
    forced = os.environ.get("RESHIFT_CONV", "")
    tile = conv2d_ocvec_cpu.choose_tile(oc, out_hw[1])
    if forced in ("pixel", "ocvec"):
        return forced == "ocvec" and tile is not None
    if tile is None:
        return False
    oh, ow = out_hw
    pt, vo = tile
    width = conv2d_ocvec_cpu.LANES * vo
    ocvec = oh * ow * (-(-oc // width) * width) / min(1.0, pt * vo / 12)
    direct = stride == (1, 1) and dilation[0] == dilation[1]
    panels, pixels = conv2d_cpu.pixel_tile(oh * (row if direct else ow))
    rt = conv2d_cpu.oc_tile(panels)
    pixel = pixels * (-(-oc // rt) * rt) / conv2d_cpu.tile_efficiency(panels) * (1.0 if direct else 1.1)
    return ocvec < pixel


@dataclass(frozen=True)
class _Conv:
    """A conv2d node the CPU kernels can run: constant fp32 filter, groups=1, static spatial size."""

    node: Node
    shape: list  # input [n, c, h, w]; n may be symbolic
    w: np.ndarray
    bias: np.ndarray | None
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilation: tuple[int, int]
    out_hw: tuple[int, int]

    @property
    def ocvec(self) -> bool:
        """Whether the output-channel-vectorized kernel runs this conv (see :func:`_prefer_ocvec`)."""
        row = self.shape[3] + self.pads[1] + self.pads[3]
        return _prefer_ocvec(self.w.shape[0], self.out_hw, self.stride, self.dilation, row)

    @property
    def winograd(self) -> bool:
        """Whether Winograd F(2x2, 3x3) runs this (ocvec-routed) conv: 3x3, stride 1, channels in
        whole vectors, even output; ``RESHIFT_CONV=ocvec`` forces the direct kernel (comparisons)."""
        oc, channels = self.w.shape[:2]
        if os.environ.get("RESHIFT_CONV", "") == "ocvec":
            return False
        return winograd.applies(self.w.shape[2:], self.stride, self.dilation, channels, oc, self.out_hw)

    @property
    def input_layout(self) -> conv2d_ocvec_cpu.OutputLayout:
        """The zero padded image the ocvec kernel reads (what a producer may write directly)."""
        top, left, bottom, right = self.pads
        h, w = self.shape[2:]
        return conv2d_ocvec_cpu.OutputLayout(top, left, w + left + right, h + top + bottom)


def _cpu_conv(ctx: LowerContext, node: Node) -> _Conv | None:
    """``node`` as a :class:`_Conv`, or None when the CPU kernels do not apply."""
    w = _constant_f32(node, 1)
    attrs = node.attrs
    if node.op != "conv2d" or not enabled() or w is None or attrs["groups"] != 1 or node.inputs[0].dtype != "float32":
        return None
    shape = ctx.shape(node.inputs[0])
    usable, bias = _optional_bias(node)
    if not all(isinstance(d, int) for d in shape[1:]) or not usable:
        return None
    out_hw = tuple(int(d) for d in node.outputs[0].shape[2:])
    return _Conv(
        node, shape, w, bias, tuple(attrs["stride"]), tuple(attrs["padding"]), tuple(attrs["dilation"]), out_hw
    )


@dataclass(frozen=True)
class _Epilogue:
    """The nodes after an fp32 conv its kernel computes: ``conv [-> add(., residual)] [-> relu]``
    (ResNet's block end, or a plain conv + ReLU), each the only reader of the previous value."""

    add: Node | None
    residual: Value | None
    relu: Node | None
    value: Value  # what the kernel's output is: the last node's output, or the conv's

    @property
    def nodes(self) -> list[Node]:
        return [n for n in (self.add, self.relu) if n is not None]


def _epilogue(ctx: LowerContext, conv: _Conv) -> _Epilogue:
    """``RESHIFT_CONV_RESIDUAL=0`` leaves the add a separate op (``benchmarks/conv_epilogue.py``'s A/B)."""
    value, add, residual = conv.node.outputs[0], None, None
    fuse = os.environ.get("RESHIFT_CONV_RESIDUAL", "1") != "0"
    found = ctx.residual_add(value) if fuse else None
    if found is not None:
        (add, residual), value = found, found[0].outputs[0]
    relu = ctx.relu_of(value)
    return _Epilogue(add, residual, relu, relu.outputs[0] if relu is not None else value)


def _padded_consumers(ctx: LowerContext, value: Value) -> conv2d_ocvec_cpu.OutputLayout | None:
    """The padded input layout when ``value`` is read only by ocvec convs that all want the same one."""
    readers = ctx.users.get(value, [])
    if not readers or value in ctx.graph_outputs:
        return None
    layouts = set()
    for node in readers:
        consumer = _cpu_conv(ctx, node)
        if consumer is None or not consumer.ocvec or node.inputs[0] is not value or value in node.inputs[1:]:
            return None
        layouts.add(consumer.input_layout)
    return layouts.pop() if len(layouts) == 1 else None


def _winograd(
    ctx: LowerContext, conv: _Conv, src: relax.Expr, b: np.ndarray, out, relu: bool, res: relax.Expr | None
) -> relax.Expr:
    """The three Winograd F(2x2, 3x3) kernels of ``conv2d_winograd_cpu.py`` on the padded input ``src``;
    the output transform adds ``res`` (a residual, ``[n, oc, oh*ow]``) when given."""
    n, channels = conv.shape[0], conv.shape[1]
    width = b.shape[0]
    (oh, ow), layout = conv.out_hw, conv.input_layout
    tiles = (oh // winograd.TILE, ow // winograd.TILE)
    rows = n * tiles[0] * tiles[1]
    gv_in = ctx.bb.add_func(winograd.input_transform_func(channels, layout.row, layout.plane, tiles), "winograd_input")
    v = ctx.emit(relax.op.call_tir(gv_in, [src, src], out_ty=relax.TensorType((16, rows, channels), "float32")))
    blocks = width // dense_cpu.LANES
    gemm = dense_cpu.dense_func(channels, blocks, 16, dense_knobs(rows, channels, blocks, 16))
    gv_gemm = ctx.bb.add_func(gemm, "winograd_gemm")
    u, zero = relax.const(winograd.transformed_filters(conv.w)), relax.const(np.zeros((16, width), np.float32))
    m = ctx.emit(relax.op.call_tir(gv_gemm, [v, u, zero], out_ty=relax.TensorType((16, rows, width), "float32")))
    out = out or conv2d_ocvec_cpu.OutputLayout.plain(oh, ow)
    func = winograd.output_transform_func(width, tiles, (oh, ow), out, relu, residual=res is not None)
    bias = relax.const(b)
    return ctx.emit(
        relax.op.call_tir(
            ctx.bb.add_func(func, "winograd_output"),
            [m, bias, bias if res is None else res],  # the kernel does not read an absent residual
            out_ty=relax.TensorType((n, width, out.plane), "float32"),
        )
    )


def _conv2d_ocvec(ctx: LowerContext, conv: _Conv, x: relax.Expr) -> relax.Expr:
    """The ocvec kernel; it reads a producer's padded output when there is one, computes the
    residual add and ReLU after it (:func:`_epilogue`) and, when its readers allow, writes their
    padded input, leaving the plain output unmaterialized."""
    channels, h, wd = conv.shape[1:]
    oc, _, kh, kw = conv.w.shape
    pt, vo = conv2d_ocvec_cpu.choose_tile(oc, conv.out_hw[1])
    width = -(-oc // (conv2d_ocvec_cpu.LANES * vo)) * conv2d_ocvec_cpu.LANES * vo
    layout = conv.input_layout
    if conv.node.inputs[0] in ctx.padded:
        src, written = ctx.padded[conv.node.inputs[0]]
        assert written == layout, (written, layout)
    else:
        src = _padded_flat(ctx, x, conv.shape, conv.pads, layout.grid_rows, layout.row)
    # whole channel vectors only: otherwise the output is sliced to ``oc`` after the kernel
    epi = _epilogue(ctx, conv) if width == oc else _Epilogue(None, None, None, conv.node.outputs[0])
    relu = epi.relu
    out = _padded_consumers(ctx, epi.value) if width == oc else None
    plane = out.plane if out is not None else conv.out_hw[0] * conv.out_hw[1]
    n, (oh, ow) = conv.shape[0], conv.out_hw
    res = None if epi.add is None else ctx.emit(op.reshape(ctx.env[epi.residual], (n, oc, oh * ow)))
    if not conv.winograd and isinstance(conv.shape[0], int):  # the tuned tile keeps ``width`` (check_knobs)
        key = conv2d_ocvec_cpu.shape_key(
            conv.shape[0], channels, (kh, kw), conv.stride, conv.dilation, layout.row, layout.plane, conv.out_hw, oc,
            out or conv2d_ocvec_cpu.OutputLayout.plain(*conv.out_hw), relu is not None, res is not None,
        )  # fmt: skip
        chosen = knob_db.choose("conv2d_ocvec_f32", key)
        pt, vo = chosen["pt"], chosen["vo"]
    oc_blocks = -(-oc // (conv2d_ocvec_cpu.LANES * vo))
    b = np.zeros(width, np.float32)
    if conv.bias is not None:
        b[:oc] = conv.bias
    if conv.winograd:
        y = _winograd(ctx, conv, src, b, out, relu is not None, res)
    else:
        func = conv2d_ocvec_cpu.conv_ocvec_func(
            channels,
            (kh, kw),
            conv.stride,
            conv.dilation,
            layout.row,
            layout.plane,
            conv.out_hw,
            oc_blocks,
            pt,
            vo,
            out,
            relu is not None,
            res is not None,
        )
        bias = relax.const(b)
        y = ctx.emit(
            relax.op.call_tir(
                ctx.bb.add_func(func, "conv2d_ocvec_f32"),
                [src, relax.const(conv2d_ocvec_cpu.pack_filters(conv.w, vo)), bias, bias if res is None else res],
                out_ty=relax.TensorType((n, width, plane), "float32"),
            )
        )
    if out is not None:
        for node in epi.nodes:
            ctx.fused[node] = [ABSORBED]
        ctx.padded[epi.value] = (y, out)
        return ABSORBED
    if width != oc:
        y = ctx.emit(op.strided_slice(y, axes=[1], begin=[0], end=[oc]))
    y = ctx.emit(op.reshape(y, (n, oc, oh, ow)))
    if not epi.nodes:
        return y
    for node in epi.nodes:  # the conv's and the add's outputs are never materialized
        ctx.fused[node] = [y if node is epi.nodes[-1] else ABSORBED]
    return ABSORBED


def conv2d(ctx: LowerContext, node: Node, x: relax.Expr) -> relax.Expr | None:
    """groups=1 fp32 conv with a constant filter and static spatial size, or a depthwise one
    (``depthwise_cpu``); else ``None``."""
    if node.attrs["groups"] != 1:
        from reshift.codegen.tvm.kernels import depthwise_cpu  # it imports this module

        return depthwise_cpu.depthwise_conv2d(ctx, node, x)
    conv = _cpu_conv(ctx, node)
    if conv is None:
        return None
    if conv.ocvec:
        return _conv2d_ocvec(ctx, conv, x)
    shape, w, bias, stride, pads, dilation = conv.shape, conv.w, conv.bias, conv.stride, conv.pads, conv.dilation
    channels, h, wd = shape[1:]
    oc, _, kh, kw = w.shape
    oh, ow = conv.out_hw
    direct = stride == (1, 1) and dilation[0] == dilation[1]
    row = wd + pads[1] + pads[3] if direct else ow
    panels, pixels = conv2d_cpu.pixel_tile(oh * row)
    rt = conv2d_cpu.oc_tile(panels)
    packed = conv2d_cpu.pack_filters(w, rt)
    oc_blocks = packed.shape[0]
    b = np.zeros(oc_blocks * rt, np.float32)
    if bias is not None:
        b[:oc] = bias
    if direct:  # implicit GEMM over the padded, flattened image
        d = dilation[0]
        needed = max((h + pads[0] + pads[2]) * row, (kh - 1) * d * row + (kw - 1) * d + pixels)
        grid_rows = -(-needed // row)
        plane = grid_rows * row
        src = _padded_flat(ctx, x, shape, pads, grid_rows, row)
        args = (channels, kh, kw, d, row, plane, pixels, oc_blocks, panels, rt)
    else:  # im2col, then the same kernel with a 1x1 filter
        wp = wd + pads[1] + pads[3]
        plane = (h + pads[0] + pads[2]) * wp
        flat = _padded_flat(ctx, x, shape, pads, h + pads[0] + pads[2], wp)
        copy = conv2d_cpu.im2col_func(channels, (kh, kw), stride, dilation, wp, plane, (oh, ow), pixels)
        gv_col = ctx.bb.add_func(copy, "conv_im2col_f32")
        src = ctx.emit(
            relax.op.call_tir(
                gv_col, [flat], out_ty=relax.TensorType((shape[0], channels * kh * kw, pixels), "float32")
            )
        )
        args = (channels * kh * kw, 1, 1, 1, row, pixels, pixels, oc_blocks, panels, rt)
    gv = ctx.bb.add_func(conv2d_cpu.conv_gemm_func(*args), "conv2d_packed_f32")
    y = ctx.emit(
        relax.op.call_tir(
            gv,
            [src, relax.const(packed), relax.const(b)],
            out_ty=relax.TensorType((shape[0], oc_blocks * rt, pixels), "float32"),
        )
    )
    return ctx.te(conv2d_cpu.crop, y, oc, (oh, ow), row, name="conv_crop")
