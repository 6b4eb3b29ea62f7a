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

Bit allocation (ShiftAddLLM Sec. 3.2) chooses ``q`` per layer from its measured output error
under an average-bits budget (:func:`allocate_bits`). Ternary (BitNet b1.58, Ma et al. 2024):
``scale = mean|W_g|``, ``T = rint(clip(W / scale, -1, 1))``, then alternating least-squares scale
refits (optional); with calibration data the same GPTQ fit over the codebook ``{-s, 0, s}``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from reshift.ir.graph import Graph
from reshift.ir.ops_lowbit import pack_signs, pack_trits
from reshift.passes.manager import Pass, PassContext
from reshift.passes.pattern import Match
from reshift.passes.quant_common import (
    LayerPlan,
    compensated_target,
    hessian,
    quantize_linears,
    refit_scales_output,
    relative_output_error,
)
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
        scales = np.repeat(self.alpha, group_size, axis=1)[:, : self.codes.shape[2], :]
        return np.einsum("okq,qok->ok", scales, self.codes.astype(np.float64))


def _combos(q: int) -> np.ndarray:
    """All ``2^q`` sign vectors, ``[2^q, q]``."""
    return np.array(list(itertools.product((-1.0, 1.0), repeat=q)))


def _grouped(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [O, K] as ``[O, groups, G]`` (zero padded) and the validity mask ``[groups, G]``."""
    out, k = w.shape
    ng = -(-k // group_size)
    padded = np.zeros((out, ng * group_size))
    padded[:, :k] = w
    mask = (np.arange(ng * group_size) < k).reshape(ng, group_size)
    return padded.reshape(out, ng, group_size), mask


def _ls_alpha(wg: np.ndarray, bg: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Least-squares alphas ``[O, groups, q]`` given codes ``bg`` [q, O, groups, G]."""
    bm = bg * mask
    gram = np.einsum("iogk,jogk->ogij", bm, bm)
    rhs = np.einsum("iogk,ogk->ogi", bm, wg)
    return (np.linalg.pinv(gram) @ rhs[..., None])[..., 0]


def _nearest_codes(wg: np.ndarray, alpha: np.ndarray, combos: np.ndarray, rows: int = 256) -> np.ndarray:
    """Per weight the sign combination whose value ``combo . alpha`` is nearest: ``[q, O, groups, G]``."""
    out = np.empty((combos.shape[1],) + wg.shape)
    for start in range(0, wg.shape[0], rows):
        values = alpha[start : start + rows] @ combos.T  # [o, groups, 2^q]
        best = np.argmin(np.abs(wg[start : start + rows, :, :, None] - values[:, :, None, :]), axis=-1)
        out[:, start : start + rows] = np.moveaxis(combos[best], -1, 0)
    return out


def _fit_weight_only(w: np.ndarray, q: int, group_size: int, iters: int) -> BCQFit:
    wg, mask = _grouped(w, group_size)
    combos = _combos(q)
    residual = wg * mask
    codes, alphas = [], []
    for _ in range(q):  # greedy init
        a = np.abs(residual).sum(-1) / mask.sum(-1)
        b = np.where(residual >= 0, 1.0, -1.0)
        residual = residual - a[..., None] * b * mask
        codes.append(b)
        alphas.append(a)
    bg, alpha = np.stack(codes), np.stack(alphas, axis=-1)
    history = [float(np.linalg.norm(residual))]
    for _ in range(iters):
        alpha = _ls_alpha(wg, bg, mask)
        bg = _nearest_codes(wg, alpha, combos)
        recon = np.einsum("ogi,iogk->ogk", alpha, bg)
        history.append(float(np.linalg.norm((wg - recon) * mask)))
        if history[-2] - history[-1] <= 1e-12 * max(history[0], 1e-30):
            break
    k = w.shape[1]
    return BCQFit(bg.reshape(q, w.shape[0], -1)[:, :, :k].astype(np.int8), alpha, history)


def _hessian_factor(x: np.ndarray, damp: float, act_order: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``H = X^T X + lambda I`` (:func:`hessian`) and the act-order permutation: columns by
    descending ``H[k,k]`` (GPTQ's "act-order", Frantar et al. 2023 Sec. 4), so the columns that
    carry the most input energy are quantized first and the later ones absorb their error. Also
    the dead-input mask (inputs that are zero on every calibration row)."""
    h = hessian(x, damp)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(len(h))
    return h, perm, np.all(x == 0, axis=0)


def _gptq_codes(
    w: np.ndarray,
    h: np.ndarray,
    perm: np.ndarray,
    group_size: int,
    combos: np.ndarray,
    init: Callable[[np.ndarray], np.ndarray],
    alpha: np.ndarray | None = None,
    block: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2023, Alg. 1) over a per-group codebook ``alpha[o, g] . combo``.

    Columns go in the order ``perm`` with ``U`` the upper Cholesky factor of ``H^-1`` (permuted);
    each column takes its nearest code and its error ``(w - w_q) / U[k,k]`` is propagated to the
    later columns, inside a block of ``block`` columns at once and to the rest lazily per block
    (Alg. 1's lazy batch update). A group's scales are fitted by ``init`` to its error-compensated
    columns when its first column comes up (ShiftAddLLM Sec. 3.1), unless ``alpha`` fixes them.
    Returns codes ``[q, O, K]`` in the original column order and ``alpha`` ``[O, groups, q]``.
    """
    out, k = w.shape
    u = np.linalg.cholesky(np.linalg.inv(h[np.ix_(perm, perm)])).T
    work = w[:, perm].astype(np.float64)
    inverse = np.empty(k, int)
    inverse[perm] = np.arange(k)
    ng, q = -(-k // group_size), combos.shape[1]
    ready = np.zeros(ng, bool) if alpha is None else np.ones(ng, bool)
    alpha = np.zeros((out, ng, q)) if alpha is None else alpha.copy()
    codes = np.empty((q, out, k), np.int8)
    rows = np.arange(out)
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        errors = np.zeros((out, b1 - b0))
        for j in range(b0, b1):
            g = perm[j] // group_size
            if not ready[g]:
                alpha[:, g] = init(work[:, inverse[g * group_size : min(k, (g + 1) * group_size)]])
                ready[g] = True
            values = alpha[:, g] @ combos.T  # [O, codebook]
            best = np.argmin(np.abs(work[:, j, None] - values), axis=1)
            codes[:, :, j] = combos[best].T
            errors[:, j - b0] = (work[:, j] - values[rows, best]) / u[j, j]
            work[:, j + 1 : b1] -= np.outer(errors[:, j - b0], u[j, j + 1 : b1])
        work[:, b1:] -= errors @ u[b0:b1, b1:]
    return codes[:, :, inverse], alpha


def _output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)``, the squared output error on the calibration rows."""
    diff = w - w_hat
    return float(np.einsum("ok,kl,ol->", diff, h, diff))


def _fit_output_aware(
    w: np.ndarray,
    group_size: int,
    factor: tuple,
    combos: np.ndarray,
    init: Callable[[np.ndarray], np.ndarray],
    rounds: int,
) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ codes (:func:`_gptq_codes`), then the scales refitted to the output,
    ``min_alpha ||X W^T - X W_hat^T||`` (:func:`refit_scales_output`), since compensation moved the
    weights away from the alphas fitted at each group's start. ``rounds > 1`` alternates: GPTQ codes
    again with those alphas fixed, refit again; the round with the lowest output error is kept."""
    h, perm, dead = factor
    w = np.where(dead, 0.0, w)  # no output depends on a dead input: GPTQ zeroes those weights
    best = None
    alpha = None
    for _ in range(max(1, rounds)):
        codes, _ = _gptq_codes(w, h, perm, group_size, combos, init, alpha)
        alpha = refit_scales_output(w, codes, group_size, h)
        scales = np.repeat(alpha, group_size, axis=1)[:, : w.shape[1], :]
        error = _output_error(w, np.einsum("okq,qok->ok", scales, codes.astype(np.float64)), h)
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
    factor: tuple | None = None,
    act_order: bool = True,
    rounds: int = DEFAULT_GPTQ_ROUNDS,
    x_float: np.ndarray | None = None,
) -> BCQFit:
    """Fit ``q`` binary planes with group-wise alphas to ``w`` [O, K]; to the output ``x @ w^T``
    when calibration rows ``x`` [M, K] are given (see module docstring), or to the float model's
    output ``x_float @ w^T`` from the actual inputs ``x`` (:func:`compensated_target`). ``factor``
    reuses a :func:`_hessian_factor` of ``x`` across calls (bit allocation fits each layer several times)."""
    if not 1 <= q <= 4:
        raise ValueError(f"fit_bcq: q={q} bit planes; supported 1..4 (exhaustive code search is 2^q)")
    w = np.asarray(w, dtype=np.float64)
    if x is None:
        return _fit_weight_only(w, q, group_size, iters)
    factor = factor or _hessian_factor(np.asarray(x, dtype=np.float64), damp, act_order)
    if x_float is not None:
        w = compensated_target(w, x, x_float, factor[0])
    codes, alpha = _fit_output_aware(
        w,
        group_size,
        factor,
        _combos(q),
        lambda block: _fit_weight_only(block, q, block.shape[1], iters).alpha[:, 0],
        rounds,
    )
    return BCQFit(codes, alpha, [])


def _fit_ternary_weight_only(w: np.ndarray, group_size: int, refit: bool, iters: int) -> tuple[np.ndarray, np.ndarray]:
    wg, mask = _grouped(w, group_size)
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
) -> tuple[np.ndarray, np.ndarray]:
    """``(T int8 [O,K] in {-1,0,1}, scale float64 [O, groups])``: BitNet b1.58 absmean, then
    alternating LS refits of the scale (``refit``). With calibration rows ``x`` the codes come from
    the same GPTQ column-by-column compensation as BCQ over the codebook ``{-s, 0, s}`` (each
    group's ``s`` from the weight-only fit of its compensated columns), then the output-aware scale
    refit. (Refitting the scales alone to the output, codes fixed, overfits small calibration sets.)
    ``x_float`` as in :func:`fit_bcq`."""
    w = np.asarray(w, dtype=np.float64)
    if x is None:
        return _fit_ternary_weight_only(w, group_size, refit, iters)
    factor = _hessian_factor(np.asarray(x, dtype=np.float64), damp, act_order)
    if x_float is not None:
        w = compensated_target(w, x, x_float, factor[0])
    codes, scale = _fit_output_aware(
        w,
        group_size,
        factor,
        np.array([[-1.0], [0.0], [1.0]]),
        lambda block: _fit_ternary_weight_only(block, block.shape[1], refit, iters)[1],
        rounds,
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


def _plan_bcq(
    candidates: list[Match], xs: dict[str, np.ndarray], options: dict, xs_float: dict[str, np.ndarray] | None = None
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
    fits: dict[str, dict[int, BCQFit]] = {}
    sensitivity = []
    for m in candidates:
        w, x = m.array("weight"), xs.get(m["x"].name)
        factor = _hessian_factor(x, damp, act_order) if x is not None else None
        x_float = xs_float.get(m["x"].name)
        fits[m.root.name] = {
            q: fit_bcq(w, q, group_size, x, iters, damp, factor, rounds=rounds, x_float=x_float) for q in choices
        }
        errors = {}
        for q, fit in fits[m.root.name].items():
            diff = w - fit.weight(group_size)
            errors[q] = float(np.sum((x @ diff.T) ** 2) if x is not None else np.sum(diff**2))
        sensitivity.append(LayerSensitivity(m.root.name, w.size, errors))
    if budget is not None:
        chosen = allocate_bits(sensitivity, float(budget), group_size)
    else:
        chosen = {layer.name: choices[0] for layer in sensitivity}
    plans = {}
    for m in candidates:
        q = chosen[m.root.name]
        fit = fits[m.root.name][q]
        w, x = m.array("weight"), xs.get(m["x"].name)
        details = {
            "bits": q,
            "bits_per_weight": bits_per_weight(q, group_size),
            "error": relative_output_error(w, fit.weight(group_size), x, xs_float.get(m["x"].name)),
            "error_kind": "output" if x is not None else "weight",
        }
        if x is not None:
            details["calibration"] = calibration + (" asymmetric" if m["x"].name in xs_float else "")

        def build(m, rc, fit=fit, k=w.shape[1]):
            name = m.root.name
            return rc.op(
                "bcq_linear",
                m["x"],
                rc.constant(pack_signs(fit.codes), f"{name}_bits"),
                rc.constant(fit.alpha.astype(np.float32), f"{name}_alpha"),
                m.get("bias"),
                group_size=group_size,
                in_features=k,
            )

        plans[m.root.name] = LayerPlan(build=build, details=details, weight=fit.weight(group_size))
    return plans


def _plan_ternary(
    candidates: list[Match], xs: dict[str, np.ndarray], options: dict, xs_float: dict[str, np.ndarray] | None = None
) -> dict[str, LayerPlan]:
    group_size = int(options.get("group_size", DEFAULT_GROUP_SIZE))
    refit = bool(options.get("ternary_refit", True))
    damp = float(options.get("damp", 0.01))
    act_order = bool(options.get("act_order", True))
    rounds = int(options.get("gptq_rounds", DEFAULT_GPTQ_ROUNDS))
    xs_float = _float_inputs(options, xs_float)
    plans = {}
    for m in candidates:
        w, x, x_float = m.array("weight"), xs.get(m["x"].name), xs_float.get(m["x"].name)
        codes, scale = fit_ternary(
            w, group_size, refit, x, damp=damp, act_order=act_order, rounds=rounds, x_float=x_float
        )
        details = {
            "bits": 2,
            "error": relative_output_error(w, ternary_dequant(codes, scale, group_size), x, x_float),
            "error_kind": "output" if x is not None else "weight",
        }

        def build(m, rc, codes=codes, scale=scale, k=w.shape[1]):
            name = m.root.name
            return rc.op(
                "ternary_linear",
                m["x"],
                rc.constant(pack_trits(codes), f"{name}_trits"),
                rc.constant(scale.astype(np.float32), f"{name}_scale"),
                m.get("bias"),
                group_size=group_size,
                in_features=k,
            )

        plans[m.root.name] = LayerPlan(build=build, details=details, weight=ternary_dequant(codes, scale, group_size))
    return plans


def _sequential(options: dict) -> bool:
    """Sequential calibration unless switched off or a ``bits`` budget needs all layers at once."""
    return bool(options.get("sequential", True)) and options.get("bits") is None


def bcq_weights(graph: Graph, ctx: PassContext) -> RuleStats:
    """Rewrite every eligible ``linear`` into ``bcq_linear`` (per-layer bits under ``bits`` budget)."""
    return quantize_linears(graph, ctx, "linear_to_bcq", _plan_bcq, sequential=_sequential(ctx.options))


def ternary_weights(graph: Graph, ctx: PassContext) -> RuleStats:
    """Rewrite every eligible ``linear`` into ``ternary_linear``."""
    return quantize_linears(graph, ctx, "linear_to_ternary", _plan_ternary, sequential=_sequential(ctx.options))


BCQ_PASSES = [
    Pass("bcq_weights", bcq_weights, exact=False, doc="linear -> bcq_linear, W = sum alpha_i B_i (ShiftAddLLM)"),
    Pass("ternary_weights", ternary_weights, exact=False, doc="linear -> ternary_linear (BitNet b1.58)"),
]

__all__ = [
    "BCQ_PASSES",
    "BCQFit",
    "LayerSensitivity",
    "allocate_bits",
    "bcq_weights",
    "bits_per_weight",
    "fit_bcq",
    "fit_ternary",
    "ternary_dequant",
    "ternary_weights",
]
