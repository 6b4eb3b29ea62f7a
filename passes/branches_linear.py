"""Structural reparameterization of linear layers: FFN idle channels, residuals, heads, wide GEMMs.

A linear layer is linear in its input, so whatever reaches it without a nonlinearity folds into
its weight:

- RePaViT (Xu et al. 2025, "channel idle" FFN, Sec. 3): hidden channels that skip the activation
  make ``fc2(cat(act(h_a), h_i)) = W2a act(W1a x + b1a) + W2i (W1i x + b1i) + b2``; the idle part is
  one ``d x d`` matrix ``W2i W1i`` (Eq. 5), merged with the residual as ``W2i W1i + I``. Slices,
  splits and channel permutations (``gather``) between fc1 and the concat are index maps.
- BatchNorm before a linear (RePaViT's pre-FFN BN, also through the token transposes) folds into
  the weight's input columns: ``W (k x + t) + b = (W diag k) x + (W t + b)``.
- Residual ``x + linear(x) = linear(x; W + I)`` (also inside a sum), ``linear . linear`` and
  parallel linears on one input summed: ``W1 + W2``.
- DeiT (Touvron et al. 2021, Sec. 5): the class and distillation heads averaged at inference,
  ``(head(t[:, 0]) + head_dist(t[:, 1])) / 2``, are one linear over the two adjacent tokens read as
  one vector, ``[W | Wd] [t0; t1]``: same MACs, one GEMV instead of two, no add.
- Parallel-branch fusion (DBB transform IV; the fused-qkv GEMM): convs or linears with equal
  attributes reading one tensor become one op with concatenated output channels and a ``split``
  (removed when the outputs are concatenated back in order).
"""

from __future__ import annotations

import numpy as np

from reshift.ir.builder import create_node
from reshift.ir.graph import Graph, Node, Value
from reshift.ir.ops import get_op
from reshift.passes.branches import (
    _bias_or_zero,
    _bn_after_sum,
    _bn_before,
    _cast,
    _check_bn_after_sum,
    _check_bn_before,
    _f64,
    _float32,
    _fold_bn_after_sum,
    _fold_bn_before,
    _shared_weights,
)
from reshift.passes.manager import Pass, PassContext, rule_pass
from reshift.passes.pattern import Any, Const, Match, Op, Opt
from reshift.passes.rules import Refusal, Rule, RuleStats, replace_value


class Producer(Op):
    """A node of ``op`` whatever its inputs (``concat`` is variadic), kept when ``where(node, producers)``.

    The rule's check walks the inputs; ``where`` is structure only, so unrelated nodes log no refusal.
    """

    def __init__(self, op: str, name: str, where=None):
        super().__init__(op, name=name)
        self.where = where

    def match_value(self, value, ctx):
        node = ctx.producers.get(value) if value is not None else None
        if node is None or node.op != self.op or (self.where and not self.where(node, ctx.producers)):
            return False
        return ctx.bind_node(self.key, node, value)


# -- linear layers: parallel, residual, sequential, averaged heads --------------------------------
PARALLEL_LINEARS = Op(
    "add",
    Op("linear", Any("x"), Const("w1"), Opt(Const("b1")), name="linear_a"),
    Op("linear", Any("x"), Const("w2"), Opt(Const("b2")), name="linear_b"),
    name="add",
)


def _check_parallel_linears(m: Match, graph: Graph) -> str | None:
    if m["linear_a"].type != m["linear_b"].type or m["add"].type != m["linear_a"].type:
        return f"branch outputs {m['linear_a'].type} and {m['linear_b'].type} differ (the add broadcasts)"
    names = ("w1", "w2", "b1", "b2")
    return _float32(m, names) or _shared_weights(m, graph, names)


def _merge_parallel_linears(m: Match, ctx) -> Value:
    n = m["w1"].type.shape[0]
    bias = None
    if m.get("b1") is not None or m.get("b2") is not None:
        bias = ctx.constant(_cast(m, "w1", _bias_or_zero(m, "b1", n) + _bias_or_zero(m, "b2", n)), "merged_bias")
    return ctx.op("linear", m["x"], ctx.constant(_cast(m, "w1", _f64(m, "w1") + _f64(m, "w2")), "merged_weight"), bias)


RESIDUAL_LINEAR = Op(
    "add", Op("linear", Any("x"), Const("w"), Opt(Const("b")), name="linear"), Any("x"), name="add", commutative=True
)


def _check_residual_linear(m: Match, graph: Graph) -> str | None:
    if m["linear"].type != m["x"].type or m["add"].type != m["x"].type:
        return f"linear maps {m['x'].type} to {m['linear'].type}; a residual needs the same shape"
    return _float32(m, ("w", "b")) or _shared_weights(m, graph, ("w", "b"))


def _merge_residual_linear(m: Match, ctx) -> Value:
    weight = _f64(m, "w") + np.eye(m["w"].type.shape[0])
    bias = m.get("b")
    return ctx.op("linear", m["x"], ctx.constant(_cast(m, "w", weight), "merged_weight"), bias)


SEQUENTIAL_LINEARS = Op(
    "linear",
    Op("linear", Any("x"), Const("w1"), Opt(Const("b1")), name="linear_a"),
    Const("w2"),
    Opt(Const("b2")),
    name="linear_b",
)


def _check_sequential_linears(m: Match, graph: Graph) -> str | None:
    (hidden, n_in), (n_out, _) = m["w1"].type.shape, m["w2"].type.shape
    if n_out * n_in > hidden * (n_in + n_out):
        return f"{n_in}->{hidden}->{n_out} is a low-rank factorization; one {n_out}x{n_in} matrix costs more"
    names = ("w1", "w2", "b1", "b2")
    return _float32(m, names) or _shared_weights(m, graph, names)


def _merge_sequential_linears(m: Match, ctx) -> Value:
    w1, w2 = _f64(m, "w1"), _f64(m, "w2")
    bias = None
    if m.get("b1") is not None or m.get("b2") is not None:
        bias = _bias_or_zero(m, "b2", w2.shape[0]) + w2 @ _bias_or_zero(m, "b1", w1.shape[0])
        bias = ctx.constant(_cast(m, "w2", bias), "merged_bias")
    return ctx.op("linear", m["x"], ctx.constant(_cast(m, "w2", w2 @ w1), "merged_weight"), bias)


AVERAGED_HEADS = Op(
    "div",
    Op(
        "add",
        Op("linear", Any("x1"), Const("w1"), Opt(Const("b1")), name="linear_a"),
        Op("linear", Any("x2"), Const("w2"), Opt(Const("b2")), name="linear_b"),
        name="add",
    ),
    Const("c"),
    name="div",
)


def _check_averaged_heads(m: Match, graph: Graph) -> str | None:
    c = m.array("c")
    if c.size != 1:
        return f"divisor {m['c'].type} is not a scalar"
    if float(c.reshape(-1)[0]) == 0.0 or not np.isfinite(c).all():
        return "divisor is zero or not finite"
    if m["div"].type != m["add"].type or m["linear_a"].type != m["linear_b"].type:
        return "the add or the divide broadcasts"
    names = ("w1", "w2", "b1", "b2")
    return _float32(m, names) or _shared_weights(m, graph, names)


def _fold_averaged_heads(m: Match, ctx) -> Value:
    c = float(m.array("c").reshape(-1)[0])
    heads = []
    for x, w, b in (("x1", "w1", "b1"), ("x2", "w2", "b2")):
        bias = None if m.get(b) is None else ctx.constant(_cast(m, w, _f64(m, b) / c), "head_bias")
        heads.append(ctx.op("linear", m[x], ctx.constant(_cast(m, w, _f64(m, w) / c), "head_weight"), bias))
    return ctx.op("add", *heads)


RESIDUAL_IN_SUM = Op(
    "add",
    Op(
        "add",
        Any("rest"),
        Op("linear", Any("x"), Const("w"), Opt(Const("b")), name="linear"),
        name="sum",
        commutative=True,
    ),
    Any("x"),
    name="add",
    commutative=True,
)


def _check_residual_in_sum(m: Match, graph: Graph) -> str | None:
    x = m["x"].type
    if m["linear"].type != x or m["sum"].type != x or m["add"].type != x:
        return f"linear maps {x} to {m['linear'].type} inside a sum of {m['sum'].type}; a residual needs one shape"
    return _float32(m, ("w", "b")) or _shared_weights(m, graph, ("w", "b"))


def _merge_residual_in_sum(m: Match, ctx) -> Value:
    return ctx.op("add", m["rest"], _merge_residual_linear(m, ctx))


# -- RePaViT: idle FFN channels fold into a linear shortcut -----------------------------------------
SELECTIONS = ("slice", "split", "gather")


def _activation(node: Node | None) -> bool:
    return node is not None and node.op != "identity" and {"elementwise", "unary"} <= get_op(node.op).tags


def _trace_channels(value: Value, producers: dict[Value, Node]) -> tuple[Node | None, list, Node] | str:
    """(activation or None, [(selection node, its output taken)] from the concat up, fc1)."""
    act, node = None, producers.get(value)
    if _activation(node):
        act, value, node = node, node.inputs[0], producers.get(node.inputs[0])
    chain: list[tuple[Node, Value]] = []
    while node is not None and node.op in SELECTIONS:
        chain.append((node, value))
        value, node = node.inputs[0], producers.get(node.inputs[0])
    if node is None or node.op != "linear":
        return f"concat input %{value.name} is not a channel selection of a linear's output"
    return act, chain, node


def _last_axis(axis: int, rank: int) -> bool:
    return axis % rank == rank - 1


def _channel_index(chain: list[tuple[Node, Value]], hidden: int) -> np.ndarray | str:
    """fc1 output channel of every channel of the concat input, through the selections."""
    index = np.arange(hidden)
    for node, taken in reversed(chain):
        rank = node.inputs[0].type.rank
        if node.op == "slice":
            a = node.attrs
            if len(a["axes"]) != 1 or not _last_axis(a["axes"][0], rank):
                return f"{node.name} slices axes {list(a['axes'])}, not the channel axis alone"
            index = index[a["starts"][0] : a["ends"][0] : a["steps"][0]]
        elif node.op == "split":
            if not _last_axis(node.attrs["axis"], rank):
                return f"{node.name} splits axis {node.attrs['axis']}, not the channel axis"
            offsets = np.cumsum([0, *node.attrs["sizes"]])
            position = node.outputs.index(taken)
            index = index[offsets[position] : offsets[position + 1]]
        else:
            indices = node.inputs[1]
            if not _last_axis(node.attrs["axis"], rank) or indices.data is None or indices.data.ndim != 1:
                return f"{node.name} is not a constant channel permutation on the channel axis"
            index = index[indices.data]
    return index


def _idle_plan(m: Match, graph: Graph) -> dict | str:
    """Active and idle (fc1 row, fc2 column) pairs, the activation and fc1, or why not."""
    cat, producers = m.nodes["cat"], graph.producers()
    if not _last_axis(cat.attrs["axis"], m["cat"].type.rank):
        return f"concat joins axis {cat.attrs['axis']}, not fc2's input features"
    plan = {"active_rows": [], "active_cols": [], "idle_rows": [], "idle_cols": [], "acts": [], "nodes": [cat]}
    fc1, column = None, 0
    for value in cat.inputs:
        traced = _trace_channels(value, producers)
        if isinstance(traced, str):
            return traced
        act, chain, layer = traced
        if fc1 is not None and layer is not fc1:
            return f"concat inputs come from two linears, {fc1.name} and {layer.name}"
        fc1 = layer
        index = _channel_index(chain, fc1.outputs[0].type.shape[-1])
        if isinstance(index, str):
            return index
        cols = list(range(column, column + len(index)))
        column += len(index)
        kind = "active" if act is not None else "idle"
        plan[f"{kind}_rows"] += index.tolist()
        plan[f"{kind}_cols"] += cols
        plan["acts"] += [act] if act is not None else []
        plan["nodes"] += [n for n, _ in chain] + ([act] if act is not None else [])
    plan["fc1"] = fc1
    plan["nodes"].append(fc1)
    return plan


def _concat_of_selections(node: Node, producers: dict[Value, Node]) -> bool:
    return any(not isinstance(_trace_channels(v, producers), str) for v in node.inputs)


IDLE_CHANNELS = Op(
    "linear", Producer("concat", name="cat", where=_concat_of_selections), Const("w2"), Opt(Const("b2")), name="fc2"
)


def _check_idle_channels(m: Match, graph: Graph) -> str | None:
    plan = _idle_plan(m, graph)
    if isinstance(plan, str):
        return plan
    if not plan["idle_rows"]:
        return "every channel passes through a nonlinearity; no idle channel to fold"
    signatures = {(a.op, tuple(sorted(a.attrs.items()))) for a in plan["acts"]}
    if len(signatures) > 1:
        return f"active channels use different nonlinearities ({', '.join(sorted(s[0] for s in signatures))})"
    users, inside = graph.users(), {id(n) for n in plan["nodes"]} | {id(m.nodes["fc2"])}
    for node in plan["nodes"]:
        for value in node.outputs:
            outside = [u.name for u in users.get(value, []) if id(u) not in inside]
            if outside or value in graph.outputs:
                where = ", ".join(outside) or "the graph output"
                return (
                    f"%{value.name} (from {node.name}) is also read by {where}; the idle channels cannot leave the FFN"
                )
    fc1 = plan["fc1"]
    w1, b1 = fc1.inputs[1], fc1.inputs[2] if len(fc1.inputs) > 2 else None
    if w1 is None or not w1.is_constant or (b1 is not None and not b1.is_constant):
        return f"{fc1.name} has a non-constant weight or bias"
    n_in, n_out, idle = w1.type.shape[1], m["w2"].type.shape[0], len(plan["idle_rows"])
    if idle * (n_in + n_out) < n_in * n_out:
        return f"{idle} idle channels of a {n_in}->{n_out} FFN cost less than one merged {n_out}x{n_in} matrix"
    m.values.update({"w1": w1, **({"b1": b1} if b1 is not None else {})})
    for node in plan["nodes"]:
        m.nodes.setdefault(f"_{node.name}", node)
    names = ("w1", "b1", "w2", "b2")
    return _float32(m, names) or _shared_weights(m, graph, names)


def _fold_idle_channels(m: Match, ctx) -> Value:
    """``W2a act(W1a x + b1a) + (W2i W1i) x + (W2i b1i + b2)``; the shortcut may meet a residual next."""
    plan = _idle_plan(m, ctx.graph)
    fc1 = plan["fc1"]
    x, w1, w2 = fc1.inputs[0], _f64(m, "w1"), _f64(m, "w2")
    b1 = _bias_or_zero(m, "b1", w1.shape[0])
    rows, cols = plan["idle_rows"], plan["idle_cols"]
    weight = w2[:, cols] @ w1[rows]
    bias = _bias_or_zero(m, "b2", w2.shape[0]) + w2[:, cols] @ b1[rows]
    shortcut = ctx.op(
        "linear",
        x,
        ctx.constant(_cast(m, "w2", weight), "idle_weight"),
        ctx.constant(_cast(m, "w2", bias), "idle_bias"),
    )
    if not plan["active_rows"]:
        return shortcut
    rows, act = plan["active_rows"], plan["acts"][0]
    hidden_bias = None if m.get("b1") is None else ctx.constant(_cast(m, "w1", b1[rows]), "active_bias")
    hidden = ctx.op("linear", x, ctx.constant(_cast(m, "w1", w1[rows]), "active_weight"), hidden_bias)
    active = ctx.op(act.op, hidden, **act.attrs)
    out = ctx.op("linear", active, ctx.constant(_cast(m, "w2", w2[:, plan["active_cols"]]), "active_out_weight"), None)
    return ctx.op("add", out, shortcut)


# -- DeiT: class and distillation heads over two tokens of one tensor -> one head --------------------
def _token(key: str) -> Op:
    return Op("gather", Any("t"), Const(f"index_{key}"), name=f"pick_{key}")


TOKEN_HEADS = Op(
    "add",
    Op("linear", _token("a"), Const("w1"), Opt(Const("b1")), name="linear_a"),
    Op("linear", _token("b"), Const("w2"), Opt(Const("b2")), name="linear_b"),
    name="add",
)


def _token_layout(m: Match) -> tuple[int, int, int] | str:
    """Axis and the two token indices (normalized), or why the heads do not read two tokens."""
    t = m["t"].type
    axes = {m.nodes[f"pick_{k}"].attrs["axis"] % t.rank for k in "ab"}
    if len(axes) != 1:
        return "the heads pick tokens along different axes"
    (axis,) = axes
    if axis != t.rank - 2 or not isinstance(t.shape[axis], int):
        return f"tokens are picked on axis {axis} of {t}; one head needs them beside the feature axis"
    picks = []
    for k in "ab":
        index = m.array(f"index_{k}")
        if index.ndim != 0:
            return f"%{m[f'index_{k}'].name} picks {index.size} tokens, not one"
        picks.append(int(index) % t.shape[axis])
    if picks[0] == picks[1]:
        return "both heads read the same token; merge_parallel_linears applies"
    return axis, picks[0], picks[1]


def _check_token_heads(m: Match, graph: Graph) -> str | None:
    layout = _token_layout(m)
    if isinstance(layout, str):
        return layout
    if m["linear_a"].type != m["linear_b"].type or m["add"].type != m["linear_a"].type:
        return "the add broadcasts"
    names = ("w1", "w2", "b1", "b2")
    return _float32(m, names) or _shared_weights(m, graph, names)


def _merge_token_heads(m: Match, ctx) -> Value:
    """One linear over the two tokens read as one vector (a slice + reshape when adjacent)."""
    axis, a, b = _token_layout(m)
    w1, w2 = _f64(m, "w1"), _f64(m, "w2")
    t = m["t"]
    if abs(a - b) == 1:
        first = min(a, b)
        pair = ctx.op("slice", t, starts=[first], ends=[first + 2], axes=[axis], steps=[1])
        weight = np.concatenate([w1, w2] if a < b else [w2, w1], axis=1)
    else:
        pair = ctx.op("gather", t, ctx.constant(np.array([a, b], dtype=np.int64), "token_index"), axis=axis)
        weight = np.concatenate([w1, w2], axis=1)
    shape = tuple(t.type.shape[:axis]) + (2 * t.type.shape[-1],)
    flat = ctx.op("reshape", pair, shape=shape)
    bias = None
    if m.get("b1") is not None or m.get("b2") is not None:
        n = w1.shape[0]
        bias = ctx.constant(_cast(m, "w1", _bias_or_zero(m, "b1", n) + _bias_or_zero(m, "b2", n)), "head_bias")
    return ctx.op("linear", flat, ctx.constant(_cast(m, "w1", weight), "head_weight"), bias)


# -- concat(split(y)) in order is y --------------------------------------------------------------
def _is_concat_of_split(node: Node, producers: dict[Value, Node]) -> bool:
    split = producers.get(node.inputs[0])
    return split is not None and split.op == "split" and list(node.inputs) == list(split.outputs)


def _check_concat_of_split(m: Match, graph: Graph) -> str | None:
    cat = m.nodes["cat"]
    split = graph.producers()[cat.inputs[0]]
    rank = m["cat"].type.rank
    if cat.attrs["axis"] % rank != split.attrs["axis"] % rank:
        return f"concat joins axis {cat.attrs['axis']}, the split cut axis {split.attrs['axis']}"
    return None


def _remove_concat_of_split(m: Match, ctx) -> Value:
    return ctx.graph.producers()[m.nodes["cat"].inputs[0]].inputs[0]


# -- parallel-branch fusion: convs/linears reading one tensor -> one wider op + split ---------------
def _layer_signature(node: Node) -> tuple:
    """What must agree for two layers on one input to share one wider op."""
    weight = node.inputs[1]
    if node.op == "linear":
        return ("linear",)
    a = node.attrs
    return ("conv2d", tuple(weight.type.shape[1:]), tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]))


PENDING_FOLDS = ("batch_norm", "avg_pool2d", "pad")  # folds a later round may still apply to the layer


def _fusable(node: Node, users: dict[Value, list[Node]]) -> str | None:
    weight, bias = node.inputs[1], node.inputs[2] if len(node.inputs) > 2 else None
    if weight is None or not weight.is_constant or (bias is not None and not bias.is_constant):
        return "non-constant weight or bias"
    if weight.dtype != "float32":
        return f"weight is {weight.dtype}, not float32"
    if node.op == "conv2d" and node.attrs["groups"] != 1:
        return f"grouped conv (groups={node.attrs['groups']}); its output channels do not concatenate"
    for value in (weight, bias):
        if value is not None and len(users.get(value, [])) > 1:
            return f"weight %{value.name} is also read elsewhere"
    pending = [u.name for u in users.get(node.outputs[0], []) if u.op in PENDING_FOLDS]
    if pending:
        return f"output still feeds {', '.join(pending)}, which exact folds merge into this layer first"
    return None


def _summed(group: list[Node], users: dict[Value, list[Node]]) -> bool:
    outs = {id(n.outputs[0]) for n in group}
    return any(
        u.op == "add" and sum(id(v) in outs for v in u.input_values()) == 2 for n in group for u in users[n.outputs[0]]
    )


def fuse_parallel_branches(graph: Graph, ctx: PassContext) -> RuleStats:
    """Group convs/linears by input and attributes; each group of two or more becomes one op + split."""
    stats, users = RuleStats(), graph.users()
    by_input: dict[int, list[Node]] = {}
    for node in graph.nodes:
        if node.op in ("conv2d", "linear") and node.inputs[0] is not None:
            by_input.setdefault(id(node.inputs[0]), []).append(node)
    for readers in by_input.values():
        if len(readers) < 2:
            continue
        groups: dict[tuple, list[Node]] = {}
        for node in readers:
            reason = _fusable(node, users)
            if reason:
                stats.refusals.append(Refusal("fuse_parallel_branches", node.name, reason))
            else:
                groups.setdefault(_layer_signature(node), []).append(node)
        if len(groups) > 1:
            names = "; ".join(", ".join(n.name for n in g) for g in groups.values())
            stats.refusals.append(
                Refusal(
                    "fuse_parallel_branches", readers[0].name, f"layers on one input differ in kernel/attrs: {names}"
                )
            )
        for group in groups.values():
            if len(group) < 2:
                continue
            if _summed(group, users):
                stats.refusals.append(
                    Refusal("fuse_parallel_branches", group[0].name, "outputs are summed; merge_parallel_* adds them")
                )
                continue
            _widen(graph, group)
            stats.matches["fuse_parallel_branches"] = stats.matches.get("fuse_parallel_branches", 0) + 1
            users = graph.users()
    graph.remove_unused()
    return stats


def _widen(graph: Graph, group: list[Node]) -> None:
    """One op with the group's output channels concatenated, split back; inserted before the first."""
    first = group[0]
    weights = [n.inputs[1].data for n in group]
    dtype = weights[0].dtype
    sizes = [int(w.shape[0]) for w in weights]
    has_bias = any(len(n.inputs) > 2 and n.inputs[2] is not None for n in group)
    bias = None
    if has_bias:
        parts = [
            n.inputs[2].data if n.inputs[2] is not None else np.zeros(s, dtype)
            for n, s in zip(group, sizes, strict=True)
        ]
        bias = graph.add_constant(np.concatenate(parts).astype(dtype), "wide_bias")
    weight = graph.add_constant(np.concatenate(weights).astype(dtype), "wide_weight")
    wide = create_node(graph, first.op, [first.inputs[0], weight, bias], dict(first.attrs))
    axis = 1 if first.op == "conv2d" else -1
    split = create_node(graph, "split", [wide.outputs[0]], {"axis": axis, "sizes": sizes})
    at = graph.nodes.index(first)
    graph.nodes[at:at] = [wide, split]
    for node, value in zip(group, split.outputs, strict=True):
        if replace_value(graph, node.outputs[0], value) is not None:  # a graph output keeps its name
            raise AssertionError("unreachable: a split output can take any name")


# -- the rule sets ---------------------------------------------------------------------------------
LINEAR_RULES = [
    Rule("merge_parallel_linears", PARALLEL_LINEARS, _check_parallel_linears, _merge_parallel_linears),
    Rule("merge_residual_linear", RESIDUAL_LINEAR, _check_residual_linear, _merge_residual_linear),
    Rule("merge_residual_linear_in_sum", RESIDUAL_IN_SUM, _check_residual_in_sum, _merge_residual_in_sum),
    Rule("merge_sequential_linears", SEQUENTIAL_LINEARS, _check_sequential_linears, _merge_sequential_linears),
    Rule("fold_averaged_heads", AVERAGED_HEADS, _check_averaged_heads, _fold_averaged_heads),
    Rule("merge_token_heads", TOKEN_HEADS, _check_token_heads, _merge_token_heads),
    Rule("fold_idle_channels", IDLE_CHANNELS, _check_idle_channels, _fold_idle_channels),
    Rule("fold_bn_before_linear", _bn_before("linear"), _check_bn_before, _fold_bn_before, allow_shared_interior=True),
    Rule(
        "fold_token_bn_before_linear",
        _bn_before("linear", transposed=True),
        _check_bn_before,
        _fold_bn_before,
        allow_shared_interior=True,
    ),
    Rule("fold_bn_after_linear_sum", _bn_after_sum("linear"), _check_bn_after_sum, _fold_bn_after_sum),
    Rule(
        "remove_concat_of_split",
        Producer("concat", name="cat", where=_is_concat_of_split),
        _check_concat_of_split,
        _remove_concat_of_split,
        allow_shared_interior=True,
    ),
]

LINEAR_BRANCH_PASSES = [
    rule_pass(
        "fuse_linear_branches",
        LINEAR_RULES,
        "RePaViT idle channels, residual/sequential/parallel linears, DeiT heads, BN around layers",
    ),
    Pass(
        "fuse_parallel_branches",
        fuse_parallel_branches,
        doc="convs/linears with equal attributes on one input -> one wider op + split",
    ),
]

__all__ = ["LINEAR_BRANCH_PASSES", "LINEAR_RULES", "fuse_parallel_branches"]
