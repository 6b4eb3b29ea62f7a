"""Uniform post-training quantization of transformers (W8A8 / W6A6 / W4A4), the RepQ-ViT baseline.

* Every eligible ``linear`` (``quant_common.candidate_reason``: constant float weight, not tied, not
  skipped; the first and last weight layers stay float by default) becomes ``int8_linear``: weights
  per output channel, symmetric ``w_bits`` (``+-(2^(w_bits-1) - 1)``, clipping searched by MSE),
  activations per tensor, asymmetric unsigned ``a_bits`` (range by ``act_method``: ``mse``,
  ``minmax`` or ``percentile``), int32 accumulation, one float rescale per output.
* Weight rounding (option ``weight_rounding``): ``"gptq"`` below 8 bits (``passes/gptq.py``, GPTQ's
  error compensation on the fixed per-channel grid, Hessian from the calibration inputs as the
  kernel will see them, quantized), ``"nearest"`` at 8 bits. GPTQ needs at least
  ``GPTQ_ROWS_PER_INPUT`` calibration rows per input channel and otherwise rounds to nearest (the
  report says so per layer). It matters where scale reparameterization has widened some weight
  columns: in a side experiment on ``benchmarks/ptq_vit.py``'s ViT it removed most of the W4A8 loss
  the reparameterizations cost with nearest rounding and lowered W4A4 AdaLog's logit error; top-1
  differences at W4A4 stayed within the calibration-set noise.
* A ``linear`` whose input another quantizer already produced (``log2_quant`` after softmax or
  GELU) keeps its activation as is and gets fake-quantized (dequantized) weight constants.
* Every dense (``groups=1``) or depthwise (``groups`` = in = out channels) ``conv2d`` (same candidate
  rules; option ``quantize_convs``, default True) becomes ``int8_conv2d``: per-output-channel symmetric
  weights (nearest rounding), activations per tensor from calibration (static, as onnxruntime's QDQ
  convs); other grouped convs stay float, with the reason in the report. A filter whose centre taps
  ``W[o, o]`` (a fused identity branch) would set its int8 grid keeps them as wide int32 codes
  (``w_diag``, :func:`conv_weight_codes`).
* Each activation input of a ``matmul`` (q @ k^T, attention @ v) gets a per-tensor
  ``quantize_uniform`` unless a quantizer already produced it.

All quantizers are calibrated in one set of interpreter runs over ``PassContext.calibration`` on
the graph as it stands (not sequentially). Options: ``w_bits``, ``a_bits``, ``act_method``,
``weight_method``, ``skip`` (see ``quant_common``), ``quantize_matmuls`` (default True),
``act_granularity`` (``"tensor"``: static scales from calibration; ``"row"``: per-token scales
computed at run time by the kernel; default :func:`default_act_granularity`), ``smooth_alpha``
(SmoothQuant scale migration into the linear's weight before quantizing, e.g. 0.5; off by default).

Default activation granularity: ``"row"`` at 8 bits, as int8 LLM runtimes do (LLM.int8, SmoothQuant's
per-token W8A8, onnxruntime's dynamic quantization): one min/max per token at run time, so
MiniLM's post-LayerNorm outlier channels no longer set one scale for every token
(``benchmarks/ptq_vit.py``: cosine to fp32 0.9935 per tensor, 0.9988 per row). Below 8 bits the
default stays ``"tensor"``, the static setting the RepQ-ViT / AdaLog pipelines (scale reparam,
log2 quantizers) are designed for and measured in. Matmul inputs are per tensor either way.
"""

from __future__ import annotations

import numpy as np

from reshift.errors import PassError
from reshift.ir.builder import create_node
from reshift.ir.graph import Graph, Node, Value
from reshift.ir.ops import get_op
from reshift.ir.ops_quant import DIAG_LIMIT
from reshift.passes.calibrate import (
    activation_range,
    fake_quant,
    observe,
    on_weight_grid,
    quantize_weight,
    require_calibration,
    uniform_params,
    weight_scales,
)
from reshift.passes.gptq import gptq_codes, input_hessian
from reshift.passes.manager import Pass, PassContext
from reshift.passes.pattern import match
from reshift.passes.quant_common import CONV, LINEAR, candidate_reason
from reshift.passes.rules import Refusal, RuleStats

QUANTIZER_OPS = ("quantize_uniform", "log2_quant")
GRANULARITIES = ("tensor", "row")
ROUNDINGS = ("nearest", "gptq")
# GPTQ fits the rounding to the calibration inputs; with fewer rows than a few per input channel its
# Hessian is rank deficient and the fit does not carry over to new data
GPTQ_ROWS_PER_INPUT = 4


def default_weight_rounding(w_bits: int) -> str:
    """``"gptq"`` below 8 bits, where round-to-nearest loses accuracy (see module docstring)."""
    return "gptq" if w_bits < 8 else "nearest"


def default_act_granularity(a_bits: int) -> str:
    """``"row"`` (dynamic per token) for 8-bit activations, ``"tensor"`` (static) below: see module docstring."""
    return "row" if a_bits >= 8 else "tensor"


def produced_by_quantizer(value: Value, producers: dict[Value, Node]) -> bool:
    node = producers.get(value)
    return node is not None and node.op in QUANTIZER_OPS


def insert_quantizer(graph: Graph, value: Value, readers: list[Node], op: str, attrs: dict, hint: str) -> Node:
    """A new ``op(value)`` node placed just before the first of ``readers``, which now read its output."""
    node = create_node(graph, op, [value], attrs, graph.fresh_name(hint))
    first = min(graph.nodes.index(r) for r in readers)
    graph.nodes.insert(first, node)
    for reader in readers:
        reader.inputs = [node.outputs[0] if v is value else v for v in reader.inputs]
    return node


def replace_node(graph: Graph, old: Node, op: str, inputs: list[Value | None], attrs: dict) -> Node:
    """Swap ``old`` for an ``op`` node with the same name and output value (so graph outputs hold)."""
    opdef = get_op(op)
    new = Node(op, inputs, old.outputs, opdef.normalize_attrs(attrs, where=f"node {old.name}: "), old.name)
    graph.nodes[graph.nodes.index(old)] = new
    return new


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def smooth_activations(graph: Graph, calibration, matches: list, opts: dict, stats: RuleStats) -> None:
    """SmoothQuant (Xiao et al., 2023) scale migration, exact in float: ``x W^T = (x diag(s)^-1)(W diag(s))^T``
    with ``s_j = max|x_j|^alpha / max_o |W_oj|^(1-alpha)``. One ``mul`` by ``1/s`` per activation, shared
    by all the linears that read it (their weight columns are pooled for ``max|W_j|``)."""
    alpha = float(opts["smooth_alpha"])
    groups: dict[Value, list] = {}
    for m in matches:
        groups.setdefault(m["x"], []).append(m)
    observers = observe(graph, calibration, list(groups), max_samples=1)
    for x, ms in groups.items():
        obs = observers[x.name]
        if obs.ch_lo is None or not np.all(np.isfinite(obs.ch_lo)) or not np.all(np.isfinite(obs.ch_hi)):
            continue
        x_max = np.maximum(np.abs(obs.ch_lo), np.abs(obs.ch_hi)).astype(np.float64)
        w_max = np.max([np.abs(m.root.inputs[1].data).max(axis=0) for m in ms], axis=0).astype(np.float64)
        s = np.where((x_max > 0) & (w_max > 0), x_max**alpha / np.maximum(w_max, 1e-12) ** (1 - alpha), 1.0)
        s = np.clip(s, 1e-5, 1e5)
        inv = graph.add_constant((1.0 / s).astype(np.float32), f"{x.name}_smooth_inv")
        mul = create_node(graph, "mul", [x, inv], {}, graph.fresh_name(f"{x.name}_smoothed"))
        graph.nodes.insert(min(graph.nodes.index(m.root) for m in ms), mul)
        for m in ms:
            w = m.root.inputs[1].data.astype(np.float64)
            m.root.inputs[0] = mul.outputs[0]
            m.root.inputs[1] = graph.add_constant((w * s[None, :]).astype(np.float32), f"{m.root.name}_w_smooth")
        stats.matches["smooth_activation"] = stats.matches.get("smooth_activation", 0) + 1
        stats.details[mul.name] = {"alpha": alpha, "s_range": (float(s.min()), float(s.max()))}


def quantize_transformer(graph: Graph, ctx: PassContext, w_bits: int = 8, a_bits: int = 8) -> RuleStats:
    """linear -> int8_linear, matmul inputs -> quantize_uniform (see module docstring)."""
    opts = ctx.options
    w_bits, a_bits = int(opts.get("w_bits", w_bits)), int(opts.get("a_bits", a_bits))
    act_method, weight_method = opts.get("act_method", "mse"), opts.get("weight_method", "mse")
    producers, users = graph.producers(), graph.users()
    stats = RuleStats()
    linears: list = []  # (match, weight_only)
    for node in graph.nodes:
        if node.op != "linear":
            continue
        m = match(LINEAR, node, producers)
        reason = candidate_reason(m, graph, users, opts) if m is not None else "not linear(x, W, b)"
        if reason is None and on_weight_grid(m.array("weight"), w_bits):
            reason = f"weight %{m['weight'].name} already lies on a {w_bits}-bit per-channel grid"
        if reason:
            stats.refusals.append(Refusal("linear_to_int8", node.name, reason))
        else:
            linears.append((m, produced_by_quantizer(m["x"], producers)))
    convs = conv_candidates(graph, producers, users, opts, w_bits, stats) if opts.get("quantize_convs", True) else []
    matmul_inputs: dict[Value, list[Node]] = {}
    if opts.get("quantize_matmuls", True):
        for node in graph.nodes:
            if node.op != "matmul":
                continue
            for v in node.input_values():
                if not v.is_constant and v.dtype == "float32" and not produced_by_quantizer(v, producers):
                    matmul_inputs.setdefault(v, []).append(node)
    if not linears and not matmul_inputs and not convs:
        return stats
    granularity = opts.get("act_granularity") or default_act_granularity(a_bits)
    if granularity not in GRANULARITIES:
        raise PassError(f"quantize: act_granularity {granularity!r} must be 'tensor' or 'row'")
    calibration = require_calibration(ctx.calibration, f"w{w_bits}a{a_bits} quantization")
    if opts.get("smooth_alpha") is not None:
        smooth_activations(graph, calibration, [m for m, weight_only in linears if not weight_only], opts, stats)
    rounding = opts.get("weight_rounding") or default_weight_rounding(w_bits)
    if rounding not in ROUNDINGS:
        raise PassError(f"quantize: weight_rounding {rounding!r} must be 'nearest' or 'gptq'")
    static = [m.root.inputs[0] for m, weight_only in linears if not weight_only and granularity == "tensor"]
    hessian_inputs = [m.root.inputs[0] for m, _ in linears] if rounding == "gptq" else []
    watched = list(dict.fromkeys(static + list(matmul_inputs) + hessian_inputs + [m["x"] for m in convs]))
    observers = observe(
        graph, calibration, watched, keep_tensors={v.name for v in hessian_inputs}, max_batches_kept=len(calibration)
    )

    def weight_codes(w: np.ndarray, x: Value, static_input: bool) -> tuple[np.ndarray, np.ndarray, str]:
        """``(codes, scales, rounding used)``; GPTQ falls back to nearest without enough calibration rows."""
        if rounding == "nearest":
            return *quantize_weight(w, w_bits, weight_method), "nearest"
        rows = [t.reshape(-1, w.shape[1]) for t in observers[x.name].tensors]
        n_rows = sum(len(r) for r in rows)
        if n_rows < GPTQ_ROWS_PER_INPUT * w.shape[1]:
            why = f"nearest ({n_rows} calibration rows < {GPTQ_ROWS_PER_INPUT} x {w.shape[1]} inputs for gptq)"
            return *quantize_weight(w, w_bits, weight_method), why
        scales = weight_scales(w, w_bits, weight_method)
        x_rows = np.concatenate(rows)
        if static_input:  # the kernel sees Q(x): GPTQ's objective (Eq. 1) on the inputs it will really get
            x_rows = fake_quant(x_rows, *act_params(x), 0, 2**a_bits - 1)
        return gptq_codes(w, scales, input_hessian(x_rows), w_bits), scales.astype(np.float32), "gptq"

    def act_params(v: Value) -> tuple[float, int]:
        lo, hi = activation_range(observers[v.name], a_bits, act_method)
        return uniform_params(lo, hi, a_bits)

    for m, weight_only in linears:
        w = m.root.inputs[1].data  # the smoothed weight when smooth_alpha is set
        codes, scales, used = weight_codes(w, m.root.inputs[0], not weight_only and granularity == "tensor")
        w_hat = codes.astype(np.float32) * scales[:, None]
        details = {"w_bits": w_bits, "weight_rounding": used, "weight_error": relative_error(w_hat, w)}
        name = m.root.name
        if weight_only:
            m.root.inputs[1] = graph.add_constant(w_hat, f"{name}_wq{w_bits}")
            details["activation"] = "quantized upstream"
            stats.matches["fake_quant_weights"] = stats.matches.get("fake_quant_weights", 0) + 1
        else:
            x = m.root.inputs[0]  # m["x"], or its smoothed replacement
            x_scale, x_zp = act_params(x) if granularity == "tensor" else (1.0, 0)
            inputs = [x, graph.add_constant(codes, f"{name}_wq"), graph.add_constant(scales, f"{name}_wscale")]
            replace_node(
                graph,
                m.root,
                "int8_linear",
                inputs + [m.root.inputs[2] if len(m.root.inputs) > 2 else None],
                {"x_scale": x_scale, "x_zero_point": x_zp, "x_bits": a_bits, "x_granularity": granularity},
            )
            details.update(a_bits=a_bits, x_granularity=granularity)
            if granularity == "tensor":
                details.update(x_scale=x_scale, x_zero_point=x_zp)
            stats.matches["linear_to_int8"] = stats.matches.get("linear_to_int8", 0) + 1
        stats.details[name] = details
    for m in convs:
        w = m.array("weight")
        name, a = m.root.name, m.root.attrs
        codes, scales, diag, w_err = conv_weight_codes(w, a["groups"], w_bits, weight_method)
        x_scale, x_zp = act_params(m["x"])
        inputs = [m["x"], graph.add_constant(codes, f"{name}_wq"), graph.add_constant(scales, f"{name}_wscale")]
        inputs.append(m.get("bias"))
        inputs.append(None if diag is None else graph.add_constant(diag, f"{name}_wdiag"))
        attrs = {k: a[k] for k in ("stride", "padding", "dilation", "groups")}
        attrs.update(x_scale=x_scale, x_zero_point=x_zp, x_bits=a_bits)
        replace_node(graph, m.root, "int8_conv2d", inputs, attrs)
        stats.matches["conv_to_int8"] = stats.matches.get("conv_to_int8", 0) + 1
        stats.details[name] = {
            "w_bits": w_bits,
            "weight_rounding": "nearest",
            "weight_error": w_err,
            "identity_codes": diag is not None,
            "a_bits": a_bits,
            "x_scale": x_scale,
            "x_zero_point": x_zp,
        }
    for v, readers in matmul_inputs.items():
        scale, zp = act_params(v)
        attrs = {"scale": (scale,), "zero_point": (float(zp),), "bits": a_bits}
        insert_quantizer(graph, v, readers, "quantize_uniform", attrs, f"{v.name}_q")
        stats.matches["quantize_matmul_input"] = stats.matches.get("quantize_matmul_input", 0) + 1
        stats.details[f"{v.name}_q"] = {"a_bits": a_bits, "scale": scale, "zero_point": zp}
    graph.remove_unused()
    return stats


def conv_candidates(graph: Graph, producers, users, opts: dict, w_bits: int, stats: RuleStats) -> list:
    """The ``conv2d`` nodes ``int8_conv2d`` takes (dense or depthwise, constant float weight and bias);
    a refusal with its reason for every other one."""
    found = []
    for node in graph.nodes:
        if node.op != "conv2d":
            continue
        m = match(CONV, node, producers)
        reason = candidate_reason(m, graph, users, opts) if m is not None else "not conv2d(x, W, b)"
        groups = node.attrs["groups"]
        if reason is None and groups != 1 and not _depthwise(m.array("weight"), groups):
            reason = (
                f"groups={groups}: the int8 conv kernels are dense (groups=1) or depthwise (groups = in = out "
                "channels); other grouped convs stay float"
            )
        if reason is None and m.get("bias") is not None and not m["bias"].is_constant:
            reason = f"bias %{m['bias'].name} is computed at run time"
        if reason is None and produced_by_quantizer(m["x"], producers):
            reason = f"input %{m['x'].name} is already quantized by {producers[m['x']].op}"
        if reason is None and on_weight_grid(m.array("weight").reshape(len(m.array("weight")), -1), w_bits):
            reason = f"weight %{m['weight'].name} already lies on a {w_bits}-bit per-channel grid"
        if reason:
            stats.refusals.append(Refusal("conv_to_int8", node.name, reason))
        else:
            found.append(m)
    return found


def conv_weight_codes(
    w: np.ndarray, groups: int, w_bits: int, method: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """``(codes, scales, diag, weight error)`` of a conv filter, per output channel.

    A re-parameterized block (RepVGG, Ding et al. 2021, Eq. 3-4; MobileOne) adds its identity branch
    to the centre tap of ``W[o, o]``; that tap is then often many times the others, and a per-channel
    grid set by it rounds the rest coarsely (the known PTQ collapse of fused RepVGG: Chu et al., "Make
    RepVGG Greater Again", 2022). When ``C = O`` (``groups = 1``, odd kernel), the grid is also fitted
    to the filter without those taps, the taps going to ``int8_conv2d``'s int32 ``w_diag`` codes on the
    same grid; that form is kept when it at least halves the relative weight error."""
    out, c, kh, kw = w.shape
    codes, scales = quantize_weight(w.reshape(out, -1), w_bits, method)
    codes = codes.reshape(w.shape)
    err = relative_error(codes.astype(np.float32) * scales[:, None, None, None], w)
    if groups != 1 or out != c or kh % 2 == 0 or kw % 2 == 0:
        return codes, scales, None, err
    idx, ci, cj = np.arange(out), kh // 2, kw // 2
    rest = w.copy()
    rest[idx, idx, ci, cj] = 0
    rest_codes, rest_scales = quantize_weight(rest.reshape(out, -1), w_bits, method)
    rest_codes = rest_codes.reshape(w.shape)
    diag = np.rint(w[idx, idx, ci, cj] / rest_scales)
    if np.abs(diag).max() > DIAG_LIMIT:
        return codes, scales, None, err
    w_hat = rest_codes.astype(np.float32) * rest_scales[:, None, None, None]
    w_hat[idx, idx, ci, cj] += (diag * rest_scales).astype(np.float32)
    diag_err = relative_error(w_hat, w)
    if diag_err > err / 2:
        return codes, scales, None, err
    return rest_codes, rest_scales, diag.astype(np.int32), diag_err


def _depthwise(weight: np.ndarray, groups: int) -> bool:
    return weight.shape[1] == 1 and weight.shape[0] == groups


def quantizer_table(graph: Graph, report, batch: dict[str, np.ndarray]) -> str:
    """A markdown table of every quantizer in ``graph``: kind, bits, scale, the pass report's error
    (weight or searched output error) and the error measured on ``batch`` (quantizer output vs its
    float input; for ``int8_linear``, vs the float linear with the same dequantized weight)."""
    from reshift.ir.interpret import interpret

    nodes = [n for n in graph.nodes if n.op in QUANTIZER_OPS + ("int8_linear", "log2_matmul")]
    if not nodes:
        return ""
    env = interpret(graph, batch, return_all=True)
    details = getattr(report, "details", {}) or {}
    rows = ["| node | kind | bits | scale | report error | measured rel. error |", "|---|---|---|---|---|---|"]
    for n in nodes:
        a, x = n.attrs, env[n.inputs[0].name]
        y = env[n.outputs[0].name]
        if n.op == "int8_linear":
            w = n.inputs[1].data.astype(np.float32) * n.inputs[2].data[:, None]
            ref = x @ w.T + (n.inputs[3].data if len(n.inputs) > 3 and n.inputs[3] is not None else 0)
            row = a.get("x_granularity", "tensor") == "row"
            kind, bits = "int8_linear (A per row, dynamic)" if row else "int8_linear (A per tensor)", a["x_bits"]
            scale = "run time" if row else f"{a['x_scale']:.4g} (z={a['x_zero_point']})"
        elif n.op == "log2_matmul":  # vs the float attention product it replaces
            ref = x @ env[n.inputs[1].name]
            floor = a.get("floor_exponent", -1)
            floor_note = f", levels below 2^-{floor} dropped" if floor >= 0 else ""
            kind = f"log2_matmul (P {a['base_kind']} codes x V int{a['v_bits']}, shift-add{floor_note})"
            bits, scale = a["bits"], f"{a['scale']:.4g} / V {a['v_scale']:.4g}"
        elif n.op == "log2_quant":
            ref, kind, bits = x, f"log2_quant ({a['base_kind']}, base {a['base']:.4g})", a["bits"]
            scale = f"{a['scale']:.4g}"
        else:
            ref, kind, bits = x, "quantize_uniform", a["bits"]
            scale = ", ".join(f"{v:.4g}" for v in a["scale"][:4]) + (" ..." if len(a["scale"]) > 4 else "")
        d = details.get(n.name, {})
        reported = d.get("weight_error", d.get("output_error"))
        rep = "-" if reported is None else f"{reported:.3g}" + (" (weights)" if "weight_error" in d else " (output)")
        finite = np.isfinite(ref) & np.isfinite(y)
        err = relative_error(y[finite].astype(np.float64), np.asarray(ref)[finite].astype(np.float64))
        rows.append(f"| {n.name} | {kind} | {bits} | {scale} | {rep} | {err:.3g} |")
    return "\n".join(rows)


def quantize_pass(w_bits: int, a_bits: int) -> Pass:
    name = f"quantize_w{w_bits}a{a_bits}"
    return Pass(
        name,
        lambda graph, ctx: quantize_transformer(graph, ctx, w_bits, a_bits),
        exact=False,
        doc=f"linear -> int8_linear, conv2d -> int8_conv2d (W{w_bits} per channel, A{a_bits} per "
        f"{'row, dynamic' if default_act_granularity(a_bits) == 'row' else 'tensor'}), matmul inputs fake-quantized",
        options=frozenset(
            {"w_bits", "a_bits", "act_method", "weight_method", "weight_rounding", "act_granularity", "smooth_alpha"}
            | {"quantize_convs", "quantize_matmuls", "skip"}
        ),
    )


BIT_WIDTHS = (8, 6, 4)
QUANTIZE_PASSES = [quantize_pass(b, b) for b in BIT_WIDTHS]

__all__ = [
    "BIT_WIDTHS",
    "GRANULARITIES",
    "QUANTIZER_OPS",
    "QUANTIZE_PASSES",
    "insert_quantizer",
    "produced_by_quantizer",
    "quantize_pass",
    "default_act_granularity",
    "quantize_transformer",
    "quantizer_table",
    "replace_node",
    "smooth_activations",
]
