"""Run small CPU kernels on one thread: a parallel loop with little work becomes a serial loop.

Every parallel loop is a fork/join on TVM's thread pool (``TVMBackendParallelLaunch``): a few
microseconds with idle workers, far more when the cores are shared and a worker has to be woken
or rescheduled. A kernel of a tiny model (silero VAD: 16 output pixels per conv, 128-wide LSTM
gates) does less work than that, so it runs faster without the fork. This is the cost rule of
onnxruntime's thread pool (``TryParallelFor`` splits a loop only when its cost covers the
dispatch) applied at build time: the work of a parallel loop is the number of elements its body
stores (a vector store counts its lanes, so for a GEMM or conv it is the multiply-adds), with the
symbolic dims of a kernel (the batch of hand-written kernels) bound to the static shapes of its
call sites in ``main``. A loop whose work stays below ``MIN_PARALLEL_WORK`` in every call is made
serial; one with any unknown extent (a symbolic batch at run time) keeps its parallel loop.
"""

from __future__ import annotations

import operator

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx

MIN_PARALLEL_WORK = 1 << 15  # stored elements (~multiply-adds); below it a fork/join costs more than it saves

_BINARY = {
    tirx.Add: operator.add,
    tirx.Sub: operator.sub,
    tirx.Mul: operator.mul,
    tirx.FloorDiv: operator.floordiv,
    tirx.FloorMod: operator.mod,
    tirx.Min: min,
    tirx.Max: max,
}


def serial_small_parallel(min_work: int | None = None) -> tvm.transform.Pass:
    """Module pass: make every parallel loop serial whose work is below ``min_work`` in all its calls."""

    @tvm.transform.module_pass(opt_level=0, name="SerialSmallParallel")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        limit = MIN_PARALLEL_WORK if min_work is None else min_work
        calls = _call_site_bindings(mod)
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc) or not calls.get(gv.name_hint):
                continue  # not called from Relax, or once with shapes known only at run time
            body = _serialize(func.body, calls[gv.name_hint], limit)
            if not body.same_as(func.body):
                mod[gv] = func.with_body(body)
        return mod

    return _pass


def _call_site_bindings(mod: tvm.IRModule) -> dict[str, list[dict] | None]:
    """PrimFunc name -> one ``{shape var: int}`` per call, from its static shapes (None: one is not static)."""
    found: dict[str, list[dict] | None] = {}
    call_tir = {tvm.ir.Op.get("relax.call_tir"), tvm.ir.Op.get("relax.call_tir_inplace")}
    for func in mod.functions.values():
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        for block in func.body.blocks:
            for binding in block.bindings:
                call = binding.value
                if not isinstance(call, relax.Call) or call.op not in call_tir:
                    continue
                gv = call.args[0]
                prim = mod[gv] if isinstance(gv, tvm.ir.GlobalVar) else None
                if not isinstance(prim, tirx.PrimFunc):
                    continue
                values = _bind_shapes(prim, [*call.args[1].fields, *_outputs(binding.var)])
                known = found.setdefault(gv.name_hint, [])
                if values is None or known is None:
                    found[gv.name_hint] = None
                else:
                    known.append(values)
    return found


def _outputs(var: relax.Var) -> list:
    ty = var.ty
    return list(ty.fields) if isinstance(ty, relax.TupleType) else [ty]


def _static_shape(item) -> list[int] | None:
    ty = item if isinstance(item, relax.TensorType) else getattr(item, "ty", None)
    shape = getattr(ty, "shape", None)
    if not isinstance(ty, relax.TensorType) or not isinstance(shape, relax.ShapeExpr):
        return None
    dims = [d.value if isinstance(d, tirx.IntImm) else None for d in shape.values]
    return None if None in dims else dims


def _bind_shapes(prim: tirx.PrimFunc, args: list) -> dict | None:
    """``{var: int}`` for every shape var of ``prim``'s buffers, from the call's static arg shapes."""
    if len(args) != len(prim.params):
        return None
    values: dict = {}
    for param, arg in zip(prim.params, args, strict=True):
        dims = getattr(param, "shape", None)  # a buffer parameter carries its shape
        if dims is None:
            continue
        shape = _static_shape(arg)
        if shape is None or len(shape) != len(dims):
            return None
        for dim, size in zip(dims, shape, strict=True):
            if isinstance(dim, tirx.Var):
                if values.setdefault(dim, size) != size:
                    return None
    return values


def _value(expr, values: dict) -> int | None:
    """An integer expression's value with ``values`` bound, None when it depends on anything else."""
    if isinstance(expr, (int, tirx.IntImm)):
        return int(expr)
    if isinstance(expr, tirx.Var):
        return values.get(expr)
    if isinstance(expr, tirx.Cast):
        return _value(expr.value, values)
    fn = _BINARY.get(type(expr))
    if fn is None:
        return None
    a, b = _value(expr.a, values), _value(expr.b, values)
    if a is None or b is None or (fn in (operator.floordiv, operator.mod) and b == 0):
        return None
    return fn(a, b)


def work(stmt, values: dict) -> int | None:
    """Elements ``stmt`` stores (vector stores count their lanes); None when an extent is unknown."""
    if isinstance(stmt, tirx.BufferStore):
        return max(1, int(stmt.value.ty.dtype.lanes))
    if isinstance(stmt, tirx.For):
        extent, inner = _value(stmt.extent, values), work(stmt.body, values)
        return None if extent is None or inner is None else extent * inner
    if isinstance(stmt, tirx.SeqStmt):
        parts = [work(s, values) for s in stmt.seq]
        return None if None in parts else sum(parts)
    if isinstance(stmt, tirx.IfThenElse):
        parts = [work(s, values) for s in (stmt.then_case, stmt.else_case) if s is not None]
        return None if None in parts else sum(parts)
    if isinstance(stmt, s_tir.SBlockRealize):
        return work(stmt.block, values)
    if isinstance(stmt, s_tir.SBlock):
        parts = [work(s, values) for s in (stmt.body, stmt.init) if s is not None]
        return None if None in parts else sum(parts)
    if isinstance(stmt, tirx.Evaluate):
        return 1
    if isinstance(stmt, tirx.While):
        return None
    body = getattr(stmt, "body", None)  # LetStmt, AttrStmt, ... wrap a body; Bind, AllocBuffer store nothing
    return work(body, values) if isinstance(body, tirx.Stmt) else 0


def _serialize(body: tirx.Stmt, calls: list[dict], min_work: int) -> tirx.Stmt:
    def visit(loop: tirx.For) -> tirx.For:
        if loop.kind != tirx.ForKind.PARALLEL:
            return loop
        amounts = [work(loop, values) for values in calls]
        if None in amounts or max(amounts) >= min_work:
            return loop
        return tirx.For(
            loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body, None, loop.annotations, loop.step
        )

    return tvm_ffi.structural_map(body, (tirx.For, visit))
