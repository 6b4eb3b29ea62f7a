"""Lowering reshift's IR to a Relax IRModule: one function per op in the ``LOWERINGS`` table.

``lower(graph)`` makes a Relax function ``main`` whose parameters are the graph inputs (each
symbol becomes one ``tirx.Var``: ``N`` -> ``tirx.Var("N", "int64")``, ``"12*N*S"`` -> ``N * S * 12``), whose weights
are bound as ``relax.const`` and which returns one tensor, or a tuple in graph-output order.
Each lowering gets the context, the node and the Relax expressions of its inputs (``None`` for an
absent optional input) and returns one expression or a list (one per node output). Where a Relax
op's semantics differ from ``ir/ops.py`` the lowering builds a TE compute instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx

from reshift.errors import CodegenError
from reshift.ir.graph import Graph, Node, Value
from reshift.ir.types import Dim, dim_terms, numpy_dtype

op = relax.op

Lowering = Callable[..., Any]
LOWERINGS: dict[str, Lowering] = {}


def lowering(*names: str, override: bool = False) -> Callable[[Lowering], Lowering]:
    """Register one lowering function for the ops ``names`` (``override``: replace a reference one)."""

    def register(fn: Lowering) -> Lowering:
        for name in names:
            if name in LOWERINGS and not override:
                raise ValueError(f"op {name!r} has two TVM lowerings")
            LOWERINGS[name] = fn
        return fn

    return register


class Absorbed:
    """The Relax value of an IR value whose every reader reads it from somewhere else.

    A lowering that writes its result straight into the layout its consumers need (a conv writing
    the next conv's zero padded input, with the ReLU between them applied) leaves the plain tensor
    unmaterialized: its value is ``ABSORBED`` and the consumers find theirs in ``ctx.padded``.
    """

    def __repr__(self) -> str:
        return "ABSORBED"


ABSORBED = Absorbed()


class LowerContext:
    """What a lowering needs: the block builder, the graph's symbolic dimensions and its use lists.

    ``fused`` holds nodes a producer's kernel already computed (their results, bound without
    lowering them); ``padded`` maps an IR value to ``(expr, layout)`` when it exists only in a
    kernel-specific layout (see :class:`Absorbed`).
    """

    def __init__(
        self,
        bb: relax.BlockBuilder,
        symbols: dict[str, tirx.PrimExpr],
        multiples: dict[str, tuple[int, tirx.Var]],
        graph: Graph | None = None,
    ):
        self.bb = bb
        self.symbols = symbols
        self.multiples = multiples  # symbol -> (k, M) when only k*symbol is an input dimension
        self.users: dict[Value, list[Node]] = graph.users() if graph is not None else {}
        self.graph_outputs: set[Value] = set(graph.outputs) if graph is not None else set()
        self.fused: dict[Node, list[Any]] = {}
        self.padded: dict[Value, tuple[relax.Expr, Any]] = {}
        self.env: dict[Value, Any] = {}  # the values lowered so far (a fused epilogue reads an operand)

    def only_reader(self, value: Value) -> Node | None:
        """The one node reading ``value`` once, if ``value`` has exactly that use and is not a graph output."""
        readers = self.users.get(value, [])
        return readers[0] if len(readers) == 1 and value not in self.graph_outputs else None

    def relu_of(self, value: Value) -> Node | None:
        """The ``relu`` node that is ``value``'s only reader (a producer's kernel can apply it), if any."""
        reader = self.only_reader(value)
        return reader if reader is not None and reader.op == "relu" and reader.inputs[0] is value else None

    def residual_add(self, value: Value) -> tuple[Node, Value] | None:
        """``(add, other)`` when ``value``'s only reader is ``add(value, other)`` with ``other`` an
        already lowered, materialized tensor of ``value``'s type: a kernel producing ``value`` can add
        ``other`` in its epilogue (a residual connection) and compute the add's output instead."""
        reader = self.only_reader(value)
        if reader is None or reader.op != "add" or len(reader.inputs) != 2:
            return None
        other = reader.inputs[1] if reader.inputs[0] is value else reader.inputs[0]
        ready = self.env.get(other)
        if other is value or other.type != value.type or reader.outputs[0].type != value.type:
            return None
        return (reader, other) if ready is not None and ready is not ABSORBED else None

    def dim(self, dim: Dim) -> int | tirx.PrimExpr:
        """An IR dimension as a TIR expression: ``"12*N*S"`` -> ``N * S * 12`` over the input vars."""
        coefficient, symbols = dim_terms(dim)
        if not symbols:
            return coefficient
        if len(symbols) == 1 and symbols[0] in self.multiples and coefficient % self.multiples[symbols[0]][0] == 0:
            k, total = self.multiples[symbols[0]]
            return total if coefficient == k else total * (coefficient // k)
        expr = None
        for symbol in symbols:
            if symbol not in self.symbols:
                self.symbols[symbol] = tirx.Var(symbol, "int64")
            expr = self.symbols[symbol] if expr is None else expr * self.symbols[symbol]
        return expr if coefficient == 1 else expr * coefficient

    def shape(self, value: Value) -> list[int | tirx.PrimExpr]:
        return [self.dim(d) for d in value.shape]

    def emit(self, expr: relax.Expr) -> relax.Expr:
        return self.bb.emit(expr)

    def te(self, fn: Callable, *args: Any, name: str, **kwargs: Any) -> relax.Expr:
        return self.bb.emit(self.bb.call_te(fn, *args, primfunc_name_hint=name, **kwargs))


def product(dims) -> int | tirx.PrimExpr:
    """The product of dimensions, some maybe symbolic (rows of a tensor flattened to 2-D, or batches)."""
    result = 1
    for d in dims:
        result = result * d
    return result


def constant(array: np.ndarray) -> relax.Constant:
    """``array`` as a Relax constant of exactly its dtype: ``relax.const`` without a dtype makes int64 int32."""
    array = np.asarray(array)
    return relax.const(array, dtype=array.dtype.name)


def scalar(value: float | int | bool, dtype: str) -> relax.Constant:
    return constant(np.array(value, dtype=numpy_dtype(dtype)))


def lower(graph: Graph, func_name: str = "main") -> tvm.IRModule:
    """``graph`` as a Relax IRModule with one function ``func_name`` (weights bound as constants)."""
    missing = sorted({n.op for n in graph.nodes if n.op not in LOWERINGS})
    if missing:
        nodes = {m: [n.name for n in graph.nodes if n.op == m][:3] for m in missing}
        raise CodegenError(
            "the TVM backend cannot lower op(s) "
            + "; ".join(f"{m} (node {', '.join(ns)})" for m, ns in nodes.items())
            + ": add a lowering to codegen/tvm/lower.py or rewrite the graph with a reshift pass"
        )
    bb = relax.BlockBuilder()
    ctx = LowerContext(bb, *_input_symbols(graph), graph=graph)
    params = [relax.Var(v.name, relax.TensorType(ctx.shape(v), v.dtype)) for v in graph.inputs]
    env: dict[Value, relax.Expr] = dict(zip(graph.inputs, params, strict=True))
    env.update({c: constant(c.data) for c in graph.constants.values()})
    ctx.env = env
    with bb.function(func_name, params):
        with bb.dataflow():
            for node in graph.nodes:
                if node in ctx.fused:  # computed by its producer's kernel
                    env.update(zip(node.outputs, ctx.fused.pop(node), strict=True))
                    continue
                args = [env[v] if v is not None else None for v in node.inputs]
                unplaced = [
                    v.name for v, a in zip(node.inputs, args, strict=True) if a is ABSORBED and v not in ctx.padded
                ]
                if unplaced:
                    raise CodegenError(f"internal: {node.op} (node {node.name}) reads fused-away value(s) {unplaced}")
                try:
                    result = LOWERINGS[node.op](ctx, node, *args)
                except CodegenError:
                    raise
                except Exception as exc:  # noqa: BLE001 -- TVM raises many types; name the node
                    first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                    raise CodegenError(
                        f"lowering {node.op} (node {node.name}) to Relax failed: {first}; "
                        "check the node's attributes and input types (print the graph), or report it"
                    ) from None
                results = result if isinstance(result, (list, tuple)) else [result]
                if len(results) != len(node.outputs):
                    raise CodegenError(
                        f"lowering of {node.op} (node {node.name}) gave {len(results)} outputs, "
                        f"expected {len(node.outputs)}"
                    )
                _check_dtypes(node, results)
                env.update(zip(node.outputs, results, strict=True))
            outputs = [env[v] for v in graph.outputs]
            out = bb.emit_output(outputs[0] if len(outputs) == 1 else relax.Tuple(outputs))
        bb.emit_func_output(out)
    return bb.get()


def _check_dtypes(node: Node, results: list) -> None:
    """Refuse a lowering whose Relax result dtype differs from the graph's (a codegen bug, named here
    rather than as a Relax type error at the next op that reads it)."""
    for value, result in zip(node.outputs, results, strict=True):
        ty = getattr(result, "ty", None)
        if not isinstance(ty, relax.TensorType):
            continue  # ABSORBED, or a tuple a later node unpacks
        dtype = str(getattr(ty.dtype, "dtype", ty.dtype))  # a PrimType on emitted vars
        if dtype not in ("", "void") and dtype != value.dtype:
            raise CodegenError(
                f"internal: lowering of {node.op} (node {node.name}) made %{value.name} {dtype}, "
                f"the graph says {value.type}; report it with the graph"
            )


def _input_symbols(graph: Graph) -> tuple[dict[str, tirx.PrimExpr], dict[str, tuple[int, tirx.Var]]]:
    """One int64 var per symbol; if a symbol only appears as ``k*N`` in the inputs, define N = M / k."""
    symbols: dict[str, tirx.PrimExpr] = {}
    multiples: dict[str, tuple[int, tirx.Var]] = {}
    coefficients: dict[str, set[int]] = {}
    products: list[str] = []
    for value in graph.inputs:
        for dim in value.shape:
            coefficient, names = dim_terms(dim)
            if len(names) == 1:
                coefficients.setdefault(names[0], set()).add(coefficient)
            elif names:
                products.append(f"%{value.name}: {value.type}")
    for symbol, seen in coefficients.items():
        if 1 in seen:
            symbols[symbol] = tirx.Var(symbol, "int64")
        else:  # e.g. input [197*N, 384]: the function can only read M = 197*N from a shape
            k = min(seen)
            total = tirx.Var(f"{k}x{symbol}", "int64")
            multiples[symbol] = (k, total)
            symbols[symbol] = tirx.floordiv(total, k)
    unbound = sorted({s for v in graph.inputs for s in v.type.symbols} - set(symbols))
    if unbound:  # an input axis N*S with neither N nor S alone on another axis: nothing to bind them from
        raise CodegenError(
            f"the symbols {unbound} appear only inside products in the graph inputs ({', '.join(products)}); "
            "the TVM build binds each symbol from one input axis: pin them with input_shapes / --input-shape"
        )
    return symbols, multiples


# The op lowerings themselves live in lower_ops.py (elementwise, contraction, normalization),
# lower_shape.py (data movement, pooling, gathers) and lower_lowbit.py (reference low-bit linears);
# importing them fills LOWERINGS.
from reshift.codegen.tvm import lower_lowbit, lower_nn, lower_ops, lower_shape  # noqa: E402,F401
from reshift.codegen.tvm import lower_select as _lower_select  # noqa: E402,F401 -- topk, isnan, isinf
from reshift.codegen.tvm.kernels import int8_conv as _kernels_int8_conv  # noqa: E402,F401 -- int8_conv2d (VNNI)
from reshift.codegen.tvm.kernels import int8_gemm as _kernels_int8_gemm  # noqa: E402,F401 -- int8_linear (VNNI) and quantizers
from reshift.codegen.tvm.kernels import lowbit as _kernels_lowbit  # noqa: E402,F401 -- multiplication-free low-bit kernels
from reshift.codegen.tvm.kernels import moe_dispatch as _kernels_moe_dispatch  # noqa: E402,F401 -- moe_linear token dispatch
from reshift.codegen.tvm.kernels import shift_conv as _kernels_shift_conv  # noqa: E402,F401 -- shift_conv2d (im2col + shift GEMV)
