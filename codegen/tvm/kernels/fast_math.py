"""float32 ``exp`` and ``erf`` as polynomial TIR expressions that vectorize (scalar or NxF32 lanes).

LLVM has no vector ``exp``/``erf`` without a vector math library, so ``T.exp`` on 16 lanes becomes
16 calls to libm's ``expf`` and GELU's ``erf`` one call per element: on ViT-S, GELU and softmax
took 30% of the forward pass. These are the classic branch-free float32 approximations:

* ``exp_f32`` (Cephes ``expf``): ``x = n ln2 + r`` with ``|r| <= ln2/2`` (ln2 split in two parts
  so ``r`` is exact), ``e^r = 1 + r + r^2 P(r)`` with a degree-5 ``P``, and ``2^n`` built in the
  exponent bits. Relative error about 2 ulp over ``[-87.3, 88.37]``; below, 0 (no subnormals);
  above 88.37, +inf (float32 ``exp`` overflows at 88.72: the band between also gives +inf).
* ``erf_f32`` (the rational approximation of Eigen's ``generic_fast_erf_float``, also TVM's
  ``fast_erf``): ``erf(x) = x P(x^2) / Q(x^2)`` on ``[-4, 4]``, clamped beyond (where float32
  ``erf`` is +-1). Absolute error below 4e-7 (tested).
* ``tanh_f32`` (Cephes ``tanhf``): ``x + x^3 P(x^2)`` for ``|x| <= 0.625`` (no cancellation near 0),
  ``1 - 2 / (e^{2|x|} + 1)`` with the sign of ``x`` above; a few ulp (tested). GPT-2's tanh GELU
  and any ``tanh`` in a graph use it on CPUs (libm's ``tanhf`` is one call per element).

NaN stays NaN in both (clamping with ``max``/``min`` would drop it, so it is selected back).
"""

from __future__ import annotations

from tvm import tirx

_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_EXP_MAX = 88.3762626647949
_EXP_MIN = -88.3762626647949

_TANH_P = (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1, -3.33332819422e-1)

_ERF_ALPHA = (  # numerator, odd powers x^13 .. x^1
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_BETA = (  # denominator, even powers x^8 .. x^0
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


def _lanes(e: tirx.PrimExpr) -> int:
    ty = e.ty if hasattr(e, "ty") else e.dtype  # a buffer load has ``ty``, other expressions ``dtype``
    return int((ty.dtype if hasattr(ty, "dtype") else ty).lanes)


def _const(value: float, like: tirx.PrimExpr, dtype: str = "float32") -> tirx.PrimExpr:
    """A constant with the lanes of ``like`` (scalar or vector)."""
    scalar = tirx.const(value, dtype)
    lanes = _lanes(like)
    return scalar if lanes == 1 else tirx.Broadcast(scalar, lanes)


def _horner(x: tirx.PrimExpr, coefficients: tuple[float, ...]) -> tirx.PrimExpr:
    result = _const(coefficients[0], x)
    for c in coefficients[1:]:
        result = result * x + _const(c, x)
    return result


def _keep_nan(x: tirx.PrimExpr, value: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.Select(tirx.isnan(x), x, value)


def exp_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``e^x`` for float32 ``x`` (scalar or vector), Cephes ``expf`` (see the module docstring)."""
    clamped = tirx.max(tirx.min(x, _const(_EXP_MAX, x)), _const(_EXP_MIN, x))
    n = tirx.floor(clamped * _const(_LOG2E, x) + _const(0.5, x))
    r = clamped - n * _const(_LN2_HI, x) - n * _const(_LN2_LO, x)
    poly = _horner(r, _EXP_P) * r * r + r + _const(1.0, x)
    lanes = _lanes(x)
    suffix = f"x{lanes}" if lanes > 1 else ""
    exponent = tirx.shift_left(tirx.Cast(f"int32{suffix}", n) + _const(127, x, "int32"), _const(23, x, "int32"))
    value = poly * tirx.reinterpret(f"float32{suffix}", exponent)
    overflow = tirx.Select(x > _const(_EXP_MAX, x), _const(float("inf"), x), value)
    return _keep_nan(x, overflow)


def erf_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``erf(x)`` for float32 ``x`` (scalar or vector), rational approximation (module docstring)."""
    clamped = tirx.max(tirx.min(x, _const(4.0, x)), _const(-4.0, x))
    x2 = clamped * clamped
    return _keep_nan(x, clamped * _horner(x2, _ERF_ALPHA) / _horner(x2, _ERF_BETA))


def tanh_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``tanh(x)`` for float32 ``x`` (scalar or vector), Cephes ``tanhf`` (module docstring)."""
    z = tirx.abs(x)
    x2 = x * x
    small = _horner(x2, _TANH_P) * x2 * x + x
    large = _const(1.0, x) - _const(2.0, x) / (exp_f32(z + z) + _const(1.0, x))
    signed = tirx.Select(x < _const(0.0, x), -large, large)
    return _keep_nan(x, tirx.Select(z <= _const(0.625, x), small, signed))


def silu_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``x sigmoid(x) = x / (1 + e^-x)`` with :func:`exp_f32` (SwiGLU's gate)."""
    one = _const(1.0, x)
    return x * (one / (one + exp_f32(-x)))


def gelu_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``0.5 x (1 + erf(x / sqrt2))`` with :func:`erf_f32`."""
    return _const(0.5, x) * x * (_const(1.0, x) + erf_f32(x * _const(0.7071067811865476, x)))


def gelu_tanh_f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``0.5 x (1 + tanh(u))``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``, ``tanh(u) = 2 / (1 + e^(-2u)) - 1``."""
    one, two = _const(1.0, x), _const(2.0, x)
    u = _const(0.7978845608028654, x) * (x + _const(0.044715, x) * x * x * x)
    return _const(0.5, x) * x * (one + (two / (one + exp_f32(-two * u)) - one))
