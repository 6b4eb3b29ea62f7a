"""Fused int8 GEMM for ``int8_linear`` on AVX-512 VNNI: one quantize prologue, one register-blocked GEMM.

Two hand-written TIR functions replace the chain of quantize / GEMM / zero-point correction /
rescale / NaN mask / bias kernels (each a pass over memory) that ``int8_gemm.py`` lowers to:

* ``quantize_rows_func``: per row of ``x [M, K]`` (in parallel, 16 lanes at a time) the
  activation quantization of ``ops_quant.int8_linear_ref``: the per-tensor ``(x_scale, z)``, or the
  per-row dynamic ``(s_m, z_m)`` of ``row_params`` (min/max with 0, NaN cleaned to 0), written as
  ``q [M, 4*K4]`` uint8 (zero padded) and ``rows [M, 2]`` float32 ``(s_m, z_m)``; ``s_m`` is NaN for
  a row holding a NaN, so the rescale below makes the whole output row NaN as the reference does.
* ``gemm_rescale_func``: ``acc = sum_k q[m,k] wq[o,k]`` with ``vpdpbusd`` (u8 x s8 -> s32) on a
  register tile of ``R`` rows x ``V`` 16-wide output panels (each 64-byte weight load serves ``R``
  rows, each broadcast activation word ``V`` panels; BLIS's micro-kernel, Goto & van de Geijn 2008),
  then in registers ``y = float32(acc - z_m * sum_k wq[o,k]) * (s_m * w_scale[o]) + bias[o]``.
  Per tensor ``s_m * w_scale[o]`` is ``float32(x_scale) * w_scale[o]``, the reference's rescale, so
  one kernel serves both granularities and every step is the reference's float32 operation:
  the output is bit-exact. (The rescale multiply is ``vmulps {rn-sae}``: LLVM contracts a plain
  multiply and the bias add into an FMA, which rounds once instead of twice.)

Weights are packed ``[O/16, K/4, 16, 4]`` as in ``int8_gemm.pack_weights``.

Knobs of the GEMM (``GEMM_KNOBS``, searched per shape by ``codegen/tvm/tune_knobs.py``): the
register tile, ``rows_tile`` x ``panels``. Integer accumulation and the per-element rescale do not
depend on the tile, so every choice is bit-identical.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from reshift.codegen.tvm import knobs as knob_db

LANES = 16
ROUND_NEAREST = 8  # _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC: the default rounding, as an operand
ACCUMULATORS = 15  # R*V*64 B under 1 KiB keeps the tile in registers (see dense_cpu.ACCUMULATORS)


def tile_shape(blocks: int) -> tuple[int, int]:
    """``(R, V)``: rows and 16-wide output panels per register tile (``V`` divides ``blocks``)."""
    panels = next(v for v in (4, 3, 2, 1) if blocks % v == 0)
    return max(1, ACCUMULATORS // panels), panels


def quantize_rows_func(k: int, k_pad: int, bits: int, per_row: bool) -> tirx.PrimFunc:
    """``x [M, k]`` float32 -> ``(q [M, k_pad]`` uint8, ``rows [M, 2]`` float32 ``(s_m, z_m))`` (see module
    docstring); ``params [2]`` holds the per-tensor ``(float32(x_scale), zero point)``, or per row
    ``(2^bits - 1, 0)`` (the divisor of the range)."""
    qmax = float(2**bits - 1)
    k_vec = k - k % LANES
    lanes = T.Ramp(0, 1, LANES)
    inf = float("inf")
    nan = float("nan")

    @T.prim_func(private=True)
    def quantize_rows(x_h: T.handle, params: T.Buffer((2,), "float32"), q_h: T.handle, rows_h: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        m_rows = T.int64()
        x = T.match_buffer(x_h, (m_rows, k), "float32")
        q = T.match_buffer(q_h, (m_rows, k_pad), "uint8")
        info = T.match_buffer(rows_h, (m_rows, 2), "float32")
        for m in T.parallel(m_rows):
            lo = T.alloc_buffer((LANES,), "float32", scope="global")
            hi = T.alloc_buffer((LANES,), "float32", scope="global")
            bad = T.alloc_buffer((LANES,), "int32", scope="global")
            sz = T.alloc_buffer((4,), "float32", scope="global")
            lo[lanes] = T.Broadcast(T.float32(0), LANES)
            hi[lanes] = T.Broadcast(T.float32(0), LANES)
            bad[lanes] = T.Broadcast(T.int32(0), LANES)
            for c in range(k_vec // LANES):
                v = x[m, T.Ramp(c * LANES, 1, LANES)]
                nanv = T.isnan(v)
                clean = T.Select(nanv, T.Broadcast(T.float32(0), LANES), v)
                lo[lanes] = T.min(lo[lanes], clean)
                hi[lanes] = T.max(hi[lanes], clean)
                bad[lanes] = T.max(bad[lanes], T.Cast("int32x16", nanv))
            for c in range(k_vec, k):
                v1 = x[m, c]
                if T.isnan(v1):
                    bad[0] = 1
                else:
                    lo[0] = T.min(lo[0], v1)
                    hi[0] = T.max(hi[0], v1)
            sz[0] = T.float32(0)  # min
            sz[1] = T.float32(0)  # max
            sz[2] = T.float32(0)  # any NaN
            for l in range(LANES):
                sz[0] = T.min(sz[0], lo[l])
                sz[1] = T.max(sz[1], hi[l])
                sz[2] = T.max(sz[2], T.Cast("float32", bad[l]))
            if per_row:
                s = (sz[1] - sz[0]) / params[0]
                sz[3] = T.Select(T.And(s > T.float32(0), s < T.float32(inf)), s, T.float32(1))
                sz[0] = T.max(T.min(T.nearbyint(-sz[0] / sz[3]), T.float32(qmax)), T.float32(0))
            else:
                sz[3] = params[0]
                sz[0] = params[1]
            for c in range(k_vec // LANES):
                v = x[m, T.Ramp(c * LANES, 1, LANES)]
                clean = T.Select(T.isnan(v), T.Broadcast(T.float32(0), LANES), v)
                t = T.nearbyint(clean / T.Broadcast(sz[3], LANES)) + T.Broadcast(sz[0], LANES)
                t = T.max(T.min(t, T.Broadcast(T.float32(qmax), LANES)), T.Broadcast(T.float32(0), LANES))
                q[m, T.Ramp(c * LANES, 1, LANES)] = T.Cast("uint8x16", t)
            for c in range(k_vec, k_pad):
                v1 = x[m, T.min(c, k - 1)]
                clean1 = T.Select(T.isnan(v1), T.float32(0), v1)
                t1 = T.nearbyint(clean1 / sz[3]) + sz[0]
                t1 = T.max(T.min(t1, T.float32(qmax)), T.float32(0))
                q[m, c] = T.Select(c < k, T.Cast("uint8", t1), T.uint8(0))
            info[m, 0] = T.Select(sz[2] > T.float32(0), T.float32(nan), sz[3])
            info[m, 1] = sz[0]

    return quantize_rows


def default_gemm_knobs(shape: knob_db.Shape) -> knob_db.Knobs:
    rows_tile, panels = tile_shape(shape["blocks"])
    return {"rows_tile": rows_tile, "panels": panels}


def check_gemm_knobs(shape: knob_db.Shape, knobs: knob_db.Knobs) -> str | None:
    rows_tile, panels = knobs["rows_tile"], knobs["panels"]
    if not 1 <= panels <= 4 or shape["blocks"] % panels:
        return f"panels={panels} must be 1..4 and divide the {shape['blocks']} output panels"
    if rows_tile < 1 or rows_tile * panels > ACCUMULATORS:
        return f"a {rows_tile}x{panels} tile needs more than {ACCUMULATORS} accumulator registers"
    return None


def gemm_candidates(shape: knob_db.Shape) -> list[knob_db.Knobs]:
    """For each panel count dividing ``blocks``: the full-height tile and one of 2/3 the height."""
    found = [default_gemm_knobs(shape)]
    for panels in (4, 3, 2, 1):
        full = ACCUMULATORS // panels
        found += [{"rows_tile": r, "panels": panels} for r in dict.fromkeys((full, max(1, (2 * full) // 3)))]
    unique = {tuple(sorted(c.items())): c for c in found if check_gemm_knobs(shape, c) is None}
    return list(unique.values())


def gemm_instance(shape: knob_db.Shape, knobs: knob_db.Knobs, rng: np.random.Generator) -> knob_db.Instance:
    rows, blocks, k4 = shape["rows"], shape["blocks"], shape["k4"]
    width = blocks * LANES
    q = rng.integers(0, 256, (rows, k4 * 4), dtype=np.uint8)
    info = np.stack([rng.uniform(0.01, 0.1, rows), rng.integers(0, 256, rows)], axis=1).astype(np.float32)
    w = rng.integers(-127, 128, (blocks, k4, LANES, 4), dtype=np.int8)
    wsum = w.astype(np.int32).sum(axis=(1, 3)).reshape(width).astype(np.int32)
    scale, bias = rng.uniform(0.001, 0.01, width).astype(np.float32), rng.standard_normal(width).astype(np.float32)
    func = gemm_rescale_func(blocks, k4, knobs)
    return knob_db.Instance(func, [q, info, w, wsum, scale, bias], [((rows, width), "float32")])


GEMM_KNOBS = knob_db.register(
    knob_db.KnobSpace("int8_gemm_rescale_vnni", default_gemm_knobs, gemm_candidates, check_gemm_knobs, gemm_instance)
)


def gemm_rescale_func(
    blocks: int, k4: int, knobs: knob_db.Knobs | None = None, shift_bits: int | None = None
) -> tirx.PrimFunc:
    """``y [M, 16*blocks] = float32(q w - z_m wsum) * (s_m w_scale) + bias`` (see module docstring);
    ``knobs``: see :data:`GEMM_KNOBS` (default: :func:`default_gemm_knobs`).

    ``shift_bits``: ``shift_int8.py``'s epilogue, the ``shift_linear`` reference's steps instead:
    ``rows [M, 1]`` holds ``s_m``, ``w_scale [2 * O]`` the channel multipliers ``mult`` (powers of
    two, exact in float32) then ``scale``, and ``acc = (q w - wsum) * mult`` (int32: the reference's
    accumulator), ``y = ((float32(acc) * 2^-E) * s_m) * scale[o] + bias``, ``E = 2^shift_bits - 1``."""
    width = blocks * LANES
    knobs = knobs or default_gemm_knobs({"blocks": blocks})
    rows_tile, panels = knobs["rows_tile"], knobs["panels"]
    lanes = T.Ramp(0, 1, LANES)
    dpbusd = "llvm.x86.avx512.vpdpbusd.512"
    mul_rn = "llvm.x86.avx512.mul.ps.512"  # with an explicit rounding mode: never contracted into an FMA
    shift = shift_bits is not None
    info_cols, scales = (1, 2 * width) if shift else (2, width)
    unit = T.Broadcast(T.float32(2.0 ** -(2**shift_bits - 1)), LANES) if shift else None
    rounding = tirx.const(ROUND_NEAREST, "int32")

    def finish(acc_vec, m, o, info, wsum, w_scale, bias):
        """One 16-channel vector of row ``m`` (channels ``o..o+15``) from its int32 sums."""
        vec = T.Ramp(o, 1, LANES)
        if shift:
            acc_ref = (acc_vec - wsum[vec]) * T.Cast("int32x16", w_scale[vec])
            f = (T.Cast("float32x16", acc_ref) * unit) * T.Broadcast(info[m, 0], LANES)
            f = T.call_llvm_pure_intrin("float32x16", mul_rn, f, w_scale[T.Ramp(width + o, 1, LANES)], rounding)
        else:
            z = T.Broadcast(T.Cast("int32", info[m, 1]), LANES)
            f = T.Cast("float32x16", acc_vec - z * wsum[vec])
            f = T.call_llvm_pure_intrin(
                "float32x16", mul_rn, f, T.Broadcast(info[m, 0], LANES) * w_scale[vec], rounding
            )
        return f + bias[vec]

    @T.prim_func(private=True)
    def gemm_rescale(
        q_h: T.handle,
        rows_h: T.handle,
        w: T.Buffer((blocks, k4, LANES, 4), "int8"),
        wsum: T.Buffer((width,), "int32"),
        w_scale: T.Buffer((scales,), "float32"),
        bias: T.Buffer((width,), "float32"),
        y_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        m_rows = T.int64()
        q8 = T.match_buffer(q_h, (m_rows, k4 * 4), "uint8")
        info = T.match_buffer(rows_h, (m_rows, info_cols), "float32")
        y = T.match_buffer(y_h, (m_rows, width), "float32")
        a = T.decl_buffer((m_rows * k4,), "int32", data=q8.data)  # 4 activation bytes per int32
        w64 = T.decl_buffer((blocks * k4 * LANES * 4,), "int8", data=w.data)
        for t in T.parallel(blocks // panels):
            for mo in range(m_rows // rows_tile):
                acc = T.alloc_buffer((rows_tile, panels, LANES), "int32", scope="global")
                for r in T.unroll(rows_tile):
                    for v in T.unroll(panels):
                        acc[r, v, lanes] = T.Broadcast(T.int32(0), LANES)
                for kk in range(k4):
                    for r in T.unroll(rows_tile):
                        for v in T.unroll(panels):
                            acc[r, v, lanes] = T.call_llvm_pure_intrin(
                                "int32x16",
                                dpbusd,
                                acc[r, v, lanes],
                                T.reinterpret("int8x64", T.Broadcast(a[(mo * rows_tile + r) * k4 + kk], LANES)),
                                w64[T.Ramp(((t * panels + v) * k4 + kk) * (LANES * 4), 1, LANES * 4)],
                            )
                for r in T.unroll(rows_tile):
                    for v in T.unroll(panels):
                        o = (t * panels + v) * LANES
                        m = mo * rows_tile + r
                        y[m, T.Ramp(o, 1, LANES)] = finish(acc[r, v, lanes], m, o, info, wsum, w_scale, bias)
            for m1 in range(m_rows - m_rows % rows_tile, m_rows):  # tail rows (the GEMV at batch 1)
                acc1 = T.alloc_buffer((panels, LANES), "int32", scope="global")
                for v in T.unroll(panels):
                    acc1[v, lanes] = T.Broadcast(T.int32(0), LANES)
                for kk in range(k4):
                    for v in T.unroll(panels):
                        acc1[v, lanes] = T.call_llvm_pure_intrin(
                            "int32x16",
                            dpbusd,
                            acc1[v, lanes],
                            T.reinterpret("int8x64", T.Broadcast(a[m1 * k4 + kk], LANES)),
                            w64[T.Ramp(((t * panels + v) * k4 + kk) * (LANES * 4), 1, LANES * 4)],
                        )
                for v in T.unroll(panels):
                    o1 = (t * panels + v) * LANES
                    y[m1, T.Ramp(o1, 1, LANES)] = finish(acc1[v, lanes], m1, o1, info, wsum, w_scale, bias)

    return gemm_rescale


__all__ = ["GEMM_KNOBS", "gemm_rescale_func", "quantize_rows_func", "tile_shape"]
