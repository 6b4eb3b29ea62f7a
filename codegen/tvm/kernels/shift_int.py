"""``shift_linear`` / ``shift_conv2d`` as integer dot products (AVX-512 VNNI ``vpdpwssd``), bit-exact.

On a CPU a shift costs what a multiply costs; an integer dot-product instruction does 32 int16
multiply-adds at once. The shift semantics (``ir/ops_lowbit.shift_rows``) are an integer matmul
``acc[r,o] = sum_i q[r,i] * w[o,i]`` with ``w = sign * 2^(E - exponent)``, ``E = 2^bits - 1``, so
they can be computed exactly by one:

* Per output channel ``o`` the weights ``w[o,:]`` share the factor ``2^(E - max exponent)``; what is
  left, ``v = sign * 2^(emax - exponent)``, is a signed integer below ``2^(spread + 1)``
  (``spread = emax - emin`` over the nonzero weights). With ``spread <= 14`` it is an int16 code. A
  spread of 15 (the usual case at 4 exponent bits: the channel maximum has exponent 0, the smallest
  weights 15) still fits when every weight at ``emin`` has one sign: ``-2^15`` is an int16, and a
  channel whose top weights are positive is negated (its multiplier is ``-2^k``). Anything else is
  split by exponent range into more *planes* (15 exponents each), each with its own multiplier:
  ``w[o,i] = sum_p code[p,o,i] * mult[p,o]`` exactly (:func:`encode_int16`).
* ``vpdpwssd`` multiplies int16 pairs and adds them into int32 lanes (no saturation). Each plane's
  partial sum is bounded by the reference's own bound (``shift_accumulator_bound`` <= 2^31 - 1),
  so every int32 step is exact, and the planes' ``partial * mult`` add up to the reference's
  ``acc`` (addition mod 2^32 is associative). The float rescale then follows the reference step by
  step, so the output is bit-exact.

Activations are the reference's per-row int8 codes (``q in [-127, 127]``), stored as int16 pairs.
For ``shift_conv2d`` the rows are im2col windows (one per output pixel); the columns are taken in
``(i, j, c)`` order (the filters are permuted to match; an integer sum does not depend on order)
so that each tap's channels are one contiguous run of an NHWC copy of the input and the codes are
written 16 at a time. The row scale ``max |window| / 127`` is the max over the window's taps of a
per-pixel channel max (:func:`conv_prep_func`), the same value as the reference's row max.

Without VNNI (other x86 CPUs, arm64) the same layout runs through a portable int32 loop.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from reshift.codegen.tvm import lower_lowbit
from reshift.codegen.tvm.lower import LowerContext, op, scalar
from reshift.ir.ops_lowbit import INT8_QMAX

ROWS = 16  # output channels per vector (16 int32 lanes)
ROW_BLOCK = 3  # activation rows per register block (3 rows x 4 blocks = 12 accumulators)
CHUNK = 48  # rows per parallel task (its codes and the weight tile stay in L2)
PLANE_SPAN = 15  # exponents per int16 plane (2^14 is the largest power of two below 2^15 - 1)
INT16_MIN = -(2**15)


def has_vnni() -> bool:
    """AVX-512 VNNI on the current (or host) x86 target."""
    target = tvm.target.Target.current(allow_none=True)
    if target is None:
        from reshift.codegen.tvm.targets import host_cpu_flags

        return "avx512_vnni" in host_cpu_flags()
    triple = str(target.attrs.get("mtriple", "")) or "x86_64"
    if target.kind.name != "llvm" or not triple.startswith("x86_64") or not str(target.attrs.get("mcpu", "")):
        return False
    try:
        return bool(tvm.target.codegen.llvm_cpu_has_features(["avx512vnni"], target))
    except Exception:  # noqa: BLE001 -- an LLVM without the query: be conservative
        return False


# -- weight encoding ------------------------------------------------------------------------------
def _encode_channel(sign: np.ndarray, exponent: np.ndarray, e_max: int) -> list[tuple[np.ndarray, int]]:
    """One channel's ``[(int16 code [K], multiplier)]`` with ``sum code * mult = sign * 2^(E - exponent)``."""
    live = sign != 0
    if not live.any():
        return [(np.zeros(sign.shape, np.int16), 0)]
    e = exponent.astype(np.int64)
    lo, hi = int(e[live].min()), int(e[live].max())
    if hi - lo <= PLANE_SPAN - 1:
        v = np.where(live, sign.astype(np.int64) << (hi - e), 0)
        return [(v.astype(np.int16), 1 << (e_max - hi))]
    if hi - lo == PLANE_SPAN:
        top = sign[live & (e == lo)]
        if np.all(top == top[0]):  # the one value beyond int16 is -2^15: negate a channel whose top is +
            flip = int(top[0])  # +1 or -1
            v = np.where(live, -flip * (sign.astype(np.int64) << (hi - e)), 0)
            assert v.min() >= INT16_MIN and v.max() < 2**15
            return [(v.astype(np.int16), -flip * (1 << (e_max - hi)))]
    planes = []
    for start in range(lo, hi + 1, PLANE_SPAN):
        top = min(start + PLANE_SPAN - 1, hi)
        inside = live & (e >= start) & (e <= top)
        v = np.where(inside, sign.astype(np.int64) << np.clip(top - e, 0, None), 0)
        planes.append((v.astype(np.int16), 1 << (e_max - top)))
    return planes


def encode_int16(sign: np.ndarray, exponent: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``sign``/``exponent [O, K]`` -> ``(code int16 [P, O, K], mult int32 [P, O])``, exact:
    ``sum_p code[p] * mult[p][:, None] == sign * 2^(E - exponent)`` (see the module docstring)."""
    e_max = 2**bits - 1
    per = [_encode_channel(sign[o], exponent[o], e_max) for o in range(sign.shape[0])]
    planes = max((len(p) for p in per), default=1)
    code = np.zeros((planes, sign.shape[0], sign.shape[1]), np.int16)
    mult = np.zeros((planes, sign.shape[0]), np.int64)
    for o, channel in enumerate(per):
        for p, (v, m) in enumerate(channel):
            code[p, o], mult[p, o] = v, m
    assert np.all(np.abs(mult) < 2**31), "multiplier beyond int32"
    w = sign.astype(np.int64) << (e_max - exponent.astype(np.int64))
    w = np.where(sign != 0, w, 0)
    assert np.array_equal(np.einsum("pok,po->ok", code.astype(np.int64), mult), w), "int16 encoding not exact"
    return code, mult.astype(np.int32)


def pack_int16(code: np.ndarray) -> np.ndarray:
    """``int16 [P, O, K]`` -> ``[P * ceil(O/16), ceil(K/2), 16, 2]`` (zero padded per plane)."""
    planes, out, k = code.shape
    blocks, k2 = -(-out // ROWS), -(-k // 2)
    padded = np.zeros((planes, blocks * ROWS, k2 * 2), np.int16)
    padded[:, :out, :k] = code
    return np.ascontiguousarray(padded.reshape(planes * blocks, ROWS, k2, 2).transpose(0, 2, 1, 3))


# -- the GEMM -------------------------------------------------------------------------------------
def _dot_intrinsic() -> str:
    return "llvm.x86.avx512.vpdpwssd.512"


def gemm_func(blocks: int, k2: int, vnni: bool) -> tirx.PrimFunc:
    """``acc[m, 16*ob + l] = sum_k a[m, k] * w[ob, k/2, l, k%2]`` (int16 x int16 -> int32), ``a`` ``[M, 2*k2]``.

    VNNI: parallel tasks of ``CHUNK`` rows x one tile of up to 4 output blocks; inside, 3 rows x
    the tile's blocks are register-blocked (one broadcast of a row's int16 pair feeds every block).
    """
    width = blocks * ROWS
    lanes = T.Ramp(0, 1, ROWS)
    tile = next(t for t in (4, 2, 1) if blocks % t == 0)
    tiles = blocks // tile
    if not vnni:
        return _gemm_generic(blocks, k2)

    def rows_block(n_rows: int):
        @T.macro
        def block(a, wf, acc, t, m0):
            total = T.alloc_buffer((n_rows * tile, ROWS), "int32", scope="global")  # < 1 KiB: registers
            for i in T.unroll(n_rows * tile):
                total[i, lanes] = T.Broadcast(T.int32(0), ROWS)
            for kk in range(k2):
                for r in T.unroll(n_rows):
                    for b in T.unroll(tile):
                        total[r * tile + b, lanes] = T.call_llvm_pure_intrin(
                            "int32x16",
                            _dot_intrinsic(),
                            total[r * tile + b, lanes],
                            T.reinterpret("int16x32", T.Broadcast(a[m0 + r, kk], ROWS)),
                            wf[T.Ramp(((t * tile + b) * k2 + kk) * (ROWS * 2), 1, ROWS * 2)],
                        )
            for r in T.unroll(n_rows):
                for b in T.unroll(tile):
                    acc[m0 + r, T.Ramp((t * tile + b) * ROWS, 1, ROWS)] = total[r * tile + b, lanes]

        return block

    main, one = rows_block(ROW_BLOCK), rows_block(1)

    @T.prim_func(private=True)
    def gemm(a_h: T.handle, w: T.Buffer((blocks, k2, ROWS, 2), "int16"), acc_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        a16 = T.match_buffer(a_h, (rows, k2 * 2), "int16")
        acc = T.match_buffer(acc_h, (rows, width), "int32")
        a = T.decl_buffer((rows, k2), "int32", data=a16.data)  # one int16 pair per int32
        wf = T.decl_buffer((blocks * k2 * ROWS * 2,), "int16", data=w.data)
        for task in T.parallel((rows + (CHUNK - 1)) // CHUNK * tiles):
            t = task % tiles
            base = task // tiles * CHUNK
            here = T.min(T.int64(CHUNK), rows - base)
            for mb in range(here // ROW_BLOCK):
                main(a, wf, acc, t, base + mb * ROW_BLOCK)
            for m in range(here % ROW_BLOCK):
                one(a, wf, acc, t, base + here // ROW_BLOCK * ROW_BLOCK + m)

    return gemm


def _gemm_generic(blocks: int, k2: int) -> tirx.PrimFunc:
    width = blocks * ROWS

    @T.prim_func(private=True)
    def gemm_generic(a_h: T.handle, w: T.Buffer((blocks, k2, ROWS, 2), "int16"), acc_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        a = T.match_buffer(a_h, (rows, k2 * 2), "int16")
        acc = T.match_buffer(acc_h, (rows, width), "int32")
        for ob in T.parallel(blocks):
            for m in range(rows):
                total = T.alloc_buffer((ROWS,), "int32", scope="global")
                for l in T.vectorized(ROWS):
                    total[l] = T.int32(0)
                for kk in range(k2):
                    for j in range(2):
                        for l in T.vectorized(ROWS):
                            total[l] = total[l] + T.Cast("int32", a[m, kk * 2 + j]) * T.Cast("int32", w[ob, kk, l, j])
                for l in T.vectorized(ROWS):
                    acc[m, ob * ROWS + l] = total[l]

    return gemm_generic


def _combine(ctx: LowerContext, acc: relax.Expr, rows, mult: np.ndarray) -> relax.Expr:
    """``[rows, P * Opad]`` plane sums -> ``sum_p acc_p * mult[p]`` as int32 ``[rows, O]`` (mod 2^32, exact)."""
    planes, out = mult.shape
    padded = -(-out // ROWS) * ROWS
    if planes == 1:
        if padded != out:
            acc = ctx.emit(op.strided_slice(acc, axes=[1], begin=[0], end=[out]))
        if np.all(mult == 1):
            return acc
        return ctx.emit(op.multiply(acc, relax.const(mult[0])))
    acc = ctx.emit(op.reshape(acc, (rows, planes, padded)))
    if padded != out:
        acc = ctx.emit(op.strided_slice(acc, axes=[2], begin=[0], end=[out]))
    return ctx.emit(op.sum(op.multiply(acc, relax.const(mult)), axis=[1]))


def int_matmul(ctx: LowerContext, q16: relax.Expr, rows, code: np.ndarray, mult: np.ndarray) -> relax.Expr:
    """Exact ``acc [rows, O]`` int32 of the int16 codes ``q16 [rows, 2*ceil(K/2)]`` against :func:`encode_int16`."""
    packed = pack_int16(code)
    blocks, k2 = packed.shape[:2]
    vnni = has_vnni()
    gv = ctx.bb.add_func(gemm_func(blocks, k2, vnni), "shift_int16_gemm_vnni" if vnni else "shift_int16_gemm")
    acc = ctx.emit(
        relax.op.call_tir(gv, [q16, relax.const(packed)], out_ty=relax.TensorType((rows, blocks * ROWS), "int32"))
    )
    return _combine(ctx, acc, rows, mult)


def rescale(ctx: LowerContext, acc: relax.Expr, s: relax.Expr, scale: relax.Expr, bits: int) -> relax.Expr:
    """The reference's float steps: ``float32(acc) * 2^-E * s[r] * scale[o]``, NaN for non-finite rows."""
    y = ctx.emit(op.multiply(op.astype(acc, "float32"), scalar(2.0 ** -(2**bits - 1), "float32")))
    y = ctx.emit(op.multiply(y, s))
    y = ctx.emit(op.multiply(y, scale))
    finite = ctx.emit(op.less(op.abs(s), scalar(np.inf, "float32")))
    return ctx.emit(op.where(finite, y, scalar(np.nan, "float32")))


# -- shift_linear: per-row codes ------------------------------------------------------------------
def quantize_rows_int16(ctx: LowerContext, x2: relax.Expr, rows, k: int) -> tuple[relax.Expr, relax.Expr]:
    """``(q int16 [rows, 2*ceil(K/2)], s float32 [rows, 1])``: the registry's per-row int8 codes (zero padded)."""
    from tvm import te

    amax = ctx.emit(lower_lowbit.row_absmax(x2))
    s = ctx.emit(op.divide(amax, scalar(float(INT8_QMAX), "float32")))
    k_pad = -(-k // 2) * 2

    def codes(x, s):
        def value(m, c):
            q = lower_lowbit.int8_code(x[m, tirx.min(c, k - 1)], s[m, 0])
            return tirx.Select(c < k, q, tirx.const(0, "int32")).astype("int16")

        return te.compute((x.shape[0], k_pad), value, name="q16")

    return ctx.te(codes, x2, s, name="quantize_rows_int16"), s


def shift_matmul_int(
    ctx: LowerContext, x2: relax.Expr, rows, sign: np.ndarray, exponent: np.ndarray, scale: relax.Expr, bits: int
) -> relax.Expr:
    """``shift_linear`` on ``x2 [rows, K]`` as ``[rows, O]`` float32 (no bias) through the int16 GEMM."""
    q16, s = quantize_rows_int16(ctx, x2, rows, sign.shape[1])
    code, mult = encode_int16(sign, exponent, bits)
    return rescale(ctx, int_matmul(ctx, q16, rows, code, mult), s, scale, bits)


# -- shift_conv2d: per-window codes ---------------------------------------------------------------
def conv_prep_func(channels: int, hw: tuple[int, int]) -> tirx.PrimFunc:
    """``(x, x) -> (xt, cm)``: the NHWC copy of ``x [n, C, h, w]`` and ``cm[n, y, x] = max_c |x|``
    (+inf where a channel is NaN: LLVM's ``maxnum`` drops NaN). ``x`` is passed twice: Relax's
    RewriteDataflowReshape takes a block-free PrimFunc with one input for a reshape."""
    h, w = hw
    inf = T.float32(np.inf)

    @T.prim_func(private=True)
    def conv_prep(x_h: T.handle, x2_h: T.handle, xt_h: T.handle, cm_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(x_h, (n, channels, h, w), "float32")
        x_again = T.match_buffer(x2_h, (n, channels, h, w), "float32")
        xt = T.match_buffer(xt_h, (n, h, w, channels), "float32")
        cm = T.match_buffer(cm_h, (n, h, w), "float32")
        for p in T.parallel(n * h):
            for xx in range(w):
                cm[p // h, p % h, xx] = T.float32(0)
            for c in range(channels):
                for xx in range(w):
                    v = x[p // h, c, p % h, xx]
                    xt[p // h, p % h, xx, c] = v
                    again = x_again[p // h, c, p % h, xx]  # the same value
                    cm[p // h, p % h, xx] = T.max(cm[p // h, p % h, xx], T.if_then_else(T.isnan(again), inf, T.fabs(v)))

    return conv_prep


def conv_codes_func(
    channels: int, hw: tuple[int, int], kernel, stride, padding, dilation, out_hw: tuple[int, int]
) -> tirx.PrimFunc:
    """``(xt, cm) -> (s, q)``: per output pixel ``r`` its window's scale ``s[r] = max cm / 127`` and the
    int16 codes ``q[r, (i*kw + j)*C + c] = int8_code(xt[n, y, x, c], s[r])`` (0 in the padding and
    past ``K``), ``K = kh*kw*C`` padded to even."""
    h, w = hw
    kh, kw = kernel
    oh, ow = out_hw
    top, left = padding[0], padding[1]
    k = kh * kw * channels
    k_pad = -(-k // 2) * 2
    vec = 16
    body, tail = channels // vec, channels % vec

    def code(v, s):
        return lower_lowbit.int8_code(v, s).astype("int16")

    @T.prim_func(private=True)
    def conv_codes(xt_h: T.handle, cm_h: T.handle, s_h: T.handle, q_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        n = T.int64()
        xt = T.match_buffer(xt_h, (n, h, w, channels), "float32")
        cm = T.match_buffer(cm_h, (n, h, w), "float32")
        s = T.match_buffer(s_h, (n * oh * ow, 1), "float32")
        q = T.match_buffer(q_h, (n * oh * ow, k_pad), "int16")
        for r in T.parallel(n * oh * ow):
            img = r // (oh * ow)
            oy = r % (oh * ow) // ow
            ox = r % ow
            red = T.alloc_buffer((1,), "float32", scope="global")
            red[0] = T.float32(0)
            for i, j in T.grid(kh, kw):
                yy = oy * stride[0] + i * dilation[0] - top
                xx = ox * stride[1] + j * dilation[1] - left
                if yy >= 0 and yy < h and xx >= 0 and xx < w:
                    red[0] = T.max(red[0], cm[img, yy, xx])
            s[r, 0] = red[0] / T.float32(INT8_QMAX)
            for i, j in T.grid(kh, kw):
                yy = oy * stride[0] + i * dilation[0] - top
                xx = ox * stride[1] + j * dilation[1] - left
                col = (i * kw + j) * channels
                if yy >= 0 and yy < h and xx >= 0 and xx < w:
                    for cb in range(body):
                        for cv in T.vectorized(vec):
                            q[r, col + cb * vec + cv] = code(xt[img, yy, xx, cb * vec + cv], s[r, 0])
                    for ct in range(tail):
                        q[r, col + body * vec + ct] = code(xt[img, yy, xx, body * vec + ct], s[r, 0])
                else:
                    for c in range(channels):
                        q[r, col + c] = T.int16(0)
            for c in range(k_pad - k):
                q[r, k + c] = T.int16(0)

    return conv_codes


def shift_conv_int(ctx: LowerContext, node, x, sign: np.ndarray, exponent: np.ndarray, scale, bias) -> relax.Expr:
    """``shift_conv2d`` with ``groups == 1`` as per-window int16 codes + the int16 GEMM, NCHW out."""
    a = node.attrs
    out_channels, channels, kh, kw = sign.shape
    in_shape = node.inputs[0].shape
    hw = (int(in_shape[2]), int(in_shape[3]))
    oh, ow = (int(d) for d in node.outputs[0].shape[2:])
    batch = ctx.shape(node.inputs[0])[0]
    rows = batch * oh * ow
    k_pad = -(-(kh * kw * channels) // 2) * 2
    prep = ctx.bb.add_func(conv_prep_func(channels, hw), "shift_conv2d_prep")
    prepped = ctx.emit(
        relax.op.call_tir(
            prep,
            [x, x],
            out_ty=[
                relax.TensorType((batch, hw[0], hw[1], channels), "float32"),
                relax.TensorType((batch, hw[0], hw[1]), "float32"),
            ],
        )
    )
    xt, cm = ctx.emit(relax.TupleGetItem(prepped, 0)), ctx.emit(relax.TupleGetItem(prepped, 1))
    codes_fn = conv_codes_func(channels, hw, (kh, kw), a["stride"], a["padding"], a["dilation"], (oh, ow))
    gv = ctx.bb.add_func(codes_fn, "shift_conv2d_codes")
    coded = ctx.emit(
        relax.op.call_tir(
            gv,
            [xt, cm],
            out_ty=[relax.TensorType((rows, 1), "float32"), relax.TensorType((rows, k_pad), "int16")],
        )
    )
    s, q16 = ctx.emit(relax.TupleGetItem(coded, 0)), ctx.emit(relax.TupleGetItem(coded, 1))
    ohwi = (0, 2, 3, 1)  # columns in (i, j, c) order, as the codes
    sign2 = np.ascontiguousarray(sign.transpose(ohwi)).reshape(out_channels, -1)
    exponent2 = np.ascontiguousarray(exponent.transpose(ohwi)).reshape(out_channels, -1)
    code, mult = encode_int16(sign2, exponent2, a["exponent_bits"])
    y = rescale(ctx, int_matmul(ctx, q16, rows, code, mult), s, scale, a["exponent_bits"])
    if bias is not None:
        y = ctx.emit(op.add(y, bias))
    y = ctx.emit(op.reshape(y, [batch, oh, ow, out_channels]))
    return ctx.emit(op.permute_dims(y, [0, 3, 1, 2]))
