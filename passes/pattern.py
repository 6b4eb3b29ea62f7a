"""Structural patterns over the IR, in the spirit of TVM Relax's ``relax.dpl`` and onnxscript's rewriter.

A pattern is a small tree rooted at the value a rule rewrites:

    conv = Op("conv2d", Any("x"), Const("weight"), Opt(Const("bias")), name="conv")
    bn = Op("batch_norm", conv, Const("scale"), Const("shift"), Const("mean"), Const("var"), name="bn")

Leaves bind values by name; a name used twice must bind the same value (``add(conv(x), conv(x))``
for branches reading one input). Structure lives here; conditions live in the rule's check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reshift.ir.graph import Graph, Node, Value


class Pattern:
    """Base class: ``match_value`` extends ``bindings`` or returns False."""

    def match_value(self, value: Value | None, ctx: _MatchContext) -> bool:
        raise NotImplementedError


@dataclass
class Any(Pattern):
    """Any value (a graph input, constant or node output), bound to ``name``."""

    name: str

    def match_value(self, value, ctx):
        return value is not None and ctx.bind(self.name, value)


@dataclass
class Const(Pattern):
    """A constant (weight) value, bound to ``name``."""

    name: str

    def match_value(self, value, ctx):
        return value is not None and value.is_constant and ctx.bind(self.name, value)


@dataclass
class Opt(Pattern):
    """An optional input: absent (``_``) or matching ``inner``."""

    inner: Pattern

    def match_value(self, value, ctx):
        return value is None or self.inner.match_value(value, ctx)


class Op(Pattern):
    """A value produced by a node whose op is ``op`` (or one of a tuple), inputs matched in order.

    The node is bound under ``name`` (default: the op name); its output value under ``name``
    in ``Match.values``. With ``commutative`` a two-input op also matches with inputs swapped.
    """

    def __init__(self, op, *inputs: Pattern, name: str | None = None, commutative: bool = False):
        self.op, self.inputs, self.name, self.commutative = op, tuple(inputs), name, commutative

    def __repr__(self) -> str:
        return f"Op({self.op!r}, {', '.join(map(repr, self.inputs))})"

    @property
    def key(self) -> str:
        return self.name or (self.op if isinstance(self.op, str) else self.op[0])

    def match_value(self, value, ctx):
        if value is None or value not in ctx.producers:
            return False
        node = ctx.producers[value]
        ops = (self.op,) if isinstance(self.op, str) else self.op
        if node.op not in ops or not ctx.bind_node(self.key, node, value):
            return False
        orders = [list(node.inputs)]
        if self.commutative and len(node.inputs) == 2:
            orders.append(list(node.inputs[::-1]))
        for inputs in orders:
            saved = ctx.snapshot()
            padded = inputs + [None] * (len(self.inputs) - len(inputs))
            pairs = zip(self.inputs, padded, strict=False) if len(padded) == len(self.inputs) else None
            if pairs is not None and all(p.match_value(v, ctx) for p, v in pairs):
                return True
            ctx.restore(saved)
        return False


@dataclass
class Match:
    """What a pattern bound: values by leaf/op name, nodes by op-pattern name, the root node."""

    root: Node
    values: dict[str, Value] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Value:
        return self.values[name]

    def get(self, name: str) -> Value | None:
        return self.values.get(name)

    def array(self, name: str):
        """The numpy data of a bound constant (``None`` if the optional slot was empty)."""
        value = self.values.get(name)
        return None if value is None else value.data


class _MatchContext:
    def __init__(self, producers: dict[Value, Node]):
        self.producers = producers
        self.values: dict[str, Value] = {}
        self.nodes: dict[str, Node] = {}

    def bind(self, name: str, value: Value) -> bool:
        return self.values.setdefault(name, value) is value

    def bind_node(self, name: str, node: Node, value: Value) -> bool:
        return self.nodes.setdefault(name, node) is node and self.bind(name, value)

    def snapshot(self):
        return dict(self.values), dict(self.nodes)

    def restore(self, saved) -> None:
        self.values, self.nodes = dict(saved[0]), dict(saved[1])


def match(pattern: Op, node: Node, producers: dict[Value, Node]) -> Match | None:
    """Match ``pattern`` rooted at ``node``'s first output, or None."""
    ctx = _MatchContext(producers)
    if not pattern.match_value(node.outputs[0], ctx):
        return None
    return Match(node, ctx.values, ctx.nodes)


def escaping_interior(m: Match, graph: Graph, users: dict[Value, list[Node]]) -> str | None:
    """Why the match cannot be replaced whole: an interior value read outside the match, or None."""
    matched = {id(n) for n in m.nodes.values()}
    outputs = set(map(id, graph.outputs))
    for node in m.nodes.values():
        if node is m.root:
            continue
        for value in node.outputs:
            if id(value) in outputs:
                return f"%{value.name} (from {node.name}) is also a graph output"
            outside = [u.name for u in users.get(value, []) if id(u) not in matched]
            if outside:
                return f"%{value.name} (from {node.name}) is also used by {', '.join(outside)}"
    return None
