"""Partial evaluation of shape arithmetic that may involve the symbolic batch size.

Exporters compute shapes at run time (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``).
The ONNX frontend evaluates those chains at conversion time over *known* values: numpy
arrays whose elements are ints or :class:`Sym` (an integer multiple of the batch symbol), so a
``Reshape`` gets a static target such as ``("N", 197, 6, 64)``. Arrays without a :class:`Sym`
are ordinary int64 arrays and fold through the op registry's numpy references instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from reshift.errors import ReshiftError
from reshift.ir.types import Dim, make_dim, split_dim

SYMBOL = "N"


class ShapeEvalError(ReshiftError):
    """A shape computation cannot be evaluated without knowing the batch size."""


class Sym:
    """``coefficient * N``: a dimension that scales with the symbolic batch size."""

    __slots__ = ("coefficient",)

    def __init__(self, coefficient: int):
        self.coefficient = int(coefficient)

    @staticmethod
    def _other(other):
        if isinstance(other, Sym):
            return other
        if isinstance(other, (int, np.integer)):
            return int(other)
        raise ShapeEvalError(f"cannot combine the batch size with {other!r}")

    def __mul__(self, other):
        other = self._other(other)
        if isinstance(other, Sym):
            raise ShapeEvalError("the product of two batch-dependent sizes is not a dimension")
        return Sym(self.coefficient * other) if other else 0

    __rmul__ = __mul__

    def __floordiv__(self, other):
        other = self._other(other)
        if isinstance(other, Sym):
            if self.coefficient % other.coefficient:
                raise ShapeEvalError(f"{self} is not a multiple of {other}")
            return self.coefficient // other.coefficient
        if other <= 0 or self.coefficient % other:
            raise ShapeEvalError(f"{self} / {other} is not a whole dimension for every batch size")
        return Sym(self.coefficient // other)

    __truediv__ = __floordiv__

    def __rfloordiv__(self, other):
        raise ShapeEvalError(f"cannot divide {other!r} by the batch size")

    __rtruediv__ = __rfloordiv__

    def __add__(self, other):
        other = self._other(other)
        if isinstance(other, Sym):
            return Sym(self.coefficient + other.coefficient)
        if other == 0:
            return self
        raise ShapeEvalError(f"{self} + {other} is not a multiple of the batch size")

    __radd__ = __add__

    def __sub__(self, other):
        return self + (-1) * other if not isinstance(other, Sym) else self + Sym(-other.coefficient)

    def __rsub__(self, other):
        return Sym(-self.coefficient) + other

    def __neg__(self):
        return Sym(-self.coefficient)

    def __eq__(self, other):
        if isinstance(other, Sym):
            return self.coefficient == other.coefficient
        return False  # the batch size is treated as unknown, never a particular number

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(("Sym", self.coefficient))

    def __int__(self):
        raise ShapeEvalError(f"{self} has no fixed value; it depends on the batch size")

    __index__ = __int__

    def __repr__(self):
        return str(make_dim(self.coefficient, SYMBOL))


def dim_to_known(dim: Dim):
    """An IR dimension (``7`` or ``"4*N"``) as a known element (``7`` or ``Sym(4)``)."""
    coefficient, symbol = split_dim(dim)
    return coefficient if symbol is None else Sym(coefficient)


def known_to_dim(element) -> Dim:
    """Inverse of :func:`dim_to_known`, for writing a known shape vector into an attribute."""
    if isinstance(element, Sym):
        return make_dim(element.coefficient, SYMBOL)
    return int(element)


def has_sym(array: np.ndarray) -> bool:
    return array.dtype == object and any(isinstance(e, Sym) for e in array.flat)


def normalize(array: np.ndarray) -> np.ndarray:
    """An object array without symbols becomes int64 (the only dtype shapes use)."""
    if array.dtype == object and not has_sym(array):
        return np.asarray(array.tolist(), dtype=np.int64).reshape(array.shape)
    return array


def shape_vector(dims) -> np.ndarray:
    """An IR shape as a known 1-D vector (object dtype when symbolic)."""
    elements = [dim_to_known(d) for d in dims]
    if any(isinstance(e, Sym) for e in elements):
        out = np.empty(len(elements), dtype=object)
        out[:] = elements
        return out
    return np.asarray(elements, dtype=np.int64)


def _elementwise(fn: Callable) -> Callable:
    def apply(a, b):
        a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
        a, b = np.broadcast_arrays(a, b)
        out = np.empty(a.shape, dtype=object)
        for index in np.ndindex(a.shape):
            out[index] = fn(a[index], b[index])
        return out

    return apply


def _div(a, b):
    if isinstance(a, Sym) or isinstance(b, Sym):
        return a // b
    return int(np.trunc(a / b))


def _compare(fn: Callable) -> Callable:
    def compare(a, b):
        if isinstance(a, Sym) or isinstance(b, Sym):
            raise ShapeEvalError("cannot order a batch-dependent size against a number")
        return fn(a, b)

    return compare


def _max(a, b):
    if isinstance(b, Sym) and not isinstance(a, Sym):
        a, b = b, a
    if isinstance(a, Sym) and not isinstance(b, Sym) and b <= 1:
        return a  # the batch size is at least 1
    return _compare(max)(a, b)


def _cast(x, dtype):
    if dtype not in ("int64", "int32"):
        raise ShapeEvalError(f"cannot cast a batch-dependent shape to {dtype}")
    return x


def _where(cond, a, b):
    return np.where(np.asarray(cond, dtype=bool), np.asarray(a, dtype=object), np.asarray(b, dtype=object))


# Ops evaluated on object arrays that hold Sym elements; the rest reuse the IR references,
# which work unchanged on object arrays (reshape, concat, gather, slice, transpose, expand).
SYM_OPS: dict[str, Callable] = {
    "add": _elementwise(lambda a, b: a + b),
    "sub": _elementwise(lambda a, b: a - b),
    "mul": _elementwise(lambda a, b: a * b),
    "div": _elementwise(_div),
    "maximum": _elementwise(_max),
    "equal": lambda a, b: _elementwise(lambda x, y: x == y)(a, b).astype(bool),
    "less": lambda a, b: _elementwise(_compare(lambda x, y: x < y))(a, b).astype(bool),
    "greater": lambda a, b: _elementwise(_compare(lambda x, y: x > y))(a, b).astype(bool),
    "where": _where,
    "cast": _cast,
    "identity": lambda x: x,
    "neg": lambda x: _elementwise(lambda a, _: -a)(x, 0),
}
SYM_PASSTHROUGH = frozenset({"reshape", "concat", "gather", "slice", "transpose", "expand", "split"})
