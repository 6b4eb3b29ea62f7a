"""Exact cleanup rewrites: constant folding, dead code, no-op removal, BatchNorm and affine folding.

BatchNorm folding is the first step of every structural reparameterization (RepVGG, Ding et
al. 2021, Sec. 3.3): ``BN(W*x + b) = (gamma/sigma) W * x + (beta + gamma/sigma (b - mu))`` with
``sigma = sqrt(var + eps)``, so the scale goes into the conv/linear weight per output channel.
"""

from __future__ import annotations

import numpy as np

from reshift.ir.graph import Graph, Value
from reshift.ir.ops import get_op
from reshift.passes.manager import Pass, PassContext, rule_pass
from reshift.passes.pattern import Any, Const, Match, Op, Opt
from reshift.passes.rules import Refusal, Rule, RuleStats, replace_value

# a folded constant may be at most this large unless it is no larger than its inputs
FOLD_LIMIT_ELEMENTS = 1 << 20


# -- constant folding -------------------------------------------------------------------------
def fold_constants(graph: Graph, ctx: PassContext) -> RuleStats:
    """Evaluate every node whose inputs are all constants with the registry's numpy reference."""
    stats = RuleStats()
    kept = []
    for node in graph.nodes:
        inputs = node.input_values()
        if not inputs or not all(v.is_constant for v in inputs) or node.outputs[0].type.symbols:
            kept.append(node)
            continue
        out_elements = sum(int(np.prod(v.type.shape)) for v in node.outputs)
        in_elements = sum(v.data.size for v in inputs)
        if out_elements > max(FOLD_LIMIT_ELEMENTS, in_elements):
            stats.refusals.append(
                Refusal("fold_constants", node.name, f"result has {out_elements:,} elements; keeping the op is smaller")
            )
            kept.append(node)
            continue
        args = [v.data if v is not None else None for v in node.inputs]
        results = get_op(node.op).reference(*args, **node.attrs)
        results = results if isinstance(results, tuple) else (results,)
        for value, array in zip(node.outputs, results, strict=True):
            value.data = np.asarray(array)
            graph.constants[value.name] = value
        stats.matches["fold_constants"] = stats.matches.get("fold_constants", 0) + 1
    graph.nodes = kept
    # a folded graph output stays a constant output, which is legal
    return stats


def eliminate_dead_code(graph: Graph, ctx: PassContext) -> RuleStats:
    removed = graph.remove_unused()
    return RuleStats(matches={"dead_code": removed} if removed else {})


# -- no-op removal ----------------------------------------------------------------------------
def _same_type(m: Match, graph: Graph) -> str | None:
    x, out = m["x"], m.root.outputs[0]
    return None if x.type == out.type else f"changes type {x.type} -> {out.type}"


def _forward_input(m: Match, ctx) -> Value:
    return m["x"]


def _check_identity_perm(m: Match, graph: Graph) -> str | None:
    perm = m.root.attrs["perm"]
    return None if list(perm) == sorted(perm) else f"perm {list(perm)} moves axes"


def _check_full_slice(m: Match, graph: Graph) -> str | None:
    if any(step != 1 for step in m.root.attrs["steps"]):
        return "strided slice"
    return _same_type(m, graph)


def _check_neutral_constant(neutral: float):
    def check(m: Match, graph: Graph) -> str | None:
        c = m.array("c")
        if c is None or not np.all(c == neutral):
            return f"constant is not all {neutral}"
        return _same_type(m, graph)

    return check


def _noop(name: str, pattern: Op, check) -> Rule:
    """A rule forwarding the input of a node that changes nothing; its refusals are not reported."""
    return Rule(name, pattern, check, _forward_input, report_refusals=False)


NOOP_RULES = [
    _noop("remove_identity", Op("identity", Any("x")), lambda m, g: None),
    _noop("remove_same_shape_reshape", Op("reshape", Any("x")), _same_type),
    _noop("remove_same_shape_expand", Op("expand", Any("x")), _same_type),
    _noop("remove_same_dtype_cast", Op("cast", Any("x")), _same_type),
    _noop("remove_identity_transpose", Op("transpose", Any("x")), _check_identity_perm),
    _noop("remove_full_slice", Op("slice", Any("x")), _check_full_slice),
    _noop("remove_single_concat", Op("concat", Any("x")), _same_type),
    _noop("remove_add_zero", Op("add", Any("x"), Const("c"), commutative=True), _check_neutral_constant(0.0)),
    _noop("remove_sub_zero", Op("sub", Any("x"), Const("c")), _check_neutral_constant(0.0)),
    _noop("remove_mul_one", Op("mul", Any("x"), Const("c"), commutative=True), _check_neutral_constant(1.0)),
    _noop("remove_div_one", Op("div", Any("x"), Const("c")), _check_neutral_constant(1.0)),
]


# -- BatchNorm folding ------------------------------------------------------------------------
def _bn_scale_shift(m: Match) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``k = gamma / sqrt(var + eps)`` and ``shift = beta - mu * k``, in float64."""
    eps = m.nodes["bn"].attrs["eps"]
    gamma, beta, mu, var = (m.array(n).astype(np.float64) for n in ("scale", "shift", "mean", "var"))
    k = gamma / np.sqrt(var + eps)
    return k, beta - mu * k


def _check_bn_operands(m: Match, graph: Graph) -> str | None:
    if m["weight"].dtype != "float32":
        return f"weight dtype {m['weight'].dtype} is not float32"
    return None


def _fold_bn(m: Match, ctx, producer: str) -> Value:
    k, shift = _bn_scale_shift(m)
    weight = m.array("weight").astype(np.float64)
    bias = m.array("bias")
    bias = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    new_weight = weight * k.reshape((-1,) + (1,) * (weight.ndim - 1))
    new_bias = bias * k + shift
    dtype = m["weight"].data.dtype
    node = m.nodes[producer]
    return ctx.op(
        producer,
        m["x"],
        ctx.constant(new_weight.astype(dtype), f"{node.name}_weight"),
        ctx.constant(new_bias.astype(dtype), f"{node.name}_bias"),
        **node.attrs,
    )


def _check_linear_bn(m: Match, graph: Graph) -> str | None:
    out = m.nodes["linear"].outputs[0]
    if out.type.rank != 2:
        return f"BatchNorm normalizes axis 1 of rank-{out.type.rank} {out.type}, not the linear's features"
    return _check_bn_operands(m, graph)


def _bn_of(producer: Op) -> Op:
    return Op("batch_norm", producer, Const("scale"), Const("shift"), Const("mean"), Const("var"), name="bn")


BATCH_NORM_RULES = [
    Rule(
        "fold_batch_norm_into_conv",
        _bn_of(Op("conv2d", Any("x"), Const("weight"), Opt(Const("bias")))),
        _check_bn_operands,
        lambda m, ctx: _fold_bn(m, ctx, "conv2d"),
    ),
    Rule(
        "fold_batch_norm_into_linear",
        _bn_of(Op("linear", Any("x"), Const("weight"), Opt(Const("bias")))),
        _check_linear_bn,
        lambda m, ctx: _fold_bn(m, ctx, "linear"),
    ),
]


# -- per-channel affine after a conv/linear: LayerScale, bias adds, scalar scales -------------------
def per_channel(c: np.ndarray, channels: int, rank: int, axis: int) -> np.ndarray | None:
    """``c`` as a float64 [channels] vector if it broadcasts along ``axis`` only (or is a scalar)."""
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(shape) if i != axis % rank) or shape[axis % rank] not in (1, channels):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,)).copy()


def _check_affine_after(m: Match, graph: Graph) -> str | None:
    node, out = m.nodes["layer"], m["layer"].type
    if m["affine"].type != out:
        return f"{m.nodes['affine'].op} with {m['c'].type} broadcasts {out} to {m['affine'].type}"
    c = per_channel(
        m.array("c"), out.shape[1 if node.op == "conv2d" else -1], out.rank, 1 if node.op == "conv2d" else -1
    )
    if c is None:
        return f"constant {m['c'].type} is not per output channel of {out}"
    if m.nodes["affine"].op == "div" and not np.all(c != 0):
        return "divides by zero"
    if not np.all(np.isfinite(c)):
        return "constant is not finite"
    users = graph.users()
    for name in ("weight", "bias"):
        value = m.get(name)
        if value is not None and len(users.get(value, [])) > 1:
            return f"weight %{value.name} is also read elsewhere; folding would duplicate it"
    return None if m["weight"].dtype == "float32" else f"weight dtype {m['weight'].dtype} is not float32"


def _fold_affine_after(m: Match, ctx) -> Value:
    node, affine = m.nodes["layer"], m.nodes["affine"].op
    weight = m.array("weight").astype(np.float64)
    bias = m.array("bias")
    bias = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    out = m["layer"].type
    axis = 1 if node.op == "conv2d" else -1
    c = per_channel(m.array("c"), out.shape[axis], out.rank, axis)
    scale = {"mul": c, "div": 1.0 / c}.get(affine, np.ones_like(c))
    shift = {"add": c, "sub": -c}.get(affine, np.zeros_like(c))
    new_weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    dtype = m["weight"].data.dtype
    return ctx.op(
        node.op,
        m["x"],
        ctx.constant(new_weight.astype(dtype), f"{node.name}_weight"),
        ctx.constant((bias * scale + shift).astype(dtype), f"{node.name}_bias"),
        **node.attrs,
    )


def _affine_after(op: str, affine: str) -> Op:
    layer = Op(op, Any("x"), Const("weight"), Opt(Const("bias")), name="layer")
    return Op(affine, layer, Const("c"), name="affine", commutative=affine in ("add", "mul"))


AFFINE_RULES = [
    Rule(f"fold_{affine}_into_{op}", _affine_after(op, affine), _check_affine_after, _fold_affine_after)
    for op in ("conv2d", "linear")
    for affine in ("mul", "div", "add", "sub")
]

FOLD_PASSES = [
    Pass("fold_constants", fold_constants, doc="evaluate nodes whose inputs are all constants"),
    rule_pass("remove_noops", NOOP_RULES, "drop identity-like nodes"),
    rule_pass("fold_batch_norm", BATCH_NORM_RULES, "BN into the preceding conv/linear (RepVGG Sec. 3.3)"),
    rule_pass("fold_affine", AFFINE_RULES, "per-channel scale/shift (LayerScale, bias adds) into the conv/linear"),
    Pass("dead_code", eliminate_dead_code, doc="drop nodes and constants nothing reads"),
]

__all__ = [
    "AFFINE_RULES",
    "FOLD_PASSES",
    "NOOP_RULES",
    "BATCH_NORM_RULES",
    "per_channel",
    "fold_constants",
    "eliminate_dead_code",
    "replace_value",
]
