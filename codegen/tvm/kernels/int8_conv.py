"""``int8_conv2d`` (``ir/ops_quant.py``) on the CPU: an implicit-GEMM VNNI kernel, and a portable fallback.

VNNI (x86 with AVX-512 VNNI), two hand-written TIR functions:

* ``quantize_pad_func``: ``x`` NCHW float32 -> ``q [N, Hp, Wp, Cp]`` uint8, channel-last and zero
  padded: the border holds the code ``z`` of ``0.0`` (so it adds nothing once the zero point is
  corrected), channels past ``C`` up to ``Cp = 4 * ceil(C/4)`` hold 0 (their weights are 0). One
  output row per job, 16 pixels of a channel quantized at once and scattered ``Cp`` bytes apart.
  It also writes ``bad [N, Hp]`` (1 where an input row holds a NaN) for the NaN-image rule.
* ``conv_gemm_func``: the GEMM of ``int8_fused.gemm_rescale_func`` with the activation rows taken
  in place from ``q`` (implicit GEMM: the K axis is ``(kh, kw, c)``, so each tap reads ``Cp``
  contiguous bytes of one input pixel; stride and dilation are index arithmetic). A register tile is
  ``R`` output pixels of one output row x ``V`` 16-channel panels; the epilogue
  ``float32(acc - z * sum wq) * (s_n * w_scale) + bias`` (``vmulps {rn-sae}``, never an FMA) is
  stored straight into the NCHW output, 16 channels ``OH*OW`` apart.

Epilogue fusion (``_epilogue_chain``): a ReLU reading only the conv's output is applied in registers
(``y < 0 ? 0 : y``, NaN kept as numpy's maximum keeps it); when the next reader is another VNNI
``int8_conv2d``, the kernel quantizes for it and writes its channel-last padded input directly
(16 contiguous bytes per pixel and panel, border included), with its NaN rows: no float tensor
exists between the two convs, and the values are those of the unfused ops, bit for bit.

Weights are packed ``[O/16, KH*KW*Cp/4, 16, 4]`` int8 (``int8_gemm.pack_weights`` of the
``[O, KH, KW, Cp]`` filter). On aarch64 with the dot product (``arm64-dotprod``) a dense conv is an
im2col of uint8 codes into ``int8_gemm.gemm_sdot_func``. Other targets run the portable form: the
quantized codes minus ``z`` as int32, Relax's int32 ``conv2d``, then the same float32 rescale
(bit-exact, not fast).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax, te, tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.kernels.int8_fused import ROUND_NEAREST
from reshift.codegen.tvm.kernels.int8_gemm import (
    ROWS,
    channel_vector,
    has_sdot,
    has_vnni,
    pack_weights,
    quantized_code,
    sdot_gemm,
)
from reshift.codegen.tvm.lower import ABSORBED, LowerContext, lowering, op, scalar
from reshift.codegen.tvm.targets import current_target_is_gpu
from reshift.errors import CodegenError
from reshift.ir.graph import Node
from reshift.ir.ops_quant import DIAG_LIMIT

LANES = 16
ACCUMULATORS = 14  # R*V int32x16 accumulators (see int8_fused.ACCUMULATORS)
DW_PIXELS = 14  # output pixels per depthwise register tile (one int32x16 accumulator each)


def conv_tile(blocks: int) -> tuple[int, int]:
    """``(R, V)``: output pixels and 16-channel panels per register tile (``V`` divides ``blocks``)."""
    panels = next(v for v in (2, 1) if blocks % v == 0)
    return ACCUMULATORS // panels, panels


def is_depthwise(codes: np.ndarray, groups: int) -> bool:
    """One input channel per group and one filter per channel (``groups == C == O``)."""
    return groups > 1 and codes.shape[1] == 1 and codes.shape[0] == groups


def job_tile(blocks: int, depthwise: bool) -> tuple[int, int]:
    """``(R, V)`` of :func:`conv_tile`; a depthwise tile is one 16-channel panel of ``DW_PIXELS`` pixels."""
    return (DW_PIXELS, 1) if depthwise else conv_tile(blocks)


def pack_depthwise_weights(codes: np.ndarray) -> np.ndarray:
    """``int8 [C, 1, KH, KW]`` -> ``int32 [KH*KW, C]``: per tap, the channels contiguous (one vector per panel)."""
    c, _, kh, kw = codes.shape
    return np.ascontiguousarray(codes.reshape(c, kh * kw).T.astype(np.int32))


def pack_conv_weights(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """``int8 [O, C, KH, KW]`` -> (packed ``[O/16, KH*KW*Cp/4, 16, 4]``, ``Cp``)."""
    out, c, kh, kw = codes.shape
    cp = -(-c // 4) * 4
    full = np.zeros((out, kh, kw, cp), np.int8)
    full[:, :, :, :c] = codes.transpose(0, 2, 3, 1)
    return pack_weights(full.reshape(out, kh * kw * cp)), cp


def quantize_pad_func(c: int, h: int, w: int, cp: int, pads: tuple[int, int, int, int], bits: int) -> tirx.PrimFunc:
    """``x [N, c, h, w]`` -> ``q [N, Hp, Wp, cp]`` uint8 and ``bad [N, Hp]`` float32 (see module docstring);
    ``params [2]`` holds ``(float32(x_scale), z)``."""
    top, left, bottom, right = pads
    hp, wp = h + top + bottom, w + left + right
    qmax = float(2**bits - 1)
    w_vec = w - w % LANES

    @T.prim_func(private=True)
    def quantize_pad(x_h: T.handle, params: T.Buffer((2,), "float32"), q_h: T.handle, bad_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(x_h, (n, c, h, w), "float32")
        q = T.match_buffer(q_h, (n, hp, wp, cp), "uint8")
        bad = T.match_buffer(bad_h, (n, hp), "float32")
        xf = T.decl_buffer((n * c * h * w,), "float32", data=x.data)
        qf = T.decl_buffer((n * hp * wp * cp,), "uint8", data=q.data)
        for job in T.parallel(n * hp):
            img = job // hp
            row = job % hp
            flag = T.alloc_buffer((LANES,), "int32", scope="global")
            flag[T.Ramp(0, 1, LANES)] = T.Broadcast(T.int32(0), LANES)
            zq = T.Cast("uint8", params[1])
            base = job * (wp * cp)
            if row < top or row >= top + h:
                for i in range(wp * cp):
                    qf[base + i] = T.Select(i % cp < c, zq, T.uint8(0))
            else:
                for px in range(left):
                    for ch in range(cp):
                        qf[base + px * cp + ch] = T.Select(ch < c, zq, T.uint8(0))
                for px in range(left + w, wp):
                    for ch in range(cp):
                        qf[base + px * cp + ch] = T.Select(ch < c, zq, T.uint8(0))
                for px in range(left, left + w):
                    for ch in range(c, cp):
                        qf[base + px * cp + ch] = T.uint8(0)
                for ch in range(c):
                    src = ((img * c + ch) * h + row - top) * w
                    for wv in range(w_vec // LANES):
                        v = xf[T.Ramp(src + wv * LANES, 1, LANES)]
                        nanv = T.isnan(v)
                        flag[T.Ramp(0, 1, LANES)] = T.max(flag[T.Ramp(0, 1, LANES)], T.Cast("int32x16", nanv))
                        clean = T.Select(nanv, T.Broadcast(T.float32(0), LANES), v)
                        t = T.nearbyint(clean / T.Broadcast(params[0], LANES)) + T.Broadcast(params[1], LANES)
                        t = T.max(T.min(t, T.Broadcast(T.float32(qmax), LANES)), T.Broadcast(T.float32(0), LANES))
                        qf[T.Ramp(base + (left + wv * LANES) * cp + ch, cp, LANES)] = T.Cast("uint8x16", t)
                    for px1 in range(w_vec, w):
                        v1 = xf[src + px1]
                        if T.isnan(v1):
                            flag[0] = 1
                        clean1 = T.Select(T.isnan(v1), T.float32(0), v1)
                        t1 = T.nearbyint(clean1 / params[0]) + params[1]
                        t1 = T.max(T.min(t1, T.float32(qmax)), T.float32(0))
                        qf[base + (left + px1) * cp + ch] = T.Cast("uint8", t1)
            bad[img, row] = T.float32(0)
            for l in range(LANES):
                bad[img, row] = T.max(bad[img, row], T.Cast("float32", flag[l]))

    return quantize_pad


@dataclass(frozen=True)
class Requantize:
    """The next ``int8_conv2d``'s input layout, which a conv kernel writes instead of its float output:
    ``q [N, Hp, Wp, C]`` with the border ``(top, left)`` and ``(Hp, Wp)``, ``bits``, and ``params``
    ``(float32(x_scale), z)`` of that conv."""

    top: int
    left: int
    hp: int
    wp: int
    bits: int


@dataclass(frozen=True)
class QuantizedInput:
    """The layout of a ``ctx.padded`` value held only as the quantized padded input of the conv reading
    it (written by its producer's ``conv_gemm_func(requant=...)``): ``bad [N, OH, tiles]`` > 0 where a
    row of the image holds a NaN."""

    bad: relax.Expr
    bad_shape: tuple


def conv_gemm_func(
    geometry: tuple[int, int, int, int, int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    blocks: int,
    out: int,
    relu: bool = False,
    requant: Requantize | None = None,
    depthwise: bool = False,
    diagonal: bool = False,
) -> tirx.PrimFunc:
    """``y [N, out, OH, OW]`` float32 from ``q [N, Hp, Wp, Cp]`` and packed weights (see module docstring).
    ``geometry`` is ``(Hp, Wp, Cp, OH, OW, z)``; ``info [N, 1]`` holds ``s_n`` (NaN for an image with a NaN).
    ``relu`` applies ``y < 0 ? 0 : y`` (NaN stays NaN, as numpy's maximum); with ``requant`` the kernel
    writes the next conv's quantized padded input and its NaN rows ``bad [N, OH, tiles]`` instead of ``y``.
    ``depthwise`` (``cp == out``, weights ``int32 [KH*KW, out]`` of :func:`pack_depthwise_weights`): each
    channel's taps summed in int32 lanes (``zext(q) * w``), one 16-channel panel and ``DW_PIXELS`` pixels
    per register tile, the same epilogues. ``diagonal`` (dense, ``cp == out``): ``diag [width]`` int32
    codes times each output pixel's centre-tap input byte of the same channel, added to the accumulators
    (``wsum`` holds them too); without it ``diag`` is not read."""
    hp, wp, cp, oh, ow, zero_point = geometry
    kh, kw = kernel
    s0, s1 = stride
    d0, d1 = dilation
    c4 = cp // 4
    k4 = kh * kw * c4
    width = blocks * LANES
    rows_tile, panels = job_tile(blocks, depthwise)
    tiles = blocks // panels
    if (depthwise or diagonal) and cp != width:
        raise CodegenError(f"int8 depthwise / diagonal conv: {cp} input channels for {width} outputs")
    # the activation view the accumulate macro reads and the weight buffer (dense: 4 channel bytes per int32)
    a_dtype, a_div = ("uint8", 1) if depthwise else ("int32", 4)
    w_shape, w_dtype = ((kh * kw, width), "int32") if depthwise else ((blocks, k4, LANES, 4), "int8")
    w_size = int(np.prod(w_shape))
    lanes = T.Ramp(0, 1, LANES)
    dpbusd = "llvm.x86.avx512.vpdpbusd.512"
    mul_rn = "llvm.x86.avx512.mul.ps.512"
    plane = oh * ow
    full_tiles = ow // rows_tile
    jobs_per_image = oh * tiles

    @T.macro
    def accumulate(acc, nrows, a, w64, img, r_out, p0, t, a8, diag):
        for r in T.unroll(nrows):
            for v in T.unroll(panels):
                acc[r, v, lanes] = T.Broadcast(T.int32(0), LANES)
        for i in range(kh):
            for j in range(kw):
                for cc in range(c4):
                    for r in T.unroll(nrows):
                        for v in T.unroll(panels):
                            acc[r, v, lanes] = T.call_llvm_pure_intrin(
                                "int32x16",
                                dpbusd,
                                acc[r, v, lanes],
                                T.reinterpret(
                                    "int8x64",
                                    T.Broadcast(
                                        a[((img * hp + r_out * s0 + i * d0) * wp + (p0 + r) * s1 + j * d1) * c4 + cc],
                                        LANES,
                                    ),
                                ),
                                w64[
                                    T.Ramp(((t * panels + v) * k4 + (i * kw + j) * c4 + cc) * (LANES * 4), 1, LANES * 4)
                                ],
                            )
        if diagonal:
            for r in T.unroll(nrows):
                for v in T.unroll(panels):
                    ch0 = (t * panels + v) * LANES
                    ctr = ((img * hp + r_out * s0 + kh // 2 * d0) * wp + (p0 + r) * s1 + kw // 2 * d1) * cp + ch0
                    acc[r, v, lanes] = (
                        acc[r, v, lanes] + T.Cast("int32x16", a8[T.Ramp(ctr, 1, LANES)]) * diag[T.Ramp(ch0, 1, LANES)]
                    )

    @T.macro
    def accumulate_depthwise(acc, nrows, a, w64, img, r_out, p0, t, a8, diag):
        for r in T.unroll(nrows):
            acc[r, 0, lanes] = T.Broadcast(T.int32(0), LANES)
        for i in range(kh):
            for j in range(kw):
                for r in T.unroll(nrows):
                    pixel = ((img * hp + r_out * s0 + i * d0) * wp + (p0 + r) * s1 + j * d1) * cp + t * LANES
                    acc[r, 0, lanes] = (
                        acc[r, 0, lanes]
                        + T.Cast("int32x16", a[T.Ramp(pixel, 1, LANES)])
                        * w64[T.Ramp((i * kw + j) * width + t * LANES, 1, LANES)]
                    )

    accumulate_tile = accumulate_depthwise if depthwise else accumulate

    @T.macro
    def rescale(fv, acc, r, v, corr, mult, bias, t):
        fv[lanes] = (
            T.call_llvm_pure_intrin(
                "float32x16",
                mul_rn,
                T.Cast("float32x16", acc[r, v, lanes] - corr[v, lanes]),
                mult[v, lanes],
                T.int32(ROUND_NEAREST),
            )
            + bias[T.Ramp((t * panels + v) * LANES, 1, LANES)]
        )
        if relu:
            fv[lanes] = T.Select(
                fv[lanes] < T.Broadcast(T.float32(0), LANES), T.Broadcast(T.float32(0), LANES), fv[lanes]
            )

    @T.macro
    def constants(corr, mult, info, wsum, w_scale, img, t):
        for v in T.unroll(panels):
            corr[v, lanes] = T.Broadcast(T.int32(zero_point), LANES) * wsum[T.Ramp((t * panels + v) * LANES, 1, LANES)]
            mult[v, lanes] = T.Broadcast(info[img, 0], LANES) * w_scale[T.Ramp((t * panels + v) * LANES, 1, LANES)]

    if requant is None:

        @T.prim_func(private=True)
        def conv_gemm(
            q_h: T.handle,
            info_h: T.handle,
            w: T.Buffer(w_shape, w_dtype),
            wsum: T.Buffer((width,), "int32"),
            w_scale: T.Buffer((width,), "float32"),
            bias: T.Buffer((width,), "float32"),
            diag: T.Buffer((width,), "int32"),
            y_h: T.handle,
        ):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            n = T.int64()
            q8 = T.match_buffer(q_h, (n, hp, wp, cp), "uint8")
            info = T.match_buffer(info_h, (n, 1), "float32")
            y = T.match_buffer(y_h, (n, out, oh, ow), "float32")
            a = T.decl_buffer((n * hp * wp * cp // a_div,), a_dtype, data=q8.data)
            a8 = T.decl_buffer((n * hp * wp * cp,), "uint8", data=q8.data)
            w64 = T.decl_buffer((w_size,), w_dtype, data=w.data)
            yf = T.decl_buffer((n * out * plane,), "float32", data=y.data)
            for job in T.parallel(n * jobs_per_image):
                img = job // jobs_per_image
                t = job % jobs_per_image // oh
                r_out = job % oh
                corr = T.alloc_buffer((panels, LANES), "int32", scope="global")
                mult = T.alloc_buffer((panels, LANES), "float32", scope="global")
                fv = T.alloc_buffer((LANES,), "float32", scope="global")
                constants(corr, mult, info, wsum, w_scale, img, t)
                for mo in range(full_tiles):
                    acc = T.alloc_buffer((rows_tile, panels, LANES), "int32", scope="global")
                    accumulate_tile(acc, rows_tile, a, w64, img, r_out, mo * rows_tile, t, a8, diag)
                    for r in T.unroll(rows_tile):
                        for v in T.unroll(panels):
                            rescale(fv, acc, r, v, corr, mult, bias, t)
                            dst = (img * out + (t * panels + v) * LANES) * plane + r_out * ow + mo * rows_tile + r
                            yf[T.Ramp(dst, plane, LANES)] = fv[lanes]
                for p1 in range(full_tiles * rows_tile, ow):  # tail pixels of the output row
                    acc1 = T.alloc_buffer((1, panels, LANES), "int32", scope="global")
                    accumulate_tile(acc1, 1, a, w64, img, r_out, p1, t, a8, diag)
                    for v in T.unroll(panels):
                        rescale(fv, acc1, 0, v, corr, mult, bias, t)
                        dst1 = (img * out + (t * panels + v) * LANES) * plane + r_out * ow + p1
                        yf[T.Ramp(dst1, plane, LANES)] = fv[lanes]

        return conv_gemm

    qmax = float(2**requant.bits - 1)
    hp2, wp2, top2, left2 = requant.hp, requant.wp, requant.top, requant.left

    @T.macro
    def requantize(fv, flag, params, q2f, pixel):
        flag[lanes] = T.max(flag[lanes], T.Cast("int32x16", T.isnan(fv[lanes])))
        clean = T.Select(T.isnan(fv[lanes]), T.Broadcast(T.float32(0), LANES), fv[lanes])
        tq = T.nearbyint(clean / T.Broadcast(params[0], LANES)) + T.Broadcast(params[1], LANES)
        tq = T.max(T.min(tq, T.Broadcast(T.float32(qmax), LANES)), T.Broadcast(T.float32(0), LANES))
        q2f[T.Ramp(pixel, 1, LANES)] = T.Cast("uint8x16", tq)

    @T.prim_func(private=True)
    def conv_gemm_requant(
        q_h: T.handle,
        info_h: T.handle,
        w: T.Buffer(w_shape, w_dtype),
        wsum: T.Buffer((width,), "int32"),
        w_scale: T.Buffer((width,), "float32"),
        bias: T.Buffer((width,), "float32"),
        diag: T.Buffer((width,), "int32"),
        params: T.Buffer((2,), "float32"),
        q2_h: T.handle,
        bad_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        n = T.int64()
        q8 = T.match_buffer(q_h, (n, hp, wp, cp), "uint8")
        info = T.match_buffer(info_h, (n, 1), "float32")
        q2 = T.match_buffer(q2_h, (n, hp2, wp2, out), "uint8")
        bad = T.match_buffer(bad_h, (n, oh, tiles), "float32")
        a = T.decl_buffer((n * hp * wp * cp // a_div,), a_dtype, data=q8.data)
        a8 = T.decl_buffer((n * hp * wp * cp,), "uint8", data=q8.data)
        w64 = T.decl_buffer((w_size,), w_dtype, data=w.data)
        q2f = T.decl_buffer((n * hp2 * wp2 * out,), "uint8", data=q2.data)
        for job in T.parallel(n * jobs_per_image):
            img = job // jobs_per_image
            t = job % jobs_per_image // oh
            r_out = job % oh
            corr = T.alloc_buffer((panels, LANES), "int32", scope="global")
            mult = T.alloc_buffer((panels, LANES), "float32", scope="global")
            fv = T.alloc_buffer((LANES,), "float32", scope="global")
            flag = T.alloc_buffer((LANES,), "int32", scope="global")
            flag[lanes] = T.Broadcast(T.int32(0), LANES)
            zq = T.Cast("uint8", params[1])
            constants(corr, mult, info, wsum, w_scale, img, t)
            # this job's channels of the border: its row's left/right pixels, and the rows above/below
            for v in T.unroll(panels):
                c0 = (t * panels + v) * LANES
                for px in range(wp2):
                    if px < left2 or px >= left2 + ow:
                        q2f[T.Ramp(((img * hp2 + top2 + r_out) * wp2 + px) * out + c0, 1, LANES)] = T.Broadcast(
                            zq, LANES
                        )
                if r_out == 0:
                    for rr in range(top2):
                        for px in range(wp2):
                            q2f[T.Ramp(((img * hp2 + rr) * wp2 + px) * out + c0, 1, LANES)] = T.Broadcast(zq, LANES)
                if r_out == oh - 1:
                    for rr in range(top2 + oh, hp2):
                        for px in range(wp2):
                            q2f[T.Ramp(((img * hp2 + rr) * wp2 + px) * out + c0, 1, LANES)] = T.Broadcast(zq, LANES)
            row_base = (img * hp2 + top2 + r_out) * wp2 + left2
            for mo in range(full_tiles):
                acc = T.alloc_buffer((rows_tile, panels, LANES), "int32", scope="global")
                accumulate_tile(acc, rows_tile, a, w64, img, r_out, mo * rows_tile, t, a8, diag)
                for r in T.unroll(rows_tile):
                    for v in T.unroll(panels):
                        rescale(fv, acc, r, v, corr, mult, bias, t)
                        requantize(
                            fv, flag, params, q2f, (row_base + mo * rows_tile + r) * out + (t * panels + v) * LANES
                        )
            for p1 in range(full_tiles * rows_tile, ow):
                acc1 = T.alloc_buffer((1, panels, LANES), "int32", scope="global")
                accumulate_tile(acc1, 1, a, w64, img, r_out, p1, t, a8, diag)
                for v in T.unroll(panels):
                    rescale(fv, acc1, 0, v, corr, mult, bias, t)
                    requantize(fv, flag, params, q2f, (row_base + p1) * out + (t * panels + v) * LANES)
            bad[img, r_out, t] = T.float32(0)
            for l in range(LANES):
                bad[img, r_out, t] = T.max(bad[img, r_out, t], T.Cast("float32", flag[l]))

    return conv_gemm_requant


def _quantize_codes(x: te.Tensor, x_scale: float, zero_point: int, bits: int) -> te.Tensor:
    """``clip(rint(x / s) + z, 0, 2^bits - 1) - z`` as int32 (NaN -> code of 0), the portable path's operand."""

    def compute(*idx):
        q = quantized_code(x[idx], x_scale, zero_point, bits)
        return q.astype("int32") - tirx.const(zero_point, "int32")

    return te.compute(x.shape, compute, name="int8_conv_codes")


def vnni_conv_ok(node: Node) -> bool:
    """Whether ``int8_conv2d`` ``node`` runs the VNNI kernel (else the portable path)."""
    codes = node.inputs[1].data
    groups = node.attrs["groups"]
    # whole 16-channel panels, dense or depthwise
    panels = codes.shape[0] % LANES == 0 and (groups == 1 or is_depthwise(codes, groups))
    static = all(isinstance(d, int) for d in node.inputs[0].shape[1:])
    return not current_target_is_gpu() and has_vnni() and panels and static and node.inputs[1].is_constant


def _epilogue_chain(ctx: LowerContext, node: Node) -> tuple[Node | None, Node | None]:
    """``(relu, next_conv)``: a ReLU reading only this conv's output, and a VNNI ``int8_conv2d`` reading
    only that (or this conv's output directly), which this conv's kernel can compute for them."""
    value = node.outputs[0]
    relu = ctx.relu_of(value)
    if relu is not None:
        value = relu.outputs[0]
    reader = ctx.only_reader(value)
    if reader is not None and reader.op == "int8_conv2d" and reader.inputs[0] is value and vnni_conv_ok(reader):
        return relu, reader
    return relu, None


def _vnni_conv(
    ctx: LowerContext, node: Node, x, codes: np.ndarray, scales: np.ndarray, bias, diag: np.ndarray | None
) -> relax.Expr:
    a = node.attrs
    out, _, kh, kw = codes.shape
    n, c, h, w = ctx.shape(node.inputs[0])
    oh, ow = node.outputs[0].shape[2:]
    depthwise = is_depthwise(codes, a["groups"])
    if depthwise:
        packed, cp, blocks = pack_depthwise_weights(codes), c, out // LANES
    else:
        packed, cp = pack_conv_weights(codes)
        blocks = packed.shape[0]
    width = blocks * LANES
    top, left, bottom, right = a["padding"]
    # rows the last window reaches past the padded input (stride leftovers) are never read
    hp, wp = h + top + bottom, w + left + right
    held = ctx.padded.get(node.inputs[0])
    if held is not None and isinstance(held[1], QuantizedInput):  # the producing conv quantized it
        q, bad = held[0], held[1].bad
        any_bad = ctx.emit(op.max(bad, axis=list(range(1, len(held[1].bad_shape))), keepdims=False))
    else:
        params = relax.const(np.array([np.float32(a["x_scale"]), a["x_zero_point"]], np.float32))
        gv_q = ctx.bb.add_func(quantize_pad_func(c, h, w, cp, tuple(a["padding"]), a["x_bits"]), "int8_conv_quantize")
        qb = ctx.emit(
            relax.op.call_tir(
                gv_q,
                [x, params],
                out_ty=[relax.TensorType((n, hp, wp, cp), "uint8"), relax.TensorType((n, hp), "float32")],
            )
        )
        q, bad = ctx.emit(relax.TupleGetItem(qb, 0)), ctx.emit(relax.TupleGetItem(qb, 1))
        any_bad = ctx.emit(op.max(bad, axis=[1], keepdims=False))
    s = scalar(np.float32(a["x_scale"]), "float32")
    nan_image = op.greater(op.reshape(any_bad, (n, 1)), scalar(0, "float32"))
    info = ctx.emit(op.where(nan_image, scalar(np.nan, "float32"), s))

    def padded(values, dtype: str = "float32") -> relax.Expr:
        return channel_vector(ctx, values, out, width, dtype)

    diag_codes = np.zeros(out, np.int64) if diag is None else diag.astype(np.int64)
    wsum = padded((codes.astype(np.int64).reshape(out, -1).sum(axis=1) + diag_codes).astype(np.int32), "int32")
    bias = padded(bias)
    geometry = (hp, wp, cp, oh, ow, int(a["x_zero_point"]))
    window = ((kh, kw), tuple(a["stride"]), tuple(a["dilation"]), blocks, out)
    args = [q, info, relax.const(packed), wsum, padded(scales), bias, padded(diag_codes, "int32")]
    relu, nxt = _epilogue_chain(ctx, node)
    kind = "int8_dwconv" if depthwise else "int8_conv"
    shape = {"depthwise": depthwise, "diagonal": diag is not None}
    if nxt is None:
        func = conv_gemm_func(geometry, *window, relu=relu is not None, **shape)
        gv = ctx.bb.add_func(func, f"{kind}_vnni")
        y = ctx.emit(relax.op.call_tir(gv, args, out_ty=relax.TensorType((n, out, oh, ow), "float32")))
        if relu is not None:
            ctx.fused[relu] = [y]
        return y
    b = nxt.attrs
    t2, l2, b2, r2 = b["padding"]
    requant = Requantize(t2, l2, oh + t2 + b2, ow + l2 + r2, b["x_bits"])
    args.append(relax.const(np.array([np.float32(b["x_scale"]), b["x_zero_point"]], np.float32)))
    func = conv_gemm_func(geometry, *window, relu=relu is not None, requant=requant, **shape)
    gv = ctx.bb.add_func(func, f"{kind}_requant")
    tiles = blocks // job_tile(blocks, depthwise)[1]
    bad_shape = (n, oh, tiles)
    qb = ctx.emit(
        relax.op.call_tir(
            gv,
            args,
            out_ty=[
                relax.TensorType((n, requant.hp, requant.wp, out), "uint8"),
                relax.TensorType(bad_shape, "float32"),
            ],
        )
    )
    q2, bad2 = ctx.emit(relax.TupleGetItem(qb, 0)), ctx.emit(relax.TupleGetItem(qb, 1))
    ctx.padded[nxt.inputs[0]] = (q2, QuantizedInput(bad2, bad_shape))
    if relu is not None:
        ctx.fused[relu] = [ABSORBED]
    return ABSORBED


def _portable_conv(
    ctx: LowerContext, node: Node, x, codes: np.ndarray, scales: np.ndarray, bias, diag: np.ndarray | None
) -> relax.Expr:
    a = node.attrs
    codes = codes.astype(np.int32)
    if diag is not None:
        out, _, kh, kw = codes.shape
        codes[np.arange(out), np.arange(out), kh // 2, kw // 2] += diag
    q = ctx.te(_quantize_codes, x, a["x_scale"], int(a["x_zero_point"]), a["x_bits"], name="int8_conv_codes")
    acc = ctx.emit(
        op.nn.conv2d(
            q,
            relax.const(codes),
            strides=a["stride"],
            padding=a["padding"],
            dilation=a["dilation"],
            groups=a["groups"],
            out_dtype="int32",
        )
    )
    return _rescale_nchw(ctx, acc, x, a["x_scale"], scales, bias)


def _rescale_nchw(ctx: LowerContext, acc: relax.Expr, x, x_scale: float, scales: np.ndarray, bias) -> relax.Expr:
    """The reference's epilogue on ``acc int32 [N, O, OH, OW]``: ``float32(acc) * (s * w_scale[o])``, NaN
    for every image whose input holds a NaN, then ``+ bias``."""
    rescale = (np.float32(x_scale) * scales).astype(np.float32).reshape(1, -1, 1, 1)
    y = ctx.emit(op.multiply(op.astype(acc, "float32"), relax.const(rescale)))
    has_nan = ctx.emit(op.max(op.astype(op.isnan(x), "int32"), axis=[1, 2, 3], keepdims=True))
    y = ctx.emit(op.where(op.greater(has_nan, relax.const(0, "int32")), scalar(np.nan, "float32"), y))
    if bias is not None:
        y = ctx.emit(op.add(y, op.reshape(bias, (1, -1, 1, 1))))
    return y


def _im2col_u8(x: te.Tensor, attrs: dict, kh: int, kw: int, k_pad: int) -> te.Tensor:
    """``q [N * OH * OW, k_pad]`` uint8: the quantized codes of each output pixel's window, columns in
    the OIHW filter's ``(c, i, j)`` order; the border holds ``z`` (the code of 0.0), columns past
    ``C * KH * KW`` hold 0 (their weights are 0)."""
    n, c, h, w = x.shape
    (sh, sw), (dh, dw) = attrs["stride"], attrs["dilation"]
    pt, pl, pb, pr = attrs["padding"]
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    taps = c * kh * kw
    zero_point = int(attrs["x_zero_point"])
    zero, z = tirx.const(0, "float32"), tirx.const(zero_point, "float32")

    def compute(r, col):
        b, pixel = r // (oh * ow), r % (oh * ow)
        ci, tap = col // (kh * kw), col % (kh * kw)
        y = pixel // ow * sh - pt + tap // kw * dh
        xx = pixel % ow * sw - pl + tap % kw * dw
        inside = tirx.all(col < taps, y >= 0, y < h, xx >= 0, xx < w)
        v = x[b, tirx.min(ci, c - 1), tirx.max(tirx.min(y, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)]
        q = quantized_code(v, attrs["x_scale"], zero_point, attrs["x_bits"])
        return tirx.Select(inside, q, tirx.Select(col < taps, z, zero)).astype("uint8")

    return te.compute((n * oh * ow, k_pad), compute, name="int8_conv_im2col")


def sdot_conv_ok(node: Node, diag: np.ndarray | None) -> bool:
    """A dense (``groups = 1``) conv without ``w_diag`` on an aarch64 target with ``sdot``."""
    return not current_target_is_gpu() and has_sdot() and node.attrs["groups"] == 1 and diag is None


def _sdot_conv(ctx: LowerContext, node: Node, x, codes: np.ndarray, scales: np.ndarray, bias) -> relax.Expr:
    """im2col (uint8 codes) -> ``int8_gemm.gemm_sdot_func`` -> ``acc - z * sum wq``, then the reference's
    float32 rescale, NaN-image rule and bias (bit-exact: the integer sum is exact, the float ops the same)."""
    a = node.attrs
    out, _, kh, kw = codes.shape
    flat = codes.reshape(out, -1)
    packed = pack_weights(flat)
    k4 = packed.shape[1]
    n, _, oh, ow = ctx.shape(node.outputs[0])
    rows = ctx.te(_im2col_u8, x, a, kh, kw, k4 * 4, name="int8_conv_im2col")
    acc = sdot_gemm(ctx, rows, n * oh * ow, flat, packed)
    if packed.shape[0] * ROWS != out:
        acc = ctx.emit(op.strided_slice(acc, axes=[1], begin=[0], end=[out]))
    correction = (int(a["x_zero_point"]) * flat.astype(np.int64).sum(axis=1)).astype(np.int32)
    acc = ctx.emit(op.subtract(acc, relax.const(correction)))
    acc = ctx.emit(op.permute_dims(op.reshape(acc, (n, oh, ow, out)), [0, 3, 1, 2]))
    return _rescale_nchw(ctx, acc, x, a["x_scale"], scales, bias)


@lowering("int8_conv2d")
def lower_int8_conv2d(ctx: LowerContext, node: Node, x, wq, w_scale, bias=None, w_diag=None) -> relax.Expr:
    constant = (1, 2, 4) if w_diag is not None else (1, 2)
    for i in constant:
        if not node.inputs[i].is_constant:
            raise CodegenError(f"int8_conv2d (node {node.name}): {node.inputs[i].name} must be a constant")
    codes, scales = node.inputs[1].data, node.inputs[2].data.astype(np.float32)
    diag = node.inputs[4].data.astype(np.int32) if w_diag is not None else None
    if diag is not None and np.abs(diag.astype(np.int64)).max(initial=0) > DIAG_LIMIT:
        raise CodegenError(f"int8_conv2d (node {node.name}): |w_diag| must be <= {DIAG_LIMIT} (int32 accumulation)")
    if vnni_conv_ok(node):
        return _vnni_conv(ctx, node, x, codes, scales, bias, diag)
    if sdot_conv_ok(node, diag):
        return _sdot_conv(ctx, node, x, codes, scales, bias)
    return _portable_conv(ctx, node, x, codes, scales, bias, diag)


__all__ = [
    "conv_gemm_func",
    "conv_tile",
    "is_depthwise",
    "job_tile",
    "lower_int8_conv2d",
    "pack_conv_weights",
    "pack_depthwise_weights",
    "quantize_pad_func",
]
