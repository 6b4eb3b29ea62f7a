"""reshift's multiplication-free weight ops: shift, binary-coded (BCQ) and ternary linear layers.

Each numpy reference here is the exact specification the TVM kernels are checked against:

* ``shift_linear`` (DeepShift-PS, Elhoushi et al. 2021): ``W[o,i] = scale[o] * sign[o,i] *
  2^-exponent[o,i]``. Activations are quantized per row to int8; the inner loop is integer
  shifts and adds; one float rescale per output.
* ``shift_conv2d``: ``shift_linear`` applied to the im2col rows of an NCHW convolution (see
  :func:`conv_patches`): one activation row per output pixel ``(n, oh, ow)`` and group, holding
  that group's ``C/groups * kh * kw`` inputs under the window, padding zeros included.
* ``bcq_linear`` (ShiftAddLLM, You et al. 2024, Eq. 2): ``W[o, group g] = sum_i alpha[o,g,i] *
  B_i[o, group g]`` with ``B_i`` in {-1,+1}, bit-packed; the kernel's lookup tables must match
  the float32 reference within 1e-5 relative.
* ``ternary_linear`` (BitNet b1.58, Ma et al. 2024): ``W[o, group g] = scale[o,g] * T``, ``T`` in
  {-1,0,+1}, 2 bits per weight.

Registered into :data:`reshift.ir.ops.OPS` (imported at the end of ``ir/ops.py``), tagged
``custom`` so the ONNX exporter writes them in the ``ai.reshift`` domain. Their ``macs`` count
the multiplies that remain (activation quantization, per-output or per-group rescaling): the
inner loop over the input features has none, only adds; :func:`inner_adds` counts those.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from reshift.errors import IRTypeError
from reshift.ir.ops import Attr, conv2d_output_type, register
from reshift.ir.shapes import require_float, require_rank
from reshift.ir.types import TensorType

INT32_MAX = 2**31 - 1
INT8_QMAX = 127


def _rows(shape) -> int:
    return int(np.prod(shape[:-1]))


def _check_weight_type(op: str, t: TensorType, name: str, dtype: str, shape: tuple) -> None:
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise IRTypeError(f"{op}: {name} must be {dtype}{list(shape)}, got {t}")


def _check_x_bias(op: str, x: TensorType, k: int, out: int, bias: TensorType | None) -> list[TensorType]:
    require_float(x, op)
    if x.rank < 1 or x.shape[-1] != k:
        raise IRTypeError(f"{op}: input {x} must end in the {k} input features")
    if bias is not None and (tuple(bias.shape) != (out,) or bias.dtype != x.dtype):
        raise IRTypeError(f"{op}: bias {bias} must be {x.dtype}[{out}]")
    return [x.with_shape(x.shape[:-1] + (out,))]


def _finish(y: np.ndarray, bias: np.ndarray | None, lead: tuple) -> np.ndarray:
    if bias is not None:
        y = y + bias.astype(np.float32)
    return y.astype(np.float32).reshape(lead + (y.shape[-1],))


# -- shift_linear -------------------------------------------------------------------------------
def quantize_rows_int8(x2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row symmetric int8: ``s = max|row| / 127``, ``q = clip(rint(x / s), -127, 127)``.

    ``rint`` rounds half to even; an all-zero row has ``s = 0, q = 0``. Returns ``(q int32, s
    float32, finite)``: a row holding NaN or +-inf is not finite and its outputs are NaN.
    """
    x2 = x2.astype(np.float32)
    amax = np.max(np.abs(x2), axis=1) if x2.shape[1] else np.zeros(x2.shape[0], np.float32)
    s = (amax / np.float32(INT8_QMAX)).astype(np.float32)
    finite = np.isfinite(s)
    safe = np.where(finite & (s > 0), s, np.float32(1)).astype(np.float32)
    q = np.rint(np.where(finite[:, None], x2, np.float32(0)) / safe[:, None])
    return np.clip(q, -INT8_QMAX, INT8_QMAX).astype(np.int32), s, finite


def shift_accumulator_bound(sign: np.ndarray, exponent: np.ndarray, exponent_bits: int) -> np.ndarray:
    """Per output channel, the largest possible ``|acc|``: ``127 * sum_i |sign| * 2^(E - exponent)``.

    The int32 kernel is exact iff this is at most 2^31 - 1. Every term is below 2^(7+E), so any
    ``K <= (2^31 - 1) // (127 * 2^E)`` is always safe (516 for E = 15, 132104 for E = 7).
    """
    e_max = 2**exponent_bits - 1
    shifts = np.left_shift(np.int64(1), (e_max - exponent.astype(np.int64)))
    return INT8_QMAX * np.sum(np.abs(sign.astype(np.int64)) * shifts, axis=-1)


def _check_shift_codes(op: str, sign: np.ndarray, exponent: np.ndarray, exponent_bits: int) -> None:
    """Refuse codes the kernel cannot run: ``sign`` outside {-1,0,1}, ``exponent`` above ``E``, or
    weights whose int32 accumulator could overflow (``sign``/``exponent`` as ``[O, K]``)."""
    e_max = 2**exponent_bits - 1
    if sign.size and (np.any(np.abs(sign.astype(np.int64)) > 1) or int(exponent.max()) > e_max):
        raise ValueError(f"{op}: sign must be in {{-1,0,1}} and exponent in [0, {e_max}]")
    if sign.size and int(shift_accumulator_bound(sign, exponent, exponent_bits).max()) > INT32_MAX:
        raise ValueError(
            f"{op}: weights can overflow the int32 accumulator (K = {sign.shape[1]}); split K or lower exponent_bits"
        )


def shift_rows(x2: np.ndarray, sign: np.ndarray, exponent: np.ndarray, scale: np.ndarray, exponent_bits: int):
    """The shift kernel on rows: ``x2 [M, K]``, ``sign``/``exponent [O, K]`` -> float32 ``[M, O]`` (no bias).

    ``acc[r,o] = sum_i sign[o,i] * (q[r,i] << (E - exponent[o,i]))`` in int32 (here: int64, the
    caller checks it fits int32), ``E = 2^exponent_bits - 1``; then in float32, left to right:
    ``y = float32(acc) * 2^-E * s[r] * scale[o]``; a non-finite row gives NaN.
    """
    e_max = 2**exponent_bits - 1
    q, s, finite = quantize_rows_int8(x2)
    w_int = sign.astype(np.int64) * np.left_shift(np.int64(1), e_max - exponent.astype(np.int64))
    acc = q.astype(np.int64) @ w_int.T
    y = acc.astype(np.float32) * np.float32(2.0**-e_max)
    y = y * s[:, None]
    y = y * scale.astype(np.float32)[None, :]
    y[~finite] = np.nan
    return y


def _shift_reference(x, sign, exponent, scale, bias, exponent_bits):
    """The kernel, stated exactly (see module docstring, :func:`quantize_rows_int8` and :func:`shift_rows`):
    ``y = shift_rows(x as [rows, K]) + bias`` in float32."""
    _check_shift_codes("shift_linear", sign, exponent, exponent_bits)
    lead, k = x.shape[:-1], x.shape[-1]
    return _finish(shift_rows(x.reshape(-1, k), sign, exponent, scale, exponent_bits), bias, lead)


def _check_exponent_bits(op: str, exponent_bits: int) -> None:
    if not 1 <= exponent_bits <= 5:
        raise IRTypeError(f"{op}: exponent_bits {exponent_bits} must be in 1..5 (shift up to 31)")


def _shift_infer(x, sign, exponent, scale, bias, exponent_bits):
    require_rank(sign, 2, "shift_linear", "sign")
    out, k = sign.shape
    _check_exponent_bits("shift_linear", exponent_bits)
    _check_weight_type("shift_linear", sign, "sign", "int8", (out, k))
    _check_weight_type("shift_linear", exponent, "exponent", "uint8", (out, k))
    _check_weight_type("shift_linear", scale, "scale", "float32", (out,))
    return _check_x_bias("shift_linear", x, k, out, bias)


def _shift_macs(out_shape, x, sign, *_):
    return _rows(out_shape) * (int(sign[0]) + int(x[-1]))  # one rescale per output, one per quantized input


register(
    "shift_linear",
    ["x", "sign", "exponent", "scale", "bias?"],
    {"exponent_bits": Attr("int", 4)},
    _shift_infer,
    _shift_reference,
    "DeepShift-PS y = x @ (scale*sign*2^-exponent)^T + bias; int8 per-row activations, int32 shift-add "
    "accumulation, one float rescale per output",
    macs=_shift_macs,
    tags={"custom", "contraction"},
)


# -- shift_conv2d ------------------------------------------------------------------------------
def conv_patches(x: np.ndarray, kernel, stride, padding, dilation, groups: int) -> tuple[np.ndarray, tuple[int, int]]:
    """im2col of NCHW ``x``: ``([groups, N*OH*OW, C/groups*kh*kw], (OH, OW))``.

    Rows run over ``(n, oh, ow)``, columns over ``(c, i, j)`` (the OIHW filter flattened per output
    channel); ``padding`` is (top, left, bottom, right) and its zeros are part of the rows.
    """
    n, c = x.shape[:2]
    kh, kw = kernel
    top, left, bottom, right = padding
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = sliding_window_view(xp, ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1), axis=(2, 3))
    windows = windows[:, :, :: stride[0], :: stride[1], :: dilation[0], :: dilation[1]]  # [n, c, oh, ow, kh, kw]
    oh, ow = windows.shape[2:4]
    windows = windows.reshape(n, groups, c // groups, oh, ow, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
    return windows.reshape(groups, n * oh * ow, c // groups * kh * kw), (oh, ow)


def _shift_conv_reference(x, sign, exponent, scale, bias, stride, padding, dilation, groups, exponent_bits):
    """:func:`shift_rows` on each group's :func:`conv_patches` rows against that group's output channels
    (filters flattened to ``[O, C/groups*kh*kw]``), then ``+ bias``, back to NCHW."""
    out = sign.shape[0]
    sign2, exponent2 = sign.reshape(out, -1), exponent.reshape(out, -1)
    _check_shift_codes("shift_conv2d", sign2, exponent2, exponent_bits)
    patches, (oh, ow) = conv_patches(x.astype(np.float32), sign.shape[2:], stride, padding, dilation, groups)
    per = out // groups
    y = np.concatenate(
        [
            shift_rows(
                patches[g],
                sign2[g * per : (g + 1) * per],
                exponent2[g * per : (g + 1) * per],
                scale[g * per : (g + 1) * per],
                exponent_bits,
            )
            for g in range(groups)
        ],
        axis=1,
    )  # [N*OH*OW, O]
    y = _finish(y, bias, (x.shape[0], oh, ow))
    return np.ascontiguousarray(y.transpose(0, 3, 1, 2))


def _shift_conv_infer(x, sign, exponent, scale, bias, stride, padding, dilation, groups, exponent_bits):
    op = "shift_conv2d"
    require_float(x, op)
    out = conv2d_output_type(x, sign, bias, stride, padding, dilation, groups, op=op, weight="sign")
    _check_exponent_bits(op, exponent_bits)
    _check_weight_type(op, sign, "sign", "int8", sign.shape)
    _check_weight_type(op, exponent, "exponent", "uint8", sign.shape)
    _check_weight_type(op, scale, "scale", "float32", (sign.shape[0],))
    if bias is not None and bias.dtype != x.dtype:
        raise IRTypeError(f"{op}: bias {bias} must be {x.dtype}[{sign.shape[0]}]")
    return [out]


def _shift_conv_macs(out_shape, x, sign, *_):
    pixels = int(out_shape[0]) * int(out_shape[2]) * int(out_shape[3])
    return pixels * (int(out_shape[1]) + int(x[1]) * int(sign[2]) * int(sign[3]))  # rescales + quantized inputs


register(
    "shift_conv2d",
    ["x", "sign", "exponent", "scale", "bias?"],
    {
        "stride": Attr("ints", (1, 1)),
        "padding": Attr("ints", (0, 0, 0, 0)),
        "dilation": Attr("ints", (1, 1)),
        "groups": Attr("int", 1),
        "exponent_bits": Attr("int", 4),
    },
    _shift_conv_infer,
    _shift_conv_reference,
    "DeepShift-PS NCHW conv, filter scale*sign*2^-exponent (sign i8, exponent u8 OIHW, scale f32[O]): "
    "shift_linear on the im2col rows (one per output pixel and group, padding zeros included), + bias",
    macs=_shift_conv_macs,
    tags={"custom", "contraction"},
)


# -- bit packing ----------------------------------------------------------------------------
def pack_signs(b: np.ndarray) -> np.ndarray:
    """``[..., K]`` of {-1,+1} to ``uint8[..., ceil(K/8)]``: bit 1 = +1, weight k at bit k%8 of byte k//8
    (LSB first); padding bits are 0."""
    return np.packbits(np.asarray(b) > 0, axis=-1, bitorder="little")


def unpack_signs(bits: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_signs`: int8 {-1,+1} ``[..., k]``."""
    planes = np.unpackbits(bits, axis=-1, count=k, bitorder="little")
    return (planes.astype(np.int8) * 2 - 1).astype(np.int8)


def pack_trits(t: np.ndarray) -> np.ndarray:
    """``[..., K]`` of {-1,0,+1} to ``uint8[..., ceil(K/4)]``: code ``t + 1`` (0: -1, 1: 0, 2: +1; 3 is
    invalid) in bits ``2*(k%4)`` and ``2*(k%4)+1`` of byte ``k//4`` (LSB first); padding holds code 1."""
    t = np.asarray(t)
    k = t.shape[-1]
    padded = np.ones(t.shape[:-1] + (-(-k // 4) * 4,), np.uint8)
    padded[..., :k] = (t + 1).astype(np.uint8)
    quads = padded.reshape(t.shape[:-1] + (-1, 4))
    return (quads[..., 0] | quads[..., 1] << 2 | quads[..., 2] << 4 | quads[..., 3] << 6).astype(np.uint8)


def unpack_trits(trits: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_trits`: int8 {-1,0,+1} ``[..., k]``; raises on code 3."""
    codes = (trits[..., :, None] >> np.array([0, 2, 4, 6], np.uint8)) & np.uint8(3)
    codes = codes.reshape(trits.shape[:-1] + (-1,))[..., :k]
    if np.any(codes == 3):
        raise ValueError("ternary_linear: trit code 3 is invalid (codes are t + 1 in {0, 1, 2})")
    return (codes.astype(np.int8) - 1).astype(np.int8)


def groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


# -- bcq_linear -----------------------------------------------------------------------------
def bcq_weight(bits: np.ndarray, alpha: np.ndarray, group_size: int, in_features: int) -> np.ndarray:
    """``W[o,k] = sum_i alpha[o, k // G, i] * B_i[o,k]`` in float32, summed in order i = 0, 1, ..."""
    signs = unpack_signs(bits, in_features).astype(np.float32)  # [q, O, K]
    scales = np.repeat(alpha.astype(np.float32), group_size, axis=1)[:, :in_features, :]  # [O, K, q]
    w = np.zeros(signs.shape[1:], np.float32)
    for i in range(signs.shape[0]):
        w += scales[:, :, i] * signs[i]
    return w


# -- int8 lookup tables (T-MAC) ---------------------------------------------------------------
LUT_DTYPES = ("float32", "int8")
TABLE_QMAX = 127


def int8_tables(x2: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """T-MAC's quantized tables (Wei et al. 2024, Sec. 3.2 "table quantization"): ``(Q int8 [M, groups,
    slots, 16], s float32 [M, groups])`` of rows ``x2 [M, K]``.

    Slot ``t`` of group ``g`` covers columns ``c = g G + 4t + j``, ``j = 0..3`` (``v_j = x[c]``, 0 past the
    group or ``K``). Its table entry ``n`` is ``T[n] = sum_j (bit j of n ? v_j : -v_j)``, summed in float32
    in order ``j = 0, 1, 2, 3``. Per (row, group) ``s = amax / 127`` with ``amax = max_t (((|v_0| + |v_1|) +
    |v_2|) + |v_3|)`` (the largest ``|T|`` of the group: the same float operations as the all-matching-
    signs entry), and ``Q = clip(rint(T / s), -127, 127)`` (``rint``: half to even; ``s = 0``: ``Q = 0``).
    """
    x2 = np.asarray(x2, np.float32)
    m, k = x2.shape
    n_groups = groups(k, group_size)
    slots = -(-group_size // 4)
    v = np.zeros((m, n_groups, slots * 4), np.float32)
    padded = np.zeros((m, n_groups * group_size), np.float32)
    padded[:, :k] = x2
    v[:, :, :group_size] = padded.reshape(m, n_groups, group_size)
    v = v.reshape(m, n_groups, slots, 4)
    signs = np.where((np.arange(16)[:, None] >> np.arange(4)) & 1, np.float32(1), np.float32(-1))  # [16, 4]
    table = v[..., None, 0] * signs[:, 0]
    absum = np.abs(v[..., 0])
    for j in range(1, 4):
        table = table + v[..., None, j] * signs[:, j]  # +-v exactly: the product by +-1 does not round
        absum = absum + np.abs(v[..., j])
    amax = absum.max(axis=2) if slots else np.zeros((m, n_groups), np.float32)
    s = (amax / np.float32(TABLE_QMAX)).astype(np.float32)
    safe = np.where(s > 0, s, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(table / safe[:, :, None, None]), -TABLE_QMAX, TABLE_QMAX).astype(np.int8)
    return q, s


def plane_nibbles(planes: np.ndarray, group_size: int) -> np.ndarray:
    """Sign planes uint8 {0,1} ``[q, O, K]`` (1 = +1) to table indices ``[q, O, groups, slots]``:
    ``sum_j B[o, g G + 4t + j] << j`` (0 past the group or ``K``)."""
    q, out, k = planes.shape
    n_groups, slots = groups(k, group_size), -(-group_size // 4)
    padded = np.zeros((q, out, n_groups * group_size), np.uint8)
    padded[..., :k] = planes
    cols = np.zeros((q, out, n_groups, slots * 4), np.uint8)
    cols[..., :group_size] = padded.reshape(q, out, n_groups, group_size)
    cols = cols.reshape(q, out, n_groups, slots, 4)
    return (cols << np.arange(4, dtype=np.uint8)).sum(axis=-1).astype(np.uint8)


def lut_int8_rows(
    x2: np.ndarray, planes: np.ndarray, alpha: np.ndarray, group_size: int, bias: np.ndarray | None = None
) -> np.ndarray:
    """The int8-table BCQ product, exactly as the kernel computes it: ``x2 [M, K]``, sign planes
    ``[q, O, K]`` (1 = +1), ``alpha [O, groups, q]`` -> float32 ``[M, O]``.

    With :func:`int8_tables` ``(Q, s)``: ``acc[m, o, g, i] = sum_t Q[m, g, t, nibble_i(o, g, t)]`` in
    integers (exact), then in float32, starting from ``bias`` (0 if none), for ``g = 0, 1, ...`` and
    within it ``i = 0, 1, ...``: ``y = y + float32(acc) * (alpha[o, g, i] * s[m, g])`` (a multiply, a
    multiply, an add: no fused multiply-add). A row holding NaN or +-inf gives NaN outputs.
    """
    x2 = np.asarray(x2, np.float32)
    m = x2.shape[0]
    q_planes, out, _ = planes.shape
    finite = np.isfinite(x2).all(axis=1)
    table, s = int8_tables(np.where(finite[:, None], x2, np.float32(0)), group_size)
    nib = plane_nibbles(planes, group_size)  # [q, O, G, S]
    n_groups, slots = nib.shape[2], nib.shape[3]
    y = np.zeros((m, out), np.float32) if bias is None else np.broadcast_to(bias.astype(np.float32), (m, out)).copy()
    a32 = np.asarray(alpha, np.float32)
    t_idx = np.arange(slots)
    for g in range(n_groups):
        for i in range(q_planes):
            looked = table[:, g][:, t_idx[None, :], nib[i, :, g, :]]  # [M, O, S]
            acc = looked.astype(np.int32).sum(axis=-1)
            y = y + acc.astype(np.float32) * (a32[None, :, g, i] * s[:, g, None])
    y[~finite] = np.nan
    return y


def ternary_planes(trits: np.ndarray, scale: np.ndarray, in_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Ternary as two sign planes ``(P = [T = +1], N = [T = -1])`` with ``alpha = (scale/2, -scale/2)``:
    ``T = (P' - N') / 2`` for the {-1,+1} planes ``P' = 2P - 1``, ``N' = 2N - 1`` (how the LUT kernels run it)."""
    t = unpack_trits(trits, in_features)
    half = np.asarray(scale, np.float32) * np.float32(0.5)
    return np.stack([t > 0, t < 0]).astype(np.uint8), np.stack([half, -half], axis=-1)


def _check_lut_dtype(op: str, lut_dtype: str) -> None:
    if lut_dtype not in LUT_DTYPES:
        raise IRTypeError(f"{op}: lut_dtype {lut_dtype!r} must be one of {', '.join(LUT_DTYPES)}")


def _nan_rows_where_not_finite(x2: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Outputs of a row holding NaN or +-inf are NaN: a table of +-sums turns inf into inf - inf.

    The lookup-table kernels define it so (as ``shift_linear`` does), rather than reproduce the
    mix of +-inf and NaN a dense product happens to give.
    """
    y[~np.isfinite(x2).all(axis=1)] = np.nan
    return y


def _bcq_reference(x, bits, alpha, bias, group_size, in_features, lut_dtype="float32"):
    """``lut_dtype="float32"``: float32 ``x @ W^T + bias`` with ``W`` from :func:`bcq_weight` (the float
    LUT kernel matches it within 1e-5 relative); ``"int8"``: :func:`lut_int8_rows` (T-MAC int8 tables),
    which the int8 kernel matches exactly."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).astype(np.float32)
    if lut_dtype == "int8":
        planes = np.unpackbits(bits, axis=-1, count=in_features, bitorder="little")
        y = lut_int8_rows(x2, planes, alpha, group_size, None if bias is None else np.asarray(bias))
        return y.reshape(lead + (y.shape[-1],))
    w = bcq_weight(bits, alpha, group_size, in_features)
    return _finish(_nan_rows_where_not_finite(x2, x2 @ w.T), bias, lead)


def _bcq_infer(x, bits, alpha, bias, group_size, in_features, lut_dtype="float32"):
    _check_lut_dtype("bcq_linear", lut_dtype)
    require_rank(bits, 3, "bcq_linear", "bits")
    q, out, _ = bits.shape
    if group_size < 1 or in_features < 1:
        raise IRTypeError("bcq_linear: group_size and in_features must be positive")
    _check_weight_type("bcq_linear", bits, "bits", "uint8", (q, out, groups(in_features, 8)))
    _check_weight_type("bcq_linear", alpha, "alpha", "float32", (out, groups(in_features, group_size), q))
    return _check_x_bias("bcq_linear", x, in_features, out, bias)


def _bcq_macs(out_shape, x, bits, alpha, *_):
    return _rows(out_shape) * int(np.prod(alpha))  # one alpha multiply per (output, group, bit plane)


register(
    "bcq_linear",
    ["x", "bits", "alpha", "bias?"],
    {"group_size": Attr("int", 128), "in_features": Attr("int"), "lut_dtype": Attr("str", "float32")},
    _bcq_infer,
    _bcq_reference,
    "ShiftAddLLM BCQ y = x @ W^T + bias, W[o,k] = sum_i alpha[o,k//group_size,i] * B_i[o,k]; "
    "bits uint8[q, out, ceil(in/8)] (bit 1 = +1, LSB first), alpha f32[out, ceil(in/group_size), q]; "
    "lut_dtype int8: T-MAC int8 tables per (row, group), integer lookups, one rescale per (group, plane)",
    macs=_bcq_macs,
    tags={"custom", "contraction"},
)


# -- ternary_linear -------------------------------------------------------------------------
def ternary_weight(trits: np.ndarray, scale: np.ndarray, group_size: int, in_features: int) -> np.ndarray:
    t = unpack_trits(trits, in_features).astype(np.float32)
    return np.repeat(scale.astype(np.float32), group_size, axis=1)[:, :in_features] * t


def _ternary_reference(x, trits, scale, bias, group_size, in_features, lut_dtype="float32"):
    """Float32 ``x @ W^T + bias``, ``W[o,k] = scale[o, k // G] * T[o,k]``; ``lut_dtype="int8"``:
    :func:`lut_int8_rows` on the two sign planes of :func:`ternary_planes`."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).astype(np.float32)
    if lut_dtype == "int8":
        planes, alpha = ternary_planes(trits, scale, in_features)
        y = lut_int8_rows(x2, planes, alpha, group_size, None if bias is None else np.asarray(bias))
        return y.reshape(lead + (y.shape[-1],))
    w = ternary_weight(trits, scale, group_size, in_features)
    return _finish(_nan_rows_where_not_finite(x2, x2 @ w.T), bias, lead)


def _ternary_infer(x, trits, scale, bias, group_size, in_features, lut_dtype="float32"):
    _check_lut_dtype("ternary_linear", lut_dtype)
    require_rank(trits, 2, "ternary_linear", "trits")
    out = trits.shape[0]
    if group_size < 1 or in_features < 1:
        raise IRTypeError("ternary_linear: group_size and in_features must be positive")
    _check_weight_type("ternary_linear", trits, "trits", "uint8", (out, groups(in_features, 4)))
    _check_weight_type("ternary_linear", scale, "scale", "float32", (out, groups(in_features, group_size)))
    return _check_x_bias("ternary_linear", x, in_features, out, bias)


register(
    "ternary_linear",
    ["x", "trits", "scale", "bias?"],
    {"group_size": Attr("int", 128), "in_features": Attr("int"), "lut_dtype": Attr("str", "float32")},
    _ternary_infer,
    _ternary_reference,
    "BitNet b1.58 y = x @ W^T + bias, W[o,k] = scale[o,k//group_size] * T[o,k], T in {-1,0,1} packed "
    "2 bits each as code T+1 (LSB first) in uint8[out, ceil(in/4)]; lut_dtype int8: bcq_linear's int8 tables "
    "on the planes [T=+1], [T=-1] with alpha +-scale/2",
    macs=lambda out, x, trits, scale, *_: _rows(out) * int(np.prod(scale)),
    tags={"custom", "contraction"},
)


def inner_adds(op: str, out_shape, x_shape, weight_shape) -> int:
    """Adds in the inner loop of a low-bit op (``weight_shape``: sign / bits / trits)."""
    planes = int(weight_shape[0]) if op == "bcq_linear" else 1
    return _rows(out_shape) * int(out_shape[-1]) * int(x_shape[-1]) * planes


__all__ = [
    "INT32_MAX",
    "LUT_DTYPES",
    "bcq_weight",
    "int8_tables",
    "lut_int8_rows",
    "plane_nibbles",
    "conv_patches",
    "groups",
    "inner_adds",
    "pack_signs",
    "pack_trits",
    "quantize_rows_int8",
    "shift_accumulator_bound",
    "shift_rows",
    "ternary_planes",
    "ternary_weight",
    "unpack_signs",
    "unpack_trits",
]
