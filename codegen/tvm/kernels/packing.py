"""Re-layout of packed low-bit weights for the CPU kernels (bit/byte shuffles only, never floats).

BCQ and ternary weights become *nibble words*: for a block of 16 output rows, one uint32 lane per
row holds 8 nibbles, each nibble the 4 sign bits of 4 consecutive input columns of one bit plane
(T-MAC layout, Wei et al. 2024). A vector load of 16 lanes serves 16 rows; slot ``j`` (the j-th 4
activations of the word) sits at nibble ``nibble_position(j) = 2 (j % 4) + j // 4``, so byte ``b`` of a
word holds slots ``b`` (low nibble) and ``b + 4`` (high nibble): ``(word >> 4 nibble_position(j)) & 15``
indexes the float kernel's 16-entry table (``vpermps``), and for the int8 kernel one and-mask gives 4
slots' nibbles of 16 rows as 64 ``vpermb`` indices, a shift by 4 the other 4 (``lut_gemv_int8.py``).
Group ``g`` spans slots ``0 .. ceil(G/4)`` (padded to a multiple of 8 slots); a slot column past
the group or past K reads a zero activation, so its table is all zero and its bits do not matter.

Shift weights become one signed byte per weight: ``E - exponent`` in bits 0-4, the sign in bit 7,
and ``32`` (a shift that yields 0) where the sign is 0.
"""

from __future__ import annotations

import numpy as np

from reshift.ir.ops_lowbit import groups, unpack_trits

ROWS = 16  # output rows per vector (one AVX-512 register of uint32 / float32 lanes)
SLOTS_PER_WORD = 8  # 4-column nibbles per uint32


def nibble_position(slot):
    """The nibble of a word holding its slot ``slot`` (0..7): ``2 (slot % 4) + slot // 4`` (int or TIR expr)."""
    return 2 * (slot % 4) + slot // 4


def column_bit(column):
    """The bit of a word holding its column ``column`` (0..31): bit ``column % 4`` of slot ``column // 4``'s nibble."""
    return 4 * nibble_position(column // 4) + column % 4


def slot_layout(group_size: int) -> tuple[int, int]:
    """``(slots per group padded to whole words, words per group)``."""
    words = -(-group_size // (4 * SLOTS_PER_WORD))
    return words * SLOTS_PER_WORD, words


def _plane_bits(bits: np.ndarray, in_features: int) -> np.ndarray:
    """uint8 {0,1} ``[q, O, K]`` from the LSB-first packed planes."""
    return np.unpackbits(bits, axis=-1, count=in_features, bitorder="little")


def nibble_words(planes: np.ndarray, group_size: int) -> np.ndarray:
    """``planes`` uint8 {0,1} ``[q, O, K]`` to uint32 words ``[ceil(O/16), groups, q, words, 16]``."""
    q, out, k = planes.shape
    n_groups = groups(k, group_size)
    slots, words = slot_layout(group_size)
    padded = np.zeros((q, out, n_groups * group_size), np.uint8)
    padded[:, :, :k] = planes
    grouped = np.zeros((q, out, n_groups, slots * 4), np.uint32)
    grouped[..., :group_size] = padded.reshape(q, out, n_groups, group_size)
    cols = grouped.reshape(q, out, n_groups, words, SLOTS_PER_WORD * 4)
    shifts = np.array([column_bit(c) for c in range(SLOTS_PER_WORD * 4)], np.uint32)
    packed = np.bitwise_or.reduce(cols << shifts, axis=-1).astype(np.uint32)  # [q, O, groups, words]
    blocks = -(-out // ROWS)
    full = np.zeros((q, blocks * ROWS, n_groups, words), np.uint32)
    full[:, :out] = packed
    return np.ascontiguousarray(full.reshape(q, blocks, ROWS, n_groups, words).transpose(1, 3, 0, 4, 2))


def row_blocked(values: np.ndarray) -> np.ndarray:
    """Per-row float data ``[O, ...]`` as ``[ceil(O/16), ..., 16]`` (zero padded rows)."""
    out = values.shape[0]
    blocks = -(-out // ROWS)
    full = np.zeros((blocks * ROWS,) + values.shape[1:], values.dtype)
    full[:out] = values
    full = full.reshape((blocks, ROWS) + values.shape[1:])
    return np.ascontiguousarray(np.moveaxis(full, 1, -1))


def alpha_dtype_for(alpha: np.ndarray) -> str:
    """``"float16"`` when every scale survives a round trip through float16 exactly (then storing it in
    half the bytes changes no result), else ``"float32"``."""
    a32 = np.asarray(alpha, np.float32)
    with np.errstate(over="ignore"):
        return "float16" if np.array_equal(a32.astype(np.float16).astype(np.float32), a32) else "float32"


def pack_bcq(
    bits: np.ndarray, alpha: np.ndarray, group_size: int, in_features: int, alpha_dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray]:
    """``(words [OB, groups, q, words, 16] uint32, alpha [OB, groups, q, 16] alpha_dtype)``."""
    words = nibble_words(_plane_bits(bits, in_features), group_size)
    return words, row_blocked(alpha.astype(alpha_dtype))


def pack_ternary(
    trits: np.ndarray, scale: np.ndarray, group_size: int, in_features: int, alpha_dtype: str = "float32"
) -> tuple[np.ndarray, np.ndarray]:
    """Ternary as two sign planes: ``T = (P - N) / 2`` with ``P = 2[T=+1] - 1``, ``N = 2[T=-1] - 1``.

    So ``W = scale/2 * P - scale/2 * N`` runs through the BCQ kernel with q = 2 (the halving is exact,
    in float16 too unless ``scale/2`` falls below float16's normal range).
    """
    t = unpack_trits(trits, in_features)
    planes = np.stack([(t > 0), (t < 0)]).astype(np.uint8)
    half = scale.astype(np.float32) * np.float32(0.5)
    return nibble_words(planes, group_size), row_blocked(np.stack([half, -half], axis=-1).astype(alpha_dtype))


SHIFT_ZERO = 32  # vpsllvd by >= 32 gives 0


def pack_shift(sign: np.ndarray, exponent: np.ndarray, exponent_bits: int) -> np.ndarray:
    """One int8 code per weight, row-blocked ``[ceil(O/16), K, 16]``: bit 7 sign, bits 0-5 the shift."""
    e_max = 2**exponent_bits - 1
    shift = (e_max - exponent.astype(np.int16)).astype(np.int16)
    code = np.where(sign == 0, SHIFT_ZERO, shift | np.where(sign < 0, 0x80, 0)).astype(np.uint8).view(np.int8)
    return row_blocked(code)
