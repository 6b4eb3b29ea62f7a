"""Calibration for post-training quantization: observers over calibration batches, and range searches.

* :func:`observe` runs the reference interpreter once per calibration batch and keeps, per value,
  the global and per-last-axis-channel min/max plus an evenly strided sample of its elements
  (and, on request, the full tensors of the first batches, for output-aware searches).
* :func:`activation_range` picks a per-tensor ``[lo, hi]``: ``minmax``, ``percentile``, or ``mse``
  (a 1-D grid of shrink factors applied to both ends, minimizing the fake-quant squared error on
  the sample; the usual PTQ baseline, e.g. RepQ-ViT's and PTQ4ViT's calibration).
* :func:`weight_scales` picks per-output-channel symmetric scales by the same grid search on
  ``max|w_o|`` (or ``minmax``: no clipping; ``percentile`` of ``|w_o|``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reshift.errors import PassError
from reshift.ir.graph import Graph, Value
from reshift.ir.interpret import interpret

SHRINK_GRID = np.linspace(1.0, 0.05, 40)


@dataclass
class Observer:
    """What calibration saw of one value."""

    lo: float = np.inf
    hi: float = -np.inf
    ch_lo: np.ndarray | None = None
    ch_hi: np.ndarray | None = None
    samples: list[np.ndarray] = field(default_factory=list)
    tensors: list[np.ndarray] = field(default_factory=list)

    @property
    def sample(self) -> np.ndarray:
        return np.concatenate(self.samples) if self.samples else np.zeros(1)

    def update(self, array: np.ndarray, max_samples: int, keep_tensor: bool) -> None:
        a = np.asarray(array, np.float32)
        finite = a[np.isfinite(a)]
        if finite.size:
            self.lo, self.hi = min(self.lo, float(finite.min())), max(self.hi, float(finite.max()))
            step = max(1, finite.size // max_samples)
            self.samples.append(finite[::step].astype(np.float64))
        rows = np.where(np.isfinite(a), a, np.nan).reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
        with np.errstate(all="ignore"):
            lo, hi = np.nanmin(rows, axis=0), np.nanmax(rows, axis=0)
        self.ch_lo = lo if self.ch_lo is None else np.fmin(self.ch_lo, lo)
        self.ch_hi = hi if self.ch_hi is None else np.fmax(self.ch_hi, hi)
        if keep_tensor:
            self.tensors.append(a)


def require_calibration(calibration, what: str) -> list[dict[str, np.ndarray]]:
    if not calibration:
        raise PassError(
            f"{what} needs calibration data: pass calibration=[{{input name: array}}, ...] "
            "(a few representative batches) to reshift.passes.run or reshift.compile"
        )
    return list(calibration)


def observe(
    graph: Graph,
    calibration: list[dict[str, np.ndarray]],
    values: list[Value],
    max_samples: int = 1 << 16,
    keep_tensors: set[str] | None = None,
    max_batches_kept: int = 4,
) -> dict[str, Observer]:
    """One :class:`Observer` per value name, filled over all calibration batches."""
    keep_tensors = keep_tensors or set()
    observers = {v.name: Observer() for v in values}
    per_batch = max(1, max_samples // max(1, len(calibration)))
    for index, batch in enumerate(calibration):
        env = interpret(graph, batch, return_all=True)
        for v in values:
            keep = v.name in keep_tensors and index < max_batches_kept
            observers[v.name].update(env[v.name], per_batch, keep)
    return observers


def uniform_params(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Asymmetric unsigned ``(scale, zero_point)`` covering ``[min(lo,0), max(hi,0)]``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    if not np.isfinite(scale) or scale <= 1e-12:
        scale = 1e-8 if not np.isfinite(scale) or scale <= 0 else scale
        return float(np.float32(max(scale, 1e-8))), 0
    zero_point = int(np.clip(np.rint(-lo / scale), 0, qmax))
    return float(np.float32(scale)), zero_point


def fake_quant(x: np.ndarray, scale, zero_point, qmin: int, qmax: int) -> np.ndarray:
    return (np.clip(np.rint(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def activation_range(obs: Observer, bits: int, method: str = "mse", percentile: float = 99.99) -> tuple[float, float]:
    """Per-tensor ``[lo, hi]`` by ``minmax``, ``percentile`` or ``mse`` (see module docstring)."""
    if not np.isfinite(obs.lo):
        return 0.0, 1.0
    if method == "minmax":
        return obs.lo, obs.hi
    x = obs.sample
    if method == "percentile":
        return float(np.percentile(x, 100 - percentile)), float(np.percentile(x, percentile))
    if method != "mse":
        raise PassError(f"unknown activation calibration method {method!r}; use minmax, percentile or mse")
    best, best_err = (obs.lo, obs.hi), np.inf
    for shrink in SHRINK_GRID:
        scale, zp = uniform_params(obs.lo * shrink, obs.hi * shrink, bits)
        err = float(np.mean((fake_quant(x, scale, zp, 0, 2**bits - 1) - x) ** 2))
        if err < best_err:
            best, best_err = (obs.lo * shrink, obs.hi * shrink), err
    return best


def weight_scales(w: np.ndarray, bits: int, method: str = "mse", percentile: float = 99.9) -> np.ndarray:
    """Per-output-channel symmetric scales (float64 ``[O]``) for the narrow grid ``+-(2^(bits-1) - 1)``."""
    qmax = 2 ** (bits - 1) - 1
    w = np.asarray(w, np.float64)
    amax = np.max(np.abs(w), axis=1)
    if method == "percentile":
        amax = np.percentile(np.abs(w), percentile, axis=1)
    elif method == "mse":
        best, best_err = amax.copy(), np.full(len(w), np.inf)
        for shrink in SHRINK_GRID[:24]:  # down to ~0.45 max|w|
            clip = amax * shrink
            s = np.where(clip > 0, clip / qmax, 1.0)[:, None]
            err = np.sum((np.clip(np.rint(w / s), -qmax, qmax) * s - w) ** 2, axis=1)
            better = err < best_err
            best[better], best_err[better] = clip[better], err[better]
        amax = best
    elif method != "minmax":
        raise PassError(f"unknown weight calibration method {method!r}; use minmax, percentile or mse")
    return np.where(amax > 0, amax / qmax, 1.0)


def quantize_weight(w: np.ndarray, bits: int, method: str = "mse") -> tuple[np.ndarray, np.ndarray]:
    """``(codes int8 [O, K], scales float32 [O])`` with ``w ~ codes * scales[:, None]``."""
    qmax = 2 ** (bits - 1) - 1
    scales = weight_scales(w, bits, method).astype(np.float32)
    codes = np.clip(np.rint(np.asarray(w, np.float32) / scales[:, None]), -qmax, qmax).astype(np.int8)
    return codes, scales


def on_weight_grid(w: np.ndarray, bits: int) -> bool:
    """True when every row of ``w`` already lies on its own ``bits``-bit symmetric grid (a weight this
    pipeline quantized before: the largest code of each row is ``qmax``)."""
    qmax = 2 ** (bits - 1) - 1
    amax = np.max(np.abs(w), axis=1, keepdims=True)
    s = np.where(amax > 0, amax / qmax, 1.0)
    codes = w / s
    return bool(np.all(np.abs(codes - np.rint(codes)) < 1e-3))


__all__ = [
    "Observer",
    "activation_range",
    "fake_quant",
    "observe",
    "on_weight_grid",
    "quantize_weight",
    "require_calibration",
    "uniform_params",
    "weight_scales",
]
