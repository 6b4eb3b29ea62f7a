"""Fixing the symbolic batch dimension to a number, for kernels that need static shapes.

MetaSchedule cannot tune kernels over a symbolic extent (NOTES_tvm.md section 9), so a tuned
build is specialized to one batch size; the interpreter and generic builds keep ``N``.
"""

from __future__ import annotations

from reshift.ir.graph import Graph
from reshift.ir.ops import get_op, resolve_symbolic_attrs
from reshift.ir.types import TensorType
from reshift.ir.verify import verify


def specialize_batch(graph: Graph, batch: int) -> Graph:
    """A copy of ``graph`` with every symbolic dimension evaluated at ``symbol = batch``."""
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    result = graph.copy()
    symbols = set().union(*(v.type.symbols for v in result.values()))
    bindings = {symbol: batch for symbol in symbols}
    for value in result.values():
        if value.type.symbols:
            value.type = TensorType(value.type.concrete_shape(bindings), value.type.dtype)
    for node in result.nodes:
        node.attrs = resolve_symbolic_attrs(get_op(node.op), node.attrs, bindings)
    verify(result)
    return result
