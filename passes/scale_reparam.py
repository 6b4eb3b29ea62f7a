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

Applies where every reader of a LayerNorm (with affine weights, normalizing the last axis) is a
float ``linear`` with a constant weight, e.g. pre-norm ViT blocks (LayerNorm -> qkv, LayerNorm ->
fc1) or a LayerNorm feeding separate q, k, v linears. Refuses post-norm BERT LayerNorms, whose
output also feeds the residual add.
"""

from __future__ import annotations

import numpy as np

from reshift.ir.graph import Graph
from reshift.passes.calibrate import observe, require_calibration
from reshift.passes.manager import Pass, PassContext
from reshift.passes.rules import Refusal, RuleStats

RATIO_TOLERANCE = 0.05  # a second application after rounding of zero points changes nothing worth it


def _refusal(graph: Graph, node, users) -> str | None:
    if node.attrs.get("axis", -1) not in (-1, node.inputs[0].type.rank - 1):
        return "normalizes more than the last axis"
    weight, bias = (node.inputs + [None, None])[1:3]
    if weight is None or not weight.is_constant or bias is None or not bias.is_constant:
        return "needs constant affine weight and bias to absorb the ratios"
    out = node.outputs[0]
    if out in graph.outputs:
        return f"%{out.name} is a graph output"
    readers = users.get(out, [])
    if not readers:
        return "output unused"
    for r in readers:
        if r.op != "linear" or r.inputs[0] is not out or not r.inputs[1].is_constant:
            return f"output also read by {r.op} node {r.name} (only linears can absorb r1, r2)"
    shared = [v.name for v in (weight, bias) if len(users.get(v, [])) > 1]
    for r in readers:
        shared += [v.name for v in r.inputs[1:] if v is not None and len(users.get(v, [])) > 1]
    if shared:
        return f"parameters {', '.join(shared)} are shared with other nodes"
    return None


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
    users = graph.users()
    stats = RuleStats()
    targets = []
    for node in graph.nodes:
        if node.op != "layer_norm":
            continue
        reason = _refusal(graph, node, users)
        if reason:
            stats.refusals.append(Refusal("scale_reparam", node.name, reason))
        else:
            targets.append(node)
    if not targets:
        return stats
    calibration = require_calibration(ctx.calibration, "scale reparameterization")
    observers = observe(graph, calibration, [n.outputs[0] for n in targets], max_samples=1)
    for node in targets:
        obs = observers[node.outputs[0].name]
        s, z = channel_params(obs.ch_lo.astype(np.float64), obs.ch_hi.astype(np.float64), bits)
        r1, r2, s_layer, z_layer = reparam_ratios(s, z, stat)
        if np.max(np.abs(r1 - 1)) < RATIO_TOLERANCE and np.max(np.abs(r2)) <= 1:
            stats.refusals.append(Refusal("scale_reparam", node.name, "channel scales are already layer-wise"))
            continue
        shift = s * r2
        gamma, beta = node.inputs[1].data.astype(np.float64), node.inputs[2].data.astype(np.float64)
        node.inputs[1] = graph.add_constant((gamma / r1).astype(np.float32), f"{node.name}_gamma_reparam")
        node.inputs[2] = graph.add_constant(((beta + shift) / r1).astype(np.float32), f"{node.name}_beta_reparam")
        for linear in users[node.outputs[0]]:
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
            "readers": [r.name for r in users[node.outputs[0]]],
        }
    graph.remove_unused()
    return stats


def scale_reparam_pass(bits: int) -> Pass:
    return Pass(
        f"scale_reparam_a{bits}",
        lambda graph, ctx: scale_reparam(graph, ctx, bits),
        exact=True,
        doc=f"RepQ-ViT post-LayerNorm scale reparameterization for {bits}-bit per-tensor activations",
    )


SCALE_REPARAM_PASSES = [scale_reparam_pass(b) for b in (8, 6, 4)]

__all__ = ["SCALE_REPARAM_PASSES", "channel_params", "reparam_ratios", "scale_reparam", "scale_reparam_pass"]
