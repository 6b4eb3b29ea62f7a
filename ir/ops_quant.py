"""reshift's activation quantizers and integer linear, for post-training quantization of transformers.

Each numpy reference is the exact specification passes and kernels are checked against:

* ``quantize_uniform`` (fake quantization): ``q = clip(rint(x / s) + z, qmin, qmax)``,
  ``y = (q - z) * s`` in float32, per tensor or per channel along ``axis``. ``rint`` rounds half
  to even; NaN stays NaN, +-inf saturates to the end levels. Unsigned ``[0, 2^bits - 1]`` with an
  integer zero point, or ``signed``: the narrow symmetric ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]``.
* ``log2_quant`` (RepQ-ViT log2 / log-sqrt2, AdaLog adaptive base): levels ``scale * 2^(-q*a)``,
  ``q`` in ``0 .. 2^bits - 2``, plus zero (the last code). ``q = max(0, rint(-log2(x / scale) / a))``
  (rounding in the log domain, float64); ``q`` past the last level, ``x <= 0`` and ``x = 0`` give 0;
  NaN stays NaN. ``a = 1`` (log2), ``a = 1/2`` (log-sqrt2: ``2^-ceil(q/2)`` times one ``sqrt2``
  multiply for odd ``q``) or ``a = p/D`` (adaptive: ``base = 2^(p/D)``,
  ``2^-floor(qp/D) * table[qp mod D]``, ``table[r] = 2^(-r/D)``, ``D = table_size``).
* ``int8_linear``: activations quantized per tensor to ``x_bits`` unsigned integers with zero
  point ``x_zero_point`` (as ``quantize_uniform``), ``acc = sum_k (q[k] - z) * wq[o,k]`` exactly in
  int32, then ``y = float32(acc) * (float32(x_scale) * w_scale[o]) + bias[o]`` in float32. A row
  holding NaN gives NaN outputs. ``x_granularity="row"`` (per-token dynamic quantization, as
  LLM.int8 / SmoothQuant deployments do) ignores ``x_scale``/``x_zero_point`` and computes them per
  row at run time, in float32: ``lo = min(min_k x, 0)``, ``hi = max(max_k x, 0)``,
  ``s = (hi - lo) / (2^bits - 1)`` (``1`` where that is 0), ``z = clip(rint(-lo / s), 0, 2^bits - 1)``;
  then ``y = float32(acc) * (s * w_scale[o]) + bias[o]``.
* ``int8_conv2d``: ``int8_linear``'s per-tensor scheme on an NCHW convolution with an int8 OIHW
  filter: ``acc[n,o,h,w] = sum (q - z) * wq`` over the window (zero padding is the code ``z`` of
  ``0.0``, so it adds nothing), exactly in int32, ``y = float32(acc) * (float32(x_scale) * w_scale[o])
  + bias[o]``. An image (batch element) holding a NaN gives NaN outputs (a float conv would spread
  it over the NaN's receptive field only; the kernel flags whole images). Optional ``w_diag`` (int32
  ``[O]``, ``groups = 1``, ``C = O``, odd kernel, ``|w_diag| <= 2^15``) is added to the centre tap of
  ``wq[o, o]``: a re-parameterized block's identity branch (RepVGG, MobileOne) lands there and is
  often far larger than the other taps, so an int8 per-channel grid over the fused filter would be
  set by it; held apart, the filter's int8 grid fits the rest and the identity keeps a wide code.
* ``log2_matmul`` (RepQ-ViT / AdaLog attention times V as shifts and adds): ``p @ v`` with ``p`` coded
  as ``log2_quant`` does (code ``q``, the zero code skipped) and ``v`` as a per-tensor
  ``quantize_uniform`` (``v_int = clip(rint(v / v_scale) + z, lo, hi) - z``, float32 arithmetic,
  int32). A level is ``2^-e * N[r] * 2^-S``: log2 ``e = q``, one class ``N = [2^23]``; log-sqrt2
  ``e = ceil(q/2)``, ``r`` = ``q`` odd, ``N = [2^23, 11863283]`` (``float32(sqrt2) = 11863283 * 2^-23``),
  ``S = 23``; adaptive base ``2^(p/D)``: ``e = floor(q p / D)``, ``r = (q p / g) mod (D / g)``
  (``g = gcd(p, D)``), ``N[r] = float32(2^(-r g / D)) * 2^24`` (an integer), ``S = 24``. With ``E`` the
  exponent of the smallest level, one int32 accumulator per class ``acc_r = sum_{k in r}
  v_int[k] << (E - e_k)`` holds ``2^E * sum 2^-e_k v_int[k]`` exactly (the type check proves
  ``(2^v_bits - 1) * K * 2^E < 2^31``); ``t = sum_r int64(acc_r) * N[r]`` is exact in int64 and
  ``y = float32(float64(t) * C)`` with ``C = float64(scale) * float64(v_scale) * 2^-(E+S)`` (exact in
  float64): no add after a multiply, so a kernel with FMA contraction gives the same bits.
  ``y[m, j]`` is NaN where row ``m`` of ``p`` or column ``j`` of ``v`` holds NaN (as the float matmul
  of the fake-quantized operands). ``floor_exponent = W >= 0`` keeps only the levels with ``e <= W``
  (the others count as the zero code) and takes ``E = min(E, W)``: 6- and 8-bit codes, whose
  smallest levels (``2^-31`` log-sqrt2 at 6 bits, ``2^-62`` log2) overflow any int32 shift, run
  with ``W`` as large as the bound allows (``fuse_log2_matmul`` picks it); a dropped level is below
  ``2^-W scale``, so a row moves by at most ``(its dropped probability mass) * max|v|``.

Registered into :data:`reshift.ir.ops.OPS` (imported at the end of ``ir/ops.py``), tagged ``custom``.
"""

from __future__ import annotations

import numpy as np

from reshift.errors import IRTypeError
from reshift.ir.numpy_kernels import conv2d
from reshift.ir.ops import Attr, _matmul_infer, conv2d_output_type, register
from reshift.ir.shapes import normalize_axis, require_float

SQRT2 = np.float32(np.sqrt(2.0))
LOG2_KINDS = ("log2", "log_sqrt2", "adaptive")


def uniform_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of the integer grid."""
    if signed:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _per_axis(values, x: np.ndarray, axis: int) -> np.ndarray:
    v = np.asarray(values, np.float32)
    if v.size == 1:
        return v.reshape(())
    shape = [1] * x.ndim
    shape[axis] = v.size
    return v.reshape(shape)


# -- quantize_uniform ------------------------------------------------------------------------
def quantize_uniform_ref(x, scale, zero_point, bits, axis, signed=False):
    """Fake quantization, stated exactly (see module docstring)."""
    x = np.asarray(x, np.float32)
    axis = axis % x.ndim if x.ndim else 0
    s, z = _per_axis(scale, x, axis), _per_axis(zero_point, x, axis)
    lo, hi = uniform_range(bits, signed)
    q = np.clip(np.rint(x / s) + z, np.float32(lo), np.float32(hi))
    return ((q - z) * s).astype(np.float32)


def _quantize_uniform_infer(x, scale, zero_point, bits, axis, signed):
    require_float(x, "quantize_uniform")
    if not 2 <= bits <= 16:
        raise IRTypeError(f"quantize_uniform: bits {bits} must be in 2..16")
    if len(scale) != len(zero_point) or not scale:
        raise IRTypeError("quantize_uniform: scale and zero_point need the same, non-zero length")
    if len(scale) > 1:
        ax = normalize_axis(axis, x.rank, "quantize_uniform")
        if x.shape[ax] != len(scale):
            raise IRTypeError(f"quantize_uniform: {len(scale)} scales for axis {axis} of {x}")
    if not all(s > 0 and np.isfinite(s) for s in scale):
        raise IRTypeError("quantize_uniform: scales must be positive and finite")
    lo, hi = uniform_range(bits, signed)
    if any(z != round(z) or not lo <= z <= hi for z in zero_point):
        raise IRTypeError(f"quantize_uniform: zero points must be integers in [{lo}, {hi}]")
    return [x]


register(
    "quantize_uniform",
    ["x"],
    {
        "scale": Attr("floats"),
        "zero_point": Attr("floats", (0.0,)),
        "bits": Attr("int", 8),
        "axis": Attr("int", -1),
        "signed": Attr("bool", False),
    },
    _quantize_uniform_infer,
    quantize_uniform_ref,
    "fake quantization y = (clip(rint(x/s) + z, qmin, qmax) - z) * s, per tensor or per channel of axis",
    macs=lambda out, x, *_, **__: 2 * int(np.prod([d if isinstance(d, int) else 1 for d in out])),
    tags={"custom", "elementwise", "quantizer"},
)


# -- log2_quant ------------------------------------------------------------------------------
def adaptive_exponent(base: float, table_size: int) -> int:
    """``p`` with ``base = 2^(p / table_size)``; raises if ``base`` is not on that grid."""
    p = int(round(table_size * np.log2(base))) if base > 1 else 0
    if not 1 <= p <= table_size or abs(2.0 ** (p / table_size) - base) > 1e-6 * base:
        raise IRTypeError(f"log2_quant: adaptive base {base} must be 2^(p/{table_size}) with p in 1..{table_size}")
    return p


def fraction_table(table_size: int) -> np.ndarray:
    """``table[r] = 2^(-r / D)`` in float32: the fractional powers an adaptive-base kernel looks up."""
    return (2.0 ** (-np.arange(table_size) / table_size)).astype(np.float32)


def log2_codes(x: np.ndarray, bits: int, step: float, scale: float) -> np.ndarray:
    """Codes ``q`` (float64) with ``2^bits - 1`` meaning zero; NaN where ``x`` is NaN."""
    x64 = np.asarray(x, np.float64)
    with np.errstate(all="ignore"):
        t = -np.log2(x64 / scale) / step
    q = np.maximum(np.rint(t), 0.0)
    zero_code = 2**bits - 1
    q = np.where((x64 > 0) & (q < zero_code), q, zero_code)
    return np.where(np.isnan(x64), np.nan, q)


def log2_levels(q: np.ndarray, bits: int, base_kind: str, base: float, scale: float, table_size: int) -> np.ndarray:
    """Dequantized values of codes ``q`` in float32: ``(2^-e * factor) * scale``, 0 for the zero code."""
    zero = q == 2**bits - 1
    qi = np.where(np.isnan(q) | zero, 0, q).astype(np.int64)
    if base_kind == "log2":
        e, factor = qi, np.float32(1)
    elif base_kind == "log_sqrt2":
        e, factor = (qi + 1) // 2, np.where(qi % 2 == 1, SQRT2, np.float32(1))
    else:
        p = adaptive_exponent(base, table_size)
        n = qi * p
        e, factor = n // table_size, fraction_table(table_size)[n % table_size]
    power = np.ldexp(np.float32(1), -e.astype(np.int32)).astype(np.float32)
    y = (power * factor).astype(np.float32) * np.float32(scale)
    y = np.where(zero, np.float32(0), y)
    return np.where(np.isnan(q), np.float32(np.nan), y).astype(np.float32)


def log_step(base_kind: str, base: float, table_size: int) -> float:
    """The exponent step ``a`` of one code: level ``q`` is ``scale * 2^(-q*a)``."""
    if base_kind == "log2":
        return 1.0
    if base_kind == "log_sqrt2":
        return 0.5
    return adaptive_exponent(base, table_size) / table_size


def log2_quant_ref(x, bits, base_kind, base, scale, table_size):
    """Log-domain fake quantization, stated exactly (see module docstring)."""
    q = log2_codes(x, bits, log_step(base_kind, base, table_size), scale)
    return log2_levels(q, bits, base_kind, base, scale, table_size).reshape(np.shape(x))


def _log2_infer(x, bits, base_kind, base, scale, table_size):
    require_float(x, "log2_quant")
    if base_kind not in LOG2_KINDS:
        raise IRTypeError(f"log2_quant: base_kind {base_kind!r} must be one of {LOG2_KINDS}")
    if not 2 <= bits <= 8:
        raise IRTypeError(f"log2_quant: bits {bits} must be in 2..8")
    if not (scale > 0 and np.isfinite(scale)):
        raise IRTypeError(f"log2_quant: scale {scale} must be positive and finite")
    if table_size < 1:
        raise IRTypeError("log2_quant: table_size must be positive")
    if base_kind == "adaptive":
        adaptive_exponent(base, table_size)
    return [x]


register(
    "log2_quant",
    ["x"],
    {
        "bits": Attr("int", 4),
        "base_kind": Attr("str", "log_sqrt2"),
        "base": Attr("float", 2.0),
        "scale": Attr("float", 1.0),
        "table_size": Attr("int", 16),
    },
    _log2_infer,
    log2_quant_ref,
    "log-domain fake quantization: y = scale * 2^(-q*a), q = max(0, rint(-log2(x/scale)/a)), 0 past "
    "the last level or for x <= 0; a = 1 (log2), 1/2 (log_sqrt2), log2(base) = p/table_size (adaptive)",
    macs=lambda out, x, *_, **__: int(np.prod([d if isinstance(d, int) else 1 for d in out])),
    tags={"custom", "elementwise", "quantizer"},
)


# -- log2_matmul ------------------------------------------------------------------------------
LOG2_MATMUL_KINDS = ("log2", "log_sqrt2", "adaptive")
SQRT2_NUMERATOR = 11863283  # float32(sqrt2) = 11863283 * 2^-23, exactly
SQRT2_SHIFT = 23
TABLE_SHIFT = 24  # float32(2^(-r/D)) in (1/2, 1] is an integer times 2^-24
ACC_LIMIT = 2**31 - 1


def adaptive_period(base: float, table_size: int) -> tuple[int, int, int]:
    """``(p, R, g)``: ``base = 2^(p/D)``; the fractional part of ``q p / D`` takes ``R = D / g`` values
    (``g = gcd(p, D)``), ``r g / D`` for ``r`` in ``0..R-1``."""
    p = adaptive_exponent(base, table_size)
    g = int(np.gcd(p, table_size))
    return p, table_size // g, g


def level_exponent(q, base_kind: str, base: float = 2.0, table_size: int = 16):
    """``e`` of code ``q`` (int or int64 array): its level is ``2^-e`` times the class numerator."""
    if base_kind == "log2":
        return q
    if base_kind == "log_sqrt2":
        return (q + 1) // 2
    return q * adaptive_exponent(base, table_size) // table_size


def last_kept_code(bits: int, base_kind: str, base: float = 2.0, table_size: int = 16, floor_exponent: int = -1) -> int:
    """The largest code ``log2_matmul`` accumulates: ``2^bits - 2``, or with ``floor_exponent = W >= 0``
    the largest whose exponent is at most ``W`` (``e`` grows with ``q``)."""
    q = 2**bits - 2
    while floor_exponent >= 0 and q > 0 and level_exponent(q, base_kind, base, table_size) > floor_exponent:
        q -= 1
    return q


def smallest_level_exponent(
    bits: int, base_kind: str, base: float = 2.0, table_size: int = 16, floor_exponent: int = -1
) -> int:
    """``E``: the power-of-two exponent of the last kept level (code ``2^bits - 2`` without a floor)."""
    last = last_kept_code(bits, base_kind, base, table_size, floor_exponent)
    return level_exponent(last, base_kind, base, table_size)


def largest_floor_exponent(v_bits: int, k: int) -> int:
    """The largest ``W`` with ``(2^v_bits - 1) * k * 2^W`` within the int32 accumulator (-1: none)."""
    w = -1
    while (2**v_bits - 1) * k * 2 ** (w + 1) <= ACC_LIMIT:
        w += 1
    return w


def residue_numerators(base_kind: str, base: float = 2.0, table_size: int = 16) -> tuple[np.ndarray, int]:
    """``(N, S)``: a level is ``2^-e * N[r] * 2^-S`` exactly, ``r`` its residue class (one accumulator each):
    log2 ``[2^23]``; log-sqrt2 ``[2^23, 11863283]`` (``r`` = odd code); adaptive ``float32(2^(-r g / D)) * 2^24``
    (the ``fraction_table`` entries the code's fractional exponents reach)."""
    if base_kind == "log2":
        return np.array([1 << SQRT2_SHIFT], np.int64), SQRT2_SHIFT
    if base_kind == "log_sqrt2":
        return np.array([1 << SQRT2_SHIFT, SQRT2_NUMERATOR], np.int64), SQRT2_SHIFT
    _, periods, g = adaptive_period(base, table_size)
    table = fraction_table(table_size)[::g][:periods].astype(np.float64)
    return np.rint(table * 2.0**TABLE_SHIFT).astype(np.int64), TABLE_SHIFT


def log2_matmul_bound(
    bits: int, base_kind: str, v_bits: int, k: int, base: float = 2.0, table_size: int = 16, floor_exponent: int = -1
) -> int:
    """The largest ``|acc|`` an int32 accumulator of ``log2_matmul`` can reach over ``k`` terms."""
    return (2**v_bits - 1) * k * 2 ** smallest_level_exponent(bits, base_kind, base, table_size, floor_exponent)


def log2_shift_codes(
    p: np.ndarray,
    bits: int,
    base_kind: str,
    scale: float,
    base: float = 2.0,
    table_size: int = 16,
    floor_exponent: int = -1,
) -> tuple[np.ndarray, np.ndarray]:
    """``(shift, residue)`` int64 per element of ``p``: ``shift = E - e`` (``-1`` for the zero code, NaN
    and codes past the floor), ``residue`` the accumulator of the level (see :func:`residue_numerators`)."""
    q = log2_codes(p, bits, log_step(base_kind, base, table_size), scale)
    skip = np.isnan(q) | (q > last_kept_code(bits, base_kind, base, table_size, floor_exponent))
    qi = np.where(skip, 0, q).astype(np.int64)
    if base_kind == "log2":
        e, residue = qi, np.zeros_like(qi)
    elif base_kind == "log_sqrt2":
        e, residue = (qi + 1) // 2, qi % 2
    else:
        step, periods, g = adaptive_period(base, table_size)
        e, residue = qi * step // table_size, (qi * step // g) % periods
    shift = np.where(skip, -1, smallest_level_exponent(bits, base_kind, base, table_size, floor_exponent) - e)
    return shift, np.where(skip, 0, residue)


def quantize_v_int(v: np.ndarray, v_scale: float, v_zero_point: int, v_bits: int, v_signed: bool) -> np.ndarray:
    """``clip(rint(v / s) + z, lo, hi) - z`` as int64, float32 arithmetic as ``quantize_uniform`` (NaN -> 0)."""
    v = np.asarray(v, np.float32)
    lo, hi = uniform_range(v_bits, v_signed)
    clean = np.where(np.isnan(v), np.float32(0), v)
    q = np.clip(np.rint(clean / np.float32(v_scale)) + np.float32(v_zero_point), np.float32(lo), np.float32(hi))
    return q.astype(np.int64) - int(v_zero_point)


def log2_matmul_rescale(
    bits: int,
    base_kind: str,
    scale: float,
    v_scale: float,
    base: float = 2.0,
    table_size: int = 16,
    floor_exponent: int = -1,
) -> float:
    """``C = scale * v_scale * 2^-(E+S)`` in float64 (exact: float32 operands, a power of two)."""
    e = smallest_level_exponent(bits, base_kind, base, table_size, floor_exponent)
    shift = residue_numerators(base_kind, base, table_size)[1]
    return float(np.float64(np.float32(scale)) * np.float64(np.float32(v_scale)) * 2.0 ** -(e + shift))


def log2_matmul_ref(
    p,
    v,
    bits,
    base_kind,
    scale,
    v_scale,
    v_zero_point,
    v_bits,
    v_signed=False,
    base=2.0,
    table_size=16,
    floor_exponent=-1,
):
    """Shift-and-add attention, stated exactly (see module docstring)."""
    p, v = np.asarray(p, np.float32), np.asarray(v, np.float32)
    shift, residue = log2_shift_codes(p, bits, base_kind, scale, base, table_size, floor_exponent)
    v_int = quantize_v_int(v, v_scale, v_zero_point, v_bits, v_signed).astype(np.float64)
    power = np.where(shift >= 0, np.ldexp(1.0, np.maximum(shift, 0)), 0.0)  # 2^(E - e), exact in float64
    # float64 matmuls are exact here: every partial sum is an integer below 2^31 (the type check's bound)
    numerators, _ = residue_numerators(base_kind, base, table_size)
    t = sum(
        np.matmul(np.where(residue == r, power, 0.0), v_int).astype(np.int64) * int(n) for r, n in enumerate(numerators)
    )
    rescale = log2_matmul_rescale(bits, base_kind, scale, v_scale, base, table_size, floor_exponent)
    y = (t.astype(np.float64) * rescale).astype(np.float32)
    nan = np.isnan(p).any(axis=-1)[..., :, None] | np.isnan(v).any(axis=-2)[..., None, :]
    return np.where(nan, np.float32(np.nan), y).astype(np.float32)


def _log2_matmul_infer(
    p, v, bits, base_kind, scale, v_scale, v_zero_point, v_bits, v_signed, base, table_size, floor_exponent
):
    require_float(p, "log2_matmul")
    require_float(v, "log2_matmul")
    if p.rank < 2 or v.rank < 2 or p.shape[-1] != v.shape[-2]:
        raise IRTypeError(f"log2_matmul: p {p} must be [..., M, K] and v {v} [..., K, D]")
    if base_kind not in LOG2_MATMUL_KINDS:
        raise IRTypeError(f"log2_matmul: base_kind {base_kind!r} must be one of {LOG2_MATMUL_KINDS}")
    if base_kind == "adaptive":
        adaptive_exponent(base, table_size)  # raises when base is not 2^(p/D)
    if not 2 <= bits <= 8 or not 2 <= v_bits <= 8:
        raise IRTypeError(f"log2_matmul: bits {bits} and v_bits {v_bits} must be in 2..8")
    for name, value in (("scale", scale), ("v_scale", v_scale)):
        if not (value > 0 and np.isfinite(value)):
            raise IRTypeError(f"log2_matmul: {name} {value} must be positive and finite")
    lo, hi = uniform_range(v_bits, v_signed)
    if not lo <= v_zero_point <= hi:
        raise IRTypeError(f"log2_matmul: v_zero_point {v_zero_point} must be in [{lo}, {hi}]")
    k = p.shape[-1]
    if not isinstance(k, int):
        raise IRTypeError(f"log2_matmul: the contraction dimension of {p} must be static (int32 bound)")
    if floor_exponent < -1:
        raise IRTypeError(f"log2_matmul: floor_exponent {floor_exponent} must be -1 (every level) or >= 0")
    bound = log2_matmul_bound(bits, base_kind, v_bits, k, base, table_size, floor_exponent)
    if bound > ACC_LIMIT:
        e = smallest_level_exponent(bits, base_kind, base, table_size, floor_exponent)
        raise IRTypeError(
            f"log2_matmul: {bits}-bit {base_kind} levels reach 2^-{e}; {2**v_bits - 1} * {k} * 2^{e} overflows "
            f"the int32 accumulator: set floor_exponent <= {largest_floor_exponent(v_bits, k)}, keep "
            "log2_quant + matmul, or use fewer bits"
        )
    return _matmul_infer(p, v)


register(
    "log2_matmul",
    ["p", "v"],
    {
        "bits": Attr("int", 4),
        "base_kind": Attr("str", "log_sqrt2"),
        "scale": Attr("float", 1.0),
        "v_scale": Attr("float"),
        "v_zero_point": Attr("int", 0),
        "v_bits": Attr("int", 8),
        "v_signed": Attr("bool", False),
        "base": Attr("float", 2.0),
        "table_size": Attr("int", 16),
        "floor_exponent": Attr("int", -1),
    },
    _log2_matmul_infer,
    log2_matmul_ref,
    "y = float32(float64(sum_r acc_r * N_r) * scale * v_scale * 2^-(E+S)), acc_r = int32 sum_k v_int[k] << (E - e_k) "
    "over the log2 codes of p in residue class r (zero code skipped; N, S: 2^23 and 11863283 with S=23 for "
    "log2 / log-sqrt2, float32 table entries times 2^24 for adaptive bases), v_int = per-tensor uniform codes of v; "
    "floor_exponent W >= 0: levels with e > W skipped, E = min(E, W)",
    macs=lambda out, p, v, *_, **__: int(np.prod([d if isinstance(d, int) else 1 for d in out])) * int(p[-1]),
    tags={"custom", "contraction"},
)


# -- int8_linear ------------------------------------------------------------------------------
def quantize_activations(x2: np.ndarray, x_scale: float, x_zero_point: int, x_bits: int) -> np.ndarray:
    """``clip(rint(x / s) + z, 0, 2^bits - 1)`` as int32 (NaN rows give 0; the caller masks them)."""
    x2 = np.asarray(x2, np.float32)
    q = np.rint(np.where(np.isnan(x2), np.float32(0), x2) / np.float32(x_scale)) + np.float32(x_zero_point)
    return np.clip(q, 0, 2**x_bits - 1).astype(np.int32)


def row_params(x2: np.ndarray, x_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row dynamic ``(scale, zero_point)`` float32 ``[M, 1]`` of ``x_granularity="row"`` (NaN -> 0)."""
    x2 = np.where(np.isnan(x2), np.float32(0), np.asarray(x2, np.float32))
    qmax = np.float32(2**x_bits - 1)
    lo = np.minimum(x2.min(axis=1, keepdims=True), np.float32(0))
    hi = np.maximum(x2.max(axis=1, keepdims=True), np.float32(0))
    with np.errstate(all="ignore"):
        s = ((hi - lo) / qmax).astype(np.float32)
    s = np.where((s > 0) & np.isfinite(s), s, np.float32(1)).astype(np.float32)
    z = np.clip(np.rint(-lo / s), np.float32(0), qmax).astype(np.float32)
    return s, z


def int8_linear_ref(x, wq, w_scale, bias, x_scale, x_zero_point, x_bits, x_granularity="tensor"):
    """The integer kernel, stated exactly (see module docstring)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).astype(np.float32)
    if x_granularity == "row":
        s, z = row_params(x2, x_bits)
        clean = np.where(np.isnan(x2), np.float32(0), x2)
        qf = np.clip(np.rint(clean / s) + z, np.float32(0), np.float32(2**x_bits - 1))
        q = qf.astype(np.int64) - z.astype(np.int64)
        acc = (q @ wq.astype(np.int64).T).astype(np.int32)
        y = acc.astype(np.float32) * (s * w_scale.astype(np.float32)[None, :]).astype(np.float32)
    else:
        q = quantize_activations(x2, x_scale, int(x_zero_point), x_bits).astype(np.int64) - int(x_zero_point)
        acc = (q @ wq.astype(np.int64).T).astype(np.int32)
        rescale = (np.float32(x_scale) * w_scale.astype(np.float32)).astype(np.float32)
        y = acc.astype(np.float32) * rescale[None, :]
    y[np.isnan(x2).any(axis=1)] = np.nan
    if bias is not None:
        y = y + bias.astype(np.float32)
    return y.astype(np.float32).reshape(lead + (wq.shape[0],))


def _int8_linear_infer(x, wq, w_scale, bias, x_scale, x_zero_point, x_bits, x_granularity):
    require_float(x, "int8_linear")
    if x_granularity not in ("tensor", "row"):
        raise IRTypeError(f"int8_linear: x_granularity {x_granularity!r} must be 'tensor' or 'row'")
    if wq.dtype != "int8" or wq.rank != 2:
        raise IRTypeError(f"int8_linear: wq must be an int8 matrix [out, in], got {wq}")
    out, k = wq.shape
    if w_scale.dtype != "float32" or tuple(w_scale.shape) != (out,):
        raise IRTypeError(f"int8_linear: w_scale must be float32[{out}], got {w_scale}")
    if x.rank < 1 or x.shape[-1] != k:
        raise IRTypeError(f"int8_linear: input {x} must end in the {k} input features")
    if bias is not None and (tuple(bias.shape) != (out,) or bias.dtype != "float32"):
        raise IRTypeError(f"int8_linear: bias {bias} must be float32[{out}]")
    if not 2 <= x_bits <= 8:
        raise IRTypeError(f"int8_linear: x_bits {x_bits} must be in 2..8 (unsigned bytes)")
    if not (x_scale > 0 and np.isfinite(x_scale)):
        raise IRTypeError(f"int8_linear: x_scale {x_scale} must be positive and finite")
    if not 0 <= x_zero_point <= 2**x_bits - 1:
        raise IRTypeError(f"int8_linear: x_zero_point {x_zero_point} must be in [0, {2**x_bits - 1}]")
    return [x.with_shape(x.shape[:-1] + (out,))]


def _int8_linear_macs(out_shape, x, wq, *_):
    rows = int(np.prod([d if isinstance(d, int) else 1 for d in out_shape[:-1]]))
    return rows * (int(wq[0]) * int(wq[1]) + int(wq[0]))


register(
    "int8_linear",
    ["x", "wq", "w_scale", "bias?"],
    {
        "x_scale": Attr("float", 1.0),
        "x_zero_point": Attr("int", 0),
        "x_bits": Attr("int", 8),
        "x_granularity": Attr("str", "tensor"),
    },
    _int8_linear_infer,
    int8_linear_ref,
    "y = float32(sum_k (q(x)_k - z) * wq[o,k]) * (x_scale * w_scale[o]) + bias; q(x) unsigned x_bits per "
    "tensor (or per row at run time: x_granularity='row'), int32 accumulation, one float rescale per output",
    macs=_int8_linear_macs,
    tags={"custom", "contraction"},
)


# -- int8_conv2d ------------------------------------------------------------------------------
DIAG_LIMIT = 2**15  # |w_diag| bound: the int32 accumulator holds 255 * (127 * K + 2^15) for K < 60000


def int8_conv2d_ref(
    x, wq, w_scale, bias=None, w_diag=None, *, stride, padding, dilation, groups, x_scale, x_zero_point, x_bits
) -> np.ndarray:
    """The integer convolution, stated exactly (see module docstring)."""
    x = np.asarray(x, np.float32)
    z = int(x_zero_point)
    q = quantize_activations(x, x_scale, z, x_bits).astype(np.float64) - z  # zero padding is code z: 0 here
    codes = wq.astype(np.float64)
    if w_diag is not None:
        out, _, kh, kw = wq.shape
        codes[np.arange(out), np.arange(out), kh // 2, kw // 2] += np.asarray(w_diag, np.float64)
    # float64 is exact: every partial sum is an integer below 2^53 (|acc| <= 255 * (127 * K + 2^15))
    acc = conv2d(q, codes, None, stride, padding, dilation, groups).astype(np.int64).astype(np.int32)
    rescale = (np.float32(x_scale) * w_scale.astype(np.float32)).astype(np.float32)
    y = acc.astype(np.float32) * rescale[None, :, None, None]
    y[np.isnan(x).reshape(len(x), -1).any(axis=1)] = np.nan
    if bias is not None:
        y = y + bias.astype(np.float32)[None, :, None, None]
    return y.astype(np.float32)


def _int8_conv2d_infer(
    x, wq, w_scale, bias=None, w_diag=None, *, stride, padding, dilation, groups, x_scale, x_zero_point, x_bits
):
    require_float(x, "int8_conv2d")
    if wq.dtype != "int8":
        raise IRTypeError(f"int8_conv2d: wq must be an int8 OIHW filter, got {wq}")
    y = conv2d_output_type(x, wq, bias, stride, padding, dilation, groups, op="int8_conv2d", weight="wq")
    out = wq.shape[0]
    if w_scale.dtype != "float32" or tuple(w_scale.shape) != (out,):
        raise IRTypeError(f"int8_conv2d: w_scale must be float32[{out}], got {w_scale}")
    if bias is not None and bias.dtype != "float32":
        raise IRTypeError(f"int8_conv2d: bias {bias} must be float32[{out}]")
    if w_diag is not None:
        o, c, kh, kw = wq.shape
        if w_diag.dtype != "int32" or tuple(w_diag.shape) != (out,):
            raise IRTypeError(f"int8_conv2d: w_diag must be int32[{out}], got {w_diag}")
        if groups != 1 or o != c or kh % 2 == 0 or kw % 2 == 0:
            raise IRTypeError(
                f"int8_conv2d: w_diag needs groups=1, as many input as output channels and an odd kernel; "
                f"got groups={groups}, wq {list(wq.shape)}"
            )
    if not 2 <= x_bits <= 8:
        raise IRTypeError(f"int8_conv2d: x_bits {x_bits} must be in 2..8 (unsigned bytes)")
    if not (x_scale > 0 and np.isfinite(x_scale)):
        raise IRTypeError(f"int8_conv2d: x_scale {x_scale} must be positive and finite")
    if not 0 <= x_zero_point <= 2**x_bits - 1:
        raise IRTypeError(f"int8_conv2d: x_zero_point {x_zero_point} must be in [0, {2**x_bits - 1}]")
    return [y]


register(
    "int8_conv2d",
    ["x", "wq", "w_scale", "bias?", "w_diag?"],
    {
        "stride": Attr("ints", (1, 1)),
        "padding": Attr("ints", (0, 0, 0, 0)),
        "dilation": Attr("ints", (1, 1)),
        "groups": Attr("int", 1),
        "x_scale": Attr("float", 1.0),
        "x_zero_point": Attr("int", 0),
        "x_bits": Attr("int", 8),
    },
    _int8_conv2d_infer,
    int8_conv2d_ref,
    "NCHW conv of q(x) - z (unsigned x_bits per tensor, zero padding = code z) with int8 OIHW wq, int32 "
    "accumulation, y = float32(acc) * (x_scale * w_scale[o]) + bias[o]; an image holding NaN gives NaN; "
    "w_diag int32[O] adds to the centre tap of wq[o, o] (a fused identity branch kept off the int8 grid)",
    macs=lambda out, x, w, *_, **__: int(np.prod([d if isinstance(d, int) else 1 for d in out])) * int(np.prod(w[1:])),
    tags={"custom", "contraction"},
)

__all__ = [
    "LOG2_KINDS",
    "LOG2_MATMUL_KINDS",
    "SQRT2_NUMERATOR",
    "SQRT2",
    "adaptive_exponent",
    "fraction_table",
    "int8_conv2d_ref",
    "int8_linear_ref",
    "log2_codes",
    "log2_levels",
    "largest_floor_exponent",
    "last_kept_code",
    "level_exponent",
    "log2_matmul_bound",
    "DIAG_LIMIT",
    "adaptive_period",
    "residue_numerators",
    "log2_matmul_ref",
    "log2_matmul_rescale",
    "log2_shift_codes",
    "log2_quant_ref",
    "log_step",
    "quantize_activations",
    "quantize_uniform_ref",
    "quantize_v_int",
    "row_params",
    "smallest_level_exponent",
    "uniform_range",
]
