"""Log-domain activation quantizers for post-softmax and post-GELU activations (``log2_quant``).

* RepQ-ViT (Li et al., ICCV 2023, Sec. 3.3): post-softmax attention ``A`` in ``[0, 1]`` is
  quantized with base ``sqrt2``: ``A_hat = 2^(-q/2)``, ``q = rint(-2 log2 A)``; odd ``q`` costs one
  ``sqrt2`` multiply (``2^-ceil(q/2) * sqrt2``), so ``A_hat @ V`` is shifts and adds
  (``base_kind="log2"`` gives the plain ``2^-q`` quantizer).
* AdaLog (Wu et al., ECCV 2024): the base is searched per layer, ``base = 2^(p/D)`` with a
  ``D``-entry table of fractional powers (``log2_quant``'s ``table_size``), together with the top
  level ``scale``. AdaLog's Fast Progressive Combining Search is replaced by an exhaustive grid
  over ``p = 1..D`` (``D = 16``) and ``scale = max * {1, 0.9, ..., 0.5}``, minimizing the error of
  the consumer's output (``||(A_hat - A) V||`` for attention, ``||(X_hat - X) W^T||`` for the MLP)
  on calibration data: with one parameter pair per layer, the full grid is cheap.
* AdaLog's bias reparameterization for post-GELU activations (minimum ``-0.17``): the quantizer
  sees ``X + c`` (``c = 0.17 >= -min GELU``) and the next linear absorbs the shift:
  ``W X + b = W (X + c) + (b - c W 1)``.

* RepQ-ViT's integer attention: ``matmul(log2_quant(A), quantize_uniform(V))`` becomes one
  ``log2_matmul`` (``ir/ops_quant.py``): ``sum_k 2^-e_k V_int[k]`` as int32 shifts and adds, one
  accumulator per fractional part of the level exponent (log2: one; log-sqrt2: even and odd codes,
  the odd one taking the one ``sqrt2`` multiply; AdaLog's base ``2^(p/D)``: ``D / gcd(p, D)``, each
  multiplied once by its table entry at the end), zero codes skipped, one rescale by
  ``scale * v_scale``. Exact up to float32 rounding against the fake-quantized graph it replaces (it
  carries the same codes and the same calibrated per-tensor V scale). Refused, with the reason in
  the report: a float or per-channel V. Code ranges whose shifts overflow int32
  (``(2^v_bits - 1) * tokens * 2^E``: 4-bit codes fit 197 tokens; 6- and 8-bit log-sqrt2 codes,
  down to ``2^-31`` and ``2^-127``, do not) run with the op's ``floor_exponent`` ``W``, the largest
  the bound allows (``W = 15`` for 197 tokens and 8-bit V, ``13`` for 785): levels below ``2^-W``
  of the top level count as zero, moving an output row by at most its dropped probability mass
  times ``max |v|`` (under ``tokens * 2^-W``; 4-bit log-sqrt2 itself zeroes everything below
  ``2^-7``). Below ``W = MIN_FLOOR_EXPONENT`` (``2^-8``) the site stays fake-quant, with the reason.

Passes: ``log2_a{bits}`` (RepQ-ViT, softmax only; option ``base_kind``), ``adalog_a{bits}``
(adaptive base on softmax and post-GELU) and ``fuse_log2_matmul``. Option ``a_bits`` overrides the bits.
"""

from __future__ import annotations

import numpy as np

from reshift.ir.builder import create_node
from reshift.ir.graph import Graph, Node, Value
from reshift.ir.ops_quant import (
    ACC_LIMIT,
    LOG2_MATMUL_KINDS,
    largest_floor_exponent,
    log2_matmul_bound,
    log2_quant_ref,
    smallest_level_exponent,
)
from reshift.passes.calibrate import observe, require_calibration
from reshift.passes.manager import Pass, PassContext, rule_pass
from reshift.passes.pattern import Any, Match, Op
from reshift.passes.quantize import insert_quantizer
from reshift.passes.rules import RewriteContext, Rule, RuleStats

GELU_SHIFT = 0.17  # >= -min_x GELU(x) = 0.16997...
TABLE_SIZE = 16
SCALE_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
MIN_FLOOR_EXPONENT = 8  # a log2_matmul floor below 2^-8 would drop real attention mass: stay fake-quant


def _softmax_edges(graph: Graph, producers) -> list[tuple[Value, list[Node]]]:
    """Softmax outputs read as the first operand of a ``matmul`` (attention probabilities @ V)."""
    edges: dict[Value, list[Node]] = {}
    for node in graph.nodes:
        if node.op == "matmul" and node.inputs[0] is not None:
            src = producers.get(node.inputs[0])
            if src is not None and src.op == "softmax":
                edges.setdefault(node.inputs[0], []).append(node)
    return list(edges.items())


def _gelu_edges(graph: Graph, producers, users) -> list[tuple[Node, Node]]:
    """``(gelu, linear)`` pairs where a GELU output feeds only one float linear with a constant weight."""
    pairs = []
    for node in graph.nodes:
        if node.op != "linear" or node.inputs[0] is None:
            continue
        src = producers.get(node.inputs[0])
        readers = users.get(node.inputs[0], [])
        if src is not None and src.op == "gelu" and len(readers) == 1 and node.inputs[1].is_constant:
            if node.inputs[0] not in graph.outputs:
                pairs.append((src, node))
    return pairs


def search_adaptive(
    x: np.ndarray, bits: int, consumer, scale_hint: float = 1.0, kinds=("adaptive",)
) -> tuple[dict, float]:
    """Grid search of ``(base, scale)`` minimizing ``||consumer(x_hat) - consumer(x)||``; returns the
    attributes and the relative output error."""
    reference = consumer(x)
    norm = max(float(np.linalg.norm(reference)), 1e-30)
    best, best_err = None, np.inf
    for kind in kinds:
        ps = range(1, TABLE_SIZE + 1) if kind == "adaptive" else (TABLE_SIZE,)
        for p in ps:
            base = 2.0 ** (p / TABLE_SIZE)
            for f in SCALE_GRID:
                scale = float(np.float32(scale_hint * f))
                attrs = {"bits": bits, "base_kind": kind, "base": base, "scale": scale, "table_size": TABLE_SIZE}
                xq = log2_quant_ref(x.astype(np.float32), **attrs)
                err = float(np.linalg.norm(consumer(xq) - reference)) / norm
                if err < best_err:
                    best, best_err = attrs, err
    return best, best_err


def log2_activations(graph: Graph, ctx: PassContext, bits: int = 4, adaptive: bool = False) -> RuleStats:
    """Insert ``log2_quant`` after softmax (and, when ``adaptive``, after GELU with bias reparam)."""
    opts = ctx.options
    bits = int(opts.get("a_bits", bits))
    base_kind = "adaptive" if adaptive else opts.get("base_kind", "log_sqrt2")
    producers, users = graph.producers(), graph.users()
    stats = RuleStats()
    softmax = _softmax_edges(graph, producers)
    gelus = _gelu_edges(graph, producers, users) if adaptive and opts.get("log2_gelu", True) else []
    if not softmax and not gelus:
        return stats
    observers = {}
    if adaptive:
        calibration = require_calibration(ctx.calibration, "AdaLog base search")
        keep = (
            [v for v, _ in softmax]
            + [r[0].inputs[1] for _, r in softmax if len(r) == 1]
            + [g.outputs[0] for g, _ in gelus]
        )
        keep = [v for v in keep if not v.is_constant]
        observers = observe(graph, calibration, keep, keep_tensors={v.name for v in keep}, max_batches_kept=2)
    for value, readers in softmax:
        attrs = {"bits": bits, "base_kind": base_kind, "scale": 1.0, "table_size": TABLE_SIZE}
        details: dict = {"bits": bits, "base_kind": base_kind}
        if adaptive:
            a = np.concatenate(observers[value.name].tensors)
            v_in = readers[0].inputs[1]
            if len(readers) == 1 and not v_in.is_constant and v_in.name in observers:
                v = np.concatenate(observers[v_in.name].tensors)
                consumer = lambda t, v=v: np.matmul(t.astype(np.float64), v)  # noqa: E731
            else:
                consumer = lambda t: t.astype(np.float64)  # noqa: E731
            best, err = search_adaptive(a, bits, consumer, 1.0, ("adaptive", "log_sqrt2"))
            attrs = best
            details.update(base=best["base"], base_kind=best["base_kind"], scale=best["scale"], output_error=err)
        node = insert_quantizer(graph, value, readers, "log2_quant", attrs, f"{value.name}_log2")
        stats.matches["log2_softmax"] = stats.matches.get("log2_softmax", 0) + 1
        stats.details[node.name] = details
    for gelu, linear in gelus:
        x = np.concatenate(observers[gelu.outputs[0].name].tensors).reshape(-1, gelu.outputs[0].shape[-1])
        x = x[:: max(1, len(x) // 2048)].astype(np.float64) + GELU_SHIFT
        w = linear.inputs[1].data.astype(np.float64)
        best, err = search_adaptive(x, bits, lambda t, w=w: t @ w.T, float(x.max()), ("adaptive", "log_sqrt2"))
        shift = graph.add_constant(np.array(GELU_SHIFT, np.float32), f"{gelu.name}_shift")
        add = create_node(graph, "add", [gelu.outputs[0], shift], {}, graph.fresh_name(f"{gelu.name}_shifted"))
        graph.nodes.insert(graph.nodes.index(linear), add)
        linear.inputs[0] = add.outputs[0]
        node = insert_quantizer(graph, add.outputs[0], [linear], "log2_quant", best, f"{gelu.name}_log2")
        bias = linear.inputs[2].data.astype(np.float64) if linear.inputs[2] is not None else 0.0
        new_bias = (bias - GELU_SHIFT * w.sum(axis=1)).astype(np.float32)
        linear.inputs[2] = graph.add_constant(new_bias, f"{linear.name}_bias_reparam")
        stats.matches["log2_gelu_bias_reparam"] = stats.matches.get("log2_gelu_bias_reparam", 0) + 1
        stats.details[node.name] = {
            "bits": bits,
            "base_kind": best["base_kind"],
            "base": best["base"],
            "scale": best["scale"],
            "shift": GELU_SHIFT,
            "output_error": err,
        }
    graph.remove_unused()
    return stats


LOG2_OPTIONS = frozenset({"a_bits", "base_kind", "log2_gelu"})  # read by log2_activations


def log2_pass(bits: int) -> Pass:
    return Pass(
        f"log2_a{bits}",
        lambda graph, ctx: log2_activations(graph, ctx, bits, adaptive=False),
        exact=False,
        doc=f"RepQ-ViT log-sqrt2 {bits}-bit quantizer on post-softmax attention",
        options=LOG2_OPTIONS,
    )


def adalog_pass(bits: int) -> Pass:
    return Pass(
        f"adalog_a{bits}",
        lambda graph, ctx: log2_activations(graph, ctx, bits, adaptive=True),
        exact=False,
        doc=f"AdaLog adaptive-base {bits}-bit quantizer on post-softmax and (bias-reparameterized) post-GELU",
        options=LOG2_OPTIONS,
    )


# -- log2_quant -> matmul as shifts and adds ----------------------------------------------------
LOG2_ATTENTION = Op("matmul", Op("log2_quant", Any("p"), name="pq"), Any("vq"), name="mm")


def _log2_matmul_check(m: Match, graph: Graph) -> str | None:
    a = m.nodes["pq"].attrs
    if a["base_kind"] not in LOG2_MATMUL_KINDS:
        return f"log2_quant base_kind {a['base_kind']!r} has no shift-add kernel; stays fake-quant"
    vq = graph.producers().get(m["vq"])
    if vq is None or vq.op != "quantize_uniform":
        return f"V %{m['vq'].name} is not quantized: run after quantize_w*a* so V has a calibrated per-tensor scale"
    if len(vq.attrs["scale"]) != 1:
        return f"V quantizer {vq.name} is per channel; log2_matmul needs one per-tensor V scale"
    if len(m["p"].shape) < 2 or len(m["vq"].shape) < 2 or m["p"].shape[:-2] != m["vq"].shape[:-2]:
        return f"operands {m['p'].type} @ {m['vq'].type} are not batched [..., M, K] @ [..., K, D] alike"
    k = m["p"].shape[-1]
    if not isinstance(k, int):
        return f"contraction dimension {k!r} is symbolic: no static int32 bound"
    floor = floor_exponent_for(a, vq.attrs["bits"], k)
    if floor is not None and floor < MIN_FLOOR_EXPONENT:
        e = smallest_level_exponent(a["bits"], a["base_kind"], a["base"], a["table_size"])
        return (
            f"{a['bits']}-bit {a['base_kind']} levels reach 2^-{e}: {2 ** vq.attrs['bits'] - 1} * {k} tokens * 2^{e} "
            f"overflows the int32 accumulator, and a floor of 2^-{floor} (below 2^-{MIN_FLOOR_EXPONENT}) would "
            "drop attention mass; stays fake-quant"
        )
    return None


def floor_exponent_for(a: dict, v_bits: int, k: int) -> int | None:
    """The ``log2_matmul`` floor a site needs: None when every level fits int32, else the largest allowed."""
    if log2_matmul_bound(a["bits"], a["base_kind"], v_bits, k, a["base"], a["table_size"]) <= ACC_LIMIT:
        return None
    return largest_floor_exponent(v_bits, k)


def _log2_matmul_rewrite(m: Match, ctx: RewriteContext) -> Value:
    a, v = m.nodes["pq"].attrs, ctx.graph.producers()[m["vq"]]
    floor = floor_exponent_for(a, v.attrs["bits"], m["p"].shape[-1])
    return ctx.op(
        "log2_matmul",
        m["p"],
        v.inputs[0],
        bits=a["bits"],
        base_kind=a["base_kind"],
        base=a["base"],
        table_size=a["table_size"],
        scale=a["scale"],
        v_scale=v.attrs["scale"][0],
        v_zero_point=int(v.attrs["zero_point"][0]),
        v_bits=v.attrs["bits"],
        v_signed=v.attrs["signed"],
        floor_exponent=-1 if floor is None else floor,
    )


LOG2_MATMUL_RULES = [
    Rule("log2_matmul", LOG2_ATTENTION, _log2_matmul_check, _log2_matmul_rewrite, allow_shared_interior=True)
]
FUSE_LOG2_MATMUL = rule_pass(
    "fuse_log2_matmul",
    LOG2_MATMUL_RULES,
    doc="matmul(log2_quant(A), quantize_uniform(V)) -> log2_matmul (int32 shifts and adds, RepQ-ViT; "
    "6/8-bit codes with a floor on the smallest level)",
    exact=True,
)

LOG2_PASSES = [p(b) for b in (8, 6, 4) for p in (log2_pass, adalog_pass)] + [FUSE_LOG2_MATMUL]

__all__ = [
    "FUSE_LOG2_MATMUL",
    "GELU_SHIFT",
    "LOG2_ATTENTION",
    "LOG2_MATMUL_RULES",
    "LOG2_PASSES",
    "adalog_pass",
    "log2_activations",
    "log2_pass",
    "search_adaptive",
]
