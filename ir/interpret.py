"""The numpy reference interpreter: the ground truth every pass and backend is checked against."""

from __future__ import annotations

from typing import Any

import numpy as np

from reshift.errors import ExecutionError, InputError
from reshift.ir.graph import Graph, Node, Value
from reshift.ir.limits import check_array_size
from reshift.ir.ops import get_op, resolve_symbolic_attrs
from reshift.ir.types import dim_terms, numpy_dtype, resolve_dim


def bind_inputs(graph: Graph, inputs: dict[str, Any]) -> tuple[dict[Value, np.ndarray], dict[str, int]]:
    """Check names, dtypes and shapes of ``inputs`` against the graph; bind symbolic dims.

    Inputs are named as the model names them (:meth:`Graph.user_name`); the IR name works too.
    """
    expected = {graph.user_name(v): v for v in graph.inputs}
    ir_names = {v.name: name for name, v in expected.items()}
    inputs = {name if name in expected else ir_names.get(name, name): x for name, x in inputs.items()}
    missing = sorted(set(expected) - set(inputs))
    unexpected = sorted(set(inputs) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"graph {graph.name} takes inputs {sorted(expected)}; "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {unexpected}" if unexpected else "")
        )
    bindings: dict[str, int] = {}
    bound_at: dict[str, str] = {}  # symbol -> "input 'x' axis 1", for the conflict message
    env: dict[Value, np.ndarray] = {}
    for name, value in expected.items():
        array = np.asarray(inputs[name])
        if array.dtype != numpy_dtype(value.dtype):
            raise InputError(f"input {name!r}: expected dtype {value.dtype}, got {array.dtype} (cast it first)")
        if array.ndim != value.type.rank:
            raise InputError(f"input {name!r}: expected {value.type}, got shape {array.shape}")
        for axis, (dim, actual) in enumerate(zip(value.shape, array.shape, strict=True)):
            coefficient, symbols = dim_terms(dim)
            if len(symbols) == 1 and actual % coefficient == 0 and symbols[0] not in bindings:
                bindings[symbols[0]] = actual // coefficient
                bound_at[symbols[0]] = f"input {name!r} axis {axis}"
        env[value] = array
    for name, value in expected.items():  # every axis against the bindings, products of symbols too
        shape = env[value].shape
        for axis, (dim, actual) in enumerate(zip(value.shape, shape, strict=True)):
            symbols = dim_terms(dim)[1]
            unbound = [s for s in symbols if s not in bindings]
            if unbound:
                raise InputError(
                    f"input {name!r}: expected {value.type}, got shape {shape}: axis {axis} ({dim}) is {actual}, "
                    f"which gives no whole value for {unbound[0]}"
                )
            if resolve_dim(dim, bindings) != actual:
                sources = "; ".join(f"{s}={bindings[s]} from {bound_at[s]}" for s in sorted(set(symbols)))
                raise InputError(
                    f"input {name!r}: expected {value.type}, got shape {shape}: axis {axis} is {actual}, "
                    + (f"inconsistent with {sources}" if symbols else f"not {dim}")
                )
    for symbol, limit in graph.symbol_bounds.items():
        if bindings.get(symbol, 0) > limit:
            raise InputError(
                f"{bound_at[symbol]} gives {symbol}={bindings[symbol]}, but graph {graph.name} supports "
                f"{symbol} up to {limit} (a table of {limit} rows is sliced to it); pass a shorter input"
            )
    return env, bindings


def interpret(graph: Graph, inputs: dict[str, Any], *, return_all: bool = False) -> dict[str, np.ndarray]:
    """Run ``graph`` on numpy arrays; returns ``{output name: array}`` (the model's own output names).

    With ``return_all`` every value computed is returned, keyed by value name. A node whose
    output would be over the tensor limit (:mod:`reshift.ir.limits`) raises ``ResourceLimitError``
    before it runs; a reference failing on its values raises ``ExecutionError`` naming the node.
    """
    env, bindings = bind_inputs(graph, inputs)
    env.update({c: c.data for c in graph.constants.values()})
    for node in graph.nodes:
        opdef = get_op(node.op)
        attrs = resolve_symbolic_attrs(opdef, node.attrs, bindings)
        args = [env[v] if v is not None else None for v in node.inputs]
        results = _run_reference(node, opdef, args, attrs, bindings)
        results = results if isinstance(results, tuple) else (results,)
        for value, array in zip(node.outputs, results, strict=True):
            array = np.asarray(array)
            expected_shape = value.type.concrete_shape(bindings)
            if array.shape != expected_shape or array.dtype != numpy_dtype(value.dtype):
                raise AssertionError(
                    f"reference of {node.op} (node {node.name}) produced {array.dtype}{list(array.shape)}, "
                    f"expected {value.type} = {list(expected_shape)}: a bug in ir/ops.py"
                )
            env[value] = array
    if return_all:
        return {v.name: a for v, a in env.items()}
    return {graph.user_name(v): env[v] for v in graph.outputs}


# numpy's complaints about the values themselves; anything else (TypeError, KeyError...) is a bug
_VALUE_ERRORS = (IndexError, ValueError, ArithmeticError, MemoryError)


def _run_reference(node: Node, opdef, args: list, attrs: dict[str, Any], bindings: dict[str, int]):
    """One node's numpy reference, refused if an output is over the tensor limit.

    A failure on the values (an index out of range, say) becomes an :class:`ExecutionError`
    naming the node, with numpy's exception chained.
    """
    for value in node.outputs:
        check_array_size(value.type.concrete_shape(bindings), value.dtype, f"node {node.name} ({node.op}) output")
    try:
        with np.errstate(all="ignore"):
            return opdef.reference(*args, **attrs)
    except _VALUE_ERRORS as exc:
        raise ExecutionError(f"node {node.name} ({node.op}) failed on its inputs: {type(exc).__name__}: {exc}") from exc
