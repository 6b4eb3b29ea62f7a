"""Scale migration inside attention: per-channel ranges of q, k and V moved into the projections.

RepQ-ViT (Sec. 3.2) removes the inter-channel variation of post-LayerNorm activations by folding
per-channel scales into the layers around them; the matmul inputs of attention have the same
variation (a few q/k channels carry most of the range; V channels differ by an order of magnitude)
and are quantized per tensor too. Both matmuls let a per-channel scale pass through exactly:

* ``q @ k^T``: channel ``d`` of q only ever multiplies channel ``d`` of k, so
  ``q k^T = (q diag(s)) (k diag(s)^-1)^T``. With SmoothQuant's migration (Xiao et al., ICML 2023,
  Eq. 4) at strength ``alpha``: ``s_d = max|k_d|^alpha / max|q_d|^(1-alpha)``; ``alpha = 0.5`` (option
  ``qk_alpha``) gives both channels the range ``sqrt(max|q_d| max|k_d|)``. The scales fold into the
  rows (and bias) of the q and k projections (OmniQuant's Q/K equivalent transformation, Shao et al.,
  ICLR 2024, Eq. 5).
* ``P @ V`` then the output projection ``W_o``: the attention mixes tokens, never channels, so
  ``(P (V diag(t)^-1)) diag(t) W_o^T = P V W_o^T``. ``t_d = (max|V_d| / mean_d max|V_d|)^beta``
  (``beta = 1``, option ``v_alpha``) gives every V channel the same range; ``t`` folds into the rows of
  the V projection (divided) and the matching input columns of ``W_o`` (multiplied).

Which projection row feeds which matmul channel is found by running the layout ops between them
(reshape, transpose, constant gather / slice) on a tensor of channel indices, so fused qkv
projections (ViT) and separate ones (BERT) are handled alike, and the pass refuses (with the reason)
wherever a scaled channel would also reach anything else. Exact in float (tested to 1e-5);
calibration gives the ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reshift.ir.graph import Graph, Node, Value
from reshift.ir.interpret import bind_inputs, interpret
from reshift.ir.ops import get_op, resolve_symbolic_attrs
from reshift.passes.calibrate import require_calibration
from reshift.passes.manager import Pass, PassContext
from reshift.passes.rules import Refusal, RuleStats

LAYOUT_OPS = ("reshape", "transpose", "gather", "slice", "identity")
SCALE_LIMIT = 100.0  # migration factors are clipped to [1/100, 100]
BALANCED = 0.05  # factors all within 5% of 1: nothing to migrate (a second application stops here)


def _is_layout(node: Node) -> bool:
    """A single-output op that only moves elements of its first input (its other inputs constant)."""
    return node.op in LAYOUT_OPS and len(node.outputs) == 1 and all(v is None or v.is_constant for v in node.inputs[1:])


def _projection(node: Node | None, users) -> Node | None:
    """``node`` if it is a float ``linear`` with an unshared constant weight (and bias), else None."""
    if node is None or node.op != "linear" or node.inputs[1] is None or not node.inputs[1].is_constant:
        return None
    params = [v for v in node.inputs[1:] if v is not None]
    return node if all(v.is_constant and len(users.get(v, [])) == 1 for v in params) else None


def _source(value: Value, producers, users) -> Node | None:
    """The projection whose output reaches ``value`` through layout ops only."""
    node = producers.get(value)
    while node is not None and _is_layout(node):
        node = producers.get(node.inputs[0])
    return _projection(node, users)


def _layout_tree(graph: Graph, root: Value, users) -> tuple[list[Node], list[tuple[Value, Node | None]]]:
    """The layout nodes reachable from ``root`` (graph order) and the terminals they feed:
    ``(value, reader)`` pairs, ``reader`` None for a graph output."""
    nodes, terminals, stack = [], [], [root]
    while stack:
        value = stack.pop()
        if value in graph.outputs:
            terminals.append((value, None))
        for reader in dict.fromkeys(users.get(value, [])):
            if _is_layout(reader) and reader.inputs[0] is value:
                nodes.append(reader)
                stack.append(reader.outputs[0])
            else:
                terminals.append((value, reader))
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(dict.fromkeys(nodes), key=order.__getitem__), terminals


def _propagate(nodes: list[Node], root: Value, probe: np.ndarray, bindings: dict) -> dict[Value, np.ndarray]:
    """Run layout ``nodes`` on ``probe`` placed at ``root`` (numpy references)."""
    env = {root: probe}
    for node in nodes:
        opdef = get_op(node.op)
        args = [env[v] if v in env else (v.data if v is not None else None) for v in node.inputs]
        env[node.outputs[0]] = np.asarray(opdef.reference(*args, **resolve_symbolic_attrs(opdef, node.attrs, bindings)))
    return env


def _constant_along(a: np.ndarray, axis: int) -> np.ndarray | None:
    """``a`` with ``axis`` dropped when ``a`` does not vary along it, else None."""
    first = np.take(a, [0], axis=axis)
    return np.squeeze(first, axis) if np.array_equal(a, np.broadcast_to(first, a.shape)) else None


@dataclass
class _Projection:
    """Per-projection bookkeeping: channel maps of its layout tree and the scales planned for it."""

    node: Node
    terminals: list = field(default_factory=list)
    maps: dict = field(default_factory=dict)  # (value, reader) -> channel index array
    row_scale: np.ndarray | None = None
    col_scale: np.ndarray | None = None

    def reached_elsewhere(self, channels: np.ndarray, mine: list) -> bool:
        """Whether any of ``channels`` reaches a terminal other than ``mine``."""
        wanted = set(np.unique(channels).tolist())
        others = [t for t in self.terminals if t not in mine]
        return any(t not in self.maps or wanted & set(np.unique(self.maps[t]).tolist()) for t in others)


class _Planner:
    def __init__(self, graph: Graph, users, calibration, opts):
        self.graph, self.users, self.calibration = graph, users, calibration
        self.qk_alpha, self.v_alpha = float(opts.get("qk_alpha", 0.5)), float(opts.get("v_alpha", 1.0))
        self.projections: dict[Node, _Projection] = {}
        self._env, self._bindings, self._amax = None, None, {}

    def _observe(self) -> None:
        """One pass over the calibration batches: the first batch's values (concrete shapes for the
        probes) and every projection output's per-channel ``max |x|``."""
        outputs = [n.outputs[0] for n in self.graph.nodes if n.op == "linear"]
        for index, batch in enumerate(self.calibration):
            env = interpret(self.graph, batch, return_all=True)
            if index == 0:
                self._env, self._bindings = env, bind_inputs(self.graph, batch)[1]
            for v in outputs:
                a = np.abs(np.nan_to_num(env[v.name].astype(np.float64))).reshape(-1, v.shape[-1]).max(axis=0)
                self._amax[v.name] = np.maximum(self._amax.get(v.name, 0.0), a)

    def env(self) -> tuple[dict, dict]:
        if self._env is None:
            self._observe()
        return self._env, self._bindings

    def amax(self, value: Value) -> np.ndarray:
        """Per-channel ``max |x|`` of a projection output over every calibration batch."""
        if self._env is None:
            self._observe()
        return self._amax[value.name]

    def projection(self, node: Node) -> _Projection:
        if node not in self.projections:
            p = _Projection(node)
            out = node.outputs[0]
            env, bindings = self.env()
            nodes, p.terminals = _layout_tree(self.graph, out, self.users)
            channels = out.shape[-1]
            probe = np.broadcast_to(np.arange(channels, dtype=np.float32), env[out.name].shape)
            values = _propagate(nodes, out, probe, bindings)
            p.maps = {(v, r): values[v] for v, r in p.terminals if v in values}
            p.row_scale = np.ones(channels)
            p.col_scale = np.ones(node.inputs[1].shape[1])
            self.projections[node] = p
        return self.projections[node]

    def plan_qk(self, matmul: Node, qp: _Projection, kp: _Projection) -> str | None:
        q, k = matmul.inputs[:2]
        q_map = _constant_along(qp.maps[(q, matmul)], -2)  # [..., D]: one channel per (batch..., d)
        k_map = _constant_along(kp.maps[(k, matmul)], -1)
        if q_map is None or k_map is None:
            return "a q or k channel changes along the token axis (not a per-channel layout)"
        if q_map.shape != k_map.shape:
            return f"q and k^T batch shapes {q_map.shape[:-1]} and {k_map.shape[:-1]} differ (broadcast matmul)"
        pairs = dict.fromkeys(zip(q_map.ravel().astype(int).tolist(), k_map.ravel().astype(int).tolist(), strict=True))
        q_ch = np.array([a for a, _ in pairs])
        k_ch = np.array([b for _, b in pairs])
        if len(set(q_ch.tolist())) != len(q_ch) or len(set(k_ch.tolist())) != len(k_ch):
            return "a projection channel meets more than one channel of the other operand"
        if qp is kp and set(q_ch.tolist()) & set(k_ch.tolist()):
            return "q and k share projection channels"
        mine = [(q, matmul), (k, matmul)]
        if qp.reached_elsewhere(q_ch, mine) or kp.reached_elsewhere(k_ch, mine):
            return "a q or k channel also reaches another reader"
        q_max, k_max = self.amax(qp.node.outputs[0])[q_ch], self.amax(kp.node.outputs[0])[k_ch]
        ok = (q_max > 0) & (k_max > 0)
        s = np.where(ok, k_max**self.qk_alpha / np.where(ok, q_max, 1.0) ** (1 - self.qk_alpha), 1.0)
        s = np.clip(s, 1 / SCALE_LIMIT, SCALE_LIMIT)
        if np.all(np.abs(s - 1) < BALANCED):
            return "q and k channel ranges are already balanced"
        qp.row_scale[q_ch] *= s
        kp.row_scale[k_ch] /= s
        return None

    def plan_pv(self, matmul: Node, vp: _Projection) -> str | None:
        v = matmul.inputs[1]
        v_map = _constant_along(vp.maps[(v, matmul)], -2)  # [..., D]
        if v_map is None:
            return "a V channel changes along the token axis"
        out = matmul.outputs[0]
        env, bindings = self.env()
        if v_map.shape[:-1] != env[out.name].shape[:-2]:
            return f"V batch shape {v_map.shape[:-1]} differs from the output's (broadcast matmul)"
        nodes, terminals = _layout_tree(self.graph, out, self.users)
        readers = {r for _, r in terminals}
        if len(terminals) != 1 or _projection(terminals[0][1], self.users) is None:
            kinds = ", ".join("graph output" if r is None else f"{r.op} node {r.name}" for r in readers)
            return f"the attention output reaches {kinds}, not one projection"
        x, reader = terminals[0]
        if reader.inputs[0] is not x:
            return f"the attention output is not the input of {reader.name}"
        probe = np.broadcast_to(np.expand_dims(v_map, -2), env[out.name].shape).astype(np.float32)
        column_map = _propagate(nodes, out, probe, bindings)[x]
        columns = column_map.reshape(-1, column_map.shape[-1])
        if not np.array_equal(columns, np.broadcast_to(columns[:1], columns.shape)):
            return f"an input column of {reader.name} mixes V channels"
        v_ch = np.unique(v_map.astype(int))
        if vp.reached_elsewhere(v_ch, [(v, matmul)]):
            return "a V channel also reaches another reader"
        v_max = self.amax(vp.node.outputs[0])
        level = float(np.mean(v_max[v_ch]))
        if level <= 0:
            return "V is zero on the calibration data"
        t = np.clip(np.where(v_max > 0, v_max / level, 1.0) ** self.v_alpha, 1 / SCALE_LIMIT, SCALE_LIMIT)
        if np.all(np.abs(t[v_ch] - 1) < BALANCED):
            return "V channel ranges are already equal"
        vp.row_scale[v_ch] /= t[v_ch]
        self.projection(reader).col_scale *= t[columns[0].astype(int)]
        return None


def _apply(graph: Graph, p: _Projection) -> dict:
    w = p.node.inputs[1].data.astype(np.float64) * p.row_scale[:, None] * p.col_scale[None, :]
    name = p.node.name
    inputs = list(p.node.inputs)
    inputs[1] = graph.add_constant(w.astype(np.float32), f"{name}_w_attn_reparam")
    if len(inputs) > 2 and inputs[2] is not None:
        b = inputs[2].data.astype(np.float64) * p.row_scale
        inputs[2] = graph.add_constant(b.astype(np.float32), f"{name}_b_attn_reparam")
    p.node.inputs = inputs
    return {
        "row_scale_range": (float(p.row_scale.min()), float(p.row_scale.max())),
        "column_scale_range": (float(p.col_scale.min()), float(p.col_scale.max())),
    }


def attention_reparam(graph: Graph, ctx: PassContext) -> RuleStats:
    """Migrate q/k and V channel ranges into the attention projections (see module docstring)."""
    stats = RuleStats()
    planner = None
    producers, users = graph.producers(), graph.users()
    for node in [n for n in graph.nodes if n.op == "matmul"]:
        a, b = node.inputs[:2]
        qp_node, kp_node = _source(a, producers, users), _source(b, producers, users)
        if kp_node is None:
            stats.refusals.append(Refusal("attention_reparam", node.name, "right operand is not a projection output"))
            continue
        if planner is None:
            calibration = require_calibration(ctx.calibration, "attention scale migration")
            planner = _Planner(graph, users, calibration, ctx.options)
        if qp_node is not None:
            rule, reason = "migrate_qk", planner.plan_qk(node, planner.projection(qp_node), planner.projection(kp_node))
        else:
            rule, reason = "migrate_v", planner.plan_pv(node, planner.projection(kp_node))
        if reason:
            stats.refusals.append(Refusal(rule, node.name, reason))
        else:
            stats.matches[rule] = stats.matches.get(rule, 0) + 1
    if planner is None:
        return stats
    for p in planner.projections.values():
        if np.any(p.row_scale != 1) or np.any(p.col_scale != 1):
            stats.details[p.node.name] = _apply(graph, p)
    graph.remove_unused()
    return stats


ATTENTION_REPARAM_PASSES = [
    Pass(
        "attention_reparam",
        attention_reparam,
        exact=True,
        doc="q/k and V per-channel ranges migrated into the attention projections (exact)",
        options=frozenset({"qk_alpha", "v_alpha"}),
    )
]

__all__ = ["ATTENTION_REPARAM_PASSES", "attention_reparam"]
