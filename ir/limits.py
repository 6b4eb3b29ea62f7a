"""The per-tensor memory limit: a tensor whose declared size is over it is refused before allocation.

The limit is :data:`MAX_TENSOR_BYTES` (4 GiB) unless the environment variable
``RESHIFT_MAX_TENSOR_BYTES`` gives another byte count; it is read at every check, so a process
can lower it for untrusted models. Sizes are computed with Python ints, so a corrupted
dimension of 2**62 is refused rather than overflowing numpy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from reshift.errors import ResourceLimitError

MAX_TENSOR_BYTES = 4 << 30
ENV_VAR = "RESHIFT_MAX_TENSOR_BYTES"


def max_tensor_bytes() -> int:
    """The limit in bytes: ``RESHIFT_MAX_TENSOR_BYTES`` if set to a positive integer, else 4 GiB."""
    text = os.environ.get(ENV_VAR, "").strip()
    try:
        value = int(text) if text else MAX_TENSOR_BYTES
    except ValueError:
        raise ResourceLimitError(f"{ENV_VAR}={text!r} is not a byte count; set it to e.g. {MAX_TENSOR_BYTES}") from None
    return value if value > 0 else MAX_TENSOR_BYTES


def check_tensor_size(shape: Sequence[int], itemsize: int, what: str) -> None:
    """Refuse a tensor of ``shape`` (ints, symbolic dims already bound) whose bytes exceed the limit.

    A zero dimension counts as 1: an empty batch must not hide absurd spatial sizes, since
    references allocate per-window buffers that do not scale with the batch.
    """
    count = math.prod(max(int(d), 1) for d in shape)
    limit = max_tensor_bytes()
    if count * itemsize > limit:
        raise ResourceLimitError(
            f"{what}: shape {list(shape)} needs {count * itemsize:,} bytes, over the per-tensor limit of "
            f"{limit:,} bytes ({ENV_VAR}); the model's declared sizes are likely corrupted, or raise the limit"
        )


def check_array_size(shape: Sequence[int], dtype: np.dtype | str, what: str) -> None:
    """:func:`check_tensor_size` with the item size of a numpy dtype or an IR dtype name."""
    from reshift.ir.types import DTYPES, numpy_dtype

    itemsize = numpy_dtype(dtype).itemsize if isinstance(dtype, str) and dtype in DTYPES else np.dtype(dtype).itemsize
    check_tensor_size(shape, itemsize, what)


def check_type_size(tensor_type, what: str) -> None:
    """Refuse a :class:`~reshift.ir.types.TensorType` over the limit, a symbolic dim counting once."""
    from reshift.ir.types import split_dim

    check_array_size([split_dim(d)[0] for d in tensor_type.shape], tensor_type.dtype, what)
