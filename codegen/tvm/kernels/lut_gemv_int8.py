"""Integer-table BCQ GEMV (T-MAC, Wei et al. 2024): int8 tables, ``vpermb`` lookups, ``vpdpbusd`` sums.

The float kernel (``lut_gemv.py``) looks up 16 float32 sums per ``vpermps``; on a Zen 5 core that
instruction and its add bound the decode GEMV well below the DRAM roofline. Here the tables are
quantized to int8 (T-MAC's table quantization; the numerics are the registry's
``lut_dtype="int8"`` variant, ``ir.ops_lowbit.lut_int8_rows``, which this kernel matches exactly):

* ``int8_tables_func``: per (row, group) ``s = max |T| / 127`` and ``Q = rint(T / s)`` of every
  16-entry table of +-sums of 4 activations; 4 slots' tables side by side make one 64-byte
  ``vpermb`` table ``lut[m, g, tb, 16 j + n] = Q[m, g, 4 tb + j, n]``.
* ``gemv_int8_func``: a 64-byte vector of weight bytes (``packing.nibble_words``) holds, for 16 rows,
  byte ``4 r + j`` = (lo nibble: row ``r``'s slot ``8 w + j``, hi nibble: slot ``8 w + 4 + j``). Two
  index vectors come out of it, ``(b & 15) | 16 j`` and ``((b >> 4) & 15) | 16 j`` (an and-or and a
  shift); ``vpermb`` looks up 64 int8 sums at once (4 slots x 16 rows, 256 weights), and
  ``vpdpbusd`` with a ones vector adds each row's 4 adjacent bytes into its int32 lane, so the
  integer sum of a (block, group, plane) is exact (|acc| <= 127 * slots). Then once per (block,
  group, plane): ``y += float32(acc) * (alpha * s)``. Per 512 weights: one load, three bit ops, two
  ``vpermb`` and two ``vpdpbusd``, against 8 shifts, 8 ``vpermps`` and 8 adds in float.

Needs AVX-512 BW, VBMI and VNNI (``has_int8_lut``); other targets keep the float kernel. The
float32 epilogue avoids fused multiply-adds so that it matches the numpy reference bit for bit.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.kernels.packing import ROWS, slot_layout
from reshift.ir.ops_lowbit import TABLE_QMAX

TABLE_BYTES = 64  # one vpermb table: 4 slots x 16 entries
SLOTS_PER_TABLE = 4
_ATTRS = {"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}


def has_int8_lut() -> bool:
    """AVX-512 BW + VBMI + VNNI on the current (or host) x86 target: the int8-table kernel runs there."""
    target = tvm.target.Target.current(allow_none=True)
    if target is None:
        from reshift.codegen.tvm.targets import host_cpu_flags

        return {"avx512bw", "avx512vbmi", "avx512_vnni"} <= set(host_cpu_flags())
    if target.kind.name != "llvm" or not (str(target.attrs.get("mtriple", "")) or "x86_64").startswith("x86_64"):
        return False
    try:
        return bool(tvm.target.codegen.llvm_cpu_has_features(["avx512bw", "avx512vbmi", "avx512vnni"], target))
    except Exception:  # noqa: BLE001 -- no mcpu or an LLVM without the query
        return False


def table_shape(group_size: int) -> tuple[int, int]:
    """``(slots per group, 64-byte tables per group)`` (slots padded to whole 8-slot words)."""
    slots, _ = slot_layout(group_size)
    return slots, slots // SLOTS_PER_TABLE


def _signs(j: int) -> tirx.PrimExpr:
    """float32x16: entry ``n`` is +1 where bit ``j`` of ``n`` is set, else -1."""
    bit = tirx.bitwise_and(tirx.shift_right(tirx.Ramp(0, 1, ROWS), tirx.Broadcast(j, ROWS)), tirx.Broadcast(1, ROWS))
    return tirx.Cast("float32x16", bit * tirx.Broadcast(2, ROWS) - tirx.Broadcast(1, ROWS))


def _entries(v, s) -> tirx.PrimExpr:
    """The 16 entries ``sum_j (bit j of n ? v_j : -v_j)`` of slot ``s``, summed in order j = 0..3
    (each product by +-1 is exact, so a fused multiply-add rounds the same)."""
    total = tirx.Broadcast(v[4 * s], ROWS) * _signs(0)
    for j in range(1, 4):
        total = total + tirx.Broadcast(v[4 * s + j], ROWS) * _signs(j)
    return total


def _absum(v, s) -> tirx.PrimExpr:
    """``((|v_0| + |v_1|) + |v_2|) + |v_3|`` of slot ``s``: the largest |entry|, by the same float ops."""
    total = tirx.abs(v[4 * s])
    for j in range(1, 4):
        total = total + tirx.abs(v[4 * s + j])
    return total


def _quantize(total, scale) -> tirx.PrimExpr:
    """``clip(rint(total / s), -127, 127)`` as int8x16 (``s = 0``: divide by 1, the entries are 0)."""
    qmax = float(TABLE_QMAX)
    safe = tirx.Select(scale > tirx.const(0, "float32"), scale, tirx.const(1, "float32"))
    q = tirx.nearbyint(total / tirx.Broadcast(safe, ROWS))
    q = tirx.max(
        tirx.min(q, tirx.Broadcast(tirx.const(qmax, "float32"), ROWS)),
        tirx.Broadcast(tirx.const(-qmax, "float32"), ROWS),
    )
    return tirx.Cast("int8x16", tirx.Cast("int32x16", q))


def int8_tables_func(in_features: int, group_size: int) -> tirx.PrimFunc:
    """``(x f32[rows, K]) -> (lut int8[rows, groups, tables, 64], scale f32[rows, groups])``: the
    registry's ``int8_tables`` in the ``vpermb`` layout (see the module docstring)."""
    n_groups = -(-in_features // group_size)
    slots, tables = table_shape(group_size)
    width = slots * 4
    qmax = float(TABLE_QMAX)

    @T.prim_func(private=True, s_tir=True)  # a root block: Relax's pattern analysis needs one
    def int8_tables(x_h: T.handle, lut_h: T.handle, scale_h: T.handle):
        T.func_attr(_ATTRS)
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, in_features), "float32")
        lut = T.match_buffer(lut_h, (rows, n_groups, tables, TABLE_BYTES), "int8")
        scale = T.match_buffer(scale_h, (rows, n_groups), "float32")
        with T.sblock("root"):
            for m in range(rows):
                for g in range(n_groups):
                    v = T.alloc_buffer((width,), "float32", scope="global")
                    amax = T.alloc_buffer((1,), "float32", scope="global")
                    for c in range(width):
                        v[c] = T.if_then_else(
                            c < group_size and g * group_size + c < in_features,
                            x[m, T.min(g * group_size + c, in_features - 1)],
                            T.float32(0),
                        )
                    amax[0] = T.float32(0)
                    for s in range(slots):
                        amax[0] = T.max(amax[0], _absum(v, s))
                    scale[m, g] = amax[0] / T.float32(qmax)
                    for s in range(slots):
                        lut[m, g, s // SLOTS_PER_TABLE, T.Ramp((s % SLOTS_PER_TABLE) * ROWS, 1, ROWS)] = _quantize(
                            _entries(v, s), scale[m, g]
                        )

    return int8_tables


_LO_NIBBLES = 0x0F0F0F0F
_SLOT_SELECT = 0x30201000  # byte j of each uint32 lane: table j of the 64-byte vpermb table (16 j)


def _vpdpbusd(acc, looked) -> tirx.PrimExpr:
    """``acc[l] += sum of the 4 signed bytes of lane l`` (``vpdpbusd`` against a ones vector)."""
    ones = tirx.Broadcast(tirx.const(1, "int8"), 4 * ROWS)
    return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, ones, looked)


def _vpermb(table, index) -> tirx.PrimExpr:
    return tirx.call_llvm_pure_intrin(
        "int8x64", "llvm.x86.avx512.permvar.qi.512", table, tirx.reinterpret("int8x64", index)
    )


def _plane_sum(lut, w, m, ob, g, i, words: int) -> tirx.PrimExpr:
    """int32x16: the exact integer sum ``sum_t Q[m, g, t, nibble]`` of 16 rows for (block, group, plane)."""
    lanes = tirx.Ramp(0, 1, ROWS)
    table = tirx.Ramp(0, 1, TABLE_BYTES)
    mask = tirx.Broadcast(tirx.const(_LO_NIBBLES, "uint32"), ROWS)
    select = tirx.Broadcast(tirx.const(_SLOT_SELECT, "uint32"), ROWS)
    four = tirx.Broadcast(tirx.const(4, "uint32"), ROWS)
    chains = [tirx.Broadcast(tirx.const(0, "int32"), ROWS)] * 2  # lo and hi nibbles: two dependency chains
    for wi in range(words):
        word = w[ob, g, i, wi, lanes]
        lo = tirx.bitwise_or(tirx.bitwise_and(word, mask), select)
        hi = tirx.bitwise_or(tirx.bitwise_and(tirx.shift_right(word, four), mask), select)
        chains[0] = _vpdpbusd(chains[0], _vpermb(lut[m, g, 2 * wi, table], lo))
        chains[1] = _vpdpbusd(chains[1], _vpermb(lut[m, g, 2 * wi + 1, table], hi))
    return chains[0] + chains[1]


def _fence(value) -> tirx.PrimExpr:
    """``llvm.arithmetic.fence``: the product stays a rounded product (LLVM would fuse it into the add)."""
    return tirx.call_llvm_pure_intrin("float32x16", "llvm.arithmetic.fence", value)


def _alpha16(alpha, ob, g, i) -> tirx.PrimExpr:
    value = alpha[ob, g, i, tirx.Ramp(0, 1, ROWS)]
    return value if alpha.dtype == "float32" else tirx.Cast("float32x16", value)


def gemv_int8_func(blocks: int, n_groups: int, planes: int, group_size: int, alpha_dtype: str = "float32"):
    """``(lut, scale, words, alpha, bias) -> y f32[rows, 16 blocks]``: ``y = bias + sum_{g, i}
    float32(acc[g, i]) * (alpha[g, i] * scale[g])`` in that order (``ir.ops_lowbit.lut_int8_rows``);
    ``words`` as ``packing.nibble_words`` lays them out, ``alpha`` float32 or float16 (converted exactly)."""
    assert alpha_dtype in ("float32", "float16"), alpha_dtype
    slots, words = slot_layout(group_size)
    tables = slots // SLOTS_PER_TABLE
    width = blocks * ROWS
    tile = next(t for t in (4, 2, 1) if blocks % t == 0)
    lanes = T.Ramp(0, 1, ROWS)

    @T.prim_func(private=True)
    def gemv_int8(
        lut_h: T.handle,
        scale_h: T.handle,
        w: T.Buffer((blocks, n_groups, planes, words, ROWS), "uint32"),
        alpha: T.Buffer((blocks, n_groups, planes, ROWS), alpha_dtype),
        bias: T.Buffer((width,), "float32"),
        y_h: T.handle,
    ):
        T.func_attr(_ATTRS)
        rows = T.int64()
        lut = T.match_buffer(lut_h, (rows, n_groups, tables, TABLE_BYTES), "int8")
        scale = T.match_buffer(scale_h, (rows, n_groups), "float32")
        y = T.match_buffer(y_h, (rows, width), "float32")
        for t in T.parallel(blocks // tile):
            for m in range(rows):
                out = T.alloc_buffer((tile, ROWS), "float32", scope="global")
                for b in T.unroll(tile):
                    out[b, lanes] = bias[T.Ramp((t * tile + b) * ROWS, 1, ROWS)]
                for g in range(n_groups):
                    for i in range(planes):
                        for b in T.unroll(tile):
                            out[b, lanes] = out[b, lanes] + _fence(
                                T.Cast("float32x16", _plane_sum(lut, w, m, t * tile + b, g, i, words))
                                * (_alpha16(alpha, t * tile + b, g, i) * T.Broadcast(scale[m, g], ROWS))
                            )
                for b in T.unroll(tile):
                    y[m, T.Ramp((t * tile + b) * ROWS, 1, ROWS)] = out[b, lanes]

    return gemv_int8
