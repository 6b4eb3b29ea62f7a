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

Codes of at most 7 levels per channel also have an exact int8 form (:func:`encode_int8`); the uint8
window codes (``conv_codes_func(int8=True)``) and ``gemm_fused_func``'s int8 mode (``vpdpbusd``) serve
them here, ``shift_int8.py`` explains the arithmetic and holds the linear (and ``sdot``) paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from reshift.codegen.tvm import lower_lowbit
from reshift.codegen.tvm.kernels.int8_fused import ROUND_NEAREST
from reshift.codegen.tvm.kernels.int8_gemm import pack_weights
from reshift.codegen.tvm.lower import ABSORBED, LowerContext, constant, op, scalar
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
@dataclass
class Int16Weights:
    """Exact int16 form of shift weights ``w = sign * 2^(E - exponent)`` (``[O, K]``):
    ``w[o, k] = sum_p mult[p, o] * (code[p, o, k] + 65536 * [k in wrapped[o]])``.

    ``wrapped[o]`` lists the columns whose value ``+2^15`` is stored as ``-2^15`` (plane 0 only):
    a channel with spread 15 whose top weights have both signs (a few per layer in practice).
    """

    code: np.ndarray  # int16 [P, O, K]
    mult: np.ndarray  # int32 [P, O]
    wrapped: list[np.ndarray]  # per output channel, int32 column indices

    def decoded(self) -> np.ndarray:
        """The int64 ``w`` this encoding stands for."""
        w = self.code.astype(np.int64)
        for o, cols in enumerate(self.wrapped):
            w[0, o, cols] += 65536
        return np.einsum("pok,po->ok", w, self.mult.astype(np.int64))


def _encode_channel(sign: np.ndarray, exponent: np.ndarray, e_max: int):
    """One channel: ``([(int16 code [K], multiplier)], wrapped columns)`` (see :class:`Int16Weights`)."""
    none = np.zeros(0, np.int32)
    live = sign != 0
    if not live.any():
        return [(np.zeros(sign.shape, np.int16), 0)], none
    e = exponent.astype(np.int64)
    lo, hi = int(e[live].min()), int(e[live].max())
    v = np.where(live, sign.astype(np.int64) << np.clip(hi - e, 0, None), 0)
    if hi - lo <= PLANE_SPAN - 1:
        return [(v.astype(np.int16), 1 << (e_max - hi))], none
    if hi - lo == PLANE_SPAN:  # +2^15 is no int16: negate the channel so most top weights are -2^15
        top = live & (e == lo)
        flip = 1 if int(sign[top].astype(np.int64).sum()) >= 0 else -1
        v = -flip * v
        wrapped = np.flatnonzero(v == 2**15).astype(np.int32)
        v[wrapped] -= 65536
        return [(v.astype(np.int16), -flip * (1 << (e_max - hi)))], wrapped
    planes = []
    for start in range(lo, hi + 1, PLANE_SPAN):
        top = min(start + PLANE_SPAN - 1, hi)
        inside = live & (e >= start) & (e <= top)
        v = np.where(inside, sign.astype(np.int64) << np.clip(top - e, 0, None), 0)
        planes.append((v.astype(np.int16), 1 << (e_max - top)))
    return planes, none


def encode_int16(sign: np.ndarray, exponent: np.ndarray, bits: int) -> Int16Weights:
    """``sign``/``exponent [O, K]`` -> :class:`Int16Weights`, checked exact against ``sign * 2^(E - exponent)``."""
    e_max = 2**bits - 1
    per = [_encode_channel(sign[o], exponent[o], e_max) for o in range(sign.shape[0])]
    planes = max((len(p) for p, _ in per), default=1)
    code = np.zeros((planes, sign.shape[0], sign.shape[1]), np.int16)
    mult = np.zeros((planes, sign.shape[0]), np.int64)
    for o, (channel, _) in enumerate(per):
        for p, (v, m) in enumerate(channel):
            code[p, o], mult[p, o] = v, m
    assert np.all(np.abs(mult) < 2**31), "multiplier beyond int32"
    weights = Int16Weights(code, mult.astype(np.int32), [w for _, w in per])
    w = np.where(sign != 0, sign.astype(np.int64) << (e_max - exponent.astype(np.int64)), 0)
    assert np.array_equal(weights.decoded(), w), "int16 encoding not exact"
    return weights


@dataclass
class Int8Weights:
    """Exact int8 form of shift weights: ``sign * 2^(E - exponent) = mult[o] * code[o, k]``."""

    code: np.ndarray  # int8 [O, K]
    mult: np.ndarray  # int64 [O]: +-2^(E - hi_o)


def encode_int8(sign: np.ndarray, exponent: np.ndarray, bits: int) -> Int8Weights | None:
    """``sign``/``exponent [O, K]`` -> :class:`Int8Weights`, or None when a channel does not fit: the
    channel's nonzero weights span at most 7 exponents, or 8 with one sign at the smallest (see
    ``shift_int8.py``); checked exact against ``sign * 2^(E - exponent)``."""
    e_max = 2**bits - 1
    live = sign != 0
    e = np.where(live, exponent.astype(np.int64), 0)
    hi = np.where(live, e, -1).max(axis=1, initial=-1)
    lo = np.where(live, e, e_max + 1).min(axis=1, initial=e_max + 1)
    spread = np.where(hi >= 0, hi - lo, 0)
    if np.any(spread > 7):
        return None
    v = np.where(live, sign.astype(np.int64) << np.clip(hi[:, None] - e, 0, None), 0)
    flip = np.ones(len(sign), np.int64)
    for o in np.flatnonzero(spread == 7):  # +128 is no int8: negate so the top weights are -128
        top = v[o][np.abs(v[o]) == 128]
        if np.all(top > 0):
            flip[o] = -1
        elif not np.all(top < 0):
            return None
    code = (v * flip[:, None]).astype(np.int8)
    mult = np.where(hi >= 0, flip * np.left_shift(np.int64(1), e_max - np.maximum(hi, 0)), 1)  # int32 range
    w = np.where(live, sign.astype(np.int64) << (e_max - exponent.astype(np.int64)), 0)
    assert np.array_equal(code.astype(np.int64) * mult[:, None], w), "int8 encoding not exact"
    return Int8Weights(code, mult)


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
            t = T.meta_var(task % tiles)
            base = T.meta_var(task // tiles * CHUNK)
            here = T.meta_var(T.min(T.int64(CHUNK), rows - base))
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


def wrap_sum_func(k_pad: int, out: int, pairs: int) -> tirx.PrimFunc:
    """``(q16, col, chan) -> corr``: ``corr[m, o] = sum_{j: chan[j] = o} q16[m, col[j]]`` over the ``pairs``
    wrapped ``(column, channel)`` entries. Per row the zeros are vector stores and each pair one scalar
    add into ``corr`` itself (a scratch scalar per ``(m, o)`` would be a workspace allocation each)."""

    @T.prim_func(private=True)
    def wrap_sum(q_h: T.handle, col: T.Buffer((pairs,), "int32"), chan: T.Buffer((pairs,), "int32"), c_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        q = T.match_buffer(q_h, (rows, k_pad), "int16")
        corr = T.match_buffer(c_h, (rows, out), "int32")
        for m in T.parallel(rows):
            for o in T.vectorized(out):
                corr[m, o] = T.int32(0)
            for j in range(pairs):
                corr[m, chan[j]] = corr[m, chan[j]] + T.Cast("int32", q[m, col[j]])

    return wrap_sum


def _wrap_pairs(weights: Int16Weights) -> tuple[np.ndarray, np.ndarray]:
    """``(column, channel)`` int32 arrays of every wrapped entry, channel-major."""
    chan = np.concatenate(
        [np.full(len(w), o, np.int32) for o, w in enumerate(weights.wrapped)] or [np.zeros(0, np.int32)]
    )
    col = np.concatenate([w.astype(np.int32) for w in weights.wrapped] or [np.zeros(0, np.int32)])
    return col, chan


def _combine(ctx: LowerContext, acc: relax.Expr, q16: relax.Expr, rows, weights: Int16Weights) -> relax.Expr:
    """``[rows, P * Opad]`` plane sums -> the reference's ``acc [rows, O]``: int32 when no plane needs a
    multiplier, else int64 ``sum_p mult[p] * (acc_p + 65536 * corr)`` (exact; the value fits int32)."""
    mult = weights.mult
    planes, out = mult.shape
    padded = -(-out // ROWS) * ROWS
    wrapped = any(len(w) for w in weights.wrapped)
    if planes > 1:
        acc = ctx.emit(op.reshape(acc, (rows, planes, padded)))
        if padded != out:
            acc = ctx.emit(op.strided_slice(acc, axes=[2], begin=[0], end=[out]))
    elif padded != out:
        acc = ctx.emit(op.strided_slice(acc, axes=[1], begin=[0], end=[out]))
    if planes == 1 and not wrapped and np.all(mult == 1):
        return acc
    total = ctx.emit(op.astype(acc, "int64"))
    if wrapped:
        corr = _wrap_corrections(ctx, q16, rows, weights)
        corr = ctx.emit(op.multiply(op.astype(corr, "int64"), constant(np.array(65536, np.int64))))
        if planes > 1:
            corr = ctx.emit(op.concat([op.expand_dims(corr, [1]), op.zeros((rows, planes - 1, out), "int64")], 1))
        total = ctx.emit(op.add(total, corr))
    total = ctx.emit(op.multiply(total, constant(mult.astype(np.int64) if planes > 1 else mult[0].astype(np.int64))))
    return ctx.emit(op.sum(total, axis=[1])) if planes > 1 else total


def int_matmul(ctx: LowerContext, q16: relax.Expr, rows, weights: Int16Weights) -> relax.Expr:
    """Exact ``acc [rows, O]`` of the int16 codes ``q16 [rows, 2*ceil(K/2)]`` against :func:`encode_int16`'s weights."""
    packed = pack_int16(weights.code)
    blocks, k2 = packed.shape[:2]
    vnni = has_vnni()
    gv = ctx.bb.add_func(gemm_func(blocks, k2, vnni), "shift_int16_gemm_vnni" if vnni else "shift_int16_gemm")
    acc = ctx.emit(
        relax.op.call_tir(gv, [q16, constant(packed)], out_ty=relax.TensorType((rows, blocks * ROWS), "int32"))
    )
    return _combine(ctx, acc, q16, rows, weights)


def rescale(ctx: LowerContext, acc: relax.Expr, s: relax.Expr, scale: relax.Expr, bits: int) -> relax.Expr:
    """The reference's float steps: ``float32(acc) * 2^-E * s[r] * scale[o]``, NaN for non-finite rows."""
    y = ctx.emit(op.multiply(op.astype(acc, "float32"), scalar(2.0 ** -(2**bits - 1), "float32")))
    y = ctx.emit(op.multiply(y, s))
    y = ctx.emit(op.multiply(y, scale))
    finite = ctx.emit(op.less(op.abs(s), scalar(np.inf, "float32")))
    return ctx.emit(op.where(finite, y, scalar(np.nan, "float32")))


def int8_code_vectorizable(x: tirx.PrimExpr, scale: tirx.PrimExpr) -> tirx.PrimExpr:
    """``lower_lowbit.int8_code`` with the rounding as LLVM's ``nearbyint`` intrinsic: TVM's vectorizer
    scalarizes ``tirx.nearbyint`` (16 ``vdivss``/``vroundss`` per vector), the intrinsic becomes
    ``vdivps`` + ``vrndscaleps``. The same round-half-to-even of the same quotient."""
    ok = tirx.all(scale > tirx.const(0, "float32"), scale < tirx.const(np.inf, "float32"))
    safe = tirx.Select(ok, scale, tirx.const(1, "float32"))
    value = tirx.Select(scale < tirx.const(np.inf, "float32"), x, tirx.const(0, "float32"))
    rounded = tirx.call_llvm_pure_intrin("float32", "llvm.nearbyint.f32", value / safe)
    clipped = tirx.max(tirx.min(rounded, tirx.const(INT8_QMAX, "float32")), tirx.const(-INT8_QMAX, "float32"))
    return clipped.astype("int32")


def quotient(x: tirx.PrimExpr, inverse: tirx.PrimExpr) -> tirx.PrimExpr:
    """``float32(x / s)``, correctly rounded, from ``inverse = float64(1) / float64(s)``: ``float32(float64(x)
    * inverse)``. Exact because ``x / s`` (two float32s) is never a float32 rounding midpoint (its odd
    significand part divides ``x``'s, so it has at most 24 bits) and is at least ``2^-50`` (relative)
    away from any, while the float64 product is within ``2^-52``. Quotients below float32's normal
    range round to 0 either way. Two multiplies in 8 float64 lanes instead of a ``vdivps``, which is
    the conv codes' bottleneck (9 divisions per input element for a 3x3 window)."""
    return (x.astype("float64") * inverse).astype("float32")


def rint(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """Round half to even as LLVM's ``nearbyint`` intrinsic (vectorizes; ``tirx.nearbyint`` does not)."""
    return tirx.call_llvm_pure_intrin("float32", "llvm.nearbyint.f32", x)


# -- shift_linear: per-row codes ------------------------------------------------------------------
def quantize_rows_codes(
    ctx: LowerContext, x2: relax.Expr, k: int, multiple: int = 2, dtype: str = "int16", offset: int = 0
) -> tuple[relax.Expr, relax.Expr]:
    """``(codes [rows, K padded to multiple], s float32 [rows, 1])``: the registry's per-row int8 codes
    ``q`` stored as ``dtype`` values ``q + offset`` (the padding: ``offset``)."""
    from tvm import te

    amax = ctx.emit(lower_lowbit.row_absmax(x2))
    s = ctx.emit(op.divide(amax, scalar(float(INT8_QMAX), "float32")))
    k_pad = -(-k // multiple) * multiple
    shift = tirx.const(offset, "int32")

    def codes(x, s):
        def value(m, c):
            q = int8_code_vectorizable(x[m, tirx.min(c, k - 1)], s[m, 0])
            return (tirx.Select(c < k, q, tirx.const(0, "int32")) + shift).astype(dtype)

        return te.compute((x.shape[0], k_pad), value, name="q16" if dtype == "int16" else "q8")

    return ctx.te(codes, x2, s, name=f"quantize_rows_{dtype}"), s


def shift_matmul_int(
    ctx: LowerContext, x2: relax.Expr, rows, sign: np.ndarray, exponent: np.ndarray, scale: relax.Expr, bits: int
) -> relax.Expr:
    """``shift_linear`` on ``x2 [rows, K]`` as ``[rows, O]`` float32 (no bias) through the int16 GEMM."""
    q16, s = quantize_rows_codes(ctx, x2, sign.shape[1])
    return rescale(ctx, int_matmul(ctx, q16, rows, encode_int16(sign, exponent, bits)), s, scale, bits)


# -- shift_conv2d: per-window codes ---------------------------------------------------------------
def conv_k_pad(k: int, int8: bool) -> int:
    """The codes' row length: ``K`` padded to whole int16 pairs, or int8 quads."""
    multiple = 4 if int8 else 2
    return -(-k // multiple) * multiple


def conv_prep_func(channels: int, hw: tuple[int, int]) -> tirx.PrimFunc:
    """``(x, x) -> (xt, cm)``: the NHWC copy of ``x [n, C, h, w]`` and ``cm[n, y, x, 0] = max_c |x|``
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
        cm = T.match_buffer(cm_h, (n, h, w, 1), "float32")
        for p in T.parallel(n * h):
            for xx in range(w):
                cm[p // h, p % h, xx, 0] = T.float32(0)
            for c in range(channels):
                for xx in range(w):
                    v = T.meta_var(x[p // h, c, p % h, xx])
                    xt[p // h, p % h, xx, c] = v
                    again = T.meta_var(x_again[p // h, c, p % h, xx])  # the same value
                    cm[p // h, p % h, xx, 0] = T.max(
                        cm[p // h, p % h, xx, 0], T.if_then_else(T.isnan(again), inf, T.fabs(v))
                    )

    return conv_prep


def conv_codes_func(
    channels: int,
    hw: tuple[int, int],
    kernel,
    stride,
    padding,
    dilation,
    out_hw: tuple[int, int],
    parts: int = 1,
    int8: bool = False,
) -> tirx.PrimFunc:
    """``(xt, cm) -> (s, q)``: per output pixel ``r`` its window's scale ``s[r] = max cm / 127`` and the
    int16 codes ``q[r, (i*kw + j)*C + c] = int8_code(xt[n, y, x, c], s[r])`` (0 in the padding and
    past ``K``), ``K = kh*kw*C`` padded to even. A row whose scale is not finite (NaN or inf in the
    window) gets zero codes, as ``int8_code``; its outputs become NaN in the epilogue. The scale
    test is made once per row, so the inner loop is load, divide, round, clip, narrow, store. ``cm``
    is ``[n, h, w, parts]``: each pixel's channel max in ``parts`` pieces (one from the prep kernel, one
    per output tile from a producing :func:`gemm_fused_func`). ``int8``: the codes as ``uint8`` ``q + 128``
    (``shift_int8.py``; a zero code is 128) with ``K`` padded to a multiple of 4."""
    h, w = hw
    kh, kw = kernel
    oh, ow = out_hw
    top, left = padding[0], padding[1]
    k = kh * kw * channels
    k_pad = conv_k_pad(k, int8)
    dtype = "uint8" if int8 else "int16"
    offset = 128 if int8 else 0
    zero = tirx.const(offset, dtype)
    vec = 16
    body, tail = channels // vec, channels % vec
    lo, hi = T.float32(-INT8_QMAX), T.float32(INT8_QMAX)

    def window_max(cm, img, oy, ox):
        """``max`` of ``cm`` over the window (0 in the padding) as one expression: a TVMScript variable
        updated in a loop becomes a workspace allocation, and the loop around it spills to the stack."""
        best = tirx.const(0, "float32")
        for i in range(kh):
            for j in range(kw):
                yy = oy * stride[0] + i * dilation[0] - top
                xx = ox * stride[1] + j * dilation[1] - left
                inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
                for part in range(parts):
                    value = cm[img, tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0), part]
                    best = tirx.max(best, tirx.Select(inside, value, tirx.const(0, "float32")))
        return best

    def code(v, inverse):
        return T.Cast(dtype, T.Cast("int32", T.max(T.min(rint(quotient(v, inverse)), hi), lo)) + offset)

    @T.prim_func(private=True)
    def conv_codes(xt_h: T.handle, cm_h: T.handle, s_h: T.handle, q_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        n = T.int64()
        xt4 = T.match_buffer(xt_h, (n, h, w, channels), "float32")
        cm = T.match_buffer(cm_h, (n, h, w, parts), "float32")
        s = T.match_buffer(s_h, (n * oh * ow, 1), "float32")
        q2 = T.match_buffer(q_h, (n * oh * ow, k_pad), dtype)
        xt = T.decl_buffer((n * h * w * channels,), "float32", data=xt4.data)
        q = T.decl_buffer((n * oh * ow * k_pad,), dtype, data=q2.data)
        for r in T.parallel(n * oh * ow):
            img = T.meta_var(r // (oh * ow))
            oy = T.meta_var(r % (oh * ow) // ow)
            ox = T.meta_var(r % ow)
            s[r, 0] = window_max(cm, img, oy, ox) / T.float32(INT8_QMAX)
            scale = T.meta_var(s[r, 0])  # meta_var substitutes; a named scalar is a workspace per row
            row = T.meta_var(r * k_pad)
            if scale < T.float32(np.inf):
                inverse = T.meta_var(
                    T.float64(1) / T.Cast("float64", T.Select(scale > T.float32(0), scale, T.float32(1)))
                )
                for i2, j2 in T.grid(kh, kw):  # fresh names: a reassigned TVMScript variable becomes a heap buffer
                    y2 = T.meta_var(oy * stride[0] + i2 * dilation[0] - top)
                    x2 = T.meta_var(ox * stride[1] + j2 * dilation[1] - left)
                    col = T.meta_var(row + (i2 * kw + j2) * channels)
                    if y2 >= 0 and y2 < h and x2 >= 0 and x2 < w:
                        src = T.meta_var(((img * h + y2) * w + x2) * channels)
                        for cb in range(body):
                            for cv in T.vectorized(vec):
                                q[col + cb * vec + cv] = code(xt[src + cb * vec + cv], inverse)
                        for ct in range(tail):
                            q[col + body * vec + ct] = code(xt[src + body * vec + ct], inverse)
                    else:
                        for c in range(channels):
                            q[col + c] = zero
            else:
                for c in range(k):
                    q[row + c] = zero
            for c in range(k_pad - k):
                q[row + k + c] = zero

    return conv_codes


@dataclass(frozen=True)
class ChannelLast:
    """A ``shift_conv2d`` input held as ``[N*H*W, C]`` float32 (as a :func:`gemm_fused_func` wrote it)
    with ``cm [N*H*W, parts]``, each pixel's channel max in ``parts`` pieces (see :func:`conv_codes_func`)."""

    cm: relax.Expr
    parts: int


def takes_channel_last(ctx: LowerContext, node) -> bool:
    """Whether ``node`` is a ``shift_conv2d`` lowered by :func:`shift_conv_int` (groups 1, a CPU) that
    can read its input as :class:`ChannelLast` instead of NCHW."""
    from reshift.codegen.tvm.kernels.lowbit import kernel_flavor

    return (
        node.op == "shift_conv2d"
        and node.attrs["groups"] == 1
        and kernel_flavor() != "gpu"
        and node.inputs[0] not in node.inputs[1:]
        and all(isinstance(d, int) for d in node.inputs[0].shape[1:])
    )


@dataclass
class _Chain:
    """The nodes after a shift conv that its fused GEMM computes (see :class:`Epilogue`)."""

    relu: object = None
    add: object = None
    residual: object = None  # the add's other IR value
    relu_after: object = None
    channel_last: bool = False  # every reader of the result is a :func:`takes_channel_last` conv

    def last(self, node):
        return self.relu_after or self.add or self.relu or node


def _epilogue_chain(ctx: LowerContext, node) -> _Chain:
    """``relu``, ``add`` of a tensor already lowered (same shape), ``relu``, each the only reader of the
    previous value, as far as they go; then whether the result can stay channel-last."""
    chain = _Chain()
    value = node.outputs[0]
    chain.relu = ctx.relu_of(value)
    if chain.relu is not None:
        value = chain.relu.outputs[0]
    residual = ctx.residual_add(value)
    if residual is not None:
        (chain.add, chain.residual), value = residual, residual[0].outputs[0]
        chain.relu_after = ctx.relu_of(value)
        if chain.relu_after is not None:
            value = chain.relu_after.outputs[0]
    readers = ctx.users.get(value, [])
    chain.channel_last = (
        chain.add is None
        and bool(readers)
        and value not in ctx.graph_outputs
        and all(r.inputs[0] is value and takes_channel_last(ctx, r) for r in readers)
    )
    return chain


def window_codes(ctx: LowerContext, node, x, out_hw, rows, int8: bool = False) -> tuple[relax.Expr, relax.Expr]:
    """``(s [rows, 1], q [rows, K_pad])``: the per-window codes (int16, or ``int8``'s uint8), from a
    :class:`ChannelLast` input when the producer left one, else from an NHWC copy (:func:`conv_prep_func`)."""
    a = node.attrs
    channels = int(node.inputs[0].shape[1])
    hw = (int(node.inputs[0].shape[2]), int(node.inputs[0].shape[3]))
    kh, kw = node.inputs[1].shape[2:]
    batch = ctx.shape(node.inputs[0])[0]
    k_pad = conv_k_pad(kh * kw * channels, int8)
    held = ctx.padded.get(node.inputs[0])
    if held is not None and isinstance(held[1], ChannelLast):
        xt = ctx.emit(op.reshape(held[0], (batch, hw[0], hw[1], channels)))
        cm = ctx.emit(op.reshape(held[1].cm, (batch, hw[0], hw[1], held[1].parts)))
        parts = held[1].parts
    else:
        prep = ctx.bb.add_func(conv_prep_func(channels, hw), "shift_conv2d_prep")
        prepped = ctx.emit(
            relax.op.call_tir(
                prep,
                [x, x],
                out_ty=[
                    relax.TensorType((batch, hw[0], hw[1], channels), "float32"),
                    relax.TensorType((batch, hw[0], hw[1], 1), "float32"),
                ],
            )
        )
        xt, cm = ctx.emit(relax.TupleGetItem(prepped, 0)), ctx.emit(relax.TupleGetItem(prepped, 1))
        parts = 1
    window = (a["stride"], a["padding"], a["dilation"])
    codes_fn = conv_codes_func(channels, hw, (kh, kw), *window, out_hw, parts, int8)
    gv = ctx.bb.add_func(codes_fn, "shift_conv2d_codes_u8" if int8 else "shift_conv2d_codes")
    dtype = "uint8" if int8 else "int16"
    coded = ctx.emit(
        relax.op.call_tir(
            gv,
            [xt, cm],
            out_ty=[relax.TensorType((rows, 1), "float32"), relax.TensorType((rows, k_pad), dtype)],
        )
    )
    return ctx.emit(relax.TupleGetItem(coded, 0)), ctx.emit(relax.TupleGetItem(coded, 1))


def filter_rows(codes: np.ndarray) -> np.ndarray:
    """An OIHW filter's codes as ``[O, kh*kw*C]`` in ``(i, j, c)`` column order, as :func:`window_codes` writes."""
    return np.ascontiguousarray(codes.transpose(0, 2, 3, 1)).reshape(codes.shape[0], -1)


def shift_conv_int(ctx: LowerContext, node, x, sign: np.ndarray, exponent: np.ndarray, scale, bias) -> relax.Expr:
    """``shift_conv2d`` with ``groups == 1`` as per-window codes + an integer GEMM: with VNNI, whole
    16-channel blocks and codes that fit int8 (:func:`encode_int8`), uint8 codes on ``vpdpbusd``; else
    int16 codes on the int16 GEMM. With VNNI, one plane and whole 16-channel blocks the GEMM applies the
    epilogue (rescale, bias, and the ReLU / residual
    add / ReLU after it, :func:`_epilogue_chain`) in registers and stores NCHW, or channel-last for
    shift convs reading only its result; else the int32 sums go through Relax's elementwise ops."""
    a = node.attrs
    out_channels = sign.shape[0]
    oh, ow = (int(d) for d in node.outputs[0].shape[2:])
    batch = ctx.shape(node.inputs[0])[0]
    rows = batch * oh * ow
    sign2, exponent2 = filter_rows(sign), filter_rows(exponent)
    fused = has_vnni() and out_channels % ROWS == 0
    weights8 = encode_int8(sign2, exponent2, a["exponent_bits"]) if fused else None
    if weights8 is not None:  # uint8 codes on vpdpbusd (shift_int8.py)
        s, q8 = window_codes(ctx, node, x, (oh, ow), rows, int8=True)
        return _fused_conv(ctx, node, q8, s, weights8, scale, bias, (batch, oh, ow))
    s, q16 = window_codes(ctx, node, x, (oh, ow), rows)
    weights = encode_int16(sign2, exponent2, a["exponent_bits"])
    if fused and weights.mult.shape[0] == 1:
        return _fused_conv(ctx, node, q16, s, weights, scale, bias, (batch, oh, ow))
    y = rescale(ctx, int_matmul(ctx, q16, rows, weights), s, scale, a["exponent_bits"])
    if bias is not None:
        y = ctx.emit(op.add(y, bias))
    y = ctx.emit(op.reshape(y, [batch, oh, ow, out_channels]))
    return ctx.emit(op.permute_dims(y, [0, 3, 1, 2]))


def _wrap_corrections(ctx: LowerContext, q16, rows, weights: Int16Weights) -> relax.Expr | None:
    """``corr [rows, O]`` int32 of :func:`wrap_sum_func`, or None when no column wraps."""
    if not any(len(w) for w in weights.wrapped):
        return None
    out = weights.mult.shape[1]
    col, chan = _wrap_pairs(weights)
    gv = ctx.bb.add_func(wrap_sum_func(-(-weights.code.shape[2] // 2) * 2, out, len(col)), "shift_int16_wrap_sum")
    return ctx.emit(
        relax.op.call_tir(gv, [q16, constant(col), constant(chan)], out_ty=relax.TensorType((rows, out), "int32"))
    )


def _fused_conv(ctx: LowerContext, node, q, s, weights: Int16Weights | Int8Weights, scale, bias, nhw) -> relax.Expr:
    """The GEMM of :func:`gemm_fused_func` for ``node`` and the nodes of its :func:`_epilogue_chain`, on
    int16 codes ``q`` and :class:`Int16Weights`, or uint8 codes and :class:`Int8Weights`."""
    batch, oh, ow = nhw
    rows = batch * oh * ow
    int8 = isinstance(weights, Int8Weights)
    out = weights.code.shape[-2]
    if int8:
        packed = pack_weights(weights.code)
        mult, start, corr = weights.mult.astype(np.int32), -128 * weights.code.astype(np.int64).sum(axis=1), None
    else:
        packed = pack_int16(weights.code)
        mult, start, corr = weights.mult[0], None, _wrap_corrections(ctx, q, rows, weights)
    blocks, k_words = packed.shape[:2]
    chain = _epilogue_chain(ctx, node)
    epi = Epilogue(
        int8=int8,
        bits=node.attrs["exponent_bits"],
        out_hw=(oh, ow),
        has_bias=bias is not None,
        wrapped=corr is not None,
        relu=chain.relu is not None,
        residual=chain.add is not None,
        relu_after=chain.relu_after is not None,
        nhwc=chain.channel_last,
    )
    tiles = gemm_tiles(blocks)[1]
    unused = s  # any tensor: the kernel does not read an operand its epilogue lacks
    args = [
        q,
        constant(packed),
        constant(mult),
        s,
        scale,
        bias if bias is not None else constant(np.zeros(out, np.float32)),
        corr if corr is not None else unused,
        ctx.env[chain.residual] if chain.add is not None else unused,
        constant(start.astype(np.int32)) if start is not None else unused,
    ]
    if epi.nhwc:
        out_ty = [relax.TensorType((rows, out), "float32"), relax.TensorType((rows, tiles), "float32")]
    else:
        out_ty = [relax.TensorType((batch, out, oh, ow), "float32"), relax.TensorType((1, tiles), "float32")]
    name = "shift_int8_conv_fused" if int8 else "shift_int16_conv_fused"
    gv = ctx.bb.add_func(gemm_fused_func(blocks, k_words, epi), name)
    both = ctx.emit(relax.op.call_tir(gv, args, out_ty=out_ty))
    y = ctx.emit(relax.TupleGetItem(both, 0))
    last = chain.last(node)
    for fused in (chain.relu, chain.add, chain.relu_after):
        if fused is not None:
            ctx.fused[fused] = [ABSORBED]
    if epi.nhwc:
        cm = ctx.emit(relax.TupleGetItem(both, 1))
        ctx.padded[last.outputs[0]] = (y, ChannelLast(cm, tiles))
        return ABSORBED
    if last is node:
        return y
    ctx.fused[last] = [y]
    return ABSORBED


# -- depthwise shift_conv2d: one channel per group ----------------------------------------------------
def depthwise_func(
    channels: int,
    per_group: int,
    hw: tuple[int, int],
    kernel,
    stride,
    padding,
    dilation,
    out_hw: tuple[int, int],
    bits: int,
    has_bias: bool,
    relu: bool = False,
) -> tirx.PrimFunc:
    """``(x, w, scale, bias) -> y`` NCHW for ``groups == C`` (``per_group`` outputs per input channel):
    per output pixel and channel the window's scale ``s = max |x| / 127`` (+inf for NaN), its int8
    codes (the quotients through :func:`quotient`'s float64 reciprocal, one per pixel), the exact int32
    ``acc = sum_taps q * w`` (``w = sign * 2^(E - exponent)``, ``kh*kw`` terms), then the reference's
    float steps, and ``relu`` (a ReLU reading only this conv, fused). Vectorized over the output columns."""
    h, w = hw
    kh, kw = kernel
    oh, ow = out_hw
    top, left = padding[0], padding[1]
    taps = kh * kw
    out_channels = channels * per_group
    inf = T.float32(np.inf)
    unit = T.float32(2.0 ** -(2**bits - 1))

    def tap(x, img, g, oy, ox, i, j):
        yy = oy * stride[0] + i * dilation[0] - top
        xx = ox * stride[1] + j * dilation[1] - left
        inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
        value = x[img, g, tirx.max(tirx.min(yy, h - 1), 0), tirx.max(tirx.min(xx, w - 1), 0)]
        return tirx.Select(inside, value, tirx.const(0, "float32"))

    def magnitude(v):
        return tirx.Select(tirx.isnan(v), inf, T.fabs(v))

    def finish(acc, s, scale, bias):
        value = ((acc.astype("float32") * unit) * s) * scale
        value = tirx.Select(s < inf, value, tirx.const(np.nan, "float32"))
        value = value + bias if has_bias else value
        zero = tirx.const(0, "float32")
        return tirx.Select(value <= zero, zero, value) if relu else value  # numpy.maximum(value, 0)

    def code(v, s, inverse):
        """``lower_lowbit.int8_code(v, s)`` with ``v / s`` as :func:`quotient` (``inverse = 1 / safe s``)."""
        value = tirx.Select(s < inf, v, tirx.const(0, "float32"))
        rounded = rint(quotient(value, inverse))
        lo, hi = tirx.const(-INT8_QMAX, "float32"), tirx.const(INT8_QMAX, "float32")
        return tirx.max(tirx.min(rounded, hi), lo).astype("int32")

    @T.prim_func(private=True)
    def shift_depthwise(
        x_h: T.handle,
        wq: T.Buffer((out_channels, taps), "int32"),
        scale: T.Buffer((out_channels,), "float32"),
        bias: T.Buffer((out_channels,), "float32"),
        y_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(x_h, (n, channels, h, w), "float32")
        y = T.match_buffer(y_h, (n, out_channels, oh, ow), "float32")
        for p in T.parallel(n * channels * oh):
            img = T.meta_var(p // (channels * oh))
            g = T.meta_var(p % (channels * oh) // oh)
            oy = T.meta_var(p % oh)
            s = T.alloc_buffer((ow,), "float32", scope="global")
            for ox in T.vectorized(ow):
                s[ox] = T.float32(0)
            for i, j in T.grid(kh, kw):
                for ox in T.vectorized(ow):  # no let inside a vectorized loop: TVM broadcasts lane 0
                    s[ox] = T.max(s[ox], magnitude(tap(x, img, g, oy, ox, i, j)))
            inv = T.alloc_buffer((ow,), "float64", scope="global")
            for ox in T.vectorized(ow):
                s[ox] = s[ox] / T.float32(INT8_QMAX)
            for ox in T.vectorized(ow):
                inv[ox] = T.float64(1) / T.Cast(
                    "float64", T.Select(s[ox] > T.float32(0) and s[ox] < inf, s[ox], T.float32(1))
                )
            for t in range(per_group):
                o = T.meta_var(g * per_group + t)
                acc = T.alloc_buffer((ow,), "int32", scope="global")
                for ox in T.vectorized(ow):
                    acc[ox] = T.int32(0)
                for i, j in T.grid(kh, kw):
                    for ox in T.vectorized(ow):
                        acc[ox] = acc[ox] + code(tap(x, img, g, oy, ox, i, j), s[ox], inv[ox]) * wq[o, i * kw + j]
                for ox in T.vectorized(ow):
                    y[img, o, oy, ox] = finish(acc[ox], s[ox], scale[o], bias[o])

    return shift_depthwise


def shift_depthwise_int(ctx: LowerContext, node, x, sign: np.ndarray, exponent: np.ndarray, scale, bias):
    """``shift_conv2d`` with one input channel per group (depthwise) as :func:`depthwise_func`, with a
    ReLU that only reads it."""
    a = node.attrs
    out_channels, _, kh, kw = sign.shape
    in_shape = node.inputs[0].shape
    channels = int(in_shape[1])
    hw = (int(in_shape[2]), int(in_shape[3]))
    oh, ow = (int(d) for d in node.outputs[0].shape[2:])
    e_max = 2 ** a["exponent_bits"] - 1
    w = np.where(sign != 0, sign.astype(np.int64) << (e_max - exponent.astype(np.int64)), 0)
    relu = ctx.only_reader(node.outputs[0])
    if relu is not None and (relu.op != "relu" or relu.inputs[0] is not node.outputs[0]):
        relu = None
    func = depthwise_func(
        channels,
        out_channels // channels,
        hw,
        (kh, kw),
        a["stride"],
        a["padding"],
        a["dilation"],
        (oh, ow),
        a["exponent_bits"],
        bias is not None,
        relu is not None,
    )
    gv = ctx.bb.add_func(func, "shift_conv2d_depthwise")
    bias_arg = bias if bias is not None else constant(np.zeros(out_channels, np.float32))
    batch = ctx.shape(node.inputs[0])[0]
    y = ctx.emit(
        relax.op.call_tir(
            gv,
            [x, constant(w.reshape(out_channels, -1).astype(np.int32)), scale, bias_arg],
            out_ty=relax.TensorType((batch, out_channels, oh, ow), "float32"),
        )
    )
    if relu is not None:
        ctx.fused[relu] = [y]
    return y


# -- the GEMM with the whole epilogue in registers -----------------------------------------------
@dataclass(frozen=True)
class Epilogue:
    """What :func:`gemm_fused_func` computes after the integer sum, in the unfused ops' order:
    ``acc = (sum + 65536 * corr) * mult`` (int32: the value is the reference's ``acc``, which fits),
    ``y = float32(acc) * 2^-E * s[r] * scale[o]`` (NaN where ``s`` is not finite) ``+ bias``, then
    ``relu``, ``+ residual`` (an NCHW tensor of the output's shape), ``relu_after``. ``nhwc``: ``y``
    is stored ``[rows, O]`` (channel-last, what a following shift conv's codes read) with
    ``cm[r, t] = max |y|`` over the row's channels of output tile ``t`` (+inf for NaN); else NCHW
    (``out_hw = (OH, OW)``). ``int8``: the sum is ``vpdpbusd``'s over uint8 codes ``q + 128`` and int8
    weights (``shift_int8.py``), started at ``-128 * sum_k w[o, k]``; never ``wrapped``."""

    bits: int
    out_hw: tuple[int, int]
    has_bias: bool = False
    wrapped: bool = False
    relu: bool = False
    residual: bool = False
    relu_after: bool = False
    nhwc: bool = False
    int8: bool = False


def gemm_tiles(blocks: int) -> tuple[int, int]:
    """``(tile, tiles)``: output blocks per parallel task and tasks across the output channels."""
    tile = next(t for t in (4, 2, 1) if blocks % t == 0)
    return tile, blocks // tile


def _relu(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """``numpy.maximum(v, 0)`` (NaN kept, ``-0.0`` -> ``0.0``) as a select."""
    zero = tirx.Broadcast(tirx.const(0, "float32"), ROWS)
    return tirx.Select(v <= zero, zero, v)


def gemm_fused_func(blocks: int, k2: int, epi: Epilogue) -> tirx.PrimFunc:
    """:func:`gemm_func`'s VNNI GEMM (``O = 16 * blocks`` output channels, no padding) with :class:`Epilogue`
    applied to the accumulators in registers: ``(a, w, mult, s, scale, bias, corr, residual, start) -> (y,
    cm)``. ``k2`` counts 32-bit activation words (int16 pairs, or ``epi.int8``'s uint8 quads).
    ``corr`` (``[rows, O]`` int32), ``residual`` and ``start`` (``[O]`` int32, the int8 sums' first
    value) are read only when ``epi`` says so (else any tensor); ``cm`` (``[rows, tiles]``) is written
    only for ``nhwc``. The scale multiply is ``vmulps {rn-sae}``
    (LLVM contracts a plain multiply and a following add into one FMA, which rounds once)."""
    width = blocks * ROWS
    lanes = T.Ramp(0, 1, ROWS)
    tile, tiles = gemm_tiles(blocks)
    ohw = epi.out_hw[0] * epi.out_hw[1]
    inf = tirx.Broadcast(tirx.const(np.inf, "float32"), ROWS)
    nan = tirx.Broadcast(tirx.const(np.nan, "float32"), ROWS)
    unit = tirx.Broadcast(tirx.const(2.0 ** -(2**epi.bits - 1), "float32"), ROWS)
    per_word, code_type = (4, "uint8") if epi.int8 else (2, "int16")
    w_type = "int8" if epi.int8 else "int16"
    dot = "llvm.x86.avx512.vpdpbusd.512" if epi.int8 else _dot_intrinsic()
    operand = f"{w_type}x{ROWS * per_word}"

    def nchw(m, o):
        """The NCHW places of row ``m``'s channels ``o..o+15`` (``OH*OW`` apart)."""
        return tirx.Ramp((m // ohw * width + o) * ohw + m % ohw, ohw, ROWS)

    def value(acc_vec, m, o, mult, s, scale, bias, corr, res):
        """The epilogue of one 16-channel vector of row ``m``, channels ``o..o+15``."""
        vec = tirx.Ramp(o, 1, ROWS)
        if epi.wrapped:
            acc_vec = acc_vec + corr[m, vec] * tirx.Broadcast(tirx.const(65536, "int32"), ROWS)
        acc_vec = acc_vec * mult[vec]
        s_m = tirx.Broadcast(s[m, 0], ROWS)
        f = (acc_vec.astype(f"float32x{ROWS}") * unit) * s_m
        f = tirx.call_llvm_pure_intrin(
            f"float32x{ROWS}", "llvm.x86.avx512.mul.ps.512", f, scale[vec], tirx.const(ROUND_NEAREST, "int32")
        )
        f = tirx.Select(s_m < inf, f, nan)
        if epi.has_bias:
            f = f + bias[vec]
        if epi.relu:
            f = _relu(f)
        if epi.residual:
            f = f + res[nchw(m, o)]
        if epi.relu_after:
            f = _relu(f)
        return f

    def magnitude(f):
        return tirx.Select(tirx.isnan(f), inf, tirx.abs(f))

    def lane_max(buf):
        best = buf[0]
        for lane in range(1, ROWS):
            best = tirx.max(best, buf[lane])
        return best

    def rows_block(n_rows: int):
        @T.macro
        def block(a, wf, yf, cm, mult, s, scale, bias, corr, res, first, t, m0):
            total = T.alloc_buffer((n_rows * tile, ROWS), "int32", scope="global")  # < 1 KiB: registers
            for r in T.unroll(n_rows):
                for b in T.unroll(tile):
                    if epi.int8:
                        total[r * tile + b, lanes] = first[T.Ramp((t * tile + b) * ROWS, 1, ROWS)]
                    else:
                        total[r * tile + b, lanes] = T.Broadcast(T.int32(0), ROWS)
            for kk in range(k2):
                for r in T.unroll(n_rows):
                    for b in T.unroll(tile):
                        total[r * tile + b, lanes] = T.call_llvm_pure_intrin(
                            "int32x16",
                            dot,
                            total[r * tile + b, lanes],
                            T.reinterpret(operand, T.Broadcast(a[m0 + r, kk], ROWS)),
                            wf[T.Ramp(((t * tile + b) * k2 + kk) * (ROWS * per_word), 1, ROWS * per_word)],
                        )
            for r in T.unroll(n_rows):
                if epi.nhwc:
                    big = T.alloc_buffer((ROWS,), "float32", scope="global")
                    big[lanes] = T.Broadcast(T.float32(0), ROWS)
                    for b in T.unroll(tile):
                        yf[T.Ramp((m0 + r) * width + (t * tile + b) * ROWS, 1, ROWS)] = value(
                            total[r * tile + b, lanes], m0 + r, (t * tile + b) * ROWS, mult, s, scale, bias, corr, res
                        )
                        big[lanes] = T.max(
                            big[lanes], magnitude(yf[T.Ramp((m0 + r) * width + (t * tile + b) * ROWS, 1, ROWS)])
                        )
                    cm[m0 + r, t] = lane_max(big)
                else:
                    for b in T.unroll(tile):
                        yf[nchw(m0 + r, (t * tile + b) * ROWS)] = value(
                            total[r * tile + b, lanes], m0 + r, (t * tile + b) * ROWS, mult, s, scale, bias, corr, res
                        )

        return block

    main, one = rows_block(ROW_BLOCK), rows_block(1)

    oh, ow = epi.out_hw

    @T.prim_func(private=True)
    def gemm_fused(
        a_h: T.handle,
        w: T.Buffer((blocks, k2, ROWS, per_word), w_type),
        mult: T.Buffer((width,), "int32"),
        s_h: T.handle,
        scale: T.Buffer((width,), "float32"),
        bias: T.Buffer((width,), "float32"),
        corr_h: T.handle,
        res_h: T.handle,
        start_h: T.handle,
        y_h: T.handle,
        cm_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        rows = T.int64()
        a16 = T.match_buffer(a_h, (rows, k2 * per_word), code_type)
        s = T.match_buffer(s_h, (rows, 1), "float32")
        # every match_buffer before the first decl_buffer (each decl_buffer opens a frame)
        if epi.wrapped:
            corr = T.match_buffer(corr_h, (rows, width), "int32")
        if epi.residual:
            n_res = T.int64()
            res4 = T.match_buffer(res_h, (n_res, width, oh, ow), "float32")
        if epi.int8:
            first = T.match_buffer(start_h, (width,), "int32")
        if epi.nhwc:
            y2 = T.match_buffer(y_h, (rows, width), "float32")
            cm = T.match_buffer(cm_h, (rows, tiles), "float32")
        else:
            n_out = T.int64()
            y2 = T.match_buffer(y_h, (n_out, width, oh, ow), "float32")
        if not epi.wrapped:
            corr = T.decl_buffer((rows, width), "int32", data=a16.data)  # never read
        if epi.residual:
            res = T.decl_buffer((rows * width,), "float32", data=res4.data)
        else:
            res = T.decl_buffer((rows * width,), "float32", data=s.data)  # never read
        if not epi.nhwc:
            cm = T.decl_buffer((rows, tiles), "float32", data=s.data)  # never written
        if not epi.int8:
            first = T.decl_buffer((width,), "int32", data=mult.data)  # never read
        y = T.decl_buffer((rows * width,), "float32", data=y2.data)
        a = T.decl_buffer((rows, k2), "int32", data=a16.data)  # one int16 pair (or uint8 quad) per int32
        wf = T.decl_buffer((blocks * k2 * ROWS * per_word,), w_type, data=w.data)
        for task in T.parallel((rows + (CHUNK - 1)) // CHUNK * tiles):
            t = T.meta_var(task % tiles)
            base = T.meta_var(task // tiles * CHUNK)
            here = T.meta_var(T.min(T.int64(CHUNK), rows - base))
            for mb in range(here // ROW_BLOCK):
                main(a, wf, y, cm, mult, s, scale, bias, corr, res, first, t, base + mb * ROW_BLOCK)
            for m in range(here % ROW_BLOCK):
                one(a, wf, y, cm, mult, s, scale, bias, corr, res, first, t, base + here // ROW_BLOCK * ROW_BLOCK + m)

    return gemm_fused
