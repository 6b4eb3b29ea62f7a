"""A decoder LLM as one Relax IRModule with two entry points, ``prefill`` and ``decode``.

Both take ``(ids int32[n], pos int32[1], cache_k, cache_v, *weights)`` and return
``(logits f32[1, vocab], cache_k, cache_v)``: ``prefill`` has a symbolic prompt length ``n``,
``decode`` is the same graph at ``n = 1``. The weights are function parameters, not constants, so
the two functions share one copy (the runtime uploads it once and passes the same tensors to
both). The caches ``f32 [layers, kv_heads, max_seq_len, head_dim]`` are threaded through every
layer by ``R.call_tir_inplace`` (``kernels/kv_cache.py``), so their outputs alias their inputs and the
VM updates the preallocated cache without copying it; attention reads it in place
(``kernels/decode_attention.py``). Linears are fp32 GEMMs on weights packed in 16-column panels
(``kernels/dense_cpu.py``) or, on packed ``words``/``alpha``, BCQ lookup-table GEMVs
(``kernels/lut_gemv.py``, or with ``decode_lut="int8"`` the int8-table ``kernels/lut_gemv_int8.py``) for
decode and a tile-decoding GEMM (``kernels/bcq_gemm.py``) for prefill;
q/k/v and gate/up are fused into one linear each (same input).

With ``max_batch = B > 1`` the module also has ``batch_prefill`` and ``batch_decode``, both
``(ids int32[n], where int32[2, n], last int32[b], cache_k, cache_v, *weights) -> (logits f32[b, vocab],
cache_k, cache_v)`` on caches
``[layers, B, kv_heads, max_seq_len, head_dim]`` (one slot per sequence): the ``n`` rows are the
tokens of ``b`` sequences packed back to back, row ``i`` at position ``where[0, i]`` of slot
``where[1, i]``, and ``last`` names each sequence's last row, whose logits are returned. The same graph
serves the ragged prefill of ``b`` prompts (``n`` = their summed lengths; BCQ linears as the GEMM) and
the decode step of ``b <= B`` sequences each at its own position (``n = b``; the LUT GEMV, which
register-blocks up to 8 rows): the linears see all ``n`` rows at once, one weight read for ``b``
tokens, and attention masks each row to its own slot and length. CPU targets only.

Under a CUDA target (``with target:``) the same graph takes the GPU kernels of
``kernels/llm_cuda.py`` (same signatures, batch 1 only), dense linears become a TE matmul that
dlight schedules on ``.weight [N, K]`` (``llm_cuda.gpu_params`` re-lays the panels) and BCQ linears
the split-K ``kernels/lut_gemv_cuda.py`` GEMV plus a sum of its partials; the CPU path is unchanged.

The graph is built here straight from a :class:`~reshift.llm.config.DecoderSpec` rather than
through ``ir.Graph``: the IR has one symbolic dimension and no state, and torch.export of HF's
cache code is fragile; ``reshift/llm/reference.py`` is the numpy ground truth it is tested against.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax, te, tirx

from reshift.codegen.tvm.kernels.bcq_gemm import GEMM_MIN_ROWS, gemm_func
from reshift.codegen.tvm.kernels.decode_attention import attention_func
from reshift.codegen.tvm.kernels.dense_cpu import dense_func
from reshift.codegen.tvm.kernels.fast_math import gelu_f32, gelu_tanh_f32, silu_f32
from reshift.codegen.tvm.kernels.kv_cache import cache_shape, embed_func, kv_append_func, rope_q_func, where_shape
from reshift.codegen.tvm.kernels.lowbit import kernel_flavor
from reshift.codegen.tvm.kernels.lut_gemv import gemv_func, table_compute
from reshift.codegen.tvm.kernels.lut_gemv_int8 import TABLE_BYTES, gemv_int8_func, int8_tables_func, table_shape
from reshift.codegen.tvm.kernels.packing import ROWS
from reshift.codegen.tvm.targets import current_target_is_gpu

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

    def __init__(
        self,
        bb: relax.BlockBuilder,
        params: dict[str, np.ndarray],
        forms: dict[str, dict],
        kernels: str | None = None,
        lut: str = "float32",
    ):
        self.bb, self.arrays, self.forms = bb, params, forms
        self.lut = lut  # the LUT GEMV's tables: "float32" or "int8" (kernels/lut_gemv_int8.py)
        self.kernels = kernels or ("cuda" if current_target_is_gpu() else "cpu")
        self.max_rows: int | None = None  # a bound on symbolic rows (batched decode): picks the LUT GEMV
        self.gpu = self.kernels != "cpu"
        self.serial = self.kernels == "cuda-serial"  # the GPU graph with unbound loops, to check it on a CPU
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
        if self.gpu:
            y = self._linear_gpu(x, rows, name, form)
        elif form["kind"] == "dense":
            blocks = self.arrays[name + ".panels"].shape[0]
            gv = self.bb.add_func(dense_func(k, blocks), "dense_packed_f32")
            args = [x, self.w(name + ".panels"), self.w(name + ".bias")]
        else:
            g = form["group_size"]
            words = self.arrays[name + ".words"]
            blocks, n_groups, planes = words.shape[:3]
            alpha_dtype = self.arrays[name + ".alpha"].dtype.name
            packed = [self.w(name + ".words"), self.w(name + ".alpha"), self.w(name + ".bias")]
            gemv = (rows if isinstance(rows, int) else self.max_rows or GEMM_MIN_ROWS) < GEMM_MIN_ROWS
            if gemv and self.lut == "int8":  # decode: int8 tables (T-MAC), vpermb lookups, integer sums
                n_tables = table_shape(g)[1]
                tables_ty = [
                    relax.TensorType((rows, n_groups, n_tables, TABLE_BYTES), "int8"),
                    relax.TensorType((rows, n_groups), "float32"),
                ]
                gv_tables = self.bb.add_func(int8_tables_func(k, g), "bcq_int8_tables")
                tables = self.emit(relax.op.call_tir(gv_tables, [x], out_ty=tables_ty))
                lut8, scale = self.emit(relax.TupleGetItem(tables, 0)), self.emit(relax.TupleGetItem(tables, 1))
                gv = self.bb.add_func(gemv_int8_func(blocks, n_groups, planes, g, alpha_dtype), "bcq_lut8_gemv")
                args = [lut8, scale, *packed]
            elif gemv:  # decode: float32 tables
                lut = self.emit(self.bb.call_te(table_compute, x, k, g, primfunc_name_hint="bcq_lut"))
                func = gemv_func(blocks, n_groups, planes, g, kernel_flavor() == "avx512", alpha_dtype=alpha_dtype)
                gv = self.bb.add_func(func, "bcq_lut_gemv")
                args = [lut, *packed]
            else:  # prefill (symbolic prompt length) and large batches: decode weight tiles, then GEMM
                gv = self.bb.add_func(gemm_func(blocks, n_groups, planes, g, k, alpha_dtype), "bcq_gemm")
                args = [x, *packed]
        if not self.gpu:
            y = self.emit(relax.op.call_tir(gv, args, out_ty=relax.TensorType((rows, blocks * ROWS), "float32")))
        if out % ROWS:
            y = self.emit(op.strided_slice(y, axes=[1], begin=[0], end=[out]))
        return y

    def _linear_gpu(self, x: relax.Expr, rows, name: str, form: dict) -> relax.Expr:
        """The CUDA forms: dlight's GEMV/Matmul on ``.weight``, or the LUT GEMV's split-K partials summed."""
        from reshift.codegen.tvm.kernels.llm_cuda import dense_gpu
        from reshift.codegen.tvm.kernels.lut_gemv_cuda import gemv_cuda_func, split_for

        if form["kind"] == "dense":
            weight, bias = self.w(name + ".weight"), self.w(name + ".bias")
            return self.emit(self.bb.call_te(dense_gpu, x, weight, bias, primfunc_name_hint="dense"))
        k, g = form["in_features"], form["group_size"]
        words, alpha = self.arrays[name + ".words"], self.arrays[name + ".alpha"]
        blocks, n_groups, planes = words.shape[:3]
        lut = self.emit(self.bb.call_te(table_compute, x, k, g, primfunc_name_hint="bcq_lut"))
        func = gemv_cuda_func(blocks, n_groups, planes, g, serial=self.serial, alpha_dtype=alpha.dtype.name)
        gv = self.bb.add_func(func, "bcq_lut_gemv_cuda")
        part_ty = relax.TensorType((split_for(n_groups), rows, blocks * ROWS), "float32")
        part = self.emit(relax.op.call_tir(gv, [lut, self.w(name + ".words"), self.w(name + ".alpha")], out_ty=part_ty))
        return self.emit(op.add(op.sum(part, axis=[0]), self.w(name + ".bias")))

    def activation(self, x: relax.Expr, act: str) -> relax.Expr:
        """``act(x)``; on CPUs with the polynomial ``exp``/``erf`` of ``fast_math`` (Relax's ``silu`` and
        ``gelu`` call libm once per element: 14 us of a 15 ms TinyLlama decode step per layer)."""
        if self.gpu or act == "relu":
            return self.emit(_ACT[act](x))
        value = _ACT_F32[act]
        return self.emit(self.bb.call_te(lambda t: te.compute(t.shape, lambda *i: value(t[i]), act), x))

    def gated(self, gate_up: relax.Expr, ffn: int, act: str) -> relax.Expr:
        """``act(gate) * up`` of the fused ``gate_up [rows, 2 ffn]`` (SwiGLU / GeGLU), one kernel on CPUs."""
        if self.gpu or act == "relu":
            gate = op.strided_slice(gate_up, axes=[1], begin=[0], end=[ffn])
            up = op.strided_slice(gate_up, axes=[1], begin=[ffn], end=[2 * ffn])
            return self.emit(op.multiply(_ACT[act](gate), up))
        value = _ACT_F32[act]

        def glu(t: te.Tensor) -> te.Tensor:
            return te.compute((t.shape[0], ffn), lambda i, j: value(t[i, j]) * t[i, j + ffn], f"{act}_glu")

        return self.emit(self.bb.call_te(glu, gate_up))

    def norm(self, spec: Any, x: relax.Expr, prefix: str) -> relax.Expr:
        if spec.norm == "rms":
            return self.emit(op.nn.rms_norm(x, self.w(prefix + ".w"), axes=[-1], epsilon=spec.norm_eps))
        return self.emit(
            op.nn.layer_norm(x, self.w(prefix + ".w"), self.w(prefix + ".b"), axes=[-1], epsilon=spec.norm_eps)
        )


_ACT = {"silu": op.nn.silu, "gelu_tanh": op.nn.gelu_tanh, "gelu": op.nn.gelu, "relu": op.nn.relu}
_ACT_F32 = {"silu": silu_f32, "gelu_tanh": gelu_tanh_f32, "gelu": gelu_f32}  # CPU forms (``fast_math``)


def _kernels(fn: _Function):
    """``(embed_func, kv_append_func, rope_q_func, attention_func)`` of the CPU or the CUDA kernel set."""
    if not fn.gpu:
        return embed_func, kv_append_func, rope_q_func, attention_func
    from functools import partial

    from reshift.codegen.tvm.kernels import llm_cuda as k

    funcs = (k.embed_cuda_func, k.kv_append_cuda_func, k.rope_q_cuda_func, k.attention_cuda_func)
    return tuple(partial(f, serial=fn.serial) for f in funcs)


def _decoder(bb, spec, params, forms, max_seq, n, ids, pos, ck, cv, fn: _Function, slots: int = 0, last=None):
    """Emit the decoder body for ``n`` tokens; returns ``(logits, cache_k, cache_v)``. Batch 1 (``slots = 0``):
    ``pos int32[1]``, logits of the last row; batch (``slots``): ``pos`` is ``where int32[2, n]`` and the
    logits are those of the rows ``last``."""
    embed_func, kv_append_func, rope_q_func, attention_func = _kernels(fn)
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
            m = fn.gated(fn.linear(hn, n, p + "gate_up"), spec.ffn_size, spec.act)
            x = fn.emit(op.add(x, fn.linear(m, n, p + "down")))
        else:
            m = fn.activation(fn.linear(hn, n, p + "fc1"), spec.act)
            x = fn.emit(op.add(x, fn.linear(m, n, p + "fc2")))
    if last is not None:  # batch: each sequence's last row
        rows = fn.emit(op.take(x, last, axis=0, mode="clip"))
        return fn.linear(fn.norm(spec, rows, "norm"), last.ty.shape[0], "lm_head"), ck, cv
    last = fn.emit(op.strided_slice(x, axes=[0], begin=[n - 1], end=[n])) if not isinstance(n, int) else x
    logits = fn.linear(fn.norm(spec, last, "norm"), 1, "lm_head")
    return logits, ck, cv


def build_module(
    spec: Any,
    params: dict[str, np.ndarray],
    forms: dict[str, dict],
    max_seq: int,
    max_batch: int = 1,
    kernels: str | None = None,
    decode_lut: str = "float32",
) -> tvm.IRModule:
    """The IRModule with ``prefill`` and ``decode`` (and ``batch`` when ``max_batch > 1``); ``params``
    fixes the weight parameter order. ``decode_lut="int8"``: the BCQ linears of ``decode`` and
    ``batch_decode`` run the int8-table GEMV (``ir.ops_lowbit.lut_int8_rows`` semantics); the
    prefill functions stay float32 (``lm_head`` included) either way.

    ``kernels``: ``"cpu"``, ``"cuda"`` (default: by the current target) or ``"cuda-serial"``, the CUDA
    graph and layouts with every GPU kernel's loops unbound, which builds for a CPU target to check
    the GPU path against the reference without a GPU."""
    bb = relax.BlockBuilder()
    cache_ty = relax.TensorType((spec.num_layers, spec.num_kv_heads, max_seq, spec.head_dim), "float32")
    for name, n in (("prefill", tirx.Var("n", "int64")), ("decode", 1)):
        fn = _Function(bb, params, forms, kernels, decode_lut if name == "decode" else "float32")
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
        for name in ("batch_prefill", "batch_decode"):
            _batch_function(bb, name, spec, params, forms, max_seq, max_batch, decode_lut)
    return bb.get()


def _batch_function(bb, name: str, spec: Any, params, forms, max_seq: int, slots: int, decode_lut: str) -> None:
    """``name(ids [n], where [2, n], last [b], cache_k, cache_v, *weights)`` on the slotted caches;
    ``batch_decode`` (one row per sequence, at most ``slots`` rows) takes the LUT GEMV for BCQ linears,
    ``batch_prefill`` the GEMM."""
    n, b = tirx.Var("n", "int64"), tirx.Var("b", "int64")
    cache_ty = relax.TensorType(
        cache_shape(spec.num_layers, spec.num_kv_heads, max_seq, spec.head_dim, slots), "float32"
    )
    fn = _Function(bb, params, forms, lut=decode_lut if name == "batch_decode" else "float32")
    if fn.gpu:
        raise NotImplementedError("batched generation (max_batch > 1) builds for CPU targets only")
    fn.max_rows = slots if name == "batch_decode" else None
    ids = relax.Var("ids", relax.TensorType((n,), "int32"))
    where = relax.Var("where", relax.TensorType(where_shape(slots, n), "int32"))
    last = relax.Var("last", relax.TensorType((b,), "int32"))
    ck, cv = relax.Var("cache_k", cache_ty), relax.Var("cache_v", cache_ty)
    with bb.function(name, [ids, where, last, ck, cv, *fn.vars.values()]):
        with bb.dataflow():
            logits, ck2, cv2 = _decoder(bb, spec, params, forms, max_seq, n, ids, where, ck, cv, fn, slots, last)
            out = bb.emit_output(relax.Tuple([logits, ck2, cv2]))
        bb.emit_func_output(out)


def build_cuda(mod: tvm.IRModule, target: Any) -> tuple[Any, tuple[bytes, str] | None]:
    """``(executable, (fatbin, CUDA source))`` of a module built under a CUDA ``TargetSpec``.

    TVM's CUDA pipeline in two halves as ``codegen/tvm/build.py`` runs it (dlight schedules every
    TE kernel; the hand-written ones arrive bound), with its check that no kernel is left as host
    loops over device memory, and the kernels compiled here with nvcc so that the artifact carries
    them (``runtime/cuda_kernels.py``; a missing nvcc raises).
    """
    from tvm.relax.backend.cuda import pipeline as cuda

    from reshift.codegen.tvm.build import (
        BuildResult,
        _check_no_host_kernels,
        _cuda_toolchain,
        _tvm_errors,
        _walk,
        compile_cuda_kernels,
    )
    from reshift.errors import CodegenError

    tvm_target = target.target()
    with _tvm_errors(f"building the LLM module for {target.name}"), _cuda_toolchain(target):
        with tvm_target:
            mod = tvm.transform.Sequential(
                [*cuda.library_dispatch_passes(tvm_target), *cuda.legalize_passes(tvm_target)]
            )(mod)
        _check_no_host_kernels(mod, target)
        rest = tvm.transform.Sequential([*cuda.dataflow_lower_passes(tvm_target), *cuda.finalize_passes(tvm_target)])
        executable = tvm.compile(mod, tvm_target, relax_pipeline=rest)
    if not any(m.kind == "cuda" for m in _walk(executable.mod)):
        raise CodegenError(f"the LLM build for {target.name} produced no CUDA kernels (only host code)")
    return executable, compile_cuda_kernels(BuildResult(executable, target, mod, 0.0))
