"""Fixing symbolic dimensions to numbers, for kernels that need static shapes.

MetaSchedule cannot tune kernels over a symbolic extent (NOTES_tvm.md section 9), so a tuned
build is specialized to one batch size; the interpreter and generic builds keep the symbols.
:func:`specialize` binds any subset of a graph's symbols (``{"S": 128}``), the rest stay symbolic.
"""

from __future__ import annotations

from reshift.ir.graph import Graph
from reshift.ir.ops import get_op
from reshift.ir.types import TensorType, dim_terms, monomial
from reshift.ir.verify import verify

BATCH_SYMBOL = "N"


def _bind(dim, bindings: dict[str, int]):
    coefficient, symbols = dim_terms(dim)
    rest = []
    for symbol in symbols:
        if symbol in bindings:
            coefficient *= bindings[symbol]
        else:
            rest.append(symbol)
    return monomial(coefficient, rest)


def specialize(graph: Graph, bindings: dict[str, int]) -> Graph:
    """A copy of ``graph`` with the symbols in ``bindings`` replaced by their (positive) values."""
    for symbol, size in bindings.items():
        if int(size) < 1:
            raise ValueError(f"symbol {symbol} must be bound to a positive size, got {size}")
    result = graph.copy()
    for value in result.values():
        if value.type.symbols & set(bindings):
            value.type = TensorType(tuple(_bind(d, bindings) for d in value.type.shape), value.type.dtype)
    for node in result.nodes:
        opdef = get_op(node.op)
        node.attrs = {
            key: tuple(d if d == -1 else _bind(d, bindings) for d in v)
            if key in opdef.attrs and opdef.attrs[key].kind == "shape" and v is not None
            else v
            for key, v in node.attrs.items()
        }
    verify(result)
    return result


def specialize_batch(graph: Graph, batch: int) -> Graph:
    """A copy of ``graph`` with the batch symbol ``N`` (or the graph's only symbol) set to ``batch``.

    Other symbols (a sequence length ``S``) stay symbolic; :func:`specialize` pins those.
    """
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    symbols = set().union(*(v.type.symbols for v in graph.values()))
    if BATCH_SYMBOL in symbols or len(symbols) != 1:
        bound = {BATCH_SYMBOL: batch} if BATCH_SYMBOL in symbols else {}
    else:
        bound = {symbols.pop(): batch}
    return specialize(graph, bound)
