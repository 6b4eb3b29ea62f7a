"""Partial evaluation of shape arithmetic that may involve symbolic sizes (batch, sequence, ...).

Exporters compute shapes at run time (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``).
The ONNX frontend evaluates those chains at conversion time over *known* values: numpy
arrays whose elements are ints or :class:`Sym` (a monomial ``k*N*S`` of the graph's symbols,
the IR's symbolic dimension), so a ``Reshape`` gets a static target such as
``("N", "S", 6, 64)``. Arrays without a :class:`Sym` are ordinary int64 arrays and fold
through the op registry's numpy references instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from reshift.errors import ReshiftError
from reshift.ir.types import Dim, dim_terms, monomial

SYMBOL = "N"  # the batch symbol: a symbolic axis 0 of a graph input


class ShapeEvalError(ReshiftError):
    """A shape computation cannot be evaluated without knowing the symbolic sizes."""


class Sym:
    """``coefficient * prod(symbols)``: a size that scales with symbolic dimensions (``4*N*S``)."""

    __slots__ = ("coefficient", "symbols")

    def __init__(self, coefficient: int, symbols: tuple[str, ...] = (SYMBOL,)):
        self.coefficient = int(coefficient)
        self.symbols = tuple(sorted(symbols))

    @property
    def dim(self) -> Dim:
        return monomial(self.coefficient, self.symbols)

    @staticmethod
    def _other(other):
        if isinstance(other, Sym):
            return other
        if isinstance(other, (int, np.integer)):
            return int(other)
        raise ShapeEvalError(f"cannot combine a symbolic size with {other!r}")

    def __mul__(self, other):
        other = self._other(other)
        if isinstance(other, Sym):
            return _known(self.coefficient * other.coefficient, self.symbols + other.symbols)
        return _known(self.coefficient * other, self.symbols)

    __rmul__ = __mul__

    def __floordiv__(self, other):
        other = self._other(other)
        divisor, symbols = (other.coefficient, other.symbols) if isinstance(other, Sym) else (other, ())
        rest = list(self.symbols)
        for symbol in symbols:
            if symbol not in rest:
                raise ShapeEvalError(f"{self} is not a multiple of {other}")
            rest.remove(symbol)
        if divisor == 0 or self.coefficient % divisor:
            raise ShapeEvalError(f"{self} / {other} is not a whole dimension for every size")
        return _known(self.coefficient // divisor, tuple(rest))

    __truediv__ = __floordiv__

    def __rfloordiv__(self, other):
        raise ShapeEvalError(f"cannot divide {other!r} by the symbolic size {self}")

    __rtruediv__ = __rfloordiv__

    def __add__(self, other):
        other = self._other(other)
        if isinstance(other, Sym) and other.symbols == self.symbols:
            return _known(self.coefficient + other.coefficient, self.symbols)
        if not isinstance(other, Sym) and other == 0:
            return self
        raise ShapeEvalError(f"{self} + {other} is not a single symbolic dimension (a monomial such as 2*N)")

    __radd__ = __add__

    def __sub__(self, other):
        return self + (-1) * other if not isinstance(other, Sym) else self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def __neg__(self):
        return Sym(-self.coefficient, self.symbols)

    def __eq__(self, other):
        if isinstance(other, Sym):
            return self.coefficient == other.coefficient and self.symbols == other.symbols
        return False  # a symbolic size is treated as unknown, never a particular number

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(("Sym", self.coefficient, self.symbols))

    def __int__(self):
        raise ShapeEvalError(f"{self} has no fixed value; it depends on the symbolic sizes {', '.join(self.symbols)}")

    __index__ = __int__

    def __repr__(self):
        if self.coefficient < 0:
            return f"-{monomial(-self.coefficient, self.symbols)}"
        return str(self.dim)


def _known(coefficient: int, symbols: tuple[str, ...]):
    """A known element: an int without symbols (or for 0), else a :class:`Sym`."""
    return int(coefficient) if not symbols or coefficient == 0 else Sym(coefficient, symbols)


def dim_to_known(dim: Dim):
    """An IR dimension (``7`` or ``"4*N*S"``) as a known element (``7`` or ``Sym(4, ("N", "S"))``)."""
    coefficient, symbols = dim_terms(dim)
    return coefficient if not symbols else Sym(coefficient, symbols)


def known_to_dim(element) -> Dim:
    """Inverse of :func:`dim_to_known`, for writing a known shape vector into an attribute."""
    if isinstance(element, Sym):
        if element.coefficient <= 0:
            raise ShapeEvalError(f"{element} is not a size (negative for every value of its symbols)")
        return element.dim
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
            raise ShapeEvalError(f"cannot order the symbolic size {a if isinstance(a, Sym) else b} against a number")
        return fn(a, b)

    return compare


def _max(a, b):
    if isinstance(b, Sym) and not isinstance(a, Sym):
        a, b = b, a
    if isinstance(a, Sym) and not isinstance(b, Sym) and b <= 1:
        return a  # a symbolic size is at least 1
    return _compare(max)(a, b)


def _cast(x, dtype):
    if dtype not in ("int64", "int32"):
        raise ShapeEvalError(f"cannot cast a shape holding symbolic sizes to {dtype}")
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


class SymbolNames:
    """The IR symbol of every symbolic axis of an ONNX model's graph inputs.

    Axis 0 is the batch ``N`` (and so is its ``dim_param`` wherever else it appears); another
    axis takes its ``dim_param`` made an identifier (``"sequence length"`` -> ``sequence_length``),
    shared by every axis naming it, so ``input_ids`` and ``attention_mask`` agree on ``[N, seq]``;
    an unnamed or ``-1`` axis, or a placeholder such as ``"?"``, gets a fresh ``S1``, ``S2``...
    ``origins`` records where each symbol comes from, for error messages and for pinning it
    (:mod:`reshift.specializing`).
    """

    def __init__(self, graph, initializers: set[str] = frozenset()):
        self.origins: dict[str, list[tuple[str, int]]] = {}
        self._by_param: dict[str, str] = {}
        self._by_axis: dict[tuple[str, int], str] = {}
        self._fresh = 0
        for value_info in graph.input:
            dims = value_info.type.tensor_type.shape.dim if value_info.name not in initializers else []
            if dims and dims[0].dim_param:
                self._by_param[dims[0].dim_param] = SYMBOL

    def symbol(self, input_name: str, axis: int, dim_param: str = "") -> str:
        """The symbol of ``input_name``'s symbolic ``axis`` (the same answer every time it is asked)."""
        key = (input_name, axis)
        if key not in self._by_axis:
            if axis == 0:
                symbol = SYMBOL
            elif dim_param in self._by_param:
                symbol = self._by_param[dim_param]
            else:
                symbol = self._new(dim_param)
                if _identifier(dim_param):  # a placeholder such as "?" names nothing: no sharing
                    self._by_param[dim_param] = symbol
            self._by_axis[key] = symbol
            self.origins.setdefault(symbol, []).append(key)
        return self._by_axis[key]

    def _new(self, dim_param: str) -> str:
        taken = {SYMBOL, *self._by_param.values(), *self.origins}
        name = _identifier(dim_param)
        while not name or name in taken:
            self._fresh += 1
            name = f"S{self._fresh}"
        return name

    def probe(self, symbol: str, index: int) -> int:
        """A concrete size for a non-batch symbol in probe conversion ``index`` (0 or 1): distinct per symbol."""
        rank = sorted(s for s in self.origins if s != SYMBOL).index(symbol) if symbol in self.origins else 0
        base = 5 + 2 * rank
        return base if index == 0 else 2 * base + 1


def _identifier(dim_param: str) -> str:
    """``dim_param`` as an IR symbol name (``"seq len"`` -> ``seq_len``); "" when nothing of it is usable."""
    name = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in dim_param.strip()).strip("_")
    return f"S_{name}" if name[:1].isdigit() else name
