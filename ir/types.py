"""Tensor types of the IR: static shapes whose dimensions may be symbolic monomials.

A dimension is an ``int`` or a symbolic ``str``: a monomial ``k*A*B...``, a positive integer
coefficient times a product of symbols (a symbol may repeat), written canonically with the
coefficient first (omitted when 1) and the symbols sorted: ``"N"``, ``"197*N"``, ``"12*N*S"``.
Monomials are what flattening and head reshapes produce (``[N, S, 384] -> [N*S, 384]``,
``[N*S, 384] -> [N, S, 6, 64]``), so :func:`dim_mul` and :func:`dim_div` are closed over them;
a sum of two different monomials (``S + 1``) is not a dimension and is refused. A graph may hold
several symbols (batch ``N``, sequence length ``S``, ...); each is bound from the inputs at run time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from reshift.errors import IRTypeError

Dim = int | str

# dtype name -> short name used by the text form
DTYPES: dict[str, str] = {
    "float32": "f32",
    "float64": "f64",
    "float16": "f16",
    "bfloat16": "bf16",
    "int8": "i8",
    "uint8": "u8",
    "int32": "i32",
    "int64": "i64",
    "bool": "bool",
}
SHORT_DTYPES: dict[str, str] = {short: name for name, short in DTYPES.items()}
FLOAT_DTYPES = frozenset({"float32", "float64", "float16", "bfloat16"})
INT_DTYPES = frozenset({"int8", "uint8", "int32", "int64"})

_SYMBOLIC_DIM = re.compile(r"^(?:(\d+)\*)?([A-Za-z_][A-Za-z0-9_]*(?:\*[A-Za-z_][A-Za-z0-9_]*)*)$")


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype for an IR dtype name (bfloat16 through ml_dtypes)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if dtype not in DTYPES:
        raise IRTypeError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return np.dtype(dtype)


def dtype_of_array(array: np.ndarray) -> str:
    """The IR dtype name of a numpy array, or an error naming the unsupported dtype."""
    name = array.dtype.name
    if name in DTYPES:
        return name
    raise IRTypeError(f"numpy dtype {name!r} is not supported; expected one of {', '.join(DTYPES)}")


def dim_terms(dim: Dim) -> tuple[int, tuple[str, ...]]:
    """A dimension as ``(coefficient, sorted symbols)``: ``7 -> (7, ())``, ``"4*S*N" -> (4, ("N", "S"))``."""
    if isinstance(dim, (int, np.integer)):
        return int(dim), ()
    match = _SYMBOLIC_DIM.match(dim) if isinstance(dim, str) else None
    if match is None:
        raise IRTypeError(f"malformed symbolic dimension {dim!r}; expected e.g. 'N', '4*N' or '12*N*S'")
    coefficient = int(match.group(1) or 1)
    if coefficient == 0:
        raise IRTypeError(f"malformed symbolic dimension {dim!r}: a zero coefficient is the number 0")
    return coefficient, tuple(sorted(match.group(2).split("*")))


def monomial(coefficient: int, symbols: tuple[str, ...] | list[str] = ()) -> Dim:
    """The canonical dimension ``coefficient * prod(symbols)`` (an int without symbols or for 0)."""
    if not symbols or coefficient == 0:
        return int(coefficient)
    text = "*".join(sorted(symbols))
    return text if coefficient == 1 else f"{coefficient}*{text}"


def canonical_dim(dim: Dim) -> Dim:
    """A dimension in canonical form (``"S*N"`` -> ``"N*S"``, ``"1*N"`` -> ``"N"``)."""
    return monomial(*dim_terms(dim))


def dim_symbols(dim: Dim) -> set[str]:
    """The distinct symbols a dimension mentions."""
    return set(dim_terms(dim)[1])


def split_dim(dim: Dim) -> tuple[int, str | None]:
    """A dimension as ``(coefficient, symbolic part)``: ``7 -> (7, None)``, ``"4*N*S" -> (4, "N*S")``.

    The symbolic part is the canonical product text; callers that need the symbols use
    :func:`dim_terms`.
    """
    coefficient, symbols = dim_terms(dim)
    return coefficient, "*".join(symbols) if symbols else None


def make_dim(coefficient: int, symbol: str | None) -> Dim:
    """Inverse of :func:`split_dim` (``symbol`` may be a product such as ``"N*S"``)."""
    if symbol is None:
        return coefficient
    return monomial(coefficient, tuple(symbol.split("*")))


def dim_mul(a: Dim, b: Dim) -> Dim:
    """Product of two dimensions: coefficients multiply, symbol products concatenate."""
    (ca, sa), (cb, sb) = dim_terms(a), dim_terms(b)
    return monomial(ca * cb, sa + sb)


def dim_div(a: Dim, b: Dim) -> Dim:
    """Exact quotient ``a / b`` of dimensions, or an error if it is not a whole dimension.

    ``b``'s symbols must all occur in ``a`` (with multiplicity) and its coefficient must divide
    ``a``'s: ``"12*N*S" / "4*S" = "3*N"``, but ``"N" / 2`` is refused (not whole for every N).
    """
    (ca, sa), (cb, sb) = dim_terms(a), dim_terms(b)
    rest = list(sa)
    for symbol in sb:
        if symbol not in rest:
            raise IRTypeError(f"cannot divide {a!r} by {b!r}: {symbol} does not divide it")
        rest.remove(symbol)
    if cb == 0 or ca % cb:
        raise IRTypeError(f"{a!r} is not divisible by {b!r}")
    return monomial(ca // cb, rest)


def dims_product(dims: tuple[Dim, ...] | list[Dim]) -> Dim:
    """Product of a sequence of dimensions (1 for an empty one)."""
    total: Dim = 1
    for dim in dims:
        total = dim_mul(total, dim)
    return total


def resolve_dim(dim: Dim, bindings: dict[str, int]) -> int:
    """The concrete value of a dimension given values for the symbols."""
    coefficient, symbols = dim_terms(dim)
    for symbol in symbols:
        if symbol not in bindings:
            raise IRTypeError(f"symbolic dimension {symbol!r} has no value")
        coefficient *= bindings[symbol]
    return coefficient


@dataclass(frozen=True)
class TensorType:
    """Shape and dtype of a value: ``TensorType(("N", 3, 224, 224), "float32")``."""

    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise IRTypeError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        shape = tuple(canonical_dim(d) if isinstance(d, str) else int(d) for d in self.shape)
        for dim in shape:
            if isinstance(dim, int) and dim < 0:
                raise IRTypeError(f"negative dimension in shape {shape}")
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def symbols(self) -> set[str]:
        return {s for d in self.shape for s in dim_terms(d)[1]}

    @property
    def is_static(self) -> bool:
        return not self.symbols

    def numel(self) -> Dim:
        return dims_product(self.shape)

    def concrete_shape(self, bindings: dict[str, int]) -> tuple[int, ...]:
        return tuple(resolve_dim(d, bindings) for d in self.shape)

    def with_shape(self, shape: tuple[Dim, ...] | list[Dim]) -> TensorType:
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: str) -> TensorType:
        return TensorType(self.shape, dtype)

    def __str__(self) -> str:
        return f"{DTYPES[self.dtype]}[{','.join(str(d) for d in self.shape)}]"

    @classmethod
    def parse(cls, text: str) -> TensorType:
        """Read ``f32[N,3,224,224]`` (the form ``str`` writes)."""
        match = re.fullmatch(r"\s*([a-z0-9]+)\[([^\]]*)\]\s*", text)
        if match is None or match.group(1) not in SHORT_DTYPES:
            raise IRTypeError(f"malformed tensor type {text!r}; expected e.g. f32[N,3,224,224]")
        body = match.group(2).strip()
        dims: list[Dim] = []
        for item in body.split(",") if body else []:
            item = item.strip()
            dims.append(int(item) if item.lstrip("-").isdigit() else item)
        return cls(tuple(dims), SHORT_DTYPES[match.group(1)])

    @classmethod
    def of(cls, array: np.ndarray) -> TensorType:
        return cls(tuple(array.shape), dtype_of_array(array))
