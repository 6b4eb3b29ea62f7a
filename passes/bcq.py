"""Binary-coded and ternary weights: ``linear`` -> ``bcq_linear`` / ``ternary_linear``.

BCQ (ShiftAddLLM, You et al. 2024, Eq. 2): per group of ``G`` input columns,
``W[o, g] ~ sum_{i<q} alpha[o,g,i] * B_i[o, g]``, ``B_i`` in {-1,+1}. :func:`fit_bcq` fits it

* to the weights: greedy init (``alpha_i = mean|R|``, ``B_i = sign(R)`` of the residual ``R``),
  then alternating least squares: alphas by least squares given the codes, codes by exhaustive
  search over the ``2^q`` sign combinations per weight given the alphas. Each step cannot raise
  ``||W - W_hat||``, so the error history is non-increasing.
* to the layer's output on calibration activations ``X`` (ShiftAddLLM Sec. 3.1): columns are
  quantized in order, GPTQ-style (Frantar et al. 2023, Alg. 1), each group's alphas fitted (ALS)
  to the error-compensated block when the group starts, each column's rounding error
  ``(w - w_q) / U[k,k]`` propagated to the later columns through the upper Cholesky factor ``U``
  of ``(X^T X + lambda I)^-1``; finally the alphas are refitted by least squares to
  ``||X W^T - X W_hat^T||``.

Bit allocation (ShiftAddLLM Sec. 3.2) chooses ``q`` per layer from its measured output error
under an average-bits budget (:func:`allocate_bits`). Ternary (BitNet b1.58, Ma et al. 2024):
``scale = mean|W_g|``, ``T = rint(clip(W / scale, -1, 1))``, then alternating least-squares scale
refits (optional), or an output-aware scale refit with calibration data.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from reshift.ir.graph import Graph
from reshift.ir.ops_lowbit import pack_signs, pack_trits
from reshift.passes.manager import Pass, PassContext
from reshift.passes.pattern import Match
from reshift.passes.quant_common import (
    LayerPlan,
    hessian,
    quantize_linears,
    refit_scales_output,
    relative_output_error,
)
from reshift.passes.rules import RuleStats

DEFAULT_GROUP_SIZE = 128
DEFAULT_Q = 3
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


def _hessian_factor(x: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``H = X^T X + lambda I``, the upper Cholesky factor of ``H^-1``, and the dead-input mask."""
    h = hessian(x, damp)
    return h, np.linalg.cholesky(np.linalg.inv(h)).T, np.all(x == 0, axis=0)


def _fit_gptq(w: np.ndarray, q: int, group_size: int, factor: tuple, iters: int) -> BCQFit:
    out, k = w.shape
    h, u, dead = factor
    work = w.astype(np.float64).copy()
    work[:, dead] = 0.0
    combos = _combos(q)
    codes = np.empty((q, out, k), np.int8)
    alpha = np.zeros((out, -(-k // group_size), q))
    for g, start in enumerate(range(0, k, group_size)):
        stop = min(k, start + group_size)
        alpha[:, g] = _fit_weight_only(work[:, start:stop], q, stop - start, iters).alpha[:, 0]
        values = alpha[:, g] @ combos.T  # [O, 2^q]
        for col in range(start, stop):
            best = np.argmin(np.abs(work[:, col, None] - values), axis=1)
            codes[:, :, col] = combos[best].T
            error = (work[:, col] - values[np.arange(out), best]) / u[col, col]
            work[:, col + 1 :] -= np.outer(error, u[col, col + 1 :])
    alpha = refit_scales_output(w, codes, group_size, h)
    return BCQFit(codes, alpha, [])


def fit_bcq(
    w: np.ndarray,
    q: int = DEFAULT_Q,
    group_size: int = DEFAULT_GROUP_SIZE,
    x: np.ndarray | None = None,
    iters: int = 10,
    damp: float = 0.01,
    factor: tuple | None = None,
) -> BCQFit:
    """Fit ``q`` binary planes with group-wise alphas to ``w`` [O, K]; to the output ``x @ w^T``
    when calibration rows ``x`` [M, K] are given (see module docstring). ``factor`` reuses a
    :func:`_hessian_factor` of ``x`` across calls (bit allocation fits each layer several times)."""
    if not 1 <= q <= 4:
        raise ValueError(f"fit_bcq: q={q} bit planes; supported 1..4 (exhaustive code search is 2^q)")
    w = np.asarray(w, dtype=np.float64)
    if x is None:
        return _fit_weight_only(w, q, group_size, iters)
    factor = factor or _hessian_factor(np.asarray(x, dtype=np.float64), damp)
    return _fit_gptq(w, q, group_size, factor, iters)


def fit_ternary(
    w: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE, refit: bool = True, x: np.ndarray | None = None, iters: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """``(T int8 [O,K] in {-1,0,1}, scale float64 [O, groups])``: BitNet b1.58 absmean, then
    alternating LS refits of the scale (``refit``), then an output-aware refit when ``x`` is given."""
    w = np.asarray(w, dtype=np.float64)
    wg, mask = _grouped(w, group_size)
    scale = np.abs(wg * mask).sum(-1) / mask.sum(-1)
    for step in range(1 + (iters if refit else 0)):
        safe = np.where(scale > 0, scale, 1.0)
        t = np.rint(np.clip(wg / safe[..., None], -1, 1)) * mask
        if step == iters or not refit:
            break
        tt = (t * t).sum(-1)
        scale = np.where(tt > 0, (t * wg).sum(-1) / np.where(tt > 0, tt, 1.0), scale)
    codes = t.reshape(w.shape[0], -1)[:, : w.shape[1]].astype(np.int8)
    if x is not None:
        scale = refit_scales_output(w, codes[None], group_size, hessian(np.asarray(x, np.float64)))[..., 0]
    return codes, scale


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
def _plan_bcq(candidates: list[Match], xs: dict[str, np.ndarray], options: dict) -> dict[str, LayerPlan]:
    group_size = int(options.get("group_size", DEFAULT_GROUP_SIZE))
    iters = int(options.get("bcq_iters", 10))
    damp = float(options.get("damp", 0.01))
    budget = options.get("bits")
    choices = (
        tuple(options.get("bit_choices", BIT_CHOICES))
        if budget is not None
        else (int(options.get("bcq_q", DEFAULT_Q)),)
    )
    fits: dict[str, dict[int, BCQFit]] = {}
    sensitivity = []
    for m in candidates:
        w, x = m.array("weight"), xs.get(m["x"].name)
        factor = _hessian_factor(x, damp) if x is not None else None
        fits[m.root.name] = {q: fit_bcq(w, q, group_size, x, iters, damp, factor) for q in choices}
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
            "error": relative_output_error(w, fit.weight(group_size), x),
            "error_kind": "output" if x is not None else "weight",
        }

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

        plans[m.root.name] = LayerPlan(build=build, details=details)
    return plans


def _plan_ternary(candidates: list[Match], xs: dict[str, np.ndarray], options: dict) -> dict[str, LayerPlan]:
    group_size = int(options.get("group_size", DEFAULT_GROUP_SIZE))
    refit = bool(options.get("ternary_refit", True))
    plans = {}
    for m in candidates:
        w, x = m.array("weight"), xs.get(m["x"].name)
        codes, scale = fit_ternary(w, group_size, refit, x)
        details = {
            "bits": 2,
            "error": relative_output_error(w, ternary_dequant(codes, scale, group_size), x),
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

        plans[m.root.name] = LayerPlan(build=build, details=details)
    return plans


def bcq_weights(graph: Graph, ctx: PassContext) -> RuleStats:
    """Rewrite every eligible ``linear`` into ``bcq_linear`` (per-layer bits under ``bits`` budget)."""
    return quantize_linears(graph, ctx, "linear_to_bcq", _plan_bcq)


def ternary_weights(graph: Graph, ctx: PassContext) -> RuleStats:
    """Rewrite every eligible ``linear`` into ``ternary_linear``."""
    return quantize_linears(graph, ctx, "linear_to_ternary", _plan_ternary)


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
