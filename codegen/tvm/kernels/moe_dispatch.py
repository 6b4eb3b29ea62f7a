"""Token dispatch for ``moe_linear`` (ShiftAddViT's mixture of a multiplication and a shift expert).

On CPUs: every row is quantized to int8 once (``lowbit.quantize_rows_int8``, the shift expert's own
codes), the int8 router scores it (an exact int32 dot product, then the registry's float32 decision
``(float32(acc) * s) * router_scale > -router_bias``), a serial partition writes the permutation that
puts the multiplication rows first (``perm``), its inverse and their count ``n``. The count becomes
a shape (``tensor_to_shape`` + ``match_cast``: a data-dependent symbolic row count), so each expert
runs its existing kernel on exactly its rows: the packed fp32 GEMM (``dense_cpu.py``) on the gathered
float rows ``x[perm[:n]]``, and ``shift_linear``'s CPU kernel on the gathered float shift rows
``perm[n:]`` (the exact int8 or int16 dot products of ``shift_int8.py`` / ``shift_int.py``). Their outputs are stacked
and scattered back by the inverse permutation, then the bias is added. Shift rows and routing are
bit-exact to the reference, multiplication rows within the dense kernel's float32 rounding (as
``linear``).

Other targets run both experts on every row and select per row (the same function, no dispatch).

:func:`expert_latencies` times the two expert kernels for a layer's shape on the host, the latency
``ShiftAddViT``'s load-balancing loss (and the pass's ``expert_latency`` option) weights experts by.
"""

from __future__ import annotations

import time

import numpy as np
import tvm
from tvm import relax, te, tirx
from tvm.script import tirx as T

from reshift.codegen.tvm import lower_lowbit
from reshift.codegen.tvm.kernels import cpu_lowering, dense_cpu, lowbit
from reshift.codegen.tvm.kernels.shift_int8 import shift_matmul_cpu
from reshift.codegen.tvm.lower import LowerContext, lowering, op, product, scalar
from reshift.ir.graph import Node


def _route(q: te.Tensor, s: te.Tensor, router: te.Tensor, router_scale: te.Tensor, router_bias: te.Tensor):
    """``1`` where a row goes to the shift expert (the registry's :func:`route_rows`), else ``0``."""
    rows, k = q.shape[0], router.shape[0]  # q may be zero padded past K
    i = te.reduce_axis((0, k), name="k")
    acc = te.compute(
        (rows,), lambda r: te.sum(q[r, i].astype("int32") * router[i].astype("int32"), axis=i), name="router_acc"
    )
    return te.compute(
        (rows,),
        lambda r: tirx.Select(
            (acc[r].astype("float32") * s[r, 0]) * router_scale[0] > -router_bias[0],
            tirx.const(1, "int32"),
            tirx.const(0, "int32"),
        ),
        name="route",
    )


@T.prim_func(private=True, s_tir=True)
def partition(mask_h: T.handle, perm_h: T.handle, inverse_h: T.handle, count: T.Buffer((1,), "int64")):
    """``perm``: the multiplication rows (mask 0) in order, then the shift rows; ``inverse[perm[i]] = i``;
    ``count``: the number of multiplication rows. One serial pass each (a block, so Relax's passes
    that inspect call_tir bodies accept it)."""
    T.func_attr({"tir.noalias": True, "op_pattern": 8})
    rows = T.int64()
    mask = T.match_buffer(mask_h, (rows,), "int32")
    perm = T.match_buffer(perm_h, (rows,), "int64")
    inverse = T.match_buffer(inverse_h, (rows,), "int64")
    with T.sblock("partition"):
        T.reads(mask[0:rows])
        T.writes(perm[0:rows], inverse[0:rows], count[0:1])
        slot = T.alloc_buffer((2,), "int64")
        slot[0] = T.int64(0)
        for r in range(rows):
            if mask[r] == 0:
                slot[0] = slot[0] + T.int64(1)
        count[0] = slot[0]
        slot[1] = slot[0]
        slot[0] = T.int64(0)
        for r in range(rows):
            if mask[r] == 0:
                perm[slot[0]] = r
                inverse[r] = slot[0]
                slot[0] = slot[0] + T.int64(1)
            else:
                perm[slot[1]] = r
                inverse[r] = slot[1]
                slot[1] = slot[1] + T.int64(1)


def dense_rows(ctx: LowerContext, x2: relax.Expr, rows, w: np.ndarray) -> relax.Expr:
    """``x2 [rows, K] @ w^T`` (no bias) through the packed fp32 GEMM; ``rows`` may be data dependent."""
    out, k = w.shape
    packed = dense_cpu.pack_panels(w)
    blocks = packed.shape[0]
    gv = ctx.bb.add_func(dense_cpu.dense_func(k, blocks), "dense_packed_f32")
    zeros = relax.const(np.zeros(blocks * dense_cpu.LANES, np.float32))
    y = ctx.emit(
        relax.op.call_tir(
            gv, [x2, relax.const(packed), zeros], out_ty=relax.TensorType((rows, blocks * dense_cpu.LANES), "float32")
        )
    )
    if blocks * dense_cpu.LANES != out:
        y = ctx.emit(op.strided_slice(y, axes=[1], begin=[0], end=[out]))
    return y


def _dispatch(ctx, x2, mask, rows, weight, sign, exponent, scale, bits) -> relax.Expr:
    """Partition the rows, run each expert's kernel on its rows, scatter back (module docstring)."""
    parts = ctx.emit(
        relax.op.call_tir(
            ctx.bb.add_func(partition, "moe_partition"),
            [mask],
            out_ty=[
                relax.TensorType((rows,), "int64"),
                relax.TensorType((rows,), "int64"),
                relax.TensorType((1,), "int64"),
            ],
        )
    )
    perm, inverse, count = (ctx.emit(relax.TupleGetItem(parts, i)) for i in range(3))
    n_mult = tirx.Var("moe_rows_mult", "int64")
    ctx.bb.match_cast(ctx.emit(op.tensor_to_shape(count)), relax.ShapeType([n_mult]))
    mult_rows = ctx.emit(op.strided_slice(perm, axes=[0], begin=[0], end=[n_mult], assume_inbound=True))
    shift_rows = ctx.emit(op.strided_slice(perm, axes=[0], begin=[n_mult], end=[rows], assume_inbound=True))
    y_mult = dense_rows(ctx, ctx.emit(op.take(x2, mult_rows, axis=0)), n_mult, weight)
    x_shift = ctx.emit(op.take(x2, shift_rows, axis=0))  # the shift kernels quantize their rows themselves
    y_shift = shift_matmul_cpu(ctx, x_shift, rows - n_mult, sign, exponent, scale, None, bits)
    stacked = ctx.emit(op.concat([y_mult, y_shift], axis=0))
    return ctx.emit(op.take(stacked, inverse, axis=0))


@lowering("moe_linear")
def lower_moe_linear(
    ctx: LowerContext, node: Node, x, router, router_scale, router_bias, weight, sign, exponent, scale, bias
) -> relax.Expr:
    constant = lower_lowbit._constant
    weight_np, sign_np, exponent_np = constant(node, 4), constant(node, 5), constant(node, 6)
    bits = node.attrs["exponent_bits"]
    out, k = weight_np.shape
    lead = ctx.shape(node.inputs[0])[:-1]
    rows = product(lead)
    x2 = ctx.emit(op.reshape(x, (rows, k)))
    q, s = lowbit.quantize_rows_int8(ctx, x2, rows, k)
    mask = ctx.te(_route, q, s, router, router_scale, router_bias, name="moe_route")
    if cpu_lowering.enabled():
        y = _dispatch(ctx, x2, mask, rows, weight_np, sign_np, exponent_np, scale, bits)
    else:  # both experts on every row, then a per-row select
        y_mult = ctx.emit(op.matmul(x2, relax.const(np.ascontiguousarray(weight_np.T.astype(np.float32)))))
        y_shift = lowbit.shift_matmul_int8(ctx, q, s, rows, sign_np, exponent_np, scale, bits)
        chosen = ctx.emit(op.reshape(op.greater(mask, scalar(0, "int32")), (rows, 1)))
        y = ctx.emit(op.where(chosen, y_shift, y_mult))
    if bias is not None:
        y = ctx.emit(op.add(y, bias))
    return ctx.emit(op.reshape(y, [*lead, out]))


def expert_latencies(
    out_features: int,
    in_features: int,
    rows: int = 197,
    repeat: int = 20,
    exponent_bits: int = 4,
    levels: int | None = None,
) -> dict[str, float]:
    """Seconds per token of the multiplication expert (fp32 GEMM) and the shift expert (its CPU kernel on
    random codes of ``exponent_bits`` with exponents below ``levels``, default ``2^exponent_bits``: the
    pass's ``shift_bits`` / ``shift_levels``, which decide int8 or int16) at ``[rows, in] -> [rows, out]``
    on the host, median of ``repeat``."""
    from reshift.codegen.tvm import build
    from reshift.ir import GraphBuilder

    rng = np.random.default_rng(0)
    results = {}
    for kind in ("mult", "shift"):
        b = GraphBuilder(f"expert_{kind}")
        x = b.input("x", f"f32[{rows},{in_features}]")
        if kind == "mult":
            y = b.linear(x, b.constant(rng.standard_normal((out_features, in_features)).astype(np.float32)), None)
        else:
            sign = b.constant(rng.integers(-1, 2, (out_features, in_features)).astype(np.int8))
            top = levels or 2**exponent_bits
            exponent = b.constant(rng.integers(0, top, (out_features, in_features)).astype(np.uint8))
            scale = b.constant(rng.random(out_features).astype(np.float32))
            y = b.shift_linear(x, sign, exponent, scale, None, exponent_bits=exponent_bits)
        vm = relax.VirtualMachine(build(b.build(y), "cpu").executable, tvm.cpu())
        f, xv = vm["main"], tvm.runtime.tensor(rng.standard_normal((rows, in_features)).astype(np.float32))
        for _ in range(3):
            f(xv)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            f(xv)
            times.append(time.perf_counter() - start)
        results[kind] = float(np.median(times)) / rows
    return results


__all__ = ["dense_rows", "expert_latencies", "lower_moe_linear", "partition"]
