"""Power-of-two weights: ``linear`` -> ``shift_linear`` and ``conv2d`` -> ``shift_conv2d`` (DeepShift-PS,
Elhoushi et al. 2021, Eq. 4; ShiftAddViT's shift layers).

``W[o,i] ~ scale[o] * sign[o,i] * 2^-p[o,i]`` with ``scale[o] = max_i |W[o,i]|`` and
``p = clamp(rint(-log2(|W| / scale)), 0, 2^b - 1)``: rounding in the log domain, so the level
boundary between ``2^-p`` and ``2^-(p+1)`` is their geometric mean ``2^-(p+1/2)``; ties (exact
half exponents) go to the even ``p``. A weight below half the smallest level,
``|W| < scale * 2^-(2^b - 1) / 2``, becomes 0 (sign 0). ``b`` = option ``shift_bits``.

Option ``shift_levels`` = ``L`` uses only the ``L`` largest levels ``2^0 .. 2^-(L-1)``: ``p`` is
clamped to ``L - 1`` and the zero threshold is half of ``2^-(L-1)``. With ``L <= 7`` every
channel's weights are int8 multiples of its smallest level (at most ``2^6 = 64`` of them), so the
layer runs on the int8 dot-product kernel (``codegen/tvm/kernels/shift_int8.py``: 4 multiply-adds
per 32-bit lane on VNNI, twice the int16 kernel's). The default, ``shift_bits=3, shift_levels=7``
(1 sign + 3 exponent bits = 4 bits per weight, the exponent 7 unused), is that form, and 3 exponent
bits keep the int32 accumulator bound far from any layer's (``K`` up to 132104). Other ``shift_bits``
default to all ``2^b`` levels (4: the int16 kernel, 5 bits per weight). On MiniLM's real weights
(``benchmarks/lowbit_accuracy.py``) the default and 4 exponent bits give the same embedding cosine to
0.001: the levels below ``2^-6`` hold only weights under ``2^-6.5`` (1.1%) of their channel's maximum.

A conv's OIHW filter is quantized as the matrix ``[O, C/groups * kh * kw]`` (one scale per output
channel), the layout ``shift_conv2d`` contracts its im2col rows with; groups, stride, dilation and
padding carry over unchanged. Depthwise convs (one input channel per group) stay float32 unless
option ``shift_depthwise`` is true: their im2col rows have ``K = kh * kw`` (9) elements, each with
its own int8 scale, so the activation coding costs more than the 9 multiply-adds per output it
replaces (MobileOne-S0 on this repo's CPU kernels: 12.7 ms in 7 depthwise shift convs against
1.1 ms in float32, ``benchmarks/profile_ops.py``), and their weights are a small part of a model's.

Layers are chosen as for every weight quantizer (:func:`reshift.passes.quant_common.candidate_reason`:
constant, untied float32 weights; first and last weight layer kept by default, ``skip`` patterns). A
layer is refused when its int32 accumulator could overflow (see
:func:`reshift.ir.ops_lowbit.shift_accumulator_bound`; for a conv ``K = C/groups * kh * kw``): split
the layer or lower ``shift_bits``. The pass is lossy; its report gives each layer's relative error:
on calibration data the output error ``||X (W - W_hat)^T|| / ||X W^T||`` of the layer's float inputs
(a conv's: on its whole calibration images, i.e. on its im2col rows), else the weight-space error.
Neither counts the run-time int8 activation quantization, which the report's end-to-end error does.
"""

from __future__ import annotations

import functools

import numpy as np

from reshift.errors import PassError
from reshift.ir.graph import Graph, Value
from reshift.ir.ops_lowbit import INT32_MAX, shift_accumulator_bound
from reshift.passes.manager import Pass, PassContext
from reshift.passes.pattern import Match
from reshift.passes.quant_common import (
    CONV,
    LAYER_OPTIONS,
    LINEAR,
    LayerPlan,
    apply_plans,
    merge_stats,
    plan_layers,
    relative_conv_error,
    relative_output_error,
)
from reshift.passes.rules import RuleStats

DEFAULT_SHIFT_BITS = 3
DEFAULT_SHIFT_LEVELS = 7  # at DEFAULT_SHIFT_BITS: the int8 kernels' codes (module docstring)
DEPTHWISE_KEPT = (
    "depthwise conv kept float32 (its per-window int8 codes cost more than its multiplies; shift_depthwise=True)"
)


SHIFT_OPTIONS = frozenset({"shift_bits", "shift_levels"})  # read by shift_options


def shift_options(options: dict) -> tuple[int, int]:
    """``(shift_bits, shift_levels)`` from a pass's options, checked (see :func:`default_levels`)."""
    bits = int(options.get("shift_bits", DEFAULT_SHIFT_BITS))
    if not 1 <= bits <= 5:
        raise PassError(f"shift_bits={bits} must be in 1..5")
    levels = int(options.get("shift_levels") or default_levels(bits))
    if not 1 <= levels <= 2**bits:
        raise PassError(f"shift_levels={levels} must be in 1..{2**bits} (2^shift_bits)")
    return bits, levels


def default_levels(bits: int) -> int:
    """``shift_levels`` unless given: 7 at the default 3 bits (the int8 kernels' codes), else all ``2^bits``."""
    return DEFAULT_SHIFT_LEVELS if bits == DEFAULT_SHIFT_BITS else 2**bits


def quantize_shift(
    w: np.ndarray, exponent_bits: int = DEFAULT_SHIFT_BITS, levels: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sign int8 [O,K], exponent uint8 [O,K], scale float32 [O])`` per the module docstring; ``levels``:
    option ``shift_levels`` (the exponents stay below it; None: :func:`default_levels`)."""
    e_max = (levels or default_levels(exponent_bits)) - 1
    w = np.asarray(w, dtype=np.float64)
    scale = np.max(np.abs(w), axis=1) if w.shape[1] else np.zeros(w.shape[0])
    safe = np.where(scale > 0, scale, 1.0)
    ratio = np.abs(w) / safe[:, None]
    with np.errstate(divide="ignore"):
        p = np.rint(-np.log2(ratio))
    exponent = np.clip(np.nan_to_num(p, posinf=e_max), 0, e_max).astype(np.uint8)
    sign = np.sign(w).astype(np.int8)
    sign[ratio < 2.0 ** -(e_max + 1)] = 0
    exponent[sign == 0] = 0
    return sign, exponent, scale.astype(np.float32)


def shift_weight(sign: np.ndarray, exponent: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float weight the shift parameters stand for (the activation-quantization-free view)."""
    return scale[:, None].astype(np.float64) * sign * 2.0 ** -exponent.astype(np.float64)


def _overflow_reason(sign: np.ndarray, exponent: np.ndarray, bits: int, k: str) -> str | None:
    bound = int(shift_accumulator_bound(sign, exponent, bits).max()) if sign.size else 0
    if bound <= INT32_MAX:
        return None
    return (
        f"{k} with shift_bits={bits} can reach |acc| = {bound:,} > 2^31-1 in the int32 "
        "accumulator; lower shift_bits or split the layer"
    )


def _build(op: str, sign, exponent, scale, bits: int, copied_attrs: tuple[str, ...], m: Match, rc) -> Value:
    """The ``shift_linear`` / ``shift_conv2d`` replacing ``m.root``, with the window attributes copied."""
    name = m.root.name
    return rc.op(
        op,
        m["x"],
        rc.constant(sign, f"{name}_sign"),
        rc.constant(exponent, f"{name}_exponent"),
        rc.constant(scale, f"{name}_scale"),
        m.get("bias"),
        exponent_bits=bits,
        **{key: m.root.attrs[key] for key in copied_attrs},
    )


def _plan(candidates: list[Match], xs: dict[str, np.ndarray], options: dict) -> dict[str, LayerPlan]:
    bits, levels = shift_options(options)
    plans = {}
    for m in candidates:
        w = m.array("weight")
        sign, exponent, scale = quantize_shift(w, bits, levels)
        reason = _overflow_reason(sign, exponent, bits, f"K={w.shape[1]}")
        if reason:
            plans[m.root.name] = LayerPlan(reason=reason)
            continue
        error = relative_output_error(w, shift_weight(sign, exponent, scale), xs.get(m["x"].name))
        details = {"bits": 1 + bits, "error": error, "error_kind": "output" if m["x"].name in xs else "weight"}

        build = functools.partial(_build, "shift_linear", sign, exponent, scale, bits, ())
        plans[m.root.name] = LayerPlan(build=build, details=details)
    return plans


def _plan_conv(candidates: list[Match], xs: dict[str, np.ndarray], options: dict) -> dict[str, LayerPlan]:
    bits, levels = shift_options(options)
    plans = {}
    for m in candidates:
        w = m.array("weight")  # [O, C/groups, kh, kw]
        o, cg, kh, kw = w.shape
        if cg == 1 and m.root.attrs["groups"] > 1 and not options.get("shift_depthwise", False):
            plans[m.root.name] = LayerPlan(reason=DEPTHWISE_KEPT)
            continue
        sign, exponent, scale = quantize_shift(w.reshape(o, -1), bits, levels)
        reason = _overflow_reason(sign, exponent, bits, f"K = C/groups*kh*kw = {cg}*{kh}*{kw} = {cg * kh * kw}")
        if reason:
            plans[m.root.name] = LayerPlan(reason=reason)
            continue
        w_hat = shift_weight(sign, exponent, scale).reshape(w.shape)
        error = relative_conv_error(w, w_hat, xs.get(m["x"].name), m.root.attrs)
        sign, exponent = sign.reshape(w.shape), exponent.reshape(w.shape)  # OIHW, as the filter
        details = {"bits": 1 + bits, "error": error, "error_kind": "output" if m["x"].name in xs else "weight"}

        window = ("stride", "padding", "dilation", "groups")
        build = functools.partial(_build, "shift_conv2d", sign, exponent, scale, bits, window)
        plans[m.root.name] = LayerPlan(build=build, details=details)
    return plans


def shift_weights(graph: Graph, ctx: PassContext) -> RuleStats:
    """Rewrite every eligible ``linear(x, W, b)`` into ``shift_linear`` and ``conv2d(x, W, b)`` into
    ``shift_conv2d``; both are planned on the float graph (independent calibration) before either rewrite."""
    linears = plan_layers(graph, ctx, LINEAR, _plan)
    convs = plan_layers(graph, ctx, CONV, _plan_conv)
    return merge_stats(
        apply_plans(graph, "linear_to_shift", LINEAR, *linears), apply_plans(graph, "conv_to_shift", CONV, *convs)
    )


SHIFT_PASSES = [
    Pass(
        "shift_weights",
        shift_weights,
        exact=False,
        doc="linear -> shift_linear, conv2d -> shift_conv2d, W = scale*sign*2^-p (DeepShift-PS)",
        options=SHIFT_OPTIONS | {"shift_depthwise"} | LAYER_OPTIONS,
    )
]

__all__ = [
    "DEFAULT_SHIFT_BITS",
    "DEFAULT_SHIFT_LEVELS",
    "SHIFT_PASSES",
    "default_levels",
    "quantize_shift",
    "shift_options",
    "shift_weight",
    "shift_weights",
]
