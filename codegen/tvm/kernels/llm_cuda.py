"""The LLM decoder's hand-written kernels for NVIDIA GPUs: embedding, rotary q, in-place KV append, attention.

Same signatures, buffers and arithmetic as the CPU kernels (``kv_cache.py``, ``decode_attention.py``),
so ``codegen/tvm/llm.py`` swaps one set for the other per target; the caches stay
``float32 [layers, kv_heads, max_seq_len, head_dim]`` and ``kv_append`` still runs through
``call_tir_inplace``. Every function takes ``serial=True`` to give the same loops unbound (plain
serial loops, ``global`` scratch instead of ``shared``/``local``) so the indexing and the arithmetic
can be checked on a CPU against the numpy reference (``tests/test_llm_cuda_build.py``).

Thread mapping: embedding, rotary q and the append put one token row (times head) per thread
block and the feature (head) dimension on ``threadIdx.x``, so each warp reads and writes
consecutive floats. Attention puts one thread block on each (query row, head) and splits the
cache rows of its causal window over ``threads`` threads, each keeping an online softmax
(running max ``m``, sum ``l`` and the weighted value sum, Milakov & Gimelshein 2018; the
flash-decoding split, Dao et al. 2023, inside one block); the partial states meet in shared
memory: ``M = max_j m_j``, ``f_j = exp(m_j - M)``, ``out = sum_j f_j acc_j / sum_j f_j l_j``. The
phases are consecutive ``threadIdx.x`` loops over shared buffers; TVM's ``ThreadSync`` pass puts
the ``__syncthreads()`` between them (checked in the generated source). A decode step reads only
the filled rows ``start .. pos`` of the cache, as on the CPU.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.script import tirx as T

from reshift.codegen.tvm.kernels.lut_gemv_cuda import thread_loops
from reshift.errors import CodegenError

_ATTRS = {"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}  # opaque, as the CPU kernels
MAX_THREADS = 256  # threads per block of the row kernels (feature dims beyond it loop)
ATTN_SHARED_FLOATS = 8192  # shared floats for the partial value sums (32 KiB of the 48 KiB static limit)


def _threads(width: int) -> int:
    """Threads over a feature axis of ``width``: all of it up to ``MAX_THREADS``, in whole warps."""
    return min(MAX_THREADS, -(-width // 32) * 32)


def attention_threads(head_dim: int) -> int:
    """Threads per (row, head) block: as many as the shared partial sums allow, 32 to 128."""
    return max(32, min(128, ATTN_SHARED_FLOATS // head_dim))


def _batch_1(slots: int, kernel: str) -> None:
    if slots:
        raise CodegenError(f"the CUDA {kernel} kernel serves batch 1; compile with max_batch=1 for a CUDA target")


def embed_cuda_func(
    vocab: int, hidden: int, scale: float, positions: int = 0, offset: int = 0, slots: int = 0, serial: bool = False
) -> tirx.PrimFunc:
    """``x[i] = scale * table[ids[i]] (+ pos_table[pos + i + offset])``: one block per token row."""
    _batch_1(slots, "embedding")
    s = T.float32(scale)
    bind = thread_loops(serial)
    threads = _threads(hidden)
    steps = -(-hidden // threads)

    if positions:

        @T.prim_func(private=True)
        def embed_pos(ids_h: T.handle, tab_h: T.handle, ptab_h: T.handle, p_h: T.handle, x_h: T.handle):
            T.func_attr(_ATTRS)
            n = T.int64()
            ids = T.match_buffer(ids_h, (n,), "int32")
            table = T.match_buffer(tab_h, (vocab, hidden), "float32")
            ptable = T.match_buffer(ptab_h, (positions, hidden), "float32")
            pos = T.match_buffer(p_h, (1,), "int32")
            x = T.match_buffer(x_h, (n, hidden), "float32")
            for i in bind(n, "blockIdx.x"):
                for t in bind(threads, "threadIdx.x"):
                    for c in range(steps):
                        if c * threads + t < hidden:
                            x[i, c * threads + t] = (
                                table[T.Cast("int64", ids[i]), c * threads + t] * s
                                + ptable[T.Cast("int64", pos[0]) + i + offset, c * threads + t]
                            )

        return embed_pos

    @T.prim_func(private=True)
    def embed(ids_h: T.handle, tab_h: T.handle, x_h: T.handle):
        T.func_attr(_ATTRS)
        n = T.int64()
        ids = T.match_buffer(ids_h, (n,), "int32")
        table = T.match_buffer(tab_h, (vocab, hidden), "float32")
        x = T.match_buffer(x_h, (n, hidden), "float32")
        for i in bind(n, "blockIdx.x"):
            for t in bind(threads, "threadIdx.x"):
                for c in range(steps):
                    if c * threads + t < hidden:
                        x[i, c * threads + t] = table[T.Cast("int64", ids[i]), c * threads + t] * s

    return embed


def rope_q_cuda_func(
    heads: int, head_dim: int, rotary_dim: int, width: int, max_seq: int, slots: int = 0, serial: bool = False
) -> tirx.PrimFunc:
    """``q[i, h] = rotate(qkv[i, h*D : (h+1)*D], position pos + i)``: one block per (row, head), a thread per dim."""
    _batch_1(slots, "rotary")
    half = rotary_dim // 2
    bind = thread_loops(serial)

    @T.prim_func(private=True)
    def rope_q(qkv_h: T.handle, cos_h: T.handle, sin_h: T.handle, p_h: T.handle, q_h: T.handle):
        T.func_attr(_ATTRS)
        n = T.int64()
        qkv = T.match_buffer(qkv_h, (n, width), "float32")
        cos = T.match_buffer(cos_h, (max_seq, half), "float32")
        sin = T.match_buffer(sin_h, (max_seq, half), "float32")
        pos = T.match_buffer(p_h, (1,), "int32")
        q = T.match_buffer(q_h, (n, heads, head_dim), "float32")
        for ih in bind(n * heads, "blockIdx.x"):
            for d in bind(head_dim, "threadIdx.x"):
                if d < half:
                    q[ih // heads, ih % heads, d] = (
                        qkv[ih // heads, ih % heads * head_dim + d] * cos[T.Cast("int64", pos[0]) + ih // heads, d]
                        - qkv[ih // heads, ih % heads * head_dim + d + half]
                        * sin[T.Cast("int64", pos[0]) + ih // heads, d]
                    )
                    q[ih // heads, ih % heads, d + half] = (
                        qkv[ih // heads, ih % heads * head_dim + d + half]
                        * cos[T.Cast("int64", pos[0]) + ih // heads, d]
                        + qkv[ih // heads, ih % heads * head_dim + d] * sin[T.Cast("int64", pos[0]) + ih // heads, d]
                    )
                elif d >= rotary_dim:
                    q[ih // heads, ih % heads, d] = qkv[ih // heads, ih % heads * head_dim + d]

    return rope_q


def kv_append_cuda_func(
    layer: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    width: int,
    max_seq: int,
    slots: int = 0,
    serial: bool = False,
) -> tirx.PrimFunc:
    """Layer ``layer``'s new keys (rotated when ``rotary_dim``) and values into the caches, in place.

    Signature ``(cache_k, cache_v, qkv [n, width], [cos, sin,] pos)`` as ``kv_cache.kv_append_func``;
    one block per (row, KV head), a thread per head dim.
    """
    _batch_1(slots, "KV append")
    half = rotary_dim // 2
    k0, v0 = heads * head_dim, (heads + kv_heads) * head_dim
    shape = (layers, kv_heads, max_seq, head_dim)
    bind = thread_loops(serial)

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
            pos = T.match_buffer(p_h, (1,), "int32")
            for ig in bind(n * kv_heads, "blockIdx.x"):
                for d in bind(head_dim, "threadIdx.x"):
                    i = ig // kv_heads
                    g = ig % kv_heads
                    p = T.Cast("int64", pos[0]) + i
                    if d < half:
                        ck[layer, g, p, d] = (
                            qkv[i, k0 + g * head_dim + d] * cos[p, d] - qkv[i, k0 + g * head_dim + d + half] * sin[p, d]
                        )
                        ck[layer, g, p, d + half] = (
                            qkv[i, k0 + g * head_dim + d + half] * cos[p, d] + qkv[i, k0 + g * head_dim + d] * sin[p, d]
                        )
                    elif d >= rotary_dim:
                        ck[layer, g, p, d] = qkv[i, k0 + g * head_dim + d]
                    cv[layer, g, p, d] = qkv[i, v0 + g * head_dim + d]

        return kv_append_rope

    @T.prim_func(private=True)
    def kv_append(ck_h: T.handle, cv_h: T.handle, qkv_h: T.handle, p_h: T.handle):
        T.func_attr(_ATTRS)
        n = T.int64()
        ck = T.match_buffer(ck_h, shape, "float32")
        cv = T.match_buffer(cv_h, shape, "float32")
        qkv = T.match_buffer(qkv_h, (n, width), "float32")
        pos = T.match_buffer(p_h, (1,), "int32")
        for ig in bind(n * kv_heads, "blockIdx.x"):
            for d in bind(head_dim, "threadIdx.x"):
                i = ig // kv_heads
                g = ig % kv_heads
                p = T.Cast("int64", pos[0]) + i
                ck[layer, g, p, d] = qkv[i, k0 + g * head_dim + d]
                cv[layer, g, p, d] = qkv[i, v0 + g * head_dim + d]

    return kv_append


def attention_cuda_func(
    layer: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    max_seq: int,
    window: int,
    scale: float,
    slots: int = 0,
    serial: bool = False,
) -> tirx.PrimFunc:
    """``(q [n, heads, D], cache_k, cache_v, pos int32[1]) -> out [n, heads * D]`` for one layer.

    Causal (row ``i`` sees cache rows ``max(0, pos + i + 1 - window) .. pos + i``), grouped-query;
    one thread block per (row, head), the window's rows strided over the block's threads.
    """
    _batch_1(slots, "attention")
    group = heads // kv_heads
    win = window if window > 0 else max_seq + 1
    shape = (layers, kv_heads, max_seq, head_dim)
    s = T.float32(scale)
    bind = thread_loops(serial)
    threads = attention_threads(head_dim)
    d_steps = -(-head_dim // threads)
    shared = "global" if serial else "shared"
    local = "global" if serial else "local"
    lowest = T.min_value("float32")  # not -inf: exp(m - m_new) of an idle thread must stay 0 or 1, never NaN

    @T.prim_func(private=True)
    def attention(q_h: T.handle, ck_h: T.handle, cv_h: T.handle, p_h: T.handle, o_h: T.handle):
        T.func_attr(_ATTRS)
        n = T.int64()
        q = T.match_buffer(q_h, (n, heads, head_dim), "float32")
        ck = T.match_buffer(ck_h, shape, "float32")
        cv = T.match_buffer(cv_h, shape, "float32")
        pos = T.match_buffer(p_h, (1,), "int32")
        out = T.match_buffer(o_h, (n, heads * head_dim), "float32")
        for ih in bind(n * heads, "blockIdx.x"):
            qs = T.alloc_buffer((head_dim,), "float32", scope=shared)
            ms = T.alloc_buffer((threads,), "float32", scope=shared)
            ls = T.alloc_buffer((threads,), "float32", scope=shared)
            fs = T.alloc_buffer((threads,), "float32", scope=shared)
            accs = T.alloc_buffer((threads, head_dim), "float32", scope=shared)
            for t in bind(threads, "threadIdx.x"):  # phase 1: the query row into shared memory
                for c in range(d_steps):
                    if c * threads + t < head_dim:
                        qs[c * threads + t] = q[ih // heads, ih % heads, c * threads + t]
            for t in bind(threads, "threadIdx.x"):  # phase 2: each thread's online softmax over its rows
                m = T.alloc_buffer((1,), "float32", scope=local)
                l = T.alloc_buffer((1,), "float32", scope=local)
                sc = T.alloc_buffer((2,), "float32", scope=local)
                acc = T.alloc_buffer((head_dim,), "float32", scope=local)
                m[0] = lowest
                l[0] = T.float32(0)
                for d in T.unroll(head_dim):
                    acc[d] = T.float32(0)
                end = T.Cast("int64", pos[0]) + ih // heads + 1
                start = T.max(end - win, T.int64(0))
                for step in range((end - start - t + (threads - 1)) // threads):
                    sc[0] = T.float32(0)
                    for d in T.unroll(head_dim):
                        sc[0] = sc[0] + qs[d] * ck[layer, ih % heads // group, start + t + step * threads, d]
                    sc[0] = sc[0] * s
                    sc[1] = T.max(m[0], sc[0])  # the new running max
                    l[0] = l[0] * T.exp(m[0] - sc[1]) + T.exp(sc[0] - sc[1])
                    for d in T.unroll(head_dim):
                        acc[d] = (
                            acc[d] * T.exp(m[0] - sc[1])
                            + T.exp(sc[0] - sc[1]) * cv[layer, ih % heads // group, start + t + step * threads, d]
                        )
                    m[0] = sc[1]
                ms[t] = m[0]
                ls[t] = l[0]
                for d in T.unroll(head_dim):
                    accs[t, d] = acc[d]
            for t in bind(threads, "threadIdx.x"):  # phase 3: each thread's weight exp(m_t - M)
                big = T.alloc_buffer((1,), "float32", scope=local)
                big[0] = lowest
                for j in range(threads):
                    big[0] = T.max(big[0], ms[j])
                fs[t] = T.exp(ms[t] - big[0])
            for t in bind(threads, "threadIdx.x"):  # phase 4: the normalized weighted sum of the partials
                tot = T.alloc_buffer((2,), "float32", scope=local)
                tot[0] = T.float32(0)
                for j in range(threads):
                    tot[0] = tot[0] + fs[j] * ls[j]
                for c in range(d_steps):
                    if c * threads + t < head_dim:
                        tot[1] = T.float32(0)
                        for j in range(threads):
                            tot[1] = tot[1] + fs[j] * accs[j, c * threads + t]
                        out[ih // heads, ih % heads * head_dim + c * threads + t] = tot[1] / tot[0]

    return attention


def dense_gpu(x: te.Tensor, weight: te.Tensor, bias: te.Tensor) -> te.Tensor:
    """``y[m, o] = bias[o] + sum_k x[m, k] * weight[o, k]``: a plain TE matmul that dlight schedules
    (``gpu.GEMV`` for the decode step's single row, ``gpu.Matmul`` for a prompt's rows)."""
    k = te.reduce_axis((0, x.shape[1]), name="k")
    y = te.compute((x.shape[0], weight.shape[0]), lambda m, o: te.sum(x[m, k] * weight[o, k], axis=k), name="dense")
    return te.compute(y.shape, lambda m, o: y[m, o] + bias[o], name="dense_bias")


def gpu_params(params: dict[str, np.ndarray], forms: dict[str, dict]) -> dict[str, np.ndarray]:
    """The CPU parameter set re-laid for the GPU kernels, same order otherwise.

    A dense linear's ``.panels [ceil(N/16), K, 16]`` become ``.weight [ceil(N/16) * 16, K]`` (row-major,
    the zero padding rows kept so the output width is the CPU kernel's). BCQ ``words``/``alpha`` keep
    the CPU layout: ``lut_gemv_cuda`` reads a 16-row block's words as coalesced 64-byte runs.
    """
    out: dict[str, np.ndarray] = {}
    for name, array in params.items():
        fused = name.rsplit(".", 1)[0]
        if name.endswith(".panels") and forms.get(fused, {}).get("kind") == "dense":
            blocks, k, lanes = array.shape
            out[fused + ".weight"] = np.ascontiguousarray(array.transpose(0, 2, 1).reshape(blocks * lanes, k))
        else:
            out[name] = array
    return out
