"""Creating nodes with inferred types, and a small builder API for tests, frontends and passes.

b = GraphBuilder("tiny")
x = b.input("x", "f32[N,4]")
y = b.relu(b.linear(x, b.constant(w), None))
graph = b.build(y)
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from reshift.errors import IRTypeError, NodeTypeError
from reshift.ir.graph import Graph, Node, Value
from reshift.ir.ops import get_op, infer_types
from reshift.ir.types import TensorType


def sanitize_name(name: str) -> str:
    """A name usable in the text form: ``/blocks.0/attn/MatMul_output_0`` -> ``blocks.0_attn_MatMul_output_0``."""
    cleaned = re.sub(r"[^A-Za-z0-9_.]+", "_", name).strip("_")
    if not cleaned or not (cleaned[0].isalpha() or cleaned[0] == "_"):
        cleaned = "v_" + cleaned
    return cleaned


def create_node(
    graph: Graph,
    op: str,
    inputs: list[Value | None],
    attrs: dict[str, Any] | None = None,
    name: str | None = None,
    output_names: list[str] | None = None,
) -> Node:
    """A new node with normalized attributes and inferred output types (not yet in the graph)."""
    opdef = get_op(op)
    node_name = name or graph.fresh_name(op)
    problem = opdef.arity_problem(len(inputs))
    if problem:
        raise NodeTypeError(node_name, f"{op} {problem}")
    inputs = opdef.pad_inputs(inputs)
    attrs = opdef.normalize_attrs(attrs or {}, where=f"node {node_name}: ")
    try:
        types = infer_types(opdef, [v.type if v is not None else None for v in inputs], attrs)
    except IRTypeError as exc:
        raise NodeTypeError(node_name, str(exc)) from None
    if output_names is None:
        output_names = [node_name] if len(types) == 1 else [f"{node_name}.{i}" for i in range(len(types))]
        fresh = name is None  # a fresh node name is unique among value names too
        output_names = [
            n if fresh and len(types) == 1 else graph.fresh_name(n) if graph.name_taken(n) else n for n in output_names
        ]
    names = output_names
    outputs = [Value(n, t) for n, t in zip(names, types, strict=True)]
    return Node(op, inputs, outputs, attrs, node_name)


class GraphBuilder:
    """Appends nodes to a graph in order; ``b.<op>(...)`` is shorthand for ``b.op("<op>", ...)``."""

    def __init__(self, name: str = "main"):
        self.graph = Graph(name)

    def input(self, name: str, type: TensorType | str) -> Value:
        value = Value(name, TensorType.parse(type) if isinstance(type, str) else type)
        self.graph.inputs.append(value)
        return value

    def constant(self, array: np.ndarray, name: str | None = None) -> Value:
        return self.graph.add_constant(np.asarray(array), name)

    def op(self, op: str, *inputs: Value | None, name: str | None = None, **attrs: Any) -> Value | list[Value]:
        """Append one node; returns its output, or the list of outputs for a multi-output op."""
        node = create_node(self.graph, op, list(inputs), attrs, name)
        self.graph.nodes.append(node)
        return node.outputs if len(node.outputs) != 1 else node.outputs[0]

    def __getattr__(self, op: str):
        if op.startswith("_"):
            raise AttributeError(op)
        get_op(op)
        return lambda *inputs, **attrs: self.op(op, *inputs, **attrs)

    def output(self, value: Value, name: str | None = None) -> Value:
        """Mark ``value`` as a graph output, optionally under a new name."""
        if name and name != value.name:
            if value in self.graph.inputs or value.is_constant or value in self.graph.outputs:
                value = self.op("identity", value, name=self.graph.fresh_name("out"))
            value.name = name
        self.graph.outputs.append(value)
        return value

    def build(self, *outputs: Value, verify: bool = True) -> Graph:
        for value in outputs:
            self.output(value)
        if verify:
            from reshift.ir.verify import verify as verify_graph

            verify_graph(self.graph)
        return self.graph
