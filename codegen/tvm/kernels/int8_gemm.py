"""Integer GEMM for ``int8_linear`` (u8 x s8 -> s32, AVX-512 VNNI), and lowerings of the quantizers.

``int8_linear`` (``ir/ops_quant.py``) quantizes activations per tensor to unsigned bytes ``q`` with
zero point ``z``. ``vpdpbusd`` multiplies unsigned by signed bytes, so ``q`` goes in as is and the
zero point is corrected once per output with the weight row sums:
``acc[m,o] = sum_k q[m,k] wq[o,k] - z * sum_k wq[o,k]`` (exact in int32 for ``K < 66000``).
Weights are packed at build time as ``[O/16, K/4, 16, 4]`` int8 (zero padded), so one 64-byte load
holds 4 consecutive weights of 16 output rows, and one ``vpdpbusd`` with the 4 activation bytes
broadcast to all lanes does 64 multiply-adds. The float rescale
``float32(acc) * (float32(x_scale) * w_scale[o]) + bias`` follows the reference step by step, so the
result is bit-exact. On aarch64 with the dot product (preset ``arm64-dotprod``) the same sum runs
on ``sdot`` (``gemm_sdot_func``); elsewhere (other x86 CPUs, plain ``arm64``) a portable int32 loop.
GPU targets get the same sum as a TE reduction scheduled by dlight (``_int8_gemm_portable``:
correct, untuned; a hand-written CUDA int8 GEMM is not done).

``quantize_uniform`` and ``log2_quant`` lower to TE element-wise computes that follow their
references (float32 quantize arithmetic, float64 ``log2`` for the log-domain codes).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.script import tirx as T

from reshift.codegen.tvm import knobs as knob_db
from reshift.codegen.tvm.kernels import int8_fused
from reshift.codegen.tvm.lower import LowerContext, lowering, op, product, scalar
from reshift.codegen.tvm.targets import current_target_is_gpu
from reshift.errors import CodegenError
from reshift.ir.graph import Node
from reshift.ir.ops_quant import adaptive_exponent, fraction_table, log_step

ROWS = 16


def has_vnni() -> bool:
    """VNNI on the current (or host) x86 target."""
    target = tvm.target.Target.current(allow_none=True)
    if target is None:
        from reshift.codegen.tvm.targets import host_cpu_flags

        return "avx512_vnni" in host_cpu_flags()
    if target.kind.name != "llvm" or not (str(target.attrs.get("mtriple", "")) or "x86_64").startswith("x86_64"):
        return False
    try:
        return bool(tvm.target.codegen.llvm_cpu_has_features(["avx512vnni"], target))
    except Exception:  # noqa: BLE001 -- no mcpu or an LLVM without the query
        return False


def has_sdot() -> bool:
    """The Armv8.2 dot product (``sdot``) on the current aarch64 target (preset ``arm64-dotprod``)."""
    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm" or not str(target.attrs.get("mtriple", "")).startswith("aarch64"):
        return False
    try:
        return bool(tvm.target.codegen.llvm_cpu_has_features(["dotprod"], target))
    except Exception:  # noqa: BLE001 -- an LLVM without the query
        return False


def sdot_offsets(codes: np.ndarray, width: int) -> np.ndarray:
    """int32 ``[width]``: ``128 * sum_k wq[o, k]`` (zero padded), what ``gemm_sdot_func`` adds back."""
    full = np.zeros(width, np.int32)
    full[: codes.shape[0]] = 128 * codes.astype(np.int64).sum(axis=1)
    return full


def pack_weights(wq: np.ndarray) -> np.ndarray:
    """``int8 [O, K]`` -> ``[ceil(O/16), ceil(K/4), 16, 4]``, zero padded."""
    out, k = wq.shape
    blocks, k4 = -(-out // ROWS), -(-k // 4)
    padded = np.zeros((blocks * ROWS, k4 * 4), np.int8)
    padded[:out, :k] = wq
    return np.ascontiguousarray(padded.reshape(blocks, ROWS, k4, 4).transpose(0, 2, 1, 3))


def gemm_func(blocks: int, k4: int) -> tirx.PrimFunc:
    """``acc[m, 16*ob + l] = sum_k a[m, k] * w[ob, k/4, l, k%4]`` (u8 x s8 -> s32), ``a`` is ``[M, 4*k4]``:
    the portable int32 loop (VNNI CPUs take ``int8_fused``'s kernels, aarch64 with the dot product
    :func:`gemm_sdot_func`)."""
    width = blocks * ROWS

    @T.prim_func(private=True)
    def gemm_generic(a_h: T.handle, w: T.Buffer((blocks, k4, ROWS, 4), "int8"), acc_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        a = T.match_buffer(a_h, (rows, k4 * 4), "uint8")
        acc = T.match_buffer(acc_h, (rows, width), "int32")
        for ob in T.parallel(blocks):
            for m in range(rows):
                total = T.alloc_buffer((ROWS,), "int32", scope="local")
                for l in range(ROWS):
                    total[l] = T.int32(0)
                for kk in range(k4):
                    for j in range(4):
                        for l in T.vectorized(ROWS):
                            total[l] = total[l] + T.Cast("int32", a[m, kk * 4 + j]) * T.Cast("int32", w[ob, kk, l, j])
                for l in range(ROWS):
                    acc[m, ob * ROWS + l] = total[l]

    return gemm_generic


_FLIP_SIGN_BITS = -0x7F7F7F80  # 0x80808080 as int32: the top bit of each of 4 bytes


def gemm_sdot_func(blocks: int, k4: int) -> tirx.PrimFunc:
    """``gemm_func``'s ``acc`` (u8 x s8 -> s32) on Arm's ``sdot`` (s8 x s8, 4 products per int32 lane).

    ``sdot`` multiplies signed bytes, so each activation byte goes in as ``q - 128`` (its top bit
    flipped: 4 bytes with one xor) and ``offset[o] = 128 * sum_k wq[o, k]`` (:func:`sdot_offsets`)
    starts the sum: ``acc = offset + sum_k (q - 128) wq = sum_k q wq``, exact in int32 as the VNNI
    kernel's. A 64-byte ``[16 rows, 4 k]`` weight tile is four 16-byte ``sdot`` operands of 4 rows
    each; the 4 activation bytes are broadcast to every 32-bit lane."""
    width = blocks * ROWS
    lanes = T.Ramp(0, 1, ROWS)
    tile = next(t for t in (4, 2, 1) if blocks % t == 0)
    quads = ROWS // 4

    @T.prim_func(private=True)
    def gemm_sdot(
        a_h: T.handle, w: T.Buffer((blocks, k4, ROWS, 4), "int8"), offset: T.Buffer((width,), "int32"), acc_h: T.handle
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        a8 = T.match_buffer(a_h, (rows, k4 * 4), "uint8")
        acc = T.match_buffer(acc_h, (rows, width), "int32")
        a = T.decl_buffer((rows, k4), "int32", data=a8.data)  # 4 activation bytes per int32
        w64 = T.decl_buffer((blocks * k4 * ROWS * 4,), "int8", data=w.data)
        for ot in T.parallel(blocks // tile):
            for m in range(rows):
                total = T.alloc_buffer((tile, ROWS), "int32", scope="local")
                for r in T.unroll(tile):
                    total[r, lanes] = offset[T.Ramp((ot * tile + r) * ROWS, 1, ROWS)]
                for kk in range(k4):
                    for r in T.unroll(tile):
                        for v in T.unroll(quads):
                            total[r, T.Ramp(v * 4, 1, 4)] = T.call_llvm_pure_intrin(
                                "int32x4",
                                "llvm.aarch64.neon.sdot.v4i32.v16i8",
                                total[r, T.Ramp(v * 4, 1, 4)],
                                T.reinterpret(
                                    "int8x16", T.Broadcast(T.bitwise_xor(a[m, kk], T.int32(_FLIP_SIGN_BITS)), 4)
                                ),
                                w64[T.Ramp(((ot * tile + r) * k4 + kk) * (ROWS * 4) + v * 16, 1, 16)],
                            )
                for r in T.unroll(tile):
                    acc[m, T.Ramp((ot * tile + r) * ROWS, 1, ROWS)] = total[r, lanes]

    return gemm_sdot


def sdot_gemm(ctx: LowerContext, q: relax.Expr, rows, codes: np.ndarray, packed: np.ndarray) -> relax.Expr:
    """``acc int32 [rows, 16 * blocks]`` of the uint8 codes ``q`` against ``codes [O, K]`` (packed by
    :func:`pack_weights`) on :func:`gemm_sdot_func`, its offsets included."""
    blocks, k4 = packed.shape[:2]
    gv = ctx.bb.add_func(gemm_sdot_func(blocks, k4), "int8_gemm_sdot")
    args = [q, relax.const(packed), relax.const(sdot_offsets(codes, blocks * ROWS))]
    return ctx.emit(relax.op.call_tir(gv, args, out_ty=relax.TensorType((rows, blocks * ROWS), "int32")))


def _row_params(x: te.Tensor, bits: int) -> tuple[te.Tensor, te.Tensor]:
    """Per-row ``(s, z)`` float32 ``[M, 1]`` of ``x_granularity="row"``, as ``ops_quant.row_params``."""
    rows, k = x.shape
    zero = tirx.const(0, "float32")
    clean = te.compute((rows, k), lambda m, c: tirx.Select(tirx.isnan(x[m, c]), zero, x[m, c]), name="x_clean")
    r = te.reduce_axis((0, k), name="r")
    lo = te.compute((rows, 1), lambda m, _: te.min(clean[m, r], axis=r), name="row_min")
    r2 = te.reduce_axis((0, k), name="r2")
    hi = te.compute((rows, 1), lambda m, _: te.max(clean[m, r2], axis=r2), name="row_max")
    qmax = tirx.const(2**bits - 1, "float32")

    def scale(m, j):
        v = (tirx.max(hi[m, j], zero) - tirx.min(lo[m, j], zero)) / qmax
        ok = tirx.all(v > zero, v < tirx.const(np.inf, "float32"))
        return tirx.Select(ok, v, tirx.const(1, "float32"))

    s = te.compute((rows, 1), scale, name="row_scale")

    def zero_point(m, j):
        q = tirx.nearbyint(-tirx.min(lo[m, j], zero) / s[m, j])
        return tirx.max(tirx.min(q, qmax), zero)

    return s, te.compute((rows, 1), zero_point, name="row_zero_point")


def _quantize_u8_rows(x: te.Tensor, s: te.Tensor, z: te.Tensor, k_pad: int, bits: int) -> te.Tensor:
    """``clip(rint(x / s_m) + z_m, 0, 2^bits - 1)`` as uint8 ``[M, k_pad]`` with per-row ``s, z``."""
    k = x.shape[1]
    qmax = tirx.const(2**bits - 1, "float32")

    def compute(m, c):
        v = x[m, tirx.min(c, k - 1)]
        v = tirx.Select(tirx.isnan(v), tirx.const(0, "float32"), v)
        q = tirx.max(tirx.min(tirx.nearbyint(v / s[m, 0]) + z[m, 0], qmax), tirx.const(0, "float32"))
        return tirx.Select(c < k, q, tirx.const(0, "float32")).astype("uint8")

    return te.compute((x.shape[0], k_pad), compute, name="q_u8_rows")


def quantized_code(v: tirx.PrimExpr, x_scale: float, zero_point: int, bits: int) -> tirx.PrimExpr:
    """float32 ``clip(rint(v / s) + z, 0, 2^bits - 1)`` of one activation (NaN -> the code of 0), as
    ``ops_quant.quantize_activations``: the per-tensor quantizer of every int8 kernel's operand."""
    zero = tirx.const(0, "float32")
    v = tirx.Select(tirx.isnan(v), zero, v)
    q = tirx.nearbyint(v / tirx.const(np.float32(x_scale), "float32")) + tirx.const(zero_point, "float32")
    return tirx.max(tirx.min(q, tirx.const(2**bits - 1, "float32")), zero)


def _quantize_u8(x: te.Tensor, k_pad: int, x_scale: float, zero_point: int, bits: int) -> te.Tensor:
    """``clip(rint(x / s) + z, 0, 2^bits - 1)`` as uint8 ``[M, k_pad]`` (NaN -> 0, padding 0)."""
    k = x.shape[1]

    def compute(m, c):
        q = quantized_code(x[m, tirx.min(c, k - 1)], x_scale, zero_point, bits)
        return tirx.Select(c < k, q, tirx.const(0, "float32")).astype("uint8")

    return te.compute((x.shape[0], k_pad), compute, name="q_u8")


def _int8_gemm_portable(a: te.Tensor, w: te.Tensor) -> te.Tensor:
    """``acc[m, 16*ob + l] = sum_k int32(a[m, k]) * int32(w[ob, k/4, l, k%4])``: ``gemm_func`` as plain TE."""
    blocks, k4 = w.shape[0], w.shape[1]
    k = te.reduce_axis((0, k4 * 4), name="k")

    def value(m, o):
        weight = w[o // ROWS, k // 4, o % ROWS, k % 4].astype("int32")
        return te.sum(a[m, k].astype("int32") * weight, axis=k)

    return te.compute((a.shape[0], blocks * ROWS), value, name="int8_gemm")


def _nan_term(x: te.Tensor) -> te.Tensor:
    """``[m, 1]``: NaN where row ``m`` holds a NaN, else 0 (a sum of zeros and NaNs)."""
    k = te.reduce_axis((0, x.shape[1]), name="k")
    nan, zero = tirx.const(np.nan, "float32"), tirx.const(0, "float32")
    return te.compute((x.shape[0], 1), lambda m, _: te.sum(tirx.Select(tirx.isnan(x[m, k]), nan, zero), axis=k))


def channel_vector(
    ctx: LowerContext, value: relax.Expr | np.ndarray | None, out: int, width: int, dtype: str = "float32"
) -> relax.Expr:
    """A per-output-channel vector (a constant, an expression or None = zeros) zero padded to ``width``."""
    if value is None or isinstance(value, np.ndarray):
        full = np.zeros(width, dtype)
        if value is not None:
            full[:out] = value
        return relax.const(full)
    if width == out:
        return value
    return ctx.emit(op.concat([value, relax.const(np.zeros(width - out, dtype))], axis=0))


def fused_int8_linear(ctx: LowerContext, x2, rows, codes: np.ndarray, scales: np.ndarray, bias, attrs) -> relax.Expr:
    """``int8_linear`` on ``x2 [rows, K]`` as the two VNNI kernels of ``int8_fused`` (quantize, GEMM + rescale)."""
    out, k = codes.shape
    packed = pack_weights(codes)
    blocks, k4 = packed.shape[:2]
    width = blocks * ROWS
    per_row = attrs.get("x_granularity", "tensor") == "row"
    quantize = int8_fused.quantize_rows_func(k, k4 * 4, attrs["x_bits"], per_row)
    top = 2 ** attrs["x_bits"] - 1
    params = (top, 0) if per_row else (np.float32(attrs["x_scale"]), attrs["x_zero_point"])
    params = relax.const(np.array(params, np.float32))
    gv_q = ctx.bb.add_func(quantize, "int8_quantize_rows")
    qr = ctx.emit(
        relax.op.call_tir(
            gv_q,
            [x2, params],
            out_ty=[relax.TensorType((rows, k4 * 4), "uint8"), relax.TensorType((rows, 2), "float32")],
        )
    )
    q, info = ctx.emit(relax.TupleGetItem(qr, 0)), ctx.emit(relax.TupleGetItem(qr, 1))
    wsum = channel_vector(ctx, codes.astype(np.int64).sum(axis=1).astype(np.int32), out, width, "int32")
    shape = {"rows": rows, "blocks": blocks, "k4": k4}
    knobs = knob_db.choose("int8_gemm_rescale_vnni", shape) if isinstance(rows, int) else None
    gv = ctx.bb.add_func(int8_fused.gemm_rescale_func(blocks, k4, knobs), "int8_gemm_rescale_vnni")
    args = [q, info, relax.const(packed), wsum, channel_vector(ctx, scales, out, width)]
    args.append(channel_vector(ctx, bias, out, width))
    y = ctx.emit(relax.op.call_tir(gv, args, out_ty=relax.TensorType((rows, width), "float32")))
    if width != out:
        y = ctx.emit(op.strided_slice(y, axes=[1], begin=[0], end=[out]))
    return y


@lowering("int8_linear")
def lower_int8_linear(ctx: LowerContext, node: Node, x, wq, w_scale, bias) -> relax.Expr:
    for i in (1, 2):
        if not node.inputs[i].is_constant:
            raise CodegenError(f"int8_linear (node {node.name}): {node.inputs[i].name} must be a constant")
    codes, scales = node.inputs[1].data, node.inputs[2].data.astype(np.float32)
    attrs = node.attrs
    out, k = codes.shape
    packed = pack_weights(codes)
    blocks, k4 = packed.shape[:2]
    lead = ctx.shape(node.inputs[0])[:-1]
    rows = product(lead)
    x2 = ctx.emit(op.reshape(x, (rows, k)))
    per_row = attrs.get("x_granularity", "tensor") == "row"
    if not current_target_is_gpu() and has_vnni():
        y = fused_int8_linear(ctx, x2, rows, codes, scales, bias, attrs)
        return ctx.emit(op.reshape(y, [*lead, out]))
    if per_row:
        params = ctx.te(_row_params, x2, attrs["x_bits"], name="int8_row_params")
        s_row, z_row = ctx.emit(relax.TupleGetItem(params, 0)), ctx.emit(relax.TupleGetItem(params, 1))
        q = ctx.te(_quantize_u8_rows, x2, s_row, z_row, k4 * 4, attrs["x_bits"], name="int8_linear_quantize")
    else:
        scale, zero_point, bits = attrs["x_scale"], attrs["x_zero_point"], attrs["x_bits"]
        q = ctx.te(_quantize_u8, x2, k4 * 4, scale, zero_point, bits, name="int8_linear_quantize")
    if current_target_is_gpu():  # the same u8 x s8 -> s32 sum as a TE reduction that dlight schedules
        acc = ctx.te(_int8_gemm_portable, q, relax.const(packed), name="int8_gemm_portable")
    elif has_sdot():
        acc = sdot_gemm(ctx, q, rows, codes, packed)
    else:
        gv = ctx.bb.add_func(gemm_func(blocks, k4), "int8_gemm")
        acc = ctx.emit(
            relax.op.call_tir(gv, [q, relax.const(packed)], out_ty=relax.TensorType((rows, blocks * ROWS), "int32"))
        )
    if blocks * ROWS != out:
        acc = ctx.emit(op.strided_slice(acc, axes=[1], begin=[0], end=[out]))
    if per_row:  # acc - z_m * sum_k wq[o, k], then float32(acc) * (s_m * w_scale[o])
        row_sums = relax.const(codes.astype(np.int64).sum(axis=1).astype(np.int32)[None, :])
        acc = ctx.emit(op.subtract(acc, op.multiply(op.astype(z_row, "int32"), row_sums)))
        rescale = ctx.emit(op.multiply(s_row, relax.const(scales[None, :])))
        y = ctx.emit(op.multiply(op.astype(acc, "float32"), rescale))
    else:
        correction = (int(attrs["x_zero_point"]) * codes.astype(np.int64).sum(axis=1)).astype(np.int32)
        acc = ctx.emit(op.subtract(acc, relax.const(correction)))
        rescale = (np.float32(attrs["x_scale"]) * scales).astype(np.float32)
        y = ctx.emit(op.multiply(op.astype(acc, "float32"), relax.const(rescale)))
    if current_target_is_gpu():  # y + sum_k (isnan ? NaN : 0): one sum reduction, then a plain add in the epilogue.
        # (A bool ``where`` fused into this epilogue becomes ushort2 -> float2 in TVM's CUDA codegen,
        # and small side computations fused into it are left as host loops by dlight.)
        y = ctx.emit(op.add(y, ctx.te(_nan_term, x2, name="int8_linear_nan_rows")))
    else:
        has_nan = ctx.emit(op.max(op.astype(op.isnan(x2), "int32"), axis=[-1], keepdims=True))
        y = ctx.emit(op.where(op.greater(has_nan, relax.const(0, "int32")), scalar(np.nan, "float32"), y))
    if bias is not None:
        y = ctx.emit(op.add(y, bias))
    return ctx.emit(op.reshape(y, [*lead, out]))


@lowering("quantize_uniform")
def lower_quantize_uniform(ctx: LowerContext, node: Node, x) -> relax.Expr:
    a = node.attrs
    rank = node.inputs[0].type.rank
    axis = a["axis"] % rank
    lo, hi = (-(2 ** (a["bits"] - 1) - 1), 2 ** (a["bits"] - 1) - 1) if a["signed"] else (0, 2 ** a["bits"] - 1)
    scale = relax.const(np.asarray(a["scale"], np.float32))
    zero = relax.const(np.asarray(a["zero_point"], np.float32))

    def compute(x, s, z):
        def fn(*idx):
            i = (idx[axis],) if len(a["scale"]) > 1 else (0,)
            q = tirx.nearbyint(x[idx] / s[i]) + z[i]
            q = tirx.max(tirx.min(q, tirx.const(hi, "float32")), tirx.const(lo, "float32"))
            return tirx.Select(tirx.isnan(x[idx]), x[idx], (q - z[i]) * s[i])  # LLVM min/max drop NaN

        return te.compute(x.shape, fn, name="quantize_uniform")

    return ctx.te(compute, x, scale, zero, name="quantize_uniform")


@lowering("log2_quant")
def lower_log2_quant(ctx: LowerContext, node: Node, x) -> relax.Expr:
    a = node.attrs
    bits, kind, scale, d = a["bits"], a["base_kind"], a["scale"], a["table_size"]
    step = log_step(kind, a["base"], d)
    zero_code = 2**bits - 1
    table = relax.const(fraction_table(d) if kind == "adaptive" else np.ones(d, np.float32))
    p = adaptive_exponent(a["base"], d) if kind == "adaptive" else 0

    def compute(x, table):
        def fn(*idx):
            v = x[idx]
            v64 = v.astype("float64")
            t = -tirx.log2(v64 / tirx.const(scale, "float64")) / tirx.const(step, "float64")
            q = tirx.max(tirx.nearbyint(t), tirx.const(0.0, "float64"))
            is_zero = tirx.any(v <= tirx.const(0, "float32"), tirx.isnan(q), q >= tirx.const(zero_code, "float64"))
            qi = tirx.Select(is_zero, tirx.const(0, "int32"), q.astype("int32"))
            if kind == "log2":
                e, factor = qi, tirx.const(1, "float32")
            elif kind == "log_sqrt2":
                e = tirx.floordiv(qi + 1, 2)
                factor = tirx.Select(
                    tirx.floormod(qi, 2) == 1,
                    tirx.const(float(np.float32(np.sqrt(2))), "float32"),
                    tirx.const(1, "float32"),
                )
            else:
                n = qi * p
                e, factor = tirx.floordiv(n, d), table[tirx.floormod(n, d)]
            power = tirx.power(tirx.const(2.0, "float64"), (-e).astype("float64")).astype("float32")  # exact
            y = power * factor * tirx.const(scale, "float32")
            y = tirx.Select(is_zero, tirx.const(0, "float32"), y)
            return tirx.Select(tirx.isnan(v), v, y)

        return te.compute(x.shape, fn, name="log2_quant")

    return ctx.te(compute, x, table, name="log2_quant")
