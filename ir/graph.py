"""The graph IR: SSA values, nodes in topological order, constants held as numpy arrays."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reshift.ir.types import TensorType


@dataclass(eq=False)
class Value:
    """An SSA value. A constant (a weight) carries its numpy array in ``data``."""

    name: str
    type: TensorType
    data: np.ndarray | None = None

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    @property
    def shape(self) -> tuple:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type}"


@dataclass(eq=False)
class Node:
    """One operation: ``outputs = op(inputs) {attrs}``. An absent optional input is ``None``."""

    op: str
    inputs: list[Value | None]
    outputs: list[Value]
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    @property
    def output(self) -> Value:
        """The single output of a one-output node."""
        if len(self.outputs) != 1:
            raise ValueError(f"node {self.name} ({self.op}) has {len(self.outputs)} outputs")
        return self.outputs[0]

    def input_values(self) -> list[Value]:
        return [v for v in self.inputs if v is not None]

    def __repr__(self) -> str:
        return f"Node({self.name}: {self.op})"


class Graph:
    """A dataflow graph: named inputs and outputs, nodes in topological order, constants.

    Mutating helpers (:meth:`replace_all_uses`, :meth:`remove_unused`, ...) keep the node list
    topologically ordered when their callers insert replacements just before the old nodes.
    """

    def __init__(
        self,
        name: str = "main",
        inputs: list[Value] | None = None,
        outputs: list[Value] | None = None,
        nodes: list[Node] | None = None,
        constants: list[Value] | None = None,
    ):
        self.name = name
        self.inputs: list[Value] = list(inputs or [])
        self.outputs: list[Value] = list(outputs or [])
        self.nodes: list[Node] = list(nodes or [])
        self.constants: dict[str, Value] = {c.name: c for c in constants or []}
        self.notes: list[str] = []  # what the frontend did to read the model (e.g. an opset upgrade)
        # the model's own names where the IR had to rename: graph input value name -> name, and the
        # outputs by position (passes may replace an output value, never reorder the outputs)
        self.source_names: dict[str, str] = {}
        self.output_names: list[str] = []
        # the largest size a symbol may take (a sequence sliced from a 512-row position table):
        # binding a larger one is an InputError (interpreter, runtime) instead of reading past the table
        self.symbol_bounds: dict[str, int] = {}
        self._counters: dict[str, int] = {}
        self._taken: set[str] = set()
        self._taken_signature: tuple[int, int, int] | None = None

    # -- queries -----------------------------------------------------------------------------
    def values(self) -> Iterator[Value]:
        """Every value: inputs, constants, then node outputs in order."""
        yield from self.inputs
        yield from self.constants.values()
        for node in self.nodes:
            yield from node.outputs

    def producers(self) -> dict[Value, Node]:
        return {out: node for node in self.nodes for out in node.outputs}

    def users(self) -> dict[Value, list[Node]]:
        """Map each value to the nodes that read it (a node appears once per use)."""
        result: dict[Value, list[Node]] = {}
        for node in self.nodes:
            for value in node.input_values():
                result.setdefault(value, []).append(node)
        return result

    def op_histogram(self) -> Counter:
        return Counter(node.op for node in self.nodes)

    def parameter_bytes(self) -> int:
        return sum(int(c.data.nbytes) for c in self.constants.values())

    def value_names(self) -> set[str]:
        return {v.name for v in self.values()}

    # -- construction ------------------------------------------------------------------------
    def _taken_names(self) -> set[str]:
        signature = (len(self.inputs), len(self.constants), len(self.nodes))
        if self._taken_signature != signature:
            self._taken = self.value_names() | {n.name for n in self.nodes}
            self._taken_signature = signature
        return self._taken

    def name_taken(self, name: str) -> bool:
        return name in self._taken_names()

    def fresh_name(self, hint: str = "v") -> str:
        """A value or node name not used in this graph (``conv2d_3``)."""
        self._taken_names()
        hint = re.sub(r"_\d+$", "", hint) or "v"
        while True:
            count = self._counters.get(hint, 0)
            self._counters[hint] = count + 1
            name = f"{hint}_{count}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def add_constant(self, array: np.ndarray, name: str | None = None) -> Value:
        array = np.asarray(array)
        if name is None or self.name_taken(name):
            name = self.fresh_name(name or "c")
        else:
            self._taken_names().add(name)
        value = Value(name, TensorType.of(array), array)
        self.constants[value.name] = value
        return value

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every reader of ``old`` (nodes and graph outputs) read ``new`` instead."""
        for node in self.nodes:
            node.inputs = [new if v is old else v for v in node.inputs]
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_unused(self) -> int:
        """Drop nodes whose outputs nothing reads, and unread constants; returns nodes removed."""
        live: set[Value] = set(self.outputs)
        kept: list[Node] = []
        for node in reversed(self.nodes):
            if any(out in live for out in node.outputs):
                kept.append(node)
                live.update(node.input_values())
        removed = len(self.nodes) - len(kept)
        self.nodes = kept[::-1]
        self.constants = {k: c for k, c in self.constants.items() if c in live}
        return removed

    def copy(self) -> Graph:
        """A structural copy with fresh Value/Node objects; constant arrays are shared."""
        mapping: dict[Value, Value] = {}

        def clone(v: Value | None) -> Value | None:
            if v is None:
                return None
            if v not in mapping:
                mapping[v] = Value(v.name, v.type, v.data)
            return mapping[v]

        inputs = [clone(v) for v in self.inputs]
        constants = [clone(v) for v in self.constants.values()]
        nodes = [
            Node(n.op, [clone(v) for v in n.inputs], [clone(v) for v in n.outputs], dict(n.attrs), n.name)
            for n in self.nodes
        ]
        graph = Graph(self.name, inputs, [clone(v) for v in self.outputs], nodes, constants)
        graph.notes = list(self.notes)
        graph.source_names = dict(self.source_names)
        graph.output_names = list(self.output_names)
        graph.symbol_bounds = dict(self.symbol_bounds)
        return graph

    def user_name(self, value: Value) -> str:
        """The name the model's author gave a graph input or output (the IR name where none was given)."""
        if any(value is v for v in self.inputs):
            return self.source_names.get(value.name, value.name)
        if len(self.output_names) == len(self.outputs):
            for position, output in enumerate(self.outputs):
                if output is value:
                    return self.output_names[position]
        return self.source_names.get(value.name, value.name)

    # -- views -------------------------------------------------------------------------------
    def to_networkx(self):
        """A ``networkx.MultiDiGraph`` view: one vertex per node, input and constant.

        Vertices are node names (``op`` attribute), ``input:<name>`` and ``const:<name>``;
        edges carry the value name and input slot. Derived on demand, never edited back.
        """
        import networkx as nx

        view = nx.MultiDiGraph(name=self.name)
        source: dict[Value, str] = {}
        for v in self.inputs:
            source[v] = f"input:{v.name}"
            view.add_node(source[v], op="input", value=v.name, type=str(v.type))
        for v in self.constants.values():
            source[v] = f"const:{v.name}"
            view.add_node(source[v], op="constant", value=v.name, type=str(v.type))
        for node in self.nodes:
            view.add_node(node.name, op=node.op, attrs=node.attrs)
            for slot, v in enumerate(node.inputs):
                if v is not None and v in source:
                    view.add_edge(source[v], node.name, value=v.name, slot=slot)
            for out in node.outputs:
                source[out] = node.name
        for index, v in enumerate(self.outputs):
            view.add_node(f"output:{index}", op="output", value=v.name)
            if v in source:
                view.add_edge(source[v], f"output:{index}", value=v.name, slot=0)
        return view

    def summary(self) -> str:
        """One line per fact: inputs, outputs, node count, op histogram, parameter bytes."""
        hist = ", ".join(f"{op} x{n}" for op, n in self.op_histogram().most_common())
        return "\n".join(
            [
                f"graph {self.name}: {len(self.nodes)} nodes, {len(self.constants)} constants, "
                f"{self.parameter_bytes():,} parameter bytes",
                "inputs:  " + ", ".join(repr(v) for v in self.inputs),
                "outputs: " + ", ".join(repr(v) for v in self.outputs),
                f"ops:     {hist}",
                *(f"note:    {note}" for note in self.notes),
                *(f"bound:   {symbol} <= {limit}" for symbol, limit in sorted(self.symbol_bounds.items())),
            ]
        )

    def __str__(self) -> str:
        from reshift.ir.text import print_graph

        return print_graph(self, weights="elide")

    def __repr__(self) -> str:
        return f"<Graph {self.name}: {len(self.nodes)} nodes>"
