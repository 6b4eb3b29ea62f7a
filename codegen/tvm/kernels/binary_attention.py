"""Binary-code attention kernels (``binary_attention``, ShiftAddViT): additions and table lookups only.

The op (``ir/ops_attention.py``) is ``out_i = sum_j w_ij v_j / sum_j w_ij`` with ``w_ij = 1 + m_ij``,
``m_ij`` the matching bits of the query and key codes. The CPU kernel never forms ``w``:

* keys, one pass: each key ``j`` adds ``v_j`` (and one to a count) to one row per 4-bit group of
  its code, the row its 4 bits index (``b / 4`` vector adds per key; the bits pick the row, no
  branch); from those ``16 b / 4`` rows, per bit ``l`` the sums over keys whose bit is 1
  (``A_l``) and 0 (``S_v - A_l``, summed, not subtracted), and ``S_v``;
* nibble tables (T-MAC's trick, Wei et al., EuroSys 2025): per group of 4 bits, the 16 sums of one
  table row per bit, for every 4-bit query pattern (and their counts);
* queries: the 4-bit groups of the code index those tables: ``num_i = S_v + sum_g LUT_g[n_gi]``,
  ``den_i = S + sum_g CNT_g[n_gi]`` (``b / 4`` vector adds per query instead of ``S`` multiply-adds),
  then one float64 divide per output.

``causal=True`` walks the tokens once: key ``i`` enters the running table, then query ``i`` reads
it bit by bit (``b`` adds; the table changes every step, so no nibble tables).

Sums run in float64 and the counts in int32, so the integer parts are exact and the output is the
reference's float64 quotient rounded once to float32 (within one float32 ulp of it: only the order
of float64 additions differs). Parallel over (batch x head); the ``Dv`` loops are vectorized. GPU
targets get the same sums as TE reductions (non-causal) or the direct weighted sum (causal).
"""

from __future__ import annotations

from tvm import relax, te, tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.lower import LowerContext, lowering, op, product
from reshift.codegen.tvm.targets import current_target_is_gpu
from reshift.ir.graph import Node

NIBBLE = 4


def _bit(x) -> tirx.PrimExpr:
    """1 where the code is +1 (``x >= 0``; NaN: 0), as the reference's ``binary_codes``."""
    return T.Select(x >= T.float32(0), 1, 0)


def binary_attention_func(bits: int, v_dim: int) -> tirx.PrimFunc:
    """The non-causal kernel for ``bits``-bit codes and ``v_dim`` value channels (see module docstring)."""
    groups = -(-bits // NIBBLE)
    entries = groups * 16

    @T.prim_func(private=True)
    def binary_attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, y_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        batch, tq, ts = T.int64(), T.int64(), T.int64()
        qh = T.match_buffer(q_h, (batch, tq, bits), "float32")
        kh = T.match_buffer(k_h, (batch, ts, bits), "float32")
        v = T.match_buffer(v_h, (batch, ts, v_dim), "float32")
        y = T.match_buffer(y_h, (batch, tq, v_dim), "float32")
        for bi in T.parallel(batch):
            tab = T.alloc_buffer((2 * bits, v_dim), "float64", scope="local")
            cnt = T.alloc_buffer((2 * bits,), "int32", scope="local")
            lut = T.alloc_buffer((entries, v_dim), "float64", scope="local")
            lcnt = T.alloc_buffer((entries,), "int32", scope="local")
            kn = T.alloc_buffer((entries, v_dim), "float64", scope="local")
            kc = T.alloc_buffer((entries,), "int32", scope="local")
            tot = T.alloc_buffer((v_dim,), "float64", scope="local")
            acc = T.alloc_buffer((v_dim,), "float64", scope="local")
            code = T.alloc_buffer((groups,), "int32", scope="local")
            den = T.alloc_buffer((1,), "int32", scope="local")
            for r in range(entries):
                kc[r] = 0
                for d in T.vectorized(v_dim):
                    kn[r, d] = T.float64(0)
            for j in range(ts):  # each key adds its value to one row per 4-bit group of its code
                for g in T.unroll(groups):
                    code[g] = 0
                    for t in T.unroll(NIBBLE):
                        if g * NIBBLE + t < bits:
                            code[g] = code[g] + T.shift_left(_bit(kh[bi, j, g * NIBBLE + t]), t)
                for g in T.unroll(groups):
                    kc[g * 16 + code[g]] = kc[g * 16 + code[g]] + 1
                    for d in T.vectorized(v_dim):
                        kn[g * 16 + code[g], d] = kn[g * 16 + code[g], d] + T.Cast("float64", v[bi, j, d])
            for d in T.vectorized(v_dim):
                tot[d] = T.float64(0)
            for n in range(16):
                for d in T.vectorized(v_dim):
                    tot[d] = tot[d] + kn[n, d]
            for lb in range(bits):  # per bit: the keys whose bit is 0 (row 2l) and 1 (row 2l+1)
                cnt[2 * lb] = 0
                cnt[2 * lb + 1] = 0
                for d in T.vectorized(v_dim):
                    tab[2 * lb, d] = T.float64(0)
                    tab[2 * lb + 1, d] = T.float64(0)
                for n in range(16):
                    cnt[2 * lb + T.bitwise_and(T.shift_right(n, lb % NIBBLE), 1)] = (
                        cnt[2 * lb + T.bitwise_and(T.shift_right(n, lb % NIBBLE), 1)] + kc[lb // NIBBLE * 16 + n]
                    )
                    for d in T.vectorized(v_dim):
                        tab[2 * lb + T.bitwise_and(T.shift_right(n, lb % NIBBLE), 1), d] = (
                            tab[2 * lb + T.bitwise_and(T.shift_right(n, lb % NIBBLE), 1), d]
                            + kn[lb // NIBBLE * 16 + n, d]
                        )
            for g in T.unroll(groups):
                for n in range(16):
                    lcnt[g * 16 + n] = 0
                    for d in T.vectorized(v_dim):
                        lut[g * 16 + n, d] = T.float64(0)
                    for t in T.unroll(NIBBLE):
                        if g * NIBBLE + t < bits:
                            lcnt[g * 16 + n] = (
                                lcnt[g * 16 + n] + cnt[2 * (g * NIBBLE + t) + T.bitwise_and(T.shift_right(n, t), 1)]
                            )
                            for d in T.vectorized(v_dim):
                                lut[g * 16 + n, d] = (
                                    lut[g * 16 + n, d]
                                    + tab[2 * (g * NIBBLE + t) + T.bitwise_and(T.shift_right(n, t), 1), d]
                                )
            for i in range(tq):
                for g in T.unroll(groups):
                    code[g] = 0
                    for t in T.unroll(NIBBLE):
                        if g * NIBBLE + t < bits:
                            code[g] = code[g] + T.shift_left(_bit(qh[bi, i, g * NIBBLE + t]), t)
                den[0] = T.Cast("int32", ts)
                for d in T.vectorized(v_dim):
                    acc[d] = tot[d]
                for g in T.unroll(groups):
                    den[0] = den[0] + lcnt[g * 16 + code[g]]
                    for d in T.vectorized(v_dim):
                        acc[d] = acc[d] + lut[g * 16 + code[g], d]
                for d in T.vectorized(v_dim):
                    y[bi, i, d] = T.Cast("float32", acc[d] / T.Cast("float64", den[0]))

    return binary_attention


def causal_binary_attention_func(bits: int, v_dim: int) -> tirx.PrimFunc:
    """The causal kernel: key ``i`` joins the running table, then query ``i`` reads it."""

    @T.prim_func(private=True)
    def causal_binary_attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, y_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        batch, tq = T.int64(), T.int64()
        qh = T.match_buffer(q_h, (batch, tq, bits), "float32")
        kh = T.match_buffer(k_h, (batch, tq, bits), "float32")
        v = T.match_buffer(v_h, (batch, tq, v_dim), "float32")
        y = T.match_buffer(y_h, (batch, tq, v_dim), "float32")
        for bi in T.parallel(batch):
            tab = T.alloc_buffer((2 * bits, v_dim), "float64", scope="local")
            cnt = T.alloc_buffer((2 * bits,), "int32", scope="local")
            tot = T.alloc_buffer((v_dim,), "float64", scope="local")
            acc = T.alloc_buffer((v_dim,), "float64", scope="local")
            den = T.alloc_buffer((1,), "int32", scope="local")
            for r in range(2 * bits):
                cnt[r] = 0
                for d in T.vectorized(v_dim):
                    tab[r, d] = T.float64(0)
            for d in T.vectorized(v_dim):
                tot[d] = T.float64(0)
            for i in range(tq):
                for d in T.vectorized(v_dim):
                    tot[d] = tot[d] + T.Cast("float64", v[bi, i, d])
                for lb in range(bits):
                    cnt[2 * lb + _bit(kh[bi, i, lb])] = cnt[2 * lb + _bit(kh[bi, i, lb])] + 1
                    for d in T.vectorized(v_dim):
                        tab[2 * lb + _bit(kh[bi, i, lb]), d] = tab[2 * lb + _bit(kh[bi, i, lb]), d] + T.Cast(
                            "float64", v[bi, i, d]
                        )
                den[0] = T.Cast("int32", i + 1)
                for d in T.vectorized(v_dim):
                    acc[d] = tot[d]
                for lb in range(bits):
                    den[0] = den[0] + cnt[2 * lb + _bit(qh[bi, i, lb])]
                    for d in T.vectorized(v_dim):
                        acc[d] = acc[d] + tab[2 * lb + _bit(qh[bi, i, lb]), d]
                for d in T.vectorized(v_dim):
                    y[bi, i, d] = T.Cast("float32", acc[d] / T.Cast("float64", den[0]))

    return causal_binary_attention


def portable_binary_attention(qh: te.Tensor, kh: te.Tensor, v: te.Tensor, causal: bool) -> te.Tensor:
    """The same function as TE reductions (GPU targets): the linear form, or the direct weighted sum
    over ``j <= i`` when causal."""
    batch, tq, bits = qh.shape
    ts, v_dim = v.shape[1], v.shape[2]
    one = lambda x: (x >= tirx.const(0, "float32")).astype("int32")  # noqa: E731
    if causal:
        r = te.reduce_axis((0, ts), name="r")

        def weight(b, i, j):
            match = sum(one(qh[b, i, lb]) == one(kh[b, j, lb]) for lb in range(int(bits)))
            return tirx.Select(j <= i, 1 + match.astype("int32"), 0)

        w = te.compute((batch, tq, ts), weight, name="binary_weights")
        num = te.compute(
            (batch, tq, v_dim),
            lambda b, i, d: te.sum(w[b, i, r].astype("float64") * v[b, r, d].astype("float64"), axis=r),
            name="binary_num",
        )
        r2 = te.reduce_axis((0, ts), name="r2")
        den = te.compute((batch, tq), lambda b, i: te.sum(w[b, i, r2], axis=r2), name="binary_den")
        return te.compute(
            (batch, tq, v_dim),
            lambda b, i, d: (num[b, i, d] / den[b, i].astype("float64")).astype("float32"),
            name="binary_attention",
        )
    r = te.reduce_axis((0, ts), name="r")
    ones = te.compute(
        (batch, bits, v_dim),
        lambda b, lb, d: te.sum(
            tirx.Select(one(kh[b, r, lb]) == 1, v[b, r, d].astype("float64"), tirx.const(0, "float64")), axis=r
        ),
        name="binary_key_sums",
    )
    r2 = te.reduce_axis((0, ts), name="r2")
    tot = te.compute((batch, v_dim), lambda b, d: te.sum(v[b, r2, d].astype("float64"), axis=r2), name="binary_total")
    r3 = te.reduce_axis((0, ts), name="r3")
    cnt = te.compute((batch, bits), lambda b, lb: te.sum(one(kh[b, r3, lb]), axis=r3), name="binary_key_counts")
    keys = ts.astype("int32") if hasattr(ts, "astype") else tirx.const(int(ts), "int32")

    def out(b, i, d):
        num = tot[b, d] + sum(
            tirx.Select(one(qh[b, i, lb]) == 1, ones[b, lb, d], tot[b, d] - ones[b, lb, d]) for lb in range(int(bits))
        )
        den = keys + sum(tirx.Select(one(qh[b, i, lb]) == 1, cnt[b, lb], keys - cnt[b, lb]) for lb in range(int(bits)))
        return (num / den.astype("float64")).astype("float32")

    return te.compute((batch, tq, v_dim), out, name="binary_attention")


@lowering("binary_attention")
def lower_binary_attention(ctx: LowerContext, node: Node, qh, kh, v) -> relax.Expr:
    q_shape, k_shape, v_shape = ctx.shape(node.inputs[0]), ctx.shape(node.inputs[1]), ctx.shape(node.inputs[2])
    lead, tq, ts, bits, v_dim = q_shape[:-2], q_shape[-2], k_shape[-2], int(q_shape[-1]), int(v_shape[-1])
    batch = product(lead)
    q3 = ctx.emit(op.reshape(qh, (batch, tq, bits)))
    k3 = ctx.emit(op.reshape(kh, (batch, ts, bits)))
    v3 = ctx.emit(op.reshape(v, (batch, ts, v_dim)))
    causal = node.attrs["causal"]
    if current_target_is_gpu():
        y = ctx.te(portable_binary_attention, q3, k3, v3, causal, name="binary_attention")
    else:
        func = (causal_binary_attention_func if causal else binary_attention_func)(bits, v_dim)
        gv = ctx.bb.add_func(func, "causal_binary_attention" if causal else "binary_attention")
        out_ty = relax.TensorType((batch, tq, v_dim), "float32")
        y = ctx.emit(relax.op.call_tir(gv, [q3, k3, v3], out_ty=out_ty))
    return ctx.emit(op.reshape(y, [*lead, tq, v_dim]))
