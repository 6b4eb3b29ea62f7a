"""Well-formedness of a graph (LLVM's -verify-each, TVM's WellFormed): run after every pass."""

from __future__ import annotations

import re

from reshift.errors import IRTypeError, UnknownOpError, VerificationError
from reshift.ir.graph import Graph
from reshift.ir.ops import get_op, infer_types
from reshift.ir.types import TensorType

_NAME_OK = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def verify(graph: Graph) -> None:
    """Raise :class:`VerificationError` listing every broken invariant, or return None.

    Checks: names are valid and unique (SSA), every input of a node is defined before it
    (topological order), ops exist with valid attributes, recorded types equal inferred
    types, constants match their types, outputs are defined. Several symbolic dims are fine
    (malformed ones are refused when the type is built).
    """
    problems: list[str] = []
    defined: set[int] = set()
    names: dict[str, str] = {}

    def define(value, where: str) -> None:
        if not _NAME_OK.match(value.name):
            problems.append(f"{where}: invalid value name {value.name!r}")
        if value.name in names:
            problems.append(f"{where}: value %{value.name} defined twice (also {names[value.name]})")
        names[value.name] = where
        defined.add(id(value))

    for value in graph.inputs:
        if value.is_constant:
            problems.append(f"graph input %{value.name} carries constant data")
        define(value, "graph input")
    for key, value in graph.constants.items():
        if key != value.name:
            problems.append(f"constant table key {key!r} != value name {value.name!r}")
        if value.data is None or TensorType.of(value.data) != value.type:
            problems.append(f"constant %{value.name}: data does not match type {value.type}")
        define(value, "constant")
    node_names: set[str] = set()
    for node in graph.nodes:
        where = f"node {node.name} ({node.op})"
        if node.name in node_names:
            problems.append(f"{where}: node name used twice")
        node_names.add(node.name)
        for value in node.input_values():
            if id(value) not in defined:
                problems.append(f"{where}: input %{value.name} is not defined before use")
        try:
            opdef = get_op(node.op)
            problem = opdef.arity_problem(len(node.inputs), padded=True)
            if problem:
                raise IRTypeError(f"{problem} (omitted optional inputs are held as None)")
            attrs = opdef.normalize_attrs(node.attrs, where=f"{where}: ")
            types = infer_types(opdef, [v.type if v is not None else None for v in node.inputs], attrs)
            recorded = [v.type for v in node.outputs]
            if types != recorded:
                problems.append(
                    f"{where}: recorded types {[str(t) for t in recorded]} != inferred {[str(t) for t in types]}"
                )
        except (UnknownOpError, IRTypeError) as exc:
            problems.append(f"{where}: {exc}")
        for value in node.outputs:
            define(value, where)
    for value in graph.outputs:
        if id(value) not in defined:
            problems.append(f"graph output %{value.name} is not defined")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise VerificationError(f"graph {graph.name} is malformed:\n  {shown}{more}")
