"""Rewrite rules: ``Rule(name, pattern, check, rewrite)``, and the pass that applies a rule set.

A rule's ``check(match, graph)`` returns ``None`` to accept or a reason string to refuse
("conv has padding 0, identity needs 1"); refusals go into the pass report. ``rewrite(match,
ctx)`` builds the replacement with ``ctx`` (nodes are inserted just before the matched root,
so topological order holds) and returns the value that replaces the root's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reshift.ir.builder import create_node
from reshift.ir.graph import Graph, Node, Value
from reshift.passes.pattern import Match, Op, escaping_interior, match

Check = Callable[[Match, Graph], "str | None"]
Rewrite = Callable[[Match, "RewriteContext"], Value]


@dataclass(frozen=True)
class Rule:
    """One rewrite: a pattern, a check that says why not, and a replacement."""

    name: str
    pattern: Op
    check: Check
    rewrite: Rewrite
    allow_shared_interior: bool = False  # rewrite keeps interior nodes alive for other users
    report_refusals: bool = True  # False for clean-ups whose refusals only mean "not a no-op"


class RewriteContext:
    """Builds replacement nodes in front of the matched root node."""

    def __init__(self, graph: Graph, root: Node):
        self.graph = graph
        self.root = root
        self.new_nodes: list[Node] = []

    def constant(self, array: np.ndarray, hint: str = "w") -> Value:
        return self.graph.add_constant(np.ascontiguousarray(array), hint)

    def op(self, op: str, *inputs: Value | None, **attrs: Any) -> Value:
        node = create_node(self.graph, op, list(inputs), attrs, self.graph.fresh_name(op))
        self.new_nodes.append(node)
        return node.outputs[0]


@dataclass
class Refusal:
    rule: str
    node: str
    reason: str


@dataclass
class RuleStats:
    """What one application of a rule set did."""

    matches: dict[str, int] = field(default_factory=dict)
    refusals: list[Refusal] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # per-layer facts a pass reports (bits, errors)

    @property
    def changed(self) -> bool:
        return sum(self.matches.values()) > 0


def replace_value(graph: Graph, old: Value, new: Value) -> str | None:
    """Redirect readers of ``old`` to ``new``; keeps graph output names. Returns a refusal or None."""
    if old in graph.outputs:
        if new in graph.inputs or new.is_constant or new in graph.outputs:
            return f"%{old.name} is a graph output and its replacement %{new.name} cannot take its name"
        graph.replace_all_uses(old, new)
        old.name, new.name = f"{old.name}__dead", old.name
        return None
    graph.replace_all_uses(old, new)
    return None


def apply_rules(graph: Graph, rules: list[Rule]) -> RuleStats:
    """One sweep over the nodes trying every rule at every node (in place); dead code is removed."""
    stats = RuleStats()
    users = graph.users()
    producers = graph.producers()
    index = 0
    while index < len(graph.nodes):
        node = graph.nodes[index]
        for rule in rules:
            found = match(rule.pattern, node, producers)
            if found is None:
                continue
            reason = None if rule.allow_shared_interior else escaping_interior(found, graph, users)
            reason = reason or rule.check(found, graph)
            if reason is not None:
                if rule.report_refusals:
                    stats.refusals.append(Refusal(rule.name, node.name, reason))
                continue
            ctx = RewriteContext(graph, node)
            new = rule.rewrite(found, ctx)
            reason = replace_value(graph, node.outputs[0], new) if new is not node.outputs[0] else None
            if reason is not None:  # the rule applies but the graph cannot take it: always news
                stats.refusals.append(Refusal(rule.name, node.name, reason))
                continue
            graph.nodes[index:index] = ctx.new_nodes
            index += len(ctx.new_nodes)
            stats.matches[rule.name] = stats.matches.get(rule.name, 0) + 1
            users = graph.users()
            producers = graph.producers()
            break
        index += 1
    graph.remove_unused()
    return stats
