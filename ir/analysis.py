"""Static cost figures of a graph: multiply-accumulates and parameter bytes."""

from __future__ import annotations

from reshift.ir.graph import Graph
from reshift.ir.ops import get_op


def graph_macs(graph: Graph, batch: int = 1) -> int:
    """Multiply-accumulates of one run with every symbol (batch, sequence, ...) set to ``batch``."""
    total = 0
    symbols = set().union(*(v.type.symbols for v in graph.inputs)) if graph.inputs else set()
    bindings = {s: batch for s in symbols}
    for node in graph.nodes:
        macs = get_op(node.op).macs
        if macs is None:
            continue
        shapes = [v.type.concrete_shape(bindings) if v is not None else None for v in node.inputs]
        total += macs(node.outputs[0].type.concrete_shape(bindings), *shapes)
    return total


def parameter_bytes(graph: Graph) -> int:
    return graph.parameter_bytes()
