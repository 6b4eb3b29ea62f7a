"""Causal attention that reads the KV cache directly (decode and prefill, grouped-query, sliding window).

For query row ``i`` (absolute position ``pos + i``) and head ``h`` (KV head ``h // (heads / kv_heads)``)
the keys are cache rows ``max(0, pos + i + 1 - window) .. pos + i`` of one layer: the scores go to a
per-(row, head) buffer, then ``softmax`` (max-subtracted, as transformers' eager attention) and the
weighted sum of the value rows. Rows and heads run in parallel; the loops over the cache stop at
the current length, so a decode step costs what the filled part of the cache costs, not
``max_seq_len``. The head-dim loops are 16-lane vectors when ``head_dim % 16 == 0``.
With ``slots`` (batch N) each row reads its own sequence's slot up to its own position
(``where[:, i]``, see ``kv_cache.py``), so rows of different lengths never see each other's keys.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.kernels.fast_math import exp_f32
from reshift.codegen.tvm.kernels.kv_cache import _ATTRS, cache_base, cache_shape, row_position, where_shape

LANES = 16


def _dot(qf, kf, q_base, k_base, chunks: int) -> tirx.PrimExpr:
    """float32x16 lane partial sums of one query row against one cache row (``chunks`` x 16 lanes)."""
    total = None
    for c in range(chunks):
        term = qf[tirx.Ramp(q_base + c * LANES, 1, LANES)] * kf[tirx.Ramp(k_base + c * LANES, 1, LANES)]
        total = term if total is None else total + term
    return total


def _hsum(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """The sum of 16 lanes as a tree of halves (4 dependent adds, not 16)."""
    for width in (8, 4, 2, 1):
        ty = f"float32x{width}" if width > 1 else "float32"
        v = tirx.vectorlow(ty, v) + tirx.vectorhigh(ty, v)
    return v


def attention_func(
    layer: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    max_seq: int,
    window: int,
    scale: float,
    slots: int = 0,
) -> tirx.PrimFunc:
    """``(q [n, heads, D], cache_k, cache_v, pos) -> out [n, heads * D]`` for one layer; ``pos`` is
    ``int32 [1]`` (batch 1) or, with ``slots``, ``where int32 [2, n]`` (per row: position, cache slot)."""
    group = heads // kv_heads
    win = window if window > 0 else max_seq + 1
    shape = cache_shape(layers, kv_heads, max_seq, head_dim, slots)
    flat = layers * max(slots, 1) * kv_heads * max_seq * head_dim
    s = T.float32(scale)
    vec = head_dim % LANES == 0
    chunks = head_dim // LANES

    @T.prim_func(private=True)
    def attention(q_h: T.handle, ck_h: T.handle, cv_h: T.handle, p_h: T.handle, o_h: T.handle):
        T.func_attr(_ATTRS)
        n = T.int64()
        q = T.match_buffer(q_h, (n, heads, head_dim), "float32")
        ck = T.match_buffer(ck_h, shape, "float32")
        cv = T.match_buffer(cv_h, shape, "float32")
        pos = T.match_buffer(p_h, where_shape(slots, n), "int32")
        out = T.match_buffer(o_h, (n, heads * head_dim), "float32")
        qf = T.decl_buffer((n * heads * head_dim,), "float32", data=q.data)
        kf = T.decl_buffer((flat,), "float32", data=ck.data)
        vf = T.decl_buffer((flat,), "float32", data=cv.data)
        of = T.decl_buffer((n * heads * head_dim,), "float32", data=out.data)
        for ih in T.parallel(n * heads):
            score = T.alloc_buffer((max_seq,), "float32", scope="global")
            red = T.alloc_buffer((2,), "float32", scope="global")
            acc = T.alloc_buffer((head_dim,), "float32", scope="global")
            i = ih // heads
            h = ih % heads
            g = h // group
            end = row_position(pos, i, slots) + 1
            start = T.max(end - win, T.int64(0))
            qb = ih * head_dim
            cb = cache_base(pos, i, slots, layer, kv_heads, g, max_seq, head_dim)
            red[0] = T.min_value("float32")
            for t in range(start, end):
                if vec:
                    red[1] = _hsum(_dot(qf, kf, qb, cb + t * head_dim, chunks))
                else:
                    red[1] = T.float32(0)
                    for d in range(head_dim):
                        red[1] = red[1] + qf[qb + d] * kf[cb + t * head_dim + d]
                score[t] = red[1] * s
                red[0] = T.max(red[0], score[t])
            for tv in range((end - start) // LANES):
                score[T.Ramp(start + tv * LANES, 1, LANES)] = exp_f32(
                    score[T.Ramp(start + tv * LANES, 1, LANES)] - T.Broadcast(red[0], LANES)
                )
            for t in range(start + (end - start) // LANES * LANES, end):
                score[t] = exp_f32(score[t] - red[0])
            red[1] = T.float32(0)
            for t in range(start, end):
                red[1] = red[1] + score[t]
            if vec:  # the weighted sum in registers, one 16-lane accumulator per chunk of head_dim
                for c in T.unroll(chunks):
                    acc[T.Ramp(c * LANES, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                for t in range(start, end):
                    for c in T.unroll(chunks):
                        acc[T.Ramp(c * LANES, 1, LANES)] = (
                            acc[T.Ramp(c * LANES, 1, LANES)]
                            + T.Broadcast(score[t], LANES) * vf[T.Ramp(cb + t * head_dim + c * LANES, 1, LANES)]
                        )
                for c in T.unroll(chunks):
                    of[T.Ramp(qb + c * LANES, 1, LANES)] = acc[T.Ramp(c * LANES, 1, LANES)] / T.Broadcast(red[1], LANES)
            else:
                for d in range(head_dim):
                    of[qb + d] = T.float32(0)
                for t in range(start, end):
                    for d in range(head_dim):
                        of[qb + d] = of[qb + d] + score[t] * vf[cb + t * head_dim + d]
                for d in range(head_dim):
                    of[qb + d] = of[qb + d] / red[1]

    return attention
