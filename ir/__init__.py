"""reshift's graph IR: types, graph, op registry, text form, verifier and reference interpreter."""

from reshift.ir.builder import GraphBuilder, create_node, sanitize_name
from reshift.ir.graph import Graph, Node, Value
from reshift.ir.interpret import interpret
from reshift.ir.ops import OPS, Attr, OpDef, get_op
from reshift.ir.text import parse, print_graph
from reshift.ir.types import DTYPES, TensorType
from reshift.ir.verify import verify

__all__ = [
    "DTYPES",
    "OPS",
    "Attr",
    "Graph",
    "GraphBuilder",
    "Node",
    "OpDef",
    "TensorType",
    "Value",
    "create_node",
    "get_op",
    "interpret",
    "parse",
    "print_graph",
    "sanitize_name",
    "verify",
]
