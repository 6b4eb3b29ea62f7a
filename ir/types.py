"""Tensor types of the IR: static shapes with at most one symbolic batch dimension.

A dimension is an ``int`` or a symbolic ``str``. A symbolic dimension is either the batch
symbol itself (``"N"``) or an integer multiple of it (``"197*N"``), which is what flattening
the batch into the next dimension produces (``view(B*197, 384)``). Only one symbol may appear
in a graph; :func:`dim_mul` and :func:`dim_div` keep that closed under reshape arithmetic.
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

_SYMBOLIC_DIM = re.compile(r"^(?:(\d+)\*)?([A-Za-z_][A-Za-z0-9_]*)$")


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


def split_dim(dim: Dim) -> tuple[int, str | None]:
    """A dimension as ``(coefficient, symbol)``: ``7 -> (7, None)``, ``"4*N" -> (4, "N")``."""
    if isinstance(dim, (int, np.integer)):
        return int(dim), None
    match = _SYMBOLIC_DIM.match(dim)
    if match is None:
        raise IRTypeError(f"malformed symbolic dimension {dim!r}; expected 'N' or 'K*N'")
    return int(match.group(1) or 1), match.group(2)


def make_dim(coefficient: int, symbol: str | None) -> Dim:
    """Inverse of :func:`split_dim`."""
    if symbol is None:
        return coefficient
    return symbol if coefficient == 1 else f"{coefficient}*{symbol}"


def dim_mul(a: Dim, b: Dim) -> Dim:
    """Product of two dimensions; at most one of them may be symbolic."""
    (ca, sa), (cb, sb) = split_dim(a), split_dim(b)
    if sa is not None and sb is not None:
        raise IRTypeError(f"cannot multiply two symbolic dimensions {a!r} and {b!r}")
    return make_dim(ca * cb, sa or sb)


def dim_div(a: Dim, b: Dim) -> Dim:
    """Exact quotient ``a / b`` of dimensions, or an error if it is not a whole dimension."""
    (ca, sa), (cb, sb) = split_dim(a), split_dim(b)
    if sb is not None and sa != sb:
        raise IRTypeError(f"cannot divide {a!r} by {b!r}")
    if cb == 0 or ca % cb:
        raise IRTypeError(f"{a!r} is not divisible by {b!r}")
    return make_dim(ca // cb, None if sb is not None else sa)


def dims_product(dims: tuple[Dim, ...] | list[Dim]) -> Dim:
    """Product of a sequence of dimensions (1 for an empty one)."""
    total: Dim = 1
    for dim in dims:
        total = dim_mul(total, dim)
    return total


def resolve_dim(dim: Dim, bindings: dict[str, int]) -> int:
    """The concrete value of a dimension given values for the symbols."""
    coefficient, symbol = split_dim(dim)
    if symbol is None:
        return coefficient
    if symbol not in bindings:
        raise IRTypeError(f"symbolic dimension {symbol!r} has no value")
    return coefficient * bindings[symbol]


@dataclass(frozen=True)
class TensorType:
    """Shape and dtype of a value: ``TensorType(("N", 3, 224, 224), "float32")``."""

    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise IRTypeError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        shape = tuple(d if isinstance(d, str) else int(d) for d in self.shape)
        for dim in shape:
            if isinstance(dim, str):
                split_dim(dim)
            elif dim < 0:
                raise IRTypeError(f"negative dimension in shape {shape}")
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def symbols(self) -> set[str]:
        return {s for s in (split_dim(d)[1] for d in self.shape) if s is not None}

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
