"""A decoder LLM as one Relax IRModule with two entry points, ``prefill`` and ``decode``.

Both take ``(ids int32[n], pos int32[1], cache_k, cache_v, *weights)`` and return
``(logits f32[1, vocab], cache_k, cache_v)``: ``prefill`` has a symbolic prompt length ``n``,
``decode`` is the same graph at ``n = 1``. The weights are function parameters, not constants, so
the two functions share one copy (the runtime uploads it once and passes the same tensors to
both). The caches ``f32 [layers, kv_heads, max_seq_len, head_dim]`` are threaded through every
layer by ``R.call_tir_inplace`` (``kernels/kv_cache.py``), so their outputs alias their inputs and the
VM updates the preallocated cache without copying it; attention reads it in place
(``kernels/decode_attention.py``). Linears are fp32 GEMMs on weights packed in 16-column panels
(``kernels/dense_cpu.py``) or BCQ lookup-table GEMVs (``kernels/lut_gemv.py``) on packed
``words``/``alpha``; q/k/v and gate/up are fused into one linear each (same input).

With ``max_batch = B > 1`` the module also has ``batch(ids int32[n], where int32[2, n], last int32[b],
cache_k, cache_v, *weights) -> (logits f32[b, vocab], cache_k, cache_v)`` on caches
``[layers, B, kv_heads, max_seq_len, head_dim]`` (one slot per sequence): the ``n`` rows are the
tokens of ``b`` sequences packed back to back, row ``i`` at position ``where[0, i]`` of slot
``where[1, i]``, and ``last`` names each sequence's last row, whose logits are returned. One function
serves the ragged prefill of ``b`` prompts (``n`` = their summed lengths) and the decode step of ``b``
sequences each at its own position (``n = b``): the linears see all ``n`` rows at once, one weight
read for ``b`` tokens, and attention masks each row to its own slot and length.

The graph is built here straight from a :class:`~reshift.llm.config.DecoderSpec` rather than
through ``ir.Graph``: the IR has one symbolic dimension and no state, and torch.export of HF's
cache code is fragile; ``reshift/llm/reference.py`` is the numpy ground truth it is tested against.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx

from reshift.codegen.tvm.kernels.decode_attention import attention_func
from reshift.codegen.tvm.kernels.dense_cpu import dense_func
from reshift.codegen.tvm.kernels.kv_cache import cache_shape, embed_func, kv_append_func, rope_q_func, where_shape
from reshift.codegen.tvm.kernels.lowbit import kernel_flavor
from reshift.codegen.tvm.kernels.lut_gemv import gemv_func, table_compute
from reshift.codegen.tvm.kernels.packing import ROWS

op = relax.op


def fused_linears(spec: Any) -> list[tuple[str, list[str]]]:
    """``(fused name, [canonical linears in output-row order])`` of every matmul the module runs."""
    out = []
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        out.append((p + "qkv", [p + "q", p + "k", p + "v"]))
        out.append((p + "o", [p + "o"]))
        if spec.gated:
            out += [(p + "gate_up", [p + "gate", p + "up"]), (p + "down", [p + "down"])]
        else:
            out += [(p + "fc1", [p + "fc1"]), (p + "fc2", [p + "fc2"])]
    out.append(("lm_head", ["lm_head"]))
    return out


class _Function:
    """One Relax function under construction: its weight parameters, created on first use."""

    def __init__(self, bb: relax.BlockBuilder, params: dict[str, np.ndarray], forms: dict[str, dict]):
        self.bb, self.arrays, self.forms = bb, params, forms
        self.vars: dict[str, relax.Var] = {
            name: relax.Var(name.replace(".", "_"), relax.TensorType(a.shape, a.dtype.name))
            for name, a in params.items()
        }

    def w(self, name: str) -> relax.Var:
        return self.vars[name]

    def emit(self, expr):
        return self.bb.emit(expr)

    def linear(self, x: relax.Expr, rows, name: str) -> relax.Expr:
        form = self.forms[name]
        out = form["out_features"]
        k = form["in_features"]
        if form["kind"] == "dense":
            blocks = self.arrays[name + ".panels"].shape[0]
            gv = self.bb.add_func(dense_func(k, blocks), "dense_packed_f32")
            args = [x, self.w(name + ".panels"), self.w(name + ".bias")]
        else:
            g = form["group_size"]
            words = self.arrays[name + ".words"]
            blocks, n_groups, planes = words.shape[:3]
            lut = self.emit(self.bb.call_te(table_compute, x, k, g, primfunc_name_hint="bcq_lut"))
            gv = self.bb.add_func(gemv_func(blocks, n_groups, planes, g, kernel_flavor() == "avx512"), "bcq_lut_gemv")
            args = [lut, self.w(name + ".words"), self.w(name + ".alpha"), self.w(name + ".bias")]
        y = self.emit(relax.op.call_tir(gv, args, out_ty=relax.TensorType((rows, blocks * ROWS), "float32")))
        if out % ROWS:
            y = self.emit(op.strided_slice(y, axes=[1], begin=[0], end=[out]))
        return y

    def norm(self, spec: Any, x: relax.Expr, prefix: str) -> relax.Expr:
        if spec.norm == "rms":
            return self.emit(op.nn.rms_norm(x, self.w(prefix + ".w"), axes=[-1], epsilon=spec.norm_eps))
        return self.emit(
            op.nn.layer_norm(x, self.w(prefix + ".w"), self.w(prefix + ".b"), axes=[-1], epsilon=spec.norm_eps)
        )


_ACT = {"silu": op.nn.silu, "gelu_tanh": op.nn.gelu_tanh, "gelu": op.nn.gelu, "relu": op.nn.relu}


def _decoder(bb, spec, params, forms, max_seq, n, ids, pos, ck, cv, fn: _Function, slots: int = 0, last=None):
    """Emit the decoder body for ``n`` tokens; returns ``(logits, cache_k, cache_v)``. Batch 1 (``slots = 0``):
    ``pos int32[1]``, logits of the last row; batch (``slots``): ``pos`` is ``where int32[2, n]`` and the
    logits are those of the rows ``last``."""
    h, kv, d, hidden = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size
    width = (h + 2 * kv) * d
    cache_ty = relax.TensorType(cache_shape(spec.num_layers, kv, max_seq, d, slots), "float32")
    if spec.learned_positions:
        embed = embed_func(
            spec.vocab_size, hidden, spec.embed_scale, spec.learned_positions, spec.position_offset, slots
        )
        gv = bb.add_func(embed, "embed")
        args = [ids, fn.w("embed"), fn.w("pos_embed"), pos]
    else:
        gv = bb.add_func(embed_func(spec.vocab_size, hidden, spec.embed_scale), "embed")
        args = [ids, fn.w("embed")]
    x = fn.emit(relax.op.call_tir(gv, args, out_ty=relax.TensorType((n, hidden), "float32")))
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        hn = fn.norm(spec, x, p + "norm1")
        qkv = fn.linear(hn, n, p + "qkv")
        append = kv_append_func(i, spec.num_layers, h, kv, d, spec.rotary_dim, width, max_seq, slots)
        gv_append = bb.add_func(append, f"kv_append_l{i}")
        if spec.rotary_dim:
            gv_rope = bb.add_func(rope_q_func(h, d, spec.rotary_dim, width, max_seq, slots), "rope_q")
            rope_args = [fn.w("rope.cos"), fn.w("rope.sin")]
            q = fn.emit(
                relax.op.call_tir(gv_rope, [qkv, *rope_args, pos], out_ty=relax.TensorType((n, h, d), "float32"))
            )
        else:
            rope_args = []
            q = fn.emit(op.reshape(op.strided_slice(qkv, axes=[1], begin=[0], end=[h * d]), (n, h, d)))
        caches = fn.emit(
            relax.op.call_tir_inplace(gv_append, [ck, cv, qkv, *rope_args, pos], [0, 1], [cache_ty, cache_ty])
        )
        ck, cv = fn.emit(relax.TupleGetItem(caches, 0)), fn.emit(relax.TupleGetItem(caches, 1))
        attn = attention_func(i, spec.num_layers, h, kv, d, max_seq, spec.windows[i], spec.attn_scale, slots)
        gv_attn = bb.add_func(attn, f"attention_l{i}")
        a = fn.emit(relax.op.call_tir(gv_attn, [q, ck, cv, pos], out_ty=relax.TensorType((n, h * d), "float32")))
        x = fn.emit(op.add(x, fn.linear(a, n, p + "o")))
        hn = fn.norm(spec, x, p + "norm2")
        if spec.gated:
            gu = fn.linear(hn, n, p + "gate_up")
            f = spec.ffn_size
            gate = op.strided_slice(gu, axes=[1], begin=[0], end=[f])
            up = op.strided_slice(gu, axes=[1], begin=[f], end=[2 * f])
            m = fn.emit(op.multiply(_ACT[spec.act](gate), up))
            x = fn.emit(op.add(x, fn.linear(m, n, p + "down")))
        else:
            m = fn.emit(_ACT[spec.act](fn.linear(hn, n, p + "fc1")))
            x = fn.emit(op.add(x, fn.linear(m, n, p + "fc2")))
    if last is not None:  # batch: each sequence's last row
        rows = fn.emit(op.take(x, last, axis=0, mode="clip"))
        return fn.linear(fn.norm(spec, rows, "norm"), last.ty.shape[0], "lm_head"), ck, cv
    last = fn.emit(op.strided_slice(x, axes=[0], begin=[n - 1], end=[n])) if not isinstance(n, int) else x
    logits = fn.linear(fn.norm(spec, last, "norm"), 1, "lm_head")
    return logits, ck, cv


def build_module(
    spec: Any, params: dict[str, np.ndarray], forms: dict[str, dict], max_seq: int, max_batch: int = 1
) -> tvm.IRModule:
    """The IRModule with ``prefill`` and ``decode`` (and ``batch`` when ``max_batch > 1``); ``params``
    fixes the weight parameter order."""
    bb = relax.BlockBuilder()
    cache_ty = relax.TensorType((spec.num_layers, spec.num_kv_heads, max_seq, spec.head_dim), "float32")
    for name, n in (("prefill", tirx.Var("n", "int64")), ("decode", 1)):
        fn = _Function(bb, params, forms)
        ids = relax.Var("ids", relax.TensorType((n,), "int32"))
        pos = relax.Var("pos", relax.TensorType((1,), "int32"))
        ck = relax.Var("cache_k", cache_ty)
        cv = relax.Var("cache_v", cache_ty)
        with bb.function(name, [ids, pos, ck, cv, *fn.vars.values()]):
            with bb.dataflow():
                logits, ck2, cv2 = _decoder(bb, spec, params, forms, max_seq, n, ids, pos, ck, cv, fn)
                out = bb.emit_output(relax.Tuple([logits, ck2, cv2]))
            bb.emit_func_output(out)
    if max_batch > 1:
        _batch_function(bb, spec, params, forms, max_seq, max_batch)
    return bb.get()


def _batch_function(bb, spec: Any, params, forms, max_seq: int, slots: int) -> None:
    """``batch(ids [n], where [2, n], last [b], cache_k, cache_v, *weights)`` on the slotted caches."""
    n, b = tirx.Var("n", "int64"), tirx.Var("b", "int64")
    cache_ty = relax.TensorType(
        cache_shape(spec.num_layers, spec.num_kv_heads, max_seq, spec.head_dim, slots), "float32"
    )
    fn = _Function(bb, params, forms)
    ids = relax.Var("ids", relax.TensorType((n,), "int32"))
    where = relax.Var("where", relax.TensorType(where_shape(slots, n), "int32"))
    last = relax.Var("last", relax.TensorType((b,), "int32"))
    ck, cv = relax.Var("cache_k", cache_ty), relax.Var("cache_v", cache_ty)
    with bb.function("batch", [ids, where, last, ck, cv, *fn.vars.values()]):
        with bb.dataflow():
            logits, ck2, cv2 = _decoder(bb, spec, params, forms, max_seq, n, ids, where, ck, cv, fn, slots, last)
            out = bb.emit_output(relax.Tuple([logits, ck2, cv2]))
        bb.emit_func_output(out)
