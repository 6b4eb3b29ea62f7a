"""The IR's text form: ``print(graph)`` writes it, :func:`parse` reads it back.

    graph tiny(%x: f32[N,4]) {
      const %w: f32[2,4] = [0.5, -1.0, ...]
      %y: f32[N,2] = linear(%x, %w, _) @fc
      %z: f32[N,2] = relu(%y) @act
      return %z
    }

Constants print inline (up to 16 elements), as ``b64"..."`` raw little-endian bytes
(``weights="full"``) or as ``...`` (``weights="elide"``, for reading; :func:`parse` then
needs the arrays passed as ``weights=``). An absent optional input prints as ``_``.
"""

from __future__ import annotations

import base64
import math
import re
from typing import Any

import numpy as np

from reshift.errors import IRTypeError, ParseError, ReshiftError
from reshift.ir.graph import Graph, Node, Value
from reshift.ir.ops import get_op
from reshift.ir.types import TensorType, numpy_dtype

INLINE_LIMIT = 16


# -- printing ---------------------------------------------------------------------------------
def _format_scalar(x: Any) -> str:
    if isinstance(x, bool) or isinstance(x, np.bool_):
        return "true" if x else "false"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return repr(x)
    if x is None:
        return "none"
    if isinstance(x, str):
        return (
            x
            if re.fullmatch(r"(\d+\*)?[A-Za-z_]\w*", x) and x not in ("true", "false", "none", "inf", "nan")
            else f'"{x}"'
        )
    raise TypeError(f"cannot print attribute value {x!r}")


def _format_attr(value: Any, kind: str) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_format_scalar(v) for v in value) + "]"
    if kind in ("str", "dtype") and value is not None:
        return f'"{value}"'
    return _format_scalar(value)


def _format_constant(value: Value, weights: str) -> str:
    data = value.data
    if data.size <= INLINE_LIMIT:
        flat = data.reshape(-1)
        items = flat.astype(np.float64) if data.dtype.kind == "f" or data.dtype.name == "bfloat16" else flat
        return "[" + ", ".join(_format_scalar(v.item() if hasattr(v, "item") else v) for v in items) + "]"
    if weights == "elide":
        return "..."
    raw = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
    return 'b64"' + base64.b64encode(raw).decode("ascii") + '"'


def _operand(value: Value | None) -> str:
    return "_" if value is None else f"%{value.name}"


def print_node(node: Node) -> str:
    outs = ", ".join(f"%{v.name}: {v.type}" for v in node.outputs)
    args = ", ".join(_operand(v) for v in node.inputs)
    opdef = get_op(node.op)
    attrs = ", ".join(f"{k}={_format_attr(v, opdef.attrs[k].kind)}" for k, v in node.attrs.items())
    return f"{outs} = {node.op}({args})" + (f" {{{attrs}}}" if attrs else "") + f" @{node.name}"


def print_graph(graph: Graph, weights: str = "full") -> str:
    """The text form; ``weights`` is ``"full"`` (round-trips) or ``"elide"`` (readable)."""
    if weights not in ("full", "elide"):
        raise ValueError("weights must be 'full' or 'elide'")
    lines = [f"graph {graph.name}(" + ", ".join(f"%{v.name}: {v.type}" for v in graph.inputs) + ") {"]
    lines += [f"  const %{c.name}: {c.type} = {_format_constant(c, weights)}" for c in graph.constants.values()]
    lines += [f"  {print_node(node)}" for node in graph.nodes]
    lines.append("  return " + ", ".join(f"%{v.name}" for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines)


# -- parsing ----------------------------------------------------------------------------------
_NAME = r"[A-Za-z_][\w.]*"
_TYPE = r"[a-z0-9]+\[[^\]]*\]"
_HEADER = re.compile(rf"^graph\s+({_NAME})\s*\((.*)\)\s*\{{$")
_TYPED = re.compile(rf"%({_NAME})\s*:\s*({_TYPE})")
_CONST = re.compile(rf"^const\s+%({_NAME})\s*:\s*({_TYPE})\s*=\s*(.+)$")
_NODE = re.compile(rf"^(.+?)\s*=\s*({_NAME})\((.*?)\)\s*(\{{.*\}})?\s*(?:@({_NAME}))?$")
_RETURN = re.compile(r"^return\s*(.*)$")


class _ValueReader:
    """A small recursive-descent reader for attribute values: numbers, names, strings, lists."""

    _TOKEN = re.compile(r'\s*(?:(\[)|(\])|(,)|(=)|("(?:[^"\\]|\\.)*")|([^\s,\[\]=]+))')

    def __init__(self, text: str):
        self.tokens = [m for m in self._TOKEN.finditer(text) if m.group(0).strip()]
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos].group(0).strip() if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise ParseError("unexpected end of attribute list")
        self.pos += 1
        return token

    def value(self) -> Any:
        token = self.take()
        if token == "[":
            items = []
            while self.peek() != "]":
                items.append(self.value())
                if self.peek() == ",":
                    self.take()
            self.take()
            return items
        return _read_scalar(token)


def _read_scalar(token: str) -> Any:
    if token.startswith('"'):
        return token[1:-1]
    if token in ("true", "false"):
        return token == "true"
    if token == "none":
        return None
    if token in ("inf", "-inf", "nan"):
        return float(token)
    try:
        return int(token)
    except ValueError:
        pass
    try:
        return float(token)
    except ValueError:
        return token  # a symbolic dimension such as N or 197*N


def _parse_attrs(text: str) -> dict[str, Any]:
    reader = _ValueReader(text.strip()[1:-1])
    attrs: dict[str, Any] = {}
    while reader.peek() is not None:
        key = reader.take()
        if reader.take() != "=":
            raise ParseError(f"expected '=' after attribute {key!r}")
        attrs[key] = reader.value()
        if reader.peek() == ",":
            reader.take()
    return attrs


def _parse_constant(name: str, ttype: TensorType, body: str, weights: dict[str, np.ndarray] | None) -> np.ndarray:
    dtype = numpy_dtype(ttype.dtype)
    shape = ttype.concrete_shape({})
    if body == "...":
        if weights is None or name not in weights:
            raise ParseError(f"constant %{name} is elided ('...'); pass its array in parse(text, weights={{...}})")
        array = np.asarray(weights[name])
    elif body.startswith('b64"'):
        array = np.frombuffer(base64.b64decode(body[4:-1]), dtype=dtype.newbyteorder("<")).astype(dtype)
    else:
        items = _ValueReader(body).value()
        if not isinstance(items, list):
            items = [items]
        array = np.array(items, dtype=np.float64 if dtype.kind == "f" or ttype.dtype == "bfloat16" else None)
        array = array.astype(dtype)
    if array.size != int(np.prod(shape)):
        raise ParseError(f"constant %{name}: {array.size} values for type {ttype}")
    return array.reshape(shape)


def parse(text: str, weights: dict[str, np.ndarray] | None = None) -> Graph:
    """Read the text form written by ``print_graph``; errors name the line."""
    # a comment is "//" at the start or after white space (base64 weights may contain "//")
    lines = [(n, re.sub(r"(^|\s)//.*$", "", line).strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line]
    if not lines:
        raise ParseError("empty graph text")
    values: dict[str, Value] = {}
    graph: Graph | None = None

    def lookup(token: str, lineno: int) -> Value | None:
        token = token.strip()
        if token == "_":
            return None
        if not token.startswith("%") or token[1:] not in values:
            raise ParseError(f"line {lineno}: undefined value {token!r}")
        return values[token[1:]]

    for lineno, line in lines:
        try:
            if graph is None:
                header = _HEADER.match(line)
                if header is None:
                    raise ParseError(f"line {lineno}: expected 'graph NAME(%x: f32[...], ...) {{'")
                graph = Graph(header.group(1))
                for name, ttype in _TYPED.findall(header.group(2)):
                    values[name] = Value(name, TensorType.parse(ttype))
                    graph.inputs.append(values[name])
            elif line == "}":
                break
            elif m := _CONST.match(line):
                name, ttype = m.group(1), TensorType.parse(m.group(2))
                values[name] = Value(name, ttype, _parse_constant(name, ttype, m.group(3).strip(), weights))
                graph.constants[name] = values[name]
            elif m := _RETURN.match(line):
                graph.outputs = [lookup(tok, lineno) for tok in m.group(1).split(",") if tok.strip()]
            elif m := _NODE.match(line):
                outputs = [Value(name, TensorType.parse(t)) for name, t in _TYPED.findall(m.group(1))]
                if not outputs:
                    raise ParseError(f"line {lineno}: node has no typed outputs")
                args = [lookup(tok, lineno) for tok in m.group(3).split(",") if tok.strip()]
                opdef = get_op(m.group(2))
                problem = opdef.arity_problem(len(args))
                if problem:
                    raise ParseError(f"line {lineno}: {m.group(2)} {problem}")
                args = opdef.pad_inputs(args)  # omitted optional inputs are None, as create_node makes them
                attrs = opdef.normalize_attrs(_parse_attrs(m.group(4)) if m.group(4) else {})
                node = Node(m.group(2), args, outputs, attrs, m.group(5) or graph.fresh_name(m.group(2)))
                graph.nodes.append(node)
                for v in outputs:
                    values[v.name] = v
            else:
                raise ParseError(f"line {lineno}: cannot read {line!r}")
        except ParseError:
            raise
        except (ReshiftError, IRTypeError, ValueError) as exc:
            raise ParseError(f"line {lineno}: {exc}") from None
    if graph is None:
        raise ParseError("no graph header found")
    return graph
