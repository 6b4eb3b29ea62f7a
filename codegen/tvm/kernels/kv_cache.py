"""KV-cache kernels for LLM decoding: embedding lookup, rotary embedding, in-place cache append.

The caches are ``float32 [layers, kv_heads, max_seq_len, head_dim]``, allocated once by the runtime
at ``max_seq_len``. ``kv_append_func`` writes the new tokens' keys (rotated) and values at rows
``pos .. pos + n - 1`` of one layer and is called with ``R.call_tir_inplace`` (its outputs are its
inputs 0 and 1), so a decode step touches ``n * kv_heads * head_dim`` floats of the cache, never the
whole cache. ``pos`` is an ``int32 [1]`` tensor read inside the kernels (a runtime value, not a
shape, so one decode function serves every position). Rotary embeddings follow transformers'
``rotate_half`` convention on the first ``rotary_dim`` dims of each head; the ``cos``/``sin`` tables
``[max_seq_len, rotary_dim // 2]`` are weights computed at compile time.

Batch N (``slots > 0``): the caches are ``[layers, slots, kv_heads, max_seq_len, head_dim]``, one slot
per sequence, and the rows of one call are the tokens of several sequences packed back to back
(the varlen layout of FlashAttention / vLLM): ``where int32 [2, n]`` holds each row's absolute
position (``where[0, i]``) and cache slot (``where[1, i]``), so one kernel serves a ragged prefill of
several prompts and a decode step where every sequence is at its own position.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

_ATTRS = {"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}  # opaque: FuseOps leaves them alone


def where_shape(slots: int, n) -> tuple:
    """The row-placement tensor's shape: ``pos int32 [1]`` (batch 1: row ``i`` at ``pos + i``, slot 0),
    or ``where int32 [2, n]`` (``slots > 0``: row ``i`` at position ``where[0, i]`` of slot ``where[1, i]``)."""
    return (2, n) if slots else (1,)


def row_position(where, i, slots: int):
    """Absolute position of row ``i`` (int64)."""
    return T.Cast("int64", where[0, i]) if slots else T.Cast("int64", where[0]) + i


def cache_base(where, i, slots: int, layer: int, kv_heads: int, g, max_seq: int, head_dim: int):
    """Flat offset of ``cache[layer, (slot of row i,) g, 0, 0]``."""
    slot = T.Cast("int64", where[1, i]) if slots else T.int64(0)
    return ((layer * max(slots, 1) + slot) * kv_heads + g) * max_seq * head_dim


def cache_shape(layers: int, kv_heads: int, max_seq: int, head_dim: int, slots: int = 0) -> tuple:
    return (layers, slots, kv_heads, max_seq, head_dim) if slots else (layers, kv_heads, max_seq, head_dim)


def embed_func(
    vocab: int, hidden: int, scale: float, positions: int = 0, offset: int = 0, slots: int = 0
) -> tirx.PrimFunc:
    """``x[i] = scale * table[ids[i]] (+ pos_table[position(i) + offset])``; ids are checked by the runtime.

    Signature ``(ids, table, [pos_table, pos])`` (``pos``: see :func:`where_shape`)."""
    s = T.float32(scale)

    if positions:

        @T.prim_func(private=True)
        def embed_pos(ids_h: T.handle, tab_h: T.handle, ptab_h: T.handle, p_h: T.handle, x_h: T.handle):
            T.func_attr(_ATTRS)
            n = T.int64()
            ids = T.match_buffer(ids_h, (n,), "int32")
            table = T.match_buffer(tab_h, (vocab, hidden), "float32")
            ptable = T.match_buffer(ptab_h, (positions, hidden), "float32")
            pos = T.match_buffer(p_h, where_shape(slots, n), "int32")
            x = T.match_buffer(x_h, (n, hidden), "float32")
            for i in T.parallel(n):
                for d in range(hidden):
                    x[i, d] = table[T.Cast("int64", ids[i]), d] * s + ptable[row_position(pos, i, slots) + offset, d]

        return embed_pos

    @T.prim_func(private=True)
    def embed(ids_h: T.handle, tab_h: T.handle, x_h: T.handle):
        T.func_attr(_ATTRS)
        n = T.int64()
        ids = T.match_buffer(ids_h, (n,), "int32")
        table = T.match_buffer(tab_h, (vocab, hidden), "float32")
        x = T.match_buffer(x_h, (n, hidden), "float32")
        for i in T.parallel(n):
            for d in range(hidden):
                x[i, d] = table[T.Cast("int64", ids[i]), d] * s

    return embed


def rope_q_func(heads: int, head_dim: int, rotary_dim: int, width: int, max_seq: int, slots: int = 0) -> tirx.PrimFunc:
    """``q[i, h] = rotate(qkv[i, h*D : (h+1)*D], position(i))`` from the fused qkv rows ``[n, width]``."""
    half = rotary_dim // 2

    @T.prim_func(private=True)
    def rope_q(qkv_h: T.handle, cos_h: T.handle, sin_h: T.handle, p_h: T.handle, q_h: T.handle):
        T.func_attr(_ATTRS)
        n = T.int64()
        qkv = T.match_buffer(qkv_h, (n, width), "float32")
        cos = T.match_buffer(cos_h, (max_seq, half), "float32")
        sin = T.match_buffer(sin_h, (max_seq, half), "float32")
        pos = T.match_buffer(p_h, where_shape(slots, n), "int32")
        q = T.match_buffer(q_h, (n, heads, head_dim), "float32")
        for ih in T.parallel(n * heads):
            i = ih // heads
            h = ih % heads
            p = row_position(pos, i, slots)
            base = h * head_dim
            for d in range(half):
                x1 = qkv[i, base + d]
                x2 = qkv[i, base + d + half]
                q[i, h, d] = x1 * cos[p, d] - x2 * sin[p, d]
                q[i, h, d + half] = x2 * cos[p, d] + x1 * sin[p, d]
            for d in range(rotary_dim, head_dim):
                q[i, h, d] = qkv[i, base + d]

    return rope_q


def kv_append_func(
    layer: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    width: int,
    max_seq: int,
    slots: int = 0,
) -> tirx.PrimFunc:
    """Write layer ``layer``'s new keys (rotated when ``rotary_dim``) and values into the caches, in place.

    Signature ``(cache_k, cache_v, qkv [n, width], [cos, sin,] pos)``; outputs are ``cache_k, cache_v``
    themselves (``call_tir_inplace`` indices 0 and 1).
    """
    half = rotary_dim // 2
    k0, v0 = heads * head_dim, (heads + kv_heads) * head_dim
    shape = cache_shape(layers, kv_heads, max_seq, head_dim, slots)
    flat = (layers * max(slots, 1) * kv_heads * max_seq * head_dim,)

    if rotary_dim:

        @T.prim_func(private=True)
        def kv_append_rope(ck_h: T.handle, cv_h: T.handle, qkv_h: T.handle, cos_h: T.handle, sin_h: T.handle,
                           p_h: T.handle):  # fmt: skip
            T.func_attr(_ATTRS)
            n = T.int64()
            ck = T.match_buffer(ck_h, shape, "float32")
            cv = T.match_buffer(cv_h, shape, "float32")
            qkv = T.match_buffer(qkv_h, (n, width), "float32")
            cos = T.match_buffer(cos_h, (max_seq, half), "float32")
            sin = T.match_buffer(sin_h, (max_seq, half), "float32")
            pos = T.match_buffer(p_h, where_shape(slots, n), "int32")
            kf = T.decl_buffer(flat, "float32", data=ck.data)
            vf = T.decl_buffer(flat, "float32", data=cv.data)
            for ig in T.parallel(n * kv_heads):
                i = ig // kv_heads
                g = ig % kv_heads
                p = row_position(pos, i, slots)
                row = cache_base(pos, i, slots, layer, kv_heads, g, max_seq, head_dim) + p * head_dim
                kb = k0 + g * head_dim
                for d in range(half):
                    x1 = qkv[i, kb + d]
                    x2 = qkv[i, kb + d + half]
                    kf[row + d] = x1 * cos[p, d] - x2 * sin[p, d]
                    kf[row + d + half] = x2 * cos[p, d] + x1 * sin[p, d]
                for d in range(rotary_dim, head_dim):
                    kf[row + d] = qkv[i, kb + d]
                for d in range(head_dim):
                    vf[row + d] = qkv[i, v0 + g * head_dim + d]

        return kv_append_rope

    @T.prim_func(private=True)
    def kv_append(ck_h: T.handle, cv_h: T.handle, qkv_h: T.handle, p_h: T.handle):
        T.func_attr(_ATTRS)
        n = T.int64()
        ck = T.match_buffer(ck_h, shape, "float32")
        cv = T.match_buffer(cv_h, shape, "float32")
        qkv = T.match_buffer(qkv_h, (n, width), "float32")
        pos = T.match_buffer(p_h, where_shape(slots, n), "int32")
        kf = T.decl_buffer(flat, "float32", data=ck.data)
        vf = T.decl_buffer(flat, "float32", data=cv.data)
        for ig in T.parallel(n * kv_heads):
            i = ig // kv_heads
            g = ig % kv_heads
            row = (
                cache_base(pos, i, slots, layer, kv_heads, g, max_seq, head_dim)
                + row_position(pos, i, slots) * head_dim
            )
            for d in range(head_dim):
                kf[row + d] = qkv[i, k0 + g * head_dim + d]
                vf[row + d] = qkv[i, v0 + g * head_dim + d]

    return kv_append
