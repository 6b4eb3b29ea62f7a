"""Scale reparameterization of post-LayerNorm activations (RepQ-ViT, Li et al., ICCV 2023, Sec. 3.2).

Post-LayerNorm activations vary wildly across channels, so they want per-channel quantization
``(s_c, z_c)``; the integer kernel wants one ``(s, z)`` per tensor. With ``s~ = mean(s)``,
``z~ = round(mean(z))`` (DopQ-ViT: ``median``, option ``reparam_stat``), ``r1 = s / s~`` and
``r2 = z - z~`` the LayerNorm output ``y`` is replaced by ``y~ = (y + s r2) / r1``:

    gamma' = gamma / r1,   beta' = (beta + s * r2) / r1                  (LayerNorm affine)
    W' = W diag(r1),       b' = b - W (s * r2) = b - W' (s * r2 / r1)    (every reading linear)

so ``W' y~ + b' = W y + b`` exactly, and quantizing ``y~`` with ``(s~, z~)`` per tensor gives the
same integers as quantizing ``y`` with ``(s_c, z_c)`` per channel. The per-channel ``(s, z)`` come
from min/max calibration of the LayerNorm output at ``a_bits`` (asymmetric, unsigned).

Applies where a LayerNorm (with affine weights, normalizing the last axis) is read by float
``linear`` nodes with constant weights, e.g. pre-norm ViT blocks (LayerNorm -> qkv, LayerNorm ->
fc1) or a LayerNorm feeding separate q, k, v linears. Post-norm blocks (BERT, MiniLM), whose
LayerNorm output also feeds the residual add (or a graph output, a pooling), get a second
LayerNorm on the same input: the copy carries the reparameterized affine and feeds the linears, the
original keeps feeding everything else, so the pass stays exact at the price of one more LayerNorm
per block (RepQ-ViT covers pre-norm ViTs only; option ``reparam_post_norm=False`` refuses these).
"""

from __future__ import annotations

import numpy as np

from reshift.ir.builder import create_node
from reshift.ir.graph import Graph
from reshift.passes.calibrate import observe, require_calibration
from reshift.passes.manager import Pass, PassContext
from reshift.passes.rules import Refusal, RuleStats

RATIO_TOLERANCE = 0.05  # a second application after rounding of zero points changes nothing worth it


def _absorbs(r, out, users) -> bool:
    """``r`` is a float ``linear`` reading ``out`` as its input, with unshared constant parameters."""
    if r.op != "linear" or r.inputs[0] is not out or r.inputs[1] is None or not r.inputs[1].is_constant:
        return False
    return all(len(users.get(v, [])) == 1 for v in r.inputs[1:] if v is not None)


def _plan(graph: Graph, node, users, post_norm: bool) -> tuple[list, bool] | str:
    """``(linears, duplicate)``: the readers that absorb ``r1, r2`` and whether the LayerNorm needs a
    reparameterized copy (other readers keep the original); or the reason it does not apply."""
    if node.attrs.get("axis", -1) not in (-1, node.inputs[0].type.rank - 1):
        return "normalizes more than the last axis"
    weight, bias = (node.inputs + [None, None])[1:3]
    if weight is None or not weight.is_constant or bias is None or not bias.is_constant:
        return "needs constant affine weight and bias to absorb the ratios"
    out = node.outputs[0]
    readers = list(dict.fromkeys(users.get(out, [])))
    if not readers:
        return "output unused"
    linears = [r for r in readers if _absorbs(r, out, users)]
    others = [r for r in readers if r not in linears]
    if not linears:
        kinds = ", ".join(f"{r.op} node {r.name}" for r in others)
        return f"no linear with unshared constant weights reads it (readers: {kinds}); nothing absorbs r1, r2"
    if others or out in graph.outputs:
        if not post_norm:
            what = f"{others[0].op} node {others[0].name}" if others else "the graph output"
            return f"output also read by {what} (only linears can absorb r1, r2; reparam_post_norm is off)"
    return linears, bool(others) or out in graph.outputs


def channel_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel asymmetric ``(s, z)`` (float64) from min/max; integer zero points. The range is not
    widened to hold 0 (so a second application finds every channel already at ``(s~, z~)``)."""
    qmax = 2**bits - 1
    s = (hi - lo) / qmax
    s = np.where(s > 0, s, max(float(s.max()), 1e-8) if s.size else 1.0)
    return s, np.rint(-lo / s)


def reparam_ratios(s: np.ndarray, z: np.ndarray, stat: str = "mean") -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(r1, r2, s~, z~)`` for layer-wise ``s~ = stat(s)``, ``z~ = round(stat(z))``."""
    reduce = {"mean": np.mean, "median": np.median}[stat]
    s_layer, z_layer = float(reduce(s)), float(np.rint(reduce(z)))
    return s / s_layer, z - z_layer, s_layer, z_layer


def scale_reparam(graph: Graph, ctx: PassContext, bits: int = 8) -> RuleStats:
    """Fold per-channel post-LayerNorm scales into the LayerNorm affine and the next linears."""
    bits = int(ctx.options.get("a_bits", bits))
    stat = ctx.options.get("reparam_stat", "mean")
    post_norm = bool(ctx.options.get("reparam_post_norm", True))
    users = graph.users()
    stats = RuleStats()
    targets = []  # (layer_norm, reading linears, duplicate)
    for node in graph.nodes:
        if node.op != "layer_norm":
            continue
        plan = _plan(graph, node, users, post_norm)
        if isinstance(plan, str):
            stats.refusals.append(Refusal("scale_reparam", node.name, plan))
        else:
            targets.append((node, *plan))
    if not targets:
        return stats
    calibration = require_calibration(ctx.calibration, "scale reparameterization")
    observers = observe(graph, calibration, [n.outputs[0] for n, _, _ in targets], max_samples=1)
    for node, linears, duplicate in targets:
        obs = observers[node.outputs[0].name]
        s, z = channel_params(obs.ch_lo.astype(np.float64), obs.ch_hi.astype(np.float64), bits)
        r1, r2, s_layer, z_layer = reparam_ratios(s, z, stat)
        if np.max(np.abs(r1 - 1)) < RATIO_TOLERANCE and np.max(np.abs(r2)) <= 1:
            stats.refusals.append(Refusal("scale_reparam", node.name, "channel scales are already layer-wise"))
            continue
        shift = s * r2
        gamma, beta = node.inputs[1].data.astype(np.float64), node.inputs[2].data.astype(np.float64)
        affine = [
            graph.add_constant((gamma / r1).astype(np.float32), f"{node.name}_gamma_reparam"),
            graph.add_constant(((beta + shift) / r1).astype(np.float32), f"{node.name}_beta_reparam"),
        ]
        target = node
        if duplicate:  # post-norm: the linears read a reparameterized copy, the rest the original
            target = create_node(
                graph, "layer_norm", [node.inputs[0], *affine], node.attrs, graph.fresh_name(node.name)
            )
            graph.nodes.insert(graph.nodes.index(node) + 1, target)
            for linear in linears:
                linear.inputs[0] = target.outputs[0]
        else:
            node.inputs = [node.inputs[0], *affine, *node.inputs[3:]]
        for linear in linears:
            w = linear.inputs[1].data.astype(np.float64)
            b = linear.inputs[2].data.astype(np.float64) if linear.inputs[2] is not None else np.zeros(len(w))
            linear.inputs[1] = graph.add_constant((w * r1[None, :]).astype(np.float32), f"{linear.name}_w_reparam")
            bias = graph.add_constant((b - w @ shift).astype(np.float32), f"{linear.name}_b_reparam")
            linear.inputs = list(linear.inputs[:2]) + [bias]
        stats.matches["scale_reparam"] = stats.matches.get("scale_reparam", 0) + 1
        stats.details[node.name] = {
            "bits": bits,
            "stat": stat,
            "layer_scale": s_layer,
            "layer_zero_point": z_layer,
            "r1_range": (float(r1.min()), float(r1.max())),
            "readers": [r.name for r in linears],
            "duplicated": target.name if duplicate else None,
        }
    graph.remove_unused()
    return stats


def scale_reparam_pass(bits: int) -> Pass:
    return Pass(
        f"scale_reparam_a{bits}",
        lambda graph, ctx: scale_reparam(graph, ctx, bits),
        exact=True,
        doc=f"RepQ-ViT post-LayerNorm scale reparameterization for {bits}-bit per-tensor activations",
        options=frozenset({"a_bits", "reparam_stat", "reparam_post_norm"}),
    )


SCALE_REPARAM_PASSES = [scale_reparam_pass(b) for b in (8, 6, 4)]

__all__ = ["SCALE_REPARAM_PASSES", "channel_params", "reparam_ratios", "scale_reparam", "scale_reparam_pass"]
