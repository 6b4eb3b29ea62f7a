"""Binary-coded and ternary weights: ``linear`` -> ``bcq_linear`` / ``ternary_linear``.

BCQ (ShiftAddLLM, You et al. 2024, Eq. 2): per group of ``G`` input columns,
``W[o, g] ~ sum_{i<q} alpha[o,g,i] * B_i[o, g]``, ``B_i`` in {-1,+1}. :func:`fit_bcq` fits it

* to the weights: greedy init (``alpha_i = mean|R|``, ``B_i = sign(R)`` of the residual ``R``),
  then alternating least squares: alphas by least squares given the codes, codes by exhaustive
  search over the ``2^q`` sign combinations per weight given the alphas. Each step cannot raise
  ``||W - W_hat||``, so the error history is non-increasing.
* to the layer's output on calibration activations ``X`` (ShiftAddLLM Sec. 3.1): columns are
  quantized GPTQ-style (Frantar et al. 2023, Alg. 1) in act-order (descending ``H[k,k]``, Sec. 4),
  ``H = X^T X + lambda I`` (``lambda = damp * mean diag``), each group's alphas fitted (ALS) to
  its error-compensated columns when its first column comes up, each column's rounding error
  ``(w - w_q) / U[k,k]`` propagated to the later columns through the upper Cholesky factor ``U``
  of ``H^-1`` (lazy batch updates per 128 columns); then the alphas are refitted by least squares
  to the output, ``min_alpha ||X W^T - X W_hat^T||`` (the codes stay). ``rounds > 1`` alternates
  GPTQ codes with those alphas fixed and the refit, keeping the best round.

Calibration is sequential by default (option ``sequential``, GPTQ's procedure): layers are fitted
in graph order, each on the activations ``X~`` the graph produces with the earlier layers already in
their BCQ form (:func:`~reshift.passes.quant_common.quantize_linears`). With ``asymmetric`` (on by
default) the target is the float model's output ``X W^T`` rather than ``X~ W^T`` (GPTAQ, Li et al.
2025): GPTQ and the refit run on ``H = X~^T X~`` against ``V = W + W (X - X~)^T X~ H^-1``
(:func:`~reshift.passes.quant_common.compensated_target`), so each layer also undoes part of its
predecessors' error. (On MiniLM plain sequential calibration changes nothing; the asymmetric target
is what gains.) Under a ``bits`` budget the allocation compares every layer's error at once, so
calibration there stays independent.

The numerics live in :mod:`~reshift.passes.bcq_fit`, vectorized over rows and groups (a calibrated
4096x4096 layer in seconds on 2 cores, ``benchmarks/bcq_speed.py``); the Hessian of an input is
factored once and shared by the layers that read it (q/k/v, gate/up) and by every ``q`` tried. The
report lists per layer ``bits``, ``error``, ``bytes`` (as stored) against ``float_bytes`` and the
fit's ``seconds``; option ``progress`` draws a bar per layer (by default only on a terminal).

Bit allocation (ShiftAddLLM Sec. 3.2) chooses ``q`` per layer from its measured output error
under an average-bits budget (:func:`allocate_bits`). Ternary (BitNet b1.58, Ma et al. 2024):
``scale = mean|W_g|``, ``T = rint(clip(W / scale, -1, 1))``, then alternating least-squares scale
refits (optional); with calibration data the same GPTQ fit over the codebook ``{-s, 0, s}``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from reshift.ir.graph import Graph
from reshift.ir.limits import ENV_VAR, max_tensor_bytes
from reshift.ir.ops_lowbit import pack_signs, pack_trits, unpack_signs
from reshift.passes.bcq_fit import (
    HessianFactor,
    as_factor,
    combos,
    compensated_target,
    fit_weight_only,
    gptq_codes,
    grouped,
    output_error,
    planes,
    refit_scales,
)
from reshift.passes.bcq_progress import LayerProgress
from reshift.passes.manager import Pass, PassContext
from reshift.passes.pattern import Match
from reshift.passes.quant_common import LAYER_OPTIONS, LayerPlan, quantize_linears, relative_output_error
from reshift.passes.rules import RuleStats

DEFAULT_GROUP_SIZE = 128
DEFAULT_Q = 3
DEFAULT_GPTQ_ROUNDS = 1
BIT_CHOICES = (2, 3, 4)


@dataclass
class BCQFit:
    """Codes ``B`` int8 [q, O, K] in {-1,+1}, ``alpha`` float64 [O, groups, q], error history."""

    codes: np.ndarray
    alpha: np.ndarray
    history: list[float]

    def weight(self, group_size: int) -> np.ndarray:
        k = self.codes.shape[2]
        out = np.zeros(self.codes.shape[1:])
        for i, plane in enumerate(self.codes):
            out += np.repeat(self.alpha[:, :, i], group_size, axis=1)[:, :k] * plane
        return out


def _fit_weight_only(w: np.ndarray, q: int, group_size: int, iters: int) -> BCQFit:
    fit = fit_weight_only(w, q, group_size, iters)
    codes = planes(fit.idx.reshape(w.shape[0], -1)[:, : w.shape[1]], combos(q))
    return BCQFit(codes, fit.alpha, fit.history)


def hessian_factor(x: np.ndarray, damp: float = 0.01, act_order: bool = True) -> HessianFactor:
    """``H = X^T X + lambda I`` (as :func:`~reshift.passes.quant_common.hessian`) with the act-order
    permutation (columns by descending ``H[k,k]``, GPTQ's "act-order", Frantar et al. 2023 Sec. 4:
    the columns carrying the most input energy go first, the later ones absorb their error), the
    dead-input mask and the factors GPTQ and the refit need (:class:`HessianFactor`). Compute it once
    per input and share it between the layers reading that input."""
    return HessianFactor.of(x, damp, act_order)


_hessian_factor = hessian_factor  # the former private name


def _fit_output_aware(
    w: np.ndarray,
    group_size: int,
    factor: HessianFactor,
    table: np.ndarray,
    init: Callable[[np.ndarray], np.ndarray],
    rounds: int,
    progress: Callable[[float], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ codes (:func:`~reshift.passes.bcq_fit.gptq_codes`), then the scales refitted to the output,
    ``min_alpha ||X W^T - X W_hat^T||`` (:func:`~reshift.passes.bcq_fit.refit_scales`), since
    compensation moved the weights away from the alphas fitted at each group's start. ``rounds > 1``
    alternates: GPTQ codes again with those alphas fixed, refit again; the round with the lowest
    output error is kept."""
    w = np.where(factor.dead, 0.0, w)  # no output depends on a dead input: GPTQ zeroes those weights
    best = None
    alpha = None
    rounds = max(1, rounds)
    for r in range(rounds):
        tick = None if progress is None else (lambda f, r=r: progress((r + f) / rounds))
        idx, _ = gptq_codes(w, factor, group_size, table, init, alpha, progress=tick)
        codes = planes(idx, table)
        alpha = refit_scales(w, codes, group_size, factor)
        if rounds == 1:
            return codes, alpha
        error = output_error(w, BCQFit(codes, alpha, []).weight(group_size), factor)
        if best is None or error < best[0]:
            best = (error, codes, alpha)
    return best[1], best[2]


def fit_bcq(
    w: np.ndarray,
    q: int = DEFAULT_Q,
    group_size: int = DEFAULT_GROUP_SIZE,
    x: np.ndarray | None = None,
    iters: int = 10,
    damp: float = 0.01,
    factor: HessianFactor | None = None,
    act_order: bool = True,
    rounds: int = DEFAULT_GPTQ_ROUNDS,
    x_float: np.ndarray | None = None,
    progress: Callable[[float], None] | None = None,
) -> BCQFit:
    """Fit ``q`` binary planes with group-wise alphas to ``w`` [O, K]; to the output ``x @ w^T``
    when calibration rows ``x`` [M, K] are given (see module docstring), or to the float model's
    output ``x_float @ w^T`` from the actual inputs ``x`` (:func:`compensated_target`). ``factor``
    (:func:`hessian_factor` of ``x``) reuses the Hessian across calls: layers reading one input,
    and bit allocation, which fits each layer several times. ``progress(fraction)`` hears how far the fit is."""
    if not 1 <= q <= 4:
        raise ValueError(f"fit_bcq: q={q} bit planes; supported 1..4 (exhaustive code search is 2^q)")
    w = np.asarray(w, dtype=np.float64)
    if x is None:
        fit = _fit_weight_only(w, q, group_size, iters)
        if progress is not None:
            progress(1.0)
        return fit
    factor = as_factor(factor, x, damp, act_order)
    if x_float is not None:
        w = compensated_target(w, x, x_float, factor)
    codes, alpha = _fit_output_aware(
        w,
        group_size,
        factor,
        combos(q),
        lambda block: fit_weight_only(block, q, block.shape[1], iters).alpha[:, 0],
        rounds,
        progress,
    )
    return BCQFit(codes, alpha, [])


def _fit_ternary_weight_only(w: np.ndarray, group_size: int, refit: bool, iters: int) -> tuple[np.ndarray, np.ndarray]:
    wg, mask = grouped(w, group_size)
    scale = np.abs(wg * mask).sum(-1) / mask.sum(-1)
    for step in range(1 + (iters if refit else 0)):
        safe = np.where(scale > 0, scale, 1.0)
        t = np.rint(np.clip(wg / safe[..., None], -1, 1)) * mask
        if step == iters or not refit:
            break
        tt = (t * t).sum(-1)
        scale = np.where(tt > 0, (t * wg).sum(-1) / np.where(tt > 0, tt, 1.0), scale)
    return t.reshape(w.shape[0], -1)[:, : w.shape[1]].astype(np.int8), scale


def fit_ternary(
    w: np.ndarray,
    group_size: int = DEFAULT_GROUP_SIZE,
    refit: bool = True,
    x: np.ndarray | None = None,
    iters: int = 5,
    damp: float = 0.01,
    act_order: bool = True,
    rounds: int = DEFAULT_GPTQ_ROUNDS,
    x_float: np.ndarray | None = None,
    factor: HessianFactor | None = None,
    progress: Callable[[float], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(T int8 [O,K] in {-1,0,1}, scale float64 [O, groups])``: BitNet b1.58 absmean, then
    alternating LS refits of the scale (``refit``). With calibration rows ``x`` the codes come from
    the same GPTQ column-by-column compensation as BCQ over the codebook ``{-s, 0, s}`` (each
    group's ``s`` from the weight-only fit of its compensated columns), then the output-aware scale
    refit. (Refitting the scales alone to the output, codes fixed, overfits small calibration sets.)
    ``x_float``, ``factor`` and ``progress`` as in :func:`fit_bcq`."""
    w = np.asarray(w, dtype=np.float64)
    if x is None:
        return _fit_ternary_weight_only(w, group_size, refit, iters)
    factor = as_factor(factor, x, damp, act_order)
    if x_float is not None:
        w = compensated_target(w, x, x_float, factor)
    codes, scale = _fit_output_aware(
        w,
        group_size,
        factor,
        np.array([[-1.0], [0.0], [1.0]]),
        lambda block: _fit_ternary_weight_only(block, block.shape[1], refit, iters)[1],
        rounds,
        progress,
    )
    return codes[0], scale[..., 0]


def ternary_dequant(codes: np.ndarray, scale: np.ndarray, group_size: int) -> np.ndarray:
    return np.repeat(scale, group_size, axis=1)[:, : codes.shape[1]] * codes


def bits_per_weight(q: int, group_size: int) -> float:
    """Storage per weight: ``q`` code bits plus ``q`` float16 alphas per group."""
    return q + 16.0 * q / group_size


@dataclass
class LayerSensitivity:
    """A layer's parameter count and its (squared, absolute) output error for each candidate ``q``."""

    name: str
    params: int
    errors: dict[int, float]


def allocate_bits(
    layers: list[LayerSensitivity], budget_bits: float, group_size: int = DEFAULT_GROUP_SIZE
) -> dict[str, int]:
    """``q`` per layer minimizing the summed error with parameter-weighted average bits <= budget.

    Greedy by marginal error reduction per added bit (every upgrade to any larger ``q`` is a
    candidate), starting from the smallest ``q`` everywhere. Raises if even that exceeds the budget.
    """
    total_params = sum(layer.params for layer in layers)
    choice = {layer.name: min(layer.errors) for layer in layers}
    used = sum(layer.params * bits_per_weight(choice[layer.name], group_size) for layer in layers)
    budget = budget_bits * total_params
    if used > budget + 1e-9:
        raise ValueError(
            f"bit budget {budget_bits} is below the smallest choice ({used / total_params:.3f} bits per weight)"
        )
    while True:
        best = None
        for layer in layers:
            q = choice[layer.name]
            for q2, err in layer.errors.items():
                extra = layer.params * (bits_per_weight(q2, group_size) - bits_per_weight(q, group_size))
                gain = layer.errors[q] - err
                if q2 > q and used + extra <= budget + 1e-9 and gain > 0:
                    ratio = gain / extra
                    if best is None or ratio > best[0]:
                        best = (ratio, layer.name, q2, extra)
        if best is None:
            return choice
        _, name, q2, extra = best
        choice[name] = q2
        used += extra


# -- passes ---------------------------------------------------------------------------------
def _float_inputs(options: dict, xs_float: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The float model's inputs to fit to (option ``asymmetric``, on by default), if captured."""
    return (xs_float or {}) if options.get("asymmetric", True) else {}


def _shared_factors(
    candidates: list[Match], xs: dict[str, np.ndarray], damp: float, act_order: bool
) -> Callable[[int], HessianFactor | None]:
    """The :class:`HessianFactor` of candidate ``i``'s input: computed when its first reader comes up,
    shared by every layer reading the same value (q/k/v, gate/up) and dropped after its last."""
    last = {m["x"].name: i for i, m in enumerate(candidates)}
    cache: dict[str, HessianFactor] = {}

    def factor(i: int) -> HessianFactor | None:
        name = candidates[i]["x"].name
        if xs.get(name) is None:
            return None
        found = cache.get(name) or hessian_factor(xs[name], damp, act_order)
        if last[name] == i:
            cache.pop(name, None)
        else:
            cache[name] = found
        return found

    return factor


def _within_hessian_limit(xs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The calibration inputs whose K x K float64 Hessian fits the tensor limit, and why the rest don't.

    A layer with too many inputs (VGG's 25088-input classifier: a 4.7 GiB Hessian) is fitted to
    its weights alone instead of running out of memory.
    """
    limit = max_tensor_bytes()
    kept, refused = {}, {}
    for name, x in xs.items():
        k = x.shape[-1]
        if k * k * 8 > limit:
            refused[name] = (
                f"off: the {k}x{k} Hessian would need {k * k * 8 / 2**30:.1f} GiB, over the tensor limit "
                f"{limit / 2**30:.1f} GiB ({ENV_VAR}); fitted to the weights alone"
            )
        else:
            kept[name] = x
    return kept, refused


def _plan_bcq(
    candidates: list[Match],
    xs: dict[str, np.ndarray],
    options: dict,
    xs_float: dict[str, np.ndarray] | None = None,
    progress: LayerProgress | None = None,
) -> dict[str, LayerPlan]:
    group_size = int(options.get("group_size", DEFAULT_GROUP_SIZE))
    iters = int(options.get("bcq_iters", 10))
    damp = float(options.get("damp", 0.01))
    act_order = bool(options.get("act_order", True))
    rounds = int(options.get("gptq_rounds", DEFAULT_GPTQ_ROUNDS))
    budget = options.get("bits")
    choices = (
        tuple(options.get("bit_choices", BIT_CHOICES))
        if budget is not None
        else (int(options.get("bcq_q", DEFAULT_Q)),)
    )
    calibration = "sequential" if _sequential(options) else "independent"
    xs_float = _float_inputs(options, xs_float)
    xs, too_wide = _within_hessian_limit(xs)
    xs_float = {name: x for name, x in xs_float.items() if name not in too_wide}
    progress = progress or LayerProgress(False)
    factor_of = _shared_factors(candidates, xs, damp, act_order)
    fits: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}  # packed codes and alphas per q
    seconds: dict[str, float] = {}
    sensitivity = []
    for i, m in enumerate(candidates):
        w, x = m.array("weight"), xs.get(m["x"].name)
        start = time.perf_counter()
        with progress.layer(m.root.name, len(choices)) as layer:
            factor = factor_of(i)
            x_float = xs_float.get(m["x"].name)
            errors, fits[m.root.name] = {}, {}
            for n, q in enumerate(choices):
                fit = fit_bcq(
                    w, q, group_size, x, iters, damp, factor, rounds=rounds, x_float=x_float, progress=layer.fit(n)
                )
                diff = w - fit.weight(group_size)
                errors[q] = float(np.sum((x @ diff.T) ** 2) if x is not None else np.sum(diff**2))
                fits[m.root.name][q] = (pack_signs(fit.codes), fit.alpha)  # q/8 bytes a weight until allocated
        seconds[m.root.name] = time.perf_counter() - start
        sensitivity.append(LayerSensitivity(m.root.name, w.size, errors))
    if budget is not None:
        chosen = allocate_bits(sensitivity, float(budget), group_size)
    else:
        chosen = {layer.name: choices[0] for layer in sensitivity}
    plans = {}
    for m in candidates:
        q = chosen[m.root.name]
        bits, alpha = fits.pop(m.root.name)[q]
        w, x = m.array("weight"), xs.get(m["x"].name)
        w_hat = BCQFit(unpack_signs(bits, w.shape[1]), alpha, []).weight(group_size)
        details = {
            "bits": q,
            "bits_per_weight": bits_per_weight(q, group_size),
            "error": relative_output_error(w, w_hat, x, xs_float.get(m["x"].name)),
            "error_kind": "output" if x is not None else "weight",
            "bytes": bits.nbytes + alpha.size * 4,  # as stored: packed sign planes, float32 alphas
            "float_bytes": w.nbytes,
            "seconds": round(seconds[m.root.name], 3),
        }
        if x is not None:
            details["calibration"] = calibration + (" asymmetric" if m["x"].name in xs_float else "")
        elif m["x"].name in too_wide:
            details["calibration"] = too_wide[m["x"].name]

        def build(m, rc, bits=bits, alpha=alpha, k=w.shape[1]):
            name = m.root.name
            return rc.op(
                "bcq_linear",
                m["x"],
                rc.constant(bits, f"{name}_bits"),
                rc.constant(alpha.astype(np.float32), f"{name}_alpha"),
                m.get("bias"),
                group_size=group_size,
                in_features=k,
            )

        plans[m.root.name] = LayerPlan(build=build, details=details, weight=w_hat.astype(np.float32))
    return plans


def _plan_ternary(
    candidates: list[Match],
    xs: dict[str, np.ndarray],
    options: dict,
    xs_float: dict[str, np.ndarray] | None = None,
    progress: LayerProgress | None = None,
) -> dict[str, LayerPlan]:
    group_size = int(options.get("group_size", DEFAULT_GROUP_SIZE))
    refit = bool(options.get("ternary_refit", True))
    damp = float(options.get("damp", 0.01))
    act_order = bool(options.get("act_order", True))
    rounds = int(options.get("gptq_rounds", DEFAULT_GPTQ_ROUNDS))
    xs_float = _float_inputs(options, xs_float)
    progress = progress or LayerProgress(False)
    factor_of = _shared_factors(candidates, xs, damp, act_order)
    plans = {}
    for i, m in enumerate(candidates):
        w, x, x_float = m.array("weight"), xs.get(m["x"].name), xs_float.get(m["x"].name)
        start = time.perf_counter()
        with progress.layer(m.root.name, 1) as layer:
            codes, scale = fit_ternary(
                w,
                group_size,
                refit,
                x,
                damp=damp,
                act_order=act_order,
                rounds=rounds,
                x_float=x_float,
                factor=factor_of(i),
                progress=layer.fit(0),
            )
        w_hat = ternary_dequant(codes, scale, group_size)
        trits = pack_trits(codes)
        details = {
            "bits": 2,
            "bits_per_weight": 2 + 16.0 / group_size,
            "error": relative_output_error(w, w_hat, x, x_float),
            "error_kind": "output" if x is not None else "weight",
            "bytes": trits.nbytes + scale.size * 4,
            "float_bytes": w.nbytes,
            "seconds": round(time.perf_counter() - start, 3),
        }

        def build(m, rc, trits=trits, scale=scale, k=w.shape[1]):
            name = m.root.name
            return rc.op(
                "ternary_linear",
                m["x"],
                rc.constant(trits, f"{name}_trits"),
                rc.constant(scale.astype(np.float32), f"{name}_scale"),
                m.get("bias"),
                group_size=group_size,
                in_features=k,
            )

        plans[m.root.name] = LayerPlan(build=build, details=details, weight=w_hat.astype(np.float32))
    return plans


def _sequential(options: dict) -> bool:
    """Sequential calibration unless switched off or a ``bits`` budget needs all layers at once."""
    return bool(options.get("sequential", True)) and options.get("bits") is None


def _with_progress(graph: Graph, ctx: PassContext, rule: str, plan: Callable[..., dict[str, LayerPlan]]) -> RuleStats:
    """:func:`quantize_linears` with a progress bar over the layers (option ``progress``: on, off, or
    by default only when stderr is a terminal)."""
    with LayerProgress.for_pass(graph, ctx, rule) as progress:
        return quantize_linears(
            graph, ctx, rule, functools.partial(plan, progress=progress), sequential=_sequential(ctx.options)
        )


def bcq_weights(graph: Graph, ctx: PassContext) -> RuleStats:
    """Rewrite every eligible ``linear`` into ``bcq_linear`` (per-layer bits under ``bits`` budget)."""
    return _with_progress(graph, ctx, "linear_to_bcq", _plan_bcq)


def ternary_weights(graph: Graph, ctx: PassContext) -> RuleStats:
    """Rewrite every eligible ``linear`` into ``ternary_linear``."""
    return _with_progress(graph, ctx, "linear_to_ternary", _plan_ternary)


# read by the GPTQ-style fits (_plan, _plan_ternary), _float_inputs, _sequential and the progress bars
_FIT_OPTIONS = frozenset(
    {"damp", "act_order", "gptq_rounds", "group_size", "asymmetric", "sequential", "bits", "progress"}
)
BCQ_PASSES = [
    Pass(
        "bcq_weights",
        bcq_weights,
        exact=False,
        doc="linear -> bcq_linear, W = sum alpha_i B_i (ShiftAddLLM)",
        options=_FIT_OPTIONS | {"bcq_iters", "bcq_q", "bit_choices"} | LAYER_OPTIONS,
    ),
    Pass(
        "ternary_weights",
        ternary_weights,
        exact=False,
        doc="linear -> ternary_linear (BitNet b1.58)",
        options=_FIT_OPTIONS | {"ternary_refit"} | LAYER_OPTIONS,
    ),
]

__all__ = [
    "BCQ_PASSES",
    "BCQFit",
    "HessianFactor",
    "LayerSensitivity",
    "allocate_bits",
    "bcq_weights",
    "bits_per_weight",
    "fit_bcq",
    "fit_ternary",
    "hessian_factor",
    "ternary_dequant",
    "ternary_weights",
]
