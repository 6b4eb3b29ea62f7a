"""Shift-and-add attention for ``log2_matmul`` (RepQ-ViT): ``sum_k V_int[k] << (E - e_k)`` in int32.

Three element-wise stages feed one kernel:

* codes of ``p`` without a logarithm: ``y = p / scale`` in float64 is ``m * 2^x`` with ``m`` in
  ``[1, 2)`` (read from the bits); ``rint(-log2 y)`` is ``-x`` or ``-x - 1`` as ``m`` is below or
  above ``sqrt2``, and ``rint(-2 log2 y)`` is ``-2x``, ``-2x - 1`` or ``-2x - 2`` against ``2^(1/4)``
  and ``2^(3/4)``. That is the reference's float64 ``log2`` rounding whenever ``y`` is at least one
  float64 ulp away from those irrational thresholds, which always holds when ``scale`` is a power of
  two (``y`` is a float32, at least ``1.4e-8`` relative away). One int32 per element: ``-1`` for the
  zero code (and NaN), else ``E - e`` plus 32 times the level's accumulator class (the odd sqrt2
  codes; an adaptive base's fractional exponent). Adaptive bases ``2^a`` compare ``y`` against the
  float64 thresholds ``2^(-(j + 1/2) a)`` instead: ``rint(-log2(y) / a) > j`` exactly when ``y`` is
  below the ``j``-th one (with ``a = p/16``, ``p <= 16``, no threshold is a power of two); the two
  can only disagree for ``y`` within float64 rounding of a threshold (tests check the float32
  neighbours of every threshold of two bases).
* ``V_int = clip(rint(v / v_scale) + z, lo, hi) - z`` in float32 arithmetic, as ``quantize_uniform``.
* NaN flags per row of ``p`` and per column of ``v``.

The kernel walks ``(batch*head, row)`` pairs in parallel; per token ``k`` one scalar branch skips
the zero code or picks the accumulator, and the body ``acc[r, :] += V_int[k, :] << shift`` is
vectorized over the head dimension (``vpsllvd``/``vpaddd``). With one or two classes the choice is
an unrolled compare (the accumulators stay in registers); an adaptive base's up to 16 classes index
an accumulator row instead (1.8x faster than 16 compares on ViT-S attention). The epilogue follows
the reference exactly: ``t = sum_r int64(acc_r) * N[r]`` and ``y = float32(float64(t) * C)``; no
float add follows a multiply, so LLVM's FMA contraction cannot change a bit. GPU targets get the
same stages with plain TE reductions (correct, untuned).
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.lower import LowerContext, lowering, op, product
from reshift.codegen.tvm.targets import current_target_is_gpu
from reshift.ir.graph import Node
from reshift.ir.ops_quant import (
    adaptive_exponent,
    adaptive_period,
    last_kept_code,
    log2_matmul_rescale,
    residue_numerators,
    smallest_level_exponent,
    uniform_range,
)

RESIDUE_BITS = 5  # code = shift + 32 * residue class; shifts are below 31 (the int32 bound)
RESIDUE = 1 << RESIDUE_BITS
_MANTISSA = (1 << 52) - 1


def _mantissa_bits(c: float) -> int:
    return int(np.float64(c).view(np.int64)) & _MANTISSA


def adaptive_codes(y, bits: int, base: float, table_size: int, skip_code: int | None = None):
    """The code ``q`` of ``y = p / scale > 0`` for an adaptive base ``2^a``: ``rint(-log2(y) / a) >= j + 1``
    exactly when ``y < 2^(-(j + 1/2) a)``, so ``q`` counts the float64 thresholds above ``y`` (none of
    them is a power of two, see module docstring); ``2^bits - 1`` thresholds tell the zero code. With
    ``skip_code`` (the first code not accumulated) the count stops there: ``q = skip_code`` means skip."""
    a = adaptive_exponent(base, table_size) / table_size
    count = min(2**bits - 1, skip_code if skip_code is not None else 2**bits - 1)
    return sum((y < tirx.const(2.0 ** (-(j + 0.5) * a), "float64")).astype("int32") for j in range(count))


def shift_codes(
    p: te.Tensor, bits: int, base_kind: str, scale: float, base: float, table_size: int, floor_exponent: int = -1
) -> te.Tensor:
    """int32 ``[B, M, K]``: ``-1`` (zero code, NaN, past the floor), else ``(E - e) + 32 * residue`` (see
    module docstring)."""
    e_max = smallest_level_exponent(bits, base_kind, base, table_size, floor_exponent)
    zero_code = last_kept_code(bits, base_kind, base, table_size, floor_exponent) + 1  # this code and above: skip
    if base_kind == "adaptive":
        step, periods, unit = adaptive_period(base, table_size)  # unit = gcd(step, table_size)

        def adaptive(*idx):
            x = p[idx]
            y = x.astype("float64") / tirx.const(float(np.float32(scale)), "float64")
            q = adaptive_codes(y, bits, base, table_size, zero_code)
            skip = tirx.any(tirx.isnan(x), x <= tirx.const(0, "float32"), q >= zero_code)
            n = q * step
            code = (e_max - tirx.floordiv(n, table_size)) + tirx.floormod(tirx.floordiv(n, unit), periods) * RESIDUE
            return tirx.Select(skip, tirx.const(-1, "int32"), code)

        return te.compute(p.shape, adaptive, name="log2_shift_codes")
    sqrt2 = base_kind == "log_sqrt2"
    thresholds = [2**0.25, 2**0.75] if sqrt2 else [2**0.5]

    def fn(*idx):
        x = p[idx]
        y = x.astype("float64") / tirx.const(float(np.float32(scale)), "float64")
        word = tirx.reinterpret("int64", y)
        exponent = tirx.shift_right(word, tirx.const(52, "int64")).astype("int32") - 1023  # y > 0: sign bit 0
        mantissa = tirx.bitwise_and(word, tirx.const(_MANTISSA, "int64"))
        above = sum(
            (mantissa > tirx.const(_mantissa_bits(t), "int64")).astype("int32") for t in thresholds
        )  # -log2(m) / step rounds to -above
        q = (-2 if sqrt2 else -1) * exponent - above
        q = tirx.max(q, 0)
        q = tirx.Select(y >= tirx.const(np.inf, "float64"), 0, q)  # +inf: the top level
        skip = tirx.any(tirx.isnan(x), x <= tirx.const(0, "float32"), q >= zero_code)
        e = tirx.floordiv(q + 1, 2) if sqrt2 else q
        odd = tirx.floormod(q, 2) if sqrt2 else tirx.const(0, "int32")
        return tirx.Select(skip, tirx.const(-1, "int32"), (e_max - e) + odd * RESIDUE)

    return te.compute(p.shape, fn, name="log2_shift_codes")


def quantize_v(v: te.Tensor, v_scale: float, zero_point: int, bits: int, signed: bool) -> te.Tensor:
    """``clip(rint(v / s) + z, lo, hi) - z`` as int32 (NaN -> 0)."""
    lo, hi = uniform_range(bits, signed)

    def fn(*idx):
        x = tirx.Select(tirx.isnan(v[idx]), tirx.const(0, "float32"), v[idx])
        q = tirx.nearbyint(x / tirx.const(float(np.float32(v_scale)), "float32")) + tirx.const(zero_point, "float32")
        q = tirx.max(tirx.min(q, tirx.const(hi, "float32")), tirx.const(lo, "float32"))
        return q.astype("int32") - zero_point

    return te.compute(v.shape, fn, name="log2_matmul_v_int")


def nan_flags(p: te.Tensor, v: te.Tensor) -> tuple[te.Tensor, te.Tensor]:
    """int32 ``[B, M]`` (a NaN in row ``m`` of ``p``) and ``[B, D]`` (a NaN in column ``j`` of ``v``)."""
    b, m, k = p.shape
    d = v.shape[2]
    r = te.reduce_axis((0, k), name="r")
    rows = te.compute((b, m), lambda i, j: te.max(tirx.isnan(p[i, j, r]).astype("int32"), axis=r), name="p_nan")
    r2 = te.reduce_axis((0, k), name="r2")
    cols = te.compute((b, d), lambda i, j: te.max(tirx.isnan(v[i, r2, j]).astype("int32"), axis=r2), name="v_nan")
    return rows, cols


def log2_matmul_func(m: int, k: int, d: int, residues: int, rescale: float) -> tirx.PrimFunc:
    """``y[b, i, :] = epilogue(sum_k code -> V_int[b, k, :] << shift)`` (see module docstring)."""
    few = residues <= 2

    @T.prim_func(private=True)
    def log2_matmul(
        code_h: T.handle, v_h: T.handle, prow_h: T.handle, vcol_h: T.handle, numer_h: T.handle, y_h: T.handle
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        batch = T.int64()
        code = T.match_buffer(code_h, (batch, m, k), "int32")
        vi = T.match_buffer(v_h, (batch, k, d), "int32")
        prow = T.match_buffer(prow_h, (batch, m), "int32")
        vcol = T.match_buffer(vcol_h, (batch, d), "int32")
        numer = T.match_buffer(numer_h, (residues,), "int64")
        y = T.match_buffer(y_h, (batch, m, d), "float32")
        for bi in T.parallel(batch * m):
            acc = T.alloc_buffer(
                (residues, d), "int32", scope="global"
            )  # on the stack below 1 KiB (one or two classes); "local" is a heap workspace
            total = T.alloc_buffer((d,), "int64", scope="global")
            for r in T.unroll(residues):
                for j in T.vectorized(d):
                    acc[r, j] = T.int32(0)
            for kk in range(k):
                c = T.meta_var(code[bi // m, bi % m, kk])  # substituted: a named scalar is a workspace
                if c >= 0:
                    cls = T.meta_var(T.shift_right(c, RESIDUE_BITS))
                    shift = T.meta_var(T.bitwise_and(c, RESIDUE - 1))
                    if few:  # unrolled: each accumulator stays in registers
                        for r in T.unroll(residues):
                            if cls == r:
                                for j in T.vectorized(d):
                                    acc[r, j] = acc[r, j] + T.shift_left(vi[bi // m, kk, j], shift)
                    else:  # an indexed accumulator row (L1) beats a chain of compares
                        for j in T.vectorized(d):
                            acc[cls, j] = acc[cls, j] + T.shift_left(vi[bi // m, kk, j], shift)
            for j in T.vectorized(d):
                total[j] = T.int64(0)
            for r in T.unroll(residues):
                for j in T.vectorized(d):
                    total[j] = total[j] + T.Cast("int64", acc[r, j]) * numer[r]
            for j in T.vectorized(d):  # one expression: a TVMScript let here was broadcast from lane 0
                y[bi // m, bi % m, j] = T.Select(
                    prow[bi // m, bi % m] + vcol[bi // m, j] > 0,
                    T.float32(np.nan),
                    T.Cast("float32", T.Cast("float64", total[j]) * T.float64(rescale)),
                )

    return log2_matmul


def portable_log2_matmul(
    code: te.Tensor, vi: te.Tensor, prow: te.Tensor, vcol: te.Tensor, numerators: tuple[int, ...], rescale: float
) -> te.Tensor:
    """The same sums as TE reductions (GPU targets)."""
    b, m, k = code.shape
    d = vi.shape[2]
    zero = tirx.const(0, "int32")

    def acc(residue: int) -> te.Tensor:
        r = te.reduce_axis((0, k), name="r")

        def fn(i, row, j):
            c = code[i, row, r]
            hit = tirx.all(c >= 0, tirx.shift_right(c, RESIDUE_BITS) == residue)
            shifted = tirx.shift_left(vi[i, r, j], tirx.bitwise_and(c, RESIDUE - 1))
            return te.sum(tirx.Select(hit, shifted, zero), axis=r)

        return te.compute((b, m, d), fn, name=f"acc_{residue}")

    accs = [acc(r) for r in range(len(numerators))]

    def out(i, row, j):
        t = sum(
            a[i, row, j].astype("int64") * tirx.const(int(n), "int64") for a, n in zip(accs, numerators, strict=True)
        )
        value = (t.astype("float64") * tirx.const(rescale, "float64")).astype("float32")
        return tirx.Select(prow[i, row] + vcol[i, j] > 0, tirx.const(np.nan, "float32"), value)

    return te.compute((b, m, d), out, name="log2_matmul")


@lowering("log2_matmul")
def lower_log2_matmul(ctx: LowerContext, node: Node, p, v) -> relax.Expr:
    a = node.attrs
    p_shape, v_shape = ctx.shape(node.inputs[0]), ctx.shape(node.inputs[1])
    m, k, d = p_shape[-2], p_shape[-1], v_shape[-1]
    lead = p_shape[:-2]
    batch = product(lead)
    p3 = ctx.emit(op.reshape(p, (batch, m, k)))
    v3 = ctx.emit(op.reshape(v, (batch, k, d)))
    kind = (a["base_kind"], a["base"], a["table_size"])
    floor = a.get("floor_exponent", -1)
    code = ctx.te(shift_codes, p3, a["bits"], a["base_kind"], a["scale"], *kind[1:], floor, name="log2_shift_codes")
    vi = ctx.te(quantize_v, v3, a["v_scale"], a["v_zero_point"], a["v_bits"], a["v_signed"], name="log2_matmul_v_int")
    flags = ctx.te(nan_flags, p3, v3, name="log2_matmul_nan_flags")
    prow, vcol = ctx.emit(relax.TupleGetItem(flags, 0)), ctx.emit(relax.TupleGetItem(flags, 1))
    rescale = log2_matmul_rescale(a["bits"], a["base_kind"], a["scale"], a["v_scale"], *kind[1:], floor)
    numerators = residue_numerators(*kind)[0]
    if current_target_is_gpu():
        ints = tuple(int(n) for n in numerators)  # emit_te takes no numpy arrays
        y = ctx.te(portable_log2_matmul, code, vi, prow, vcol, ints, rescale, name="log2_matmul")
    else:
        func = log2_matmul_func(int(m), int(k), int(d), len(numerators), rescale)
        gv = ctx.bb.add_func(func, "log2_matmul_shift_add")
        args = [code, vi, prow, vcol, relax.const(numerators, "int64")]
        y = ctx.emit(relax.op.call_tir(gv, args, out_ty=relax.TensorType((batch, m, d), "float32")))
    return ctx.emit(op.reshape(y, [*lead, m, d]))
