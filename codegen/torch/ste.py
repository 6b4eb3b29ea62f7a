"""Straight-through estimators: quantizers that round in the forward pass and pass gradients through.

* :func:`round_ste`: ``round`` forward (half to even, as ``np.rint``), identity backward (Bengio et al.
  2013), as an autograd function so the forward value is exactly ``round(x)``, infinities included.
* :func:`uniform_fake_quant`: ``y = (clamp(rint(x/s) + z, lo, hi) - z) * s``; ``x``'s gradient passes inside
  the range only (STE with clipping), the scale gets ``d y / d s = q - z`` with the codes held fixed
  (everywhere, the clipped ends included). LSQ's estimator (Esser et al. 2020, Eq. 3, ``round(x/s) - x/s``
  inside the range) is zero at a weight that starts on its grid and, measured on the tiny transformer of
  ``tests/test_recover.py`` at W4A4, raised the distillation loss where this one lowers it.
* :func:`log2_fake_quant`: the log-domain quantizer of ``log2_quant`` (RepQ-ViT / AdaLog): levels
  ``scale * 2^(-q a)``; the forward value is the exact level (codes in float64, as the numpy reference),
  ``x``'s gradient passes where the level is not zero, and ``scale`` gets ``d y / d scale = y / scale``
  (the codes held fixed, as for the uniform quantizer).
"""

from __future__ import annotations

import numpy as np
import torch

from reshift.ir.ops_quant import SQRT2, adaptive_exponent, fraction_table, log_step


class _Straight(torch.autograd.Function):
    """``fn(x)`` forward, the incoming gradient unchanged backward (exact at +-inf and NaN too)."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _Straight.apply(x, torch.round)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    return _Straight.apply(x, torch.sign)


def pass_through(value: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """``value`` forward, ``latent``'s gradient backward (STE from a re-derived quantized tensor)."""
    return value + (latent - latent.detach())


def uniform_fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """``quantize_uniform``'s value with the gradients of the module docstring. NaN stays NaN."""
    r = torch.round(x.detach() / scale.detach()) + zero_point
    q = torch.clamp(r, lo, hi)
    live = (r >= lo) & (r <= hi) & torch.isfinite(x)
    through = torch.where(live, x, torch.zeros_like(x))
    return (q - zero_point) * scale + (through - through.detach())


def log2_codes(
    x: torch.Tensor, bits: int, step: float, scale: torch.Tensor, last_code: int | None = None
) -> torch.Tensor:
    """``ir.ops_quant.log2_codes`` in torch (float64; ``2^bits - 1`` is the zero code; NaN stays NaN);
    ``last_code``: codes past it also give the zero code (``log2_matmul``'s ``floor_exponent``)."""
    x64 = x.detach().double()
    t = -torch.log2(x64 / scale.detach().double()) / step
    q = torch.clamp(torch.round(t), min=0.0)
    zero_code = float(2**bits - 1)
    keep_below = zero_code if last_code is None else float(min(last_code + 1, 2**bits - 1))
    q = torch.where((x64 > 0) & (q < keep_below), q, torch.full_like(q, zero_code))
    return torch.where(torch.isnan(x64), x64, q)


def log2_level_factors(q: torch.Tensor, bits: int, base_kind: str, base: float, table_size: int) -> torch.Tensor:
    """``2^-e * factor`` of codes ``q`` in float32 (0 for the zero code, NaN for NaN), as ``log2_levels``
    before its multiply by ``scale``."""
    zero = q == 2**bits - 1
    nan = torch.isnan(q)
    qi = torch.where(nan | zero, torch.zeros_like(q), q).long()
    if base_kind == "log2":
        e, factor = qi, torch.ones((), dtype=torch.float32)
    elif base_kind == "log_sqrt2":
        e = torch.div(qi + 1, 2, rounding_mode="floor")
        factor = torch.where(qi % 2 == 1, torch.tensor(float(SQRT2)), torch.tensor(1.0))
    else:
        p = adaptive_exponent(base, table_size)
        n = qi * p
        table = torch.from_numpy(fraction_table(table_size).astype(np.float32))
        e, factor = torch.div(n, table_size, rounding_mode="floor"), table[n % table_size]
    power = torch.ldexp(torch.ones_like(q, dtype=torch.float32), -e.to(torch.int32))
    y = (power * factor).to(torch.float32)
    y = torch.where(zero, torch.zeros_like(y), y)
    return torch.where(nan, torch.full_like(y, float("nan")), y)


def log2_fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    base_kind: str,
    base: float,
    table_size: int,
    last_code: int | None = None,
) -> torch.Tensor:
    """``log2_quant``'s value with the gradients of the module docstring (``last_code``: see
    :func:`log2_codes`)."""
    q = log2_codes(x, bits, log_step(base_kind, base, table_size), scale, last_code)
    factor = log2_level_factors(q, bits, base_kind, base, table_size)
    y = factor * scale  # exact level, gradient y / scale to the scale
    live = (factor > 0) & torch.isfinite(x)
    through = torch.where(live, x, torch.zeros_like(x))
    return y + (through - through.detach())


__all__ = [
    "log2_codes",
    "log2_fake_quant",
    "log2_level_factors",
    "pass_through",
    "round_ste",
    "sign_ste",
    "uniform_fake_quant",
]
