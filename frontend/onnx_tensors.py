"""Reading ONNX ``TensorProto`` data (initializers, ``Constant`` values) without trusting the file.

``onnx.numpy_helper.to_array`` fails with a bare ``ValueError`` when ``raw_data`` does not match
the declared dims and element type, and would allocate whatever the dims say. Here the element
type, the dims, the declared size (against :mod:`reshift.ir.limits`) and the stored byte count
are checked first, and every failure is a :class:`~reshift.errors.ModelLoadError` naming the
tensor.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper

from reshift.errors import ModelLoadError
from reshift.ir.limits import check_tensor_size

T = onnx.TensorProto
# element types read from a file: everything with a plain fixed-size numpy counterpart
READABLE = {
    T.FLOAT: 4, T.DOUBLE: 8, T.FLOAT16: 2, T.BFLOAT16: 2, T.INT8: 1, T.UINT8: 1, T.INT16: 2,
    T.UINT16: 2, T.INT32: 4, T.UINT32: 4, T.INT64: 8, T.UINT64: 8, T.BOOL: 1,
}  # fmt: skip


def type_name(data_type: int) -> str:
    """An element type's ONNX name, or a description of an unknown one."""
    try:
        return T.DataType.Name(data_type)
    except ValueError:
        return f"unknown element type {data_type}"


def tensor_to_array(tensor: onnx.TensorProto, what: str) -> np.ndarray:
    """The numpy array stored in ``tensor``; ``what`` names it in errors (``initializer 'w'``)."""
    if tensor.data_type not in READABLE:
        raise ModelLoadError(
            f"{what} has element type {type_name(tensor.data_type)}; reshift reads "
            + ", ".join(T.DataType.Name(t) for t in READABLE)
        )
    dims = [int(d) for d in tensor.dims]
    if any(d < 0 for d in dims):
        raise ModelLoadError(f"{what} has negative dims {dims}")
    itemsize = READABLE[tensor.data_type]
    check_tensor_size(dims, itemsize, what)
    if onnx.external_data_helper.uses_external_data(tensor):
        raise ModelLoadError(f"{what} refers to external data that was not loaded with the model")
    if tensor.HasField("raw_data") and len(tensor.raw_data) != math.prod(dims) * itemsize:
        raise ModelLoadError(
            f"{what}: raw_data holds {len(tensor.raw_data):,} bytes, but dims {dims} of "
            f"{type_name(tensor.data_type)} need {math.prod(dims) * itemsize:,}; the file is corrupted"
        )
    try:
        array = numpy_helper.to_array(tensor)
    except Exception as exc:  # typed fields whose length disagrees with the dims, segments, ...
        raise ModelLoadError(f"{what} cannot be read ({type(exc).__name__}: {exc})") from exc
    return array
