"""MLP linears -> ``moe_linear``: a multiplication expert and a shift expert per layer with a router
(ShiftAddViT, You et al., NeurIPS 2023, Sec. 4.3, "MoE framework for MLPs"; op in ``ir/ops_moe.py``).

Both linears of a transformer MLP, ``fc1 -> gelu|relu|silu -> fc2`` (each intermediate read once),
become ``moe_linear``: the multiplication expert keeps the float32 weights, the shift expert holds
their DeepShift-PS coding (:func:`reshift.passes.shift.quantize_shift`, options ``shift_bits``,
``shift_levels``).
ShiftAddViT's experts are whole MLPs; here each linear routes its own tokens, so each one's share of
shift rows is measured and reported.

The router is initialised so routing is defined before any training (recovery fine-tunes it):
on the layer's calibration rows each token's shift-expert error ``e[r] = ||y_shift - y||/||y||``
(the exact kernel, int8 activations included) is measured; the ``share`` of tokens with the lowest
error are labelled "shift"; a ridge linear probe ``w = (X_c^T X_c + lambda I)^-1 X_c^T t`` (``t`` =
+-1, centred rows) is int8-coded (``router_scale = max|w| / 127``) and the bias set to the score
quantile that routes exactly ``share`` of the calibration tokens to the shift expert.

``share`` is option ``moe_shift_share`` (default 0.5), or, with option ``expert_latency`` =
``{"mult": t_m, "shift": t_s}`` (seconds per token, measured by reshift's kernels on the target,
:func:`reshift.codegen.tvm.kernels.moe_dispatch.expert_latencies`), the balance point of
ShiftAddViT's latency-aware load-balancing loss, where both experts carry equal latency-weighted
load: ``t_m (1 - share) = t_s share``, so ``share = t_m / (t_m + t_s)``. A per-layer dict
``{node: seconds}`` in each entry is read too.

Refusals (with reasons): a linear that is not an MLP linear, no calibration data (the router is fitted
on it), the usual weight checks (:func:`reshift.passes.quant_common.candidate_reason`; only the
``skip`` patterns apply, not ``@first``/``@last``, which name the patch embedding and the head), and
shift codes that could overflow the int32 accumulator. The pass is lossy; its report gives per
layer the shift share on calibration, the fraction of the layer's multiplications removed
(:func:`reshift.ir.ops_moe.multiplications_removed`) and the output error of the mixture.
"""

from __future__ import annotations

import functools

import numpy as np

from reshift.errors import PassError
from reshift.ir.graph import Graph, Node, Value
from reshift.ir.ops_lowbit import quantize_rows_int8
from reshift.ir.ops_moe import multiplications_removed, route_rows, shift_rows_blas
from reshift.passes.manager import Pass, PassContext
from reshift.passes.pattern import Match
from reshift.passes.quant_common import LAYER_OPTIONS, LINEAR, LayerPlan, apply_plans, plan_layers
from reshift.passes.rules import RewriteContext, RuleStats
from reshift.passes.shift import SHIFT_OPTIONS, _overflow_reason, quantize_shift, shift_options

ACTIVATIONS = ("gelu", "relu", "silu")
DEFAULT_SHIFT_SHARE = 0.5
DEFAULT_MOE_SKIP = ("*embed*", "*lm_head*")
RIDGE = 1e-3  # lambda relative to the mean diagonal of X_c^T X_c


def mlp_roles(graph: Graph) -> dict[str, str]:
    """``{node name: "fc1" | "fc2"}`` for every ``linear -> act -> linear`` chain, intermediates read once."""
    users, producers = graph.users(), graph.producers()
    roles: dict[str, str] = {}
    for act in graph.nodes:
        if act.op not in ACTIVATIONS:
            continue
        fc1 = producers.get(act.inputs[0])
        readers = users.get(act.outputs[0], [])
        if fc1 is None or fc1.op != "linear" or len(users.get(fc1.outputs[0], [])) != 1:
            continue
        if len(readers) != 1 or readers[0].op != "linear" or readers[0].inputs[0] is not act.outputs[0]:
            continue
        if act.outputs[0] in graph.outputs or fc1.outputs[0] in graph.outputs:
            continue
        roles[fc1.name], roles[readers[0].name] = "fc1", "fc2"
    return roles


def target_share(name: str, options: dict) -> float:
    """The share of tokens the router sends to the shift expert (module docstring)."""
    latency = options.get("expert_latency")
    if latency is not None:
        t_m, t_s = (latency[e][name] if isinstance(latency[e], dict) else latency[e] for e in ("mult", "shift"))
        if not (t_m > 0 and t_s > 0):
            raise PassError(f"moe_mlp: expert_latency for {name} must be positive seconds, got mult={t_m}, shift={t_s}")
        return float(t_m / (t_m + t_s))
    share = float(options.get("moe_shift_share", DEFAULT_SHIFT_SHARE))
    if not 0.0 <= share <= 1.0:
        raise PassError(f"moe_mlp: option moe_shift_share must be in [0, 1], got {share}")
    return share


def token_errors(x: np.ndarray, w: np.ndarray, sign, exponent, scale, bits: int) -> np.ndarray:
    """Per row of ``x`` the shift expert's relative output error ``||y_shift - y|| / ||y||`` (no bias)."""
    x32 = x.astype(np.float32)
    y = x32.astype(np.float64) @ w.astype(np.float64).T
    y_shift = shift_rows_blas(x32, sign, exponent, scale, bits).astype(np.float64)
    return np.linalg.norm(y_shift - y, axis=1) / np.maximum(np.linalg.norm(y, axis=1), 1e-30)


def fit_router(x: np.ndarray, errors: np.ndarray, share: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(router int8 [K], router_scale f32 [1], router_bias f32 [1])`` routing ``share`` of the rows of
    ``x`` to the shift expert, preferring the rows with the lowest shift ``errors`` (module docstring)."""
    m, k = x.shape
    n_shift = int(round(share * m))
    labels = -np.ones(m)
    labels[np.argsort(errors, kind="stable")[:n_shift]] = 1.0
    xc = x - x.mean(axis=0)
    gram = xc.T @ xc
    gram[np.diag_indices(k)] += RIDGE * max(float(np.trace(gram)) / k, 1e-12)
    w = np.linalg.solve(gram, xc.T @ (labels - labels.mean()))
    amax = float(np.max(np.abs(w))) if k else 0.0
    router_scale = np.float32(amax / 127.0 if amax > 0 else 1.0)
    router = np.clip(np.rint(w / router_scale), -127, 127).astype(np.int8)
    q, s, _ = quantize_rows_int8(x.astype(np.float32))
    with np.errstate(invalid="ignore"):
        score = (q.astype(np.float64) @ router.astype(np.float64)).astype(np.float32) * s * router_scale
    order = np.sort(score.astype(np.float32))
    if n_shift == 0:
        bias = -np.float32(abs(order[-1]) * 2 + 1)  # below every score: no row is routed to shift
    elif n_shift == m:
        bias = np.float32(abs(order[0]) * 2 + 1)
    else:  # between the (m - n_shift)-th and the next score: d > 0 for the top n_shift rows
        lo, hi = order[m - n_shift - 1], order[m - n_shift]
        bias = -np.float32((np.float64(lo) + np.float64(hi)) / 2)
    return router, np.array([router_scale], np.float32), np.array([bias], np.float32)


def _build(router, router_scale, router_bias, sign, exponent, scale, bits: int, m: Match, rc: RewriteContext) -> Value:
    name = m.root.name
    return rc.op(
        "moe_linear",
        m["x"],
        rc.constant(router, f"{name}_router"),
        rc.constant(router_scale, f"{name}_router_scale"),
        rc.constant(router_bias, f"{name}_router_bias"),
        m["weight"],
        rc.constant(sign, f"{name}_sign"),
        rc.constant(exponent, f"{name}_exponent"),
        rc.constant(scale, f"{name}_scale"),
        m.get("bias"),
        exponent_bits=bits,
    )


def _plan(roles: dict[str, str], candidates: list[Match], xs: dict[str, np.ndarray], options: dict):
    bits, levels = shift_options(options)
    plans: dict[str, LayerPlan] = {}
    for m in candidates:
        name = m.root.name
        if name not in roles:
            plans[name] = LayerPlan(reason="not an MLP linear (fc1 -> gelu/relu/silu -> fc2, each read once)")
            continue
        x = xs.get(m["x"].name)
        if x is None or not len(x):
            plans[name] = LayerPlan(reason="the router is fitted on calibration data: pass calibration=[...]")
            continue
        w = m.array("weight")
        sign, exponent, scale = quantize_shift(w, bits, levels)
        reason = _overflow_reason(sign, exponent, bits, f"K={w.shape[1]}")
        if reason:
            plans[name] = LayerPlan(reason=reason)
            continue
        share = target_share(name, options)
        errors = token_errors(x, w, sign, exponent, scale, bits)
        router, router_scale, router_bias = fit_router(x, errors, share)
        q, s, _ = quantize_rows_int8(x.astype(np.float32))
        with np.errstate(invalid="ignore"):
            to_shift = route_rows(q, s, router, router_scale, router_bias)
        measured = float(np.mean(to_shift))
        y = x @ w.astype(np.float64).T
        y_moe = y.copy()
        y_moe[to_shift] = shift_rows_blas(x[to_shift].astype(np.float32), sign, exponent, scale, bits)
        details = {
            "role": roles[name],
            "shift_share": measured,
            "target_share": share,
            "mults_removed": multiplications_removed(measured, *w.shape),
            "error": float(np.linalg.norm(y_moe - y) / max(np.linalg.norm(y), 1e-30)),
            "error_all_shift": float(
                np.linalg.norm(errors * np.linalg.norm(y, axis=1)) / max(np.linalg.norm(y), 1e-30)
            ),
        }
        build = functools.partial(_build, router, router_scale, router_bias, sign, exponent, scale, bits)
        plans[name] = LayerPlan(build=build, details=details)
    return plans


def moe_mlp(graph: Graph, ctx: PassContext) -> RuleStats:
    """Rewrite the MLP linears into ``moe_linear`` (planned on the float graph, then applied)."""
    roles = mlp_roles(graph)
    options = {"skip": DEFAULT_MOE_SKIP, **ctx.options, "calib_rows": ctx.options.get("calib_rows", 4096)}
    plan_ctx = PassContext(ctx.calibration, options)
    refusals, plans = plan_layers(graph, plan_ctx, LINEAR, functools.partial(_plan, roles))
    return apply_plans(graph, "linear_to_moe", LINEAR, refusals, plans)


def moe_layers(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op == "moe_linear"]


MOE_PASSES = [
    Pass(
        "moe_mlp",
        moe_mlp,
        exact=False,
        doc="MLP linear -> moe_linear: float32 and shift experts, int8 router fitted on calibration (ShiftAddViT)",
        options=SHIFT_OPTIONS | {"expert_latency", "moe_shift_share"} | LAYER_OPTIONS,
    )
]

__all__ = ["MOE_PASSES", "fit_router", "mlp_roles", "moe_layers", "moe_mlp", "target_share", "token_errors"]
