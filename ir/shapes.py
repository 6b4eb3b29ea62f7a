"""Shape-inference helpers shared by the op declarations in :mod:`reshift.ir.ops`."""

from __future__ import annotations

from collections.abc import Sequence

from reshift.errors import IRTypeError
from reshift.ir.numpy_kernels import pool_output_size
from reshift.ir.types import FLOAT_DTYPES, Dim, TensorType, dim_div, dims_product, split_dim


def normalize_axis(axis: int, rank: int, op: str = "") -> int:
    if not -rank <= axis < max(rank, 1):
        raise IRTypeError(f"{op}: axis {axis} out of range for rank {rank}")
    return axis % rank if rank else 0


def broadcast_shapes(*shapes: Sequence[Dim], op: str = "") -> tuple[Dim, ...]:
    """Numpy broadcasting of shapes with symbolic dims (equal, or one side is 1)."""
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    result: list[Dim] = []
    for dims in zip(*padded, strict=True):
        distinct = {d for d in dims if d != 1}
        if len(distinct) > 1:
            raise IRTypeError(f"{op}: shapes {[tuple(s) for s in shapes]} do not broadcast")
        result.append(distinct.pop() if distinct else 1)
    return tuple(result)


def reshape_shape(src: Sequence[Dim], target: Sequence[Dim], op: str = "reshape") -> tuple[Dim, ...]:
    """Resolve a reshape target (one ``-1`` allowed) against the source shape."""
    if sum(1 for d in target if d == -1) > 1:
        raise IRTypeError(f"{op}: more than one -1 in target shape {list(target)}")
    total = dims_product(list(src))
    known = [d for d in target if d != -1]
    if -1 in target:
        inferred = dim_div(total, dims_product(known))
        result = tuple(inferred if d == -1 else d for d in target)
    else:
        result = tuple(target)
    if split_dim(dims_product(list(result))) != split_dim(total):
        raise IRTypeError(f"{op}: cannot reshape {tuple(src)} into {tuple(target)}")
    return result


def window_output(x: TensorType, kernel, stride, padding, dilation, ceil_mode=False) -> tuple[Dim, Dim]:
    """Spatial output size of a 2-D convolution or pooling window over NCHW input."""
    h, w = x.shape[2], x.shape[3]
    if isinstance(h, str) or isinstance(w, str):
        raise IRTypeError("spatial dimensions must be static")
    if len(kernel) != 2 or len(stride) != 2 or len(dilation) != 2 or len(padding) != 4:
        raise IRTypeError(f"window: kernel {list(kernel)}, stride, dilation take 2 values, padding 4")
    if min(*kernel, *stride, *dilation) < 1 or min(padding) < 0:
        raise IRTypeError(
            f"window: kernel {list(kernel)}, stride {list(stride)} and dilation {list(dilation)} must be "
            f"positive and padding {list(padding)} non-negative"
        )
    top, left, bottom, right = padding
    out = (
        pool_output_size(h, kernel[0], stride[0], top, bottom, dilation[0], ceil_mode),
        pool_output_size(w, kernel[1], stride[1], left, right, dilation[1], ceil_mode),
    )
    if min(out) < 1:
        raise IRTypeError(
            f"window: kernel {list(kernel)} (dilation {list(dilation)}) is larger than the padded input {x}"
        )
    return out


def require_rank(t: TensorType, rank: int, op: str, what: str = "input") -> None:
    if t.rank != rank:
        raise IRTypeError(f"{op}: {what} must have rank {rank}, got {t}")


def require_float(t: TensorType, op: str, what: str = "input") -> None:
    """Refuse a non-float operand (ops whose math, or whose backends, only exist for floats)."""
    if t.dtype not in FLOAT_DTYPES:
        raise IRTypeError(f"{op}: expected a float tensor, got {t}; cast the {what} to float32 first")


def require_same_dtype(op: str, **operands: TensorType | None) -> str:
    """The one dtype the named (non-absent) operands share, or an error naming each operand's type.

    Backends reject mixed operands (TVM: "int64 on the LHS ... int32 on the RHS"), so the
    registry does too: the frontend or pass that built the node must insert a ``cast``.
    """
    present = {name: t for name, t in operands.items() if t is not None}
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) > 1:
        listed = ", ".join(f"{name} is {t}" for name, t in present.items())
        raise IRTypeError(
            f"{op}: operand dtypes differ ({listed}); they must be one dtype: insert a cast on the odd one out"
        )
    return dtypes.pop() if dtypes else ""


def require_dtype(t: TensorType, allowed: frozenset[str] | set[str], op: str, what: str) -> None:
    """Refuse an operand whose dtype is not one of ``allowed`` (e.g. indices that are not integers)."""
    if t.dtype not in allowed:
        raise IRTypeError(f"{op}: {what} must be {' or '.join(sorted(allowed))}, got {t}; cast it first")
