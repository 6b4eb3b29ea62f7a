"""What the weight quantizers (``shift.py``, ``bcq.py``) share: which linears (and, for ``shift.py``,
convs) they may touch, calibration activations, output-aware least-squares scale refits, and the
rewrite driver.

Calibration is independent (every layer sees the float model's activations) or sequential (GPTQ,
Frantar et al. 2023, which quantizes block by block on the outputs of the already-quantized blocks;
its reference code's ``true_sequential`` goes layer by layer inside a block, as here), so each layer
also compensates the error its quantized predecessors put into its inputs; see :func:`quantize_linears`.

Layer selection follows common post-training-quantization practice (ShiftAddLLM, GPTQ): the
first and last weight layers, embeddings and the LM head stay in float unless the ``skip``
option says otherwise. ``skip`` is a list of fnmatch patterns matched against the node name and
the weight's name; ``"@first"`` and ``"@last"`` name the first and last weight layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any as AnyType

import numpy as np

from reshift.ir.graph import Graph, Node, Value
from reshift.ir.interpret import interpret
from reshift.ir.numpy_kernels import conv2d
from reshift.passes.manager import PassContext
from reshift.passes.pattern import Any, Match, Op, Opt, match
from reshift.passes.rules import RewriteContext, Rule, RuleStats, apply_rules

LINEAR = Op("linear", Any("x"), Any("weight"), Opt(Any("bias")), name="linear")
CONV = Op("conv2d", Any("x"), Any("weight"), Opt(Any("bias")), name="conv2d")
WEIGHT_RANK = {"linear": (2, "matrix"), "conv2d": (4, "OIHW filter")}
WEIGHT_LAYER_OPS = ("linear", "conv2d", "shift_linear", "shift_conv2d", "bcq_linear", "ternary_linear")
DEFAULT_SKIP = ("@first", "@last", "*embed*", "*wte*", "*wpe*", "*lm_head*")


@dataclass
class LayerPlan:
    """A quantizer's decision for one linear (or conv): a replacement builder, or why not; plus report facts."""

    build: Callable[[Match, RewriteContext], Value] | None = None
    reason: str | None = None
    details: dict[str, AnyType] = field(default_factory=dict)
    weight: np.ndarray | None = None  # the float weight the replacement stands for (sequential calibration)


def skip_reason(node: Node, weight: Value, graph: Graph, patterns) -> str | None:
    """Why ``node`` is excluded by the ``skip`` patterns, or None."""
    layers = [n.name for n in graph.nodes if n.op in WEIGHT_LAYER_OPS]
    for pattern in patterns:
        if pattern == "@first" and layers and layers[0] == node.name:
            return "first weight layer is kept in float (skip '@first')"
        if pattern == "@last" and layers and layers[-1] == node.name:
            return "last weight layer is kept in float (skip '@last')"
        if not pattern.startswith("@") and (fnmatch(node.name, pattern) or fnmatch(weight.name, pattern)):
            return f"layer {node.name} (weight %{weight.name}) matches skip pattern {pattern!r}"
    return None


# options every pass built on plan_layers / candidate_reason reads
LAYER_OPTIONS = frozenset({"skip", "calib_rows"})


def candidate_reason(m: Match, graph: Graph, users: dict[Value, list[Node]], options: dict) -> str | None:
    """Why the matched ``linear`` or ``conv2d`` may not be quantized at all (before any fitting), or None."""
    weight = m["weight"]
    rank, kind = WEIGHT_RANK[m.root.op]
    if not weight.is_constant:
        return f"weight %{weight.name} is not a constant (computed at run time)"
    if weight.dtype != "float32" or weight.type.rank != rank:
        return f"weight %{weight.name} is {weight.type}, expected a float32 {kind}"
    if not np.all(np.isfinite(weight.data)):
        return f"weight %{weight.name} holds NaN or inf"
    if m["x"].dtype != "float32":
        return f"input %{m['x'].name} is {m['x'].type}, expected float32"
    readers = [n.name for n in users.get(weight, []) if n is not m.root]
    if readers:
        return f"weight %{weight.name} is shared with {', '.join(readers)} (tied weights stay float)"
    return skip_reason(m.root, weight, graph, options.get("skip", DEFAULT_SKIP))


def _capture(
    graph: Graph, calibration: list[dict[str, np.ndarray]], values: list[Value]
) -> dict[str, list[np.ndarray]]:
    """Each value in every calibration batch (float64); one run per batch."""
    parts: dict[str, list[np.ndarray]] = {v.name: [] for v in values}
    graph = graph.copy()  # run only what the values need (sequential calibration captures early layers often)
    by_name = {v.name: v for v in graph.values()}
    graph.outputs = [by_name[v.name] for v in values]
    graph.output_names = []  # these outputs are the captured values, not the model's named outputs
    graph.remove_unused()
    for batch in calibration:
        env = interpret(graph, batch, return_all=True)
        for v in values:
            parts[v.name].append(env[v.name].astype(np.float64))
    return parts


def _rows(graph: Graph, calibration: list[dict[str, np.ndarray]], values: list[Value]) -> dict[str, np.ndarray]:
    """Each value's rows ``[M, K]`` (float64) over all calibration batches; one run per batch."""
    parts = _capture(graph, calibration, values)
    return {name: np.concatenate([x.reshape(-1, x.shape[-1]) for x in xs]) for name, xs in parts.items()}


def _kept_rows(max_rows: int, *xs: np.ndarray) -> np.ndarray:
    """Indices of the rows finite in every ``xs``, at most ``max_rows`` of them, evenly spaced."""
    keep = np.flatnonzero(np.logical_and.reduce([np.all(np.isfinite(x), axis=1) for x in xs]))
    return keep[np.linspace(0, len(keep) - 1, max_rows).astype(int)] if len(keep) > max_rows else keep


def capture_activations(
    graph: Graph, calibration: list[dict[str, np.ndarray]] | None, values: list[Value], max_rows: int = 2048
) -> dict[str, np.ndarray]:
    """Each value's rows ``[M, K]`` (float64) over all calibration batches, at most ``max_rows``
    (evenly spaced) per value. One interpreter run per batch."""
    if not calibration or not values:
        return {}
    values = list(dict.fromkeys(values))  # q, k and v read one value: capture it once, not 3x
    return {name: x[_kept_rows(max_rows, x)] for name, x in _rows(graph, calibration, values).items()}


def capture_images(
    graph: Graph, calibration: list[dict[str, np.ndarray]] | None, values: list[Value], max_rows: int = 2048
) -> dict[str, np.ndarray]:
    """Each NCHW value's finite images (float64) over all calibration batches: evenly spaced, as many
    as hold ``max_rows`` pixels (at least one). A conv's im2col rows come from whole images."""
    if not calibration or not values:
        return {}
    images = {}
    for name, xs in _capture(graph, calibration, list(dict.fromkeys(values))).items():
        x = np.concatenate(xs)  # [images, C, H, W]: the spatial size is static
        keep = _kept_rows(max(1, max_rows // max(1, x.shape[2] * x.shape[3])), x.reshape(len(x), -1))
        images[name] = x[keep]
    return images


def capture_activation_pairs(
    graph: Graph, reference: Graph, calibration: list[dict[str, np.ndarray]], values: list[Value], max_rows: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`capture_activations` of ``graph`` and of ``reference`` (the float model) on the same
    rows (same tokens), so a layer can be fitted to the float model's output from its actual input."""
    values = list(dict.fromkeys(values))
    xs, refs = _rows(graph, calibration, values), _rows(reference, calibration, values)
    kept = {name: _kept_rows(max_rows, xs[name], refs[name]) for name in xs}
    return {n: x[kept[n]] for n, x in xs.items()}, {n: x[kept[n]] for n, x in refs.items()}


def compensated_target(w: np.ndarray, x: np.ndarray, x_float: np.ndarray, h: np.ndarray) -> np.ndarray:
    """The weight ``V`` whose output on the actual inputs ``x`` best matches the float model's
    ``x_float W^T``: ``V = W + W (X_f - X)^T X H^-1`` (``H`` the damped :func:`hessian` of ``x``; the
    damping pulls ``V`` toward ``W``). Then ``||X_f W^T - X W_hat^T||^2 = ||X (V - W_hat)^T||^2 +
    const`` (undamped), so fitting ``W_hat`` to ``V`` under ``H`` also undoes the error the earlier
    quantized layers left in ``x`` (the asymmetric calibration objective of GPTAQ, Li et al. 2025)."""
    drift = (x_float - x).T @ x  # [K, K]
    return w + np.linalg.solve(h, (w @ drift).T).T


def calibration_stages(graph: Graph, candidates: list[Match]) -> list[list[Match]]:
    """``candidates`` grouped by how many candidates lie on their input's longest path from the graph
    inputs: a stage's inputs depend only on earlier stages (q, k and v share a stage), so one
    interpreter run per stage captures them all with the earlier stages already quantized."""
    names = {m.root.name for m in candidates}
    depth: dict[str, int] = {}
    for node in graph.nodes:
        level = max((depth.get(v.name, 0) for v in node.input_values()), default=0)
        for out in node.outputs:
            depth[out.name] = level + (node.name in names)
    stages: dict[int, list[Match]] = {}
    for m in candidates:
        stages.setdefault(depth.get(m["x"].name, 0), []).append(m)
    return [stages[level] for level in sorted(stages)]


def hessian(x: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """``X^T X + lambda I`` with ``lambda = damp * mean(diag)``; dead inputs get a unit diagonal."""
    h = x.T @ x
    diag = np.diag(h).copy()
    diag[diag == 0] = 1.0
    np.fill_diagonal(h, diag)
    h[np.diag_indices_from(h)] += damp * float(np.mean(diag))
    return h


def refit_scales_output(
    w: np.ndarray, codes: np.ndarray, group_size: int, h: np.ndarray, chunk_bytes: int = 1 << 26
) -> np.ndarray:
    """Group scales minimizing ``||X W^T - X W_hat^T||_F`` for fixed codes: ``[O, groups, q]``.

    ``W_hat[o,k] = sum_i a[o, k//G, i] * codes[i,o,k]`` is linear in ``a``, so per output row
    ``o`` the normal equations are ``(M H M^T) a = M H w_o`` with ``M[(g,i), k] = codes[i,o,k]
    [k in g]`` and ``H = X^T X`` (ShiftAddLLM Sec. 3.1, the scale step of its alternating fit).
    """
    q, out, k = codes.shape
    ng = -(-k // group_size)
    h_pad = np.zeros((ng * group_size, k))
    h_pad[:k] = h
    h_groups = h_pad.reshape(ng, group_size, k)
    result = np.zeros((out, ng, q))
    step = max(1, chunk_bytes // (8 * ng * q * k))
    for start in range(0, out, step):
        c = np.zeros((min(step, out - start), q, ng * group_size))
        c[:, :, :k] = codes[:, start : start + step].transpose(1, 0, 2)
        c = c.reshape(len(c), q, ng, group_size)
        # p[o, g, i, l] = sum_{k in g} codes[i,o,k] H[k,l]
        p = np.stack([(c[:, :, g].reshape(-1, group_size) @ h_groups[g]).reshape(len(c), q, k) for g in range(ng)], 1)
        p_pad = np.zeros(p.shape[:3] + (ng * group_size,))
        p_pad[..., :k] = p
        p_pad = p_pad.reshape(p.shape[:3] + (ng, group_size))
        system = np.einsum("ogiht,ojht->ogihj", p_pad, c).reshape(len(c), ng * q, ng * q)
        rhs = np.einsum("ogil,ol->ogi", p, w[start : start + step].astype(np.float64)).reshape(len(c), ng * q)
        ridge = 1e-9 * np.maximum(np.trace(system, axis1=1, axis2=2) / (ng * q), 1e-30)
        system[:, np.arange(ng * q), np.arange(ng * q)] += ridge[:, None]
        result[start : start + step] = np.linalg.solve(system, rhs[..., None])[..., 0].reshape(-1, ng, q)
    return result


def relative_output_error(
    w: np.ndarray, w_hat: np.ndarray, x: np.ndarray | None, x_float: np.ndarray | None = None
) -> float:
    """``||X (W - W_hat)^T||_F / ||X W^T||_F``, or the weight-space ratio without ``X``; with the float
    model's inputs ``x_float``, ``||X_f W^T - X W_hat^T||_F / ||X_f W^T||_F``."""
    if x is None:
        return float(np.linalg.norm(w - w_hat) / max(np.linalg.norm(w), 1e-30))
    w, w_hat = w.astype(np.float64), w_hat.astype(np.float64)
    ref = (x if x_float is None else x_float) @ w.T
    return float(np.linalg.norm(ref - x @ w_hat.T) / max(np.linalg.norm(ref), 1e-30))


def relative_conv_error(w: np.ndarray, w_hat: np.ndarray, x: np.ndarray | None, attrs: dict) -> float:
    """:func:`relative_output_error` of a conv: ``||conv(X, W - W_hat)||_F / ||conv(X, W)||_F`` on the
    images ``x`` (the same ratio as on its im2col rows, group by group), or the weight-space ratio."""
    if x is None:
        return relative_output_error(w.reshape(len(w), -1), w_hat.reshape(len(w), -1), None)
    window = (attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"])
    w64 = w.astype(np.float64)
    ref = conv2d(x, w64, None, *window)
    diff = conv2d(x, w64 - w_hat.astype(np.float64), None, *window)
    return float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))


def plan_layers(
    graph: Graph,
    ctx: PassContext,
    pattern: Op,
    plan: Callable[..., dict[str, LayerPlan]],
    sequential: bool = False,
) -> tuple[dict[str, str], dict[str, LayerPlan]]:
    """Select the ``pattern`` layers (:data:`LINEAR` or :data:`CONV`), capture their calibration
    inputs and let ``plan`` fit them: ``(refusals by node, plans by node)``, see :func:`quantize_linears`.
    A linear's inputs come as rows ``[M, K]``, a conv's as whole NCHW images (:func:`capture_images`)."""
    producers, users = graph.producers(), graph.users()
    refusals: dict[str, str] = {}
    candidates: list[Match] = []
    for node in graph.nodes:
        if node.op != pattern.op:
            continue
        m = match(pattern, node, producers)
        reason = candidate_reason(m, graph, users, ctx.options) if m is not None else f"not {node.op}(x, W, b)"
        if reason:
            refusals[node.name] = reason
        else:
            candidates.append(m)
    max_rows = int(ctx.options.get("calib_rows", 2048))
    plans: dict[str, LayerPlan] = {}
    if sequential and pattern is not LINEAR:
        raise ValueError("sequential calibration captures rows of linears only")
    if sequential and ctx.calibration and candidates:
        work = graph.copy()  # constant arrays are shared: replace them, never write into them
        for stage in calibration_stages(graph, candidates):
            values = [m["x"] for m in stage]
            xs, xs_float = capture_activation_pairs(work, graph, ctx.calibration, values, max_rows)
            plans.update(plan(stage, xs, ctx.options, xs_float))
            for m in stage:
                w_hat = plans[m.root.name].weight
                if w_hat is not None:
                    work.constants[m["weight"].name].data = np.asarray(w_hat, np.float32)
    elif candidates:
        capture = capture_activations if pattern is LINEAR else capture_images
        xs = capture(graph, ctx.calibration, [m["x"] for m in candidates], max_rows)
        plans = plan(candidates, xs, ctx.options)
    return refusals, plans


def apply_plans(
    graph: Graph, rule_name: str, pattern: Op, refusals: dict[str, str], plans: dict[str, LayerPlan]
) -> RuleStats:
    """Apply the one rule ``rule_name`` that :func:`plan_layers` decided (in place)."""

    def check(m: Match, g: Graph) -> str | None:
        if m.root.name in refusals:
            return refusals[m.root.name]
        layer = plans.get(m.root.name)
        return "not planned" if layer is None else layer.reason

    def rewrite(m: Match, rc: RewriteContext) -> Value:
        return plans[m.root.name].build(m, rc)

    stats = apply_rules(graph, [Rule(rule_name, pattern, check, rewrite)])
    stats.details = {name: p.details for name, p in plans.items() if p.details}
    return stats


def quantize_linears(
    graph: Graph,
    ctx: PassContext,
    rule_name: str,
    plan: Callable[..., dict[str, LayerPlan]],
    sequential: bool = False,
) -> RuleStats:
    """Select candidate linears, capture their calibration inputs, let ``plan`` fit them, then apply
    the one rule ``rule_name`` they decided.

    Independent (default): ``plan`` fits all candidates at once on the float model's activations
    (bit allocation needs every layer). ``sequential`` with calibration data: stage by stage
    (:func:`calibration_stages`), the inputs are captured on a copy of the graph whose earlier
    candidates already hold their plans' ``weight`` (GPTQ's sequential procedure); ``plan(stage, xs,
    options, xs_float)`` also gets the float graph's inputs on the same rows (:func:`compensated_target`)."""
    return apply_plans(graph, rule_name, LINEAR, *plan_layers(graph, ctx, LINEAR, plan, sequential))


def merge_stats(*parts: RuleStats) -> RuleStats:
    """Several rules' stats as one pass's (rules apply to disjoint nodes)."""
    total = RuleStats()
    for stats in parts:
        total.matches.update(stats.matches)
        total.refusals += stats.refusals
        total.details.update(stats.details)
    return total
