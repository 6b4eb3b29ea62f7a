"""Exact decompositions shared by the ONNX and ATen converters.

Each takes the frontend's own builders as callbacks, so both frontends emit the same IR for the
same op: one source of truth for the rewrite, as for the registry's ops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Pool2d = Callable[[Any, list[int], list[int], list[int], list[int]], Any]


def pool3d_as_2d(
    x: Any,
    dims: Sequence,
    kernel: Sequence[int],
    stride: Sequence[int],
    pads: Sequence[int],
    dilation: Sequence[int],
    pool2d: Pool2d,
    reshape: Callable[[Any, list], Any],
    shape_of: Callable[[Any], Sequence],
) -> Any:
    """A 3-D max or average pool over NCDHW as a 2-D pool over (H, W) of every depth slice, then one
    over D of every (h, w) column. Exact: the max over a box is a max of maxes, and an average pool's
    divisor (cells inside the input, or inside the padding too) is the product of per-axis counts,
    ceil-mode overhang included. ``pads`` are begins then ends (front, top, left, back, bottom, right);
    ``pool2d(x, kernel, stride, padding, dilation)`` builds the frontend's 2-D pool.
    """
    n, c, d, h, w = dims
    planes = pool2d(
        reshape(x, [n, c * d, h, w]),
        list(kernel[1:]),
        list(stride[1:]),
        [pads[1], pads[2], pads[4], pads[5]],
        list(dilation[1:]),
    )
    oh, ow = shape_of(planes)[2:]
    columns = pool2d(
        reshape(planes, [n, c, d, oh * ow]), [kernel[0], 1], [stride[0], 1], [pads[0], 0, pads[3], 0], [dilation[0], 1]
    )
    return reshape(columns, [n, c, shape_of(columns)[2], oh, ow])


def element_coordinates(index: Any, shape: Sequence, axis: int, op: Callable[..., Any]) -> Any:
    """Where an element-wise scatter (ONNX ScatterElements, ``torch.scatter``) writes each index
    element, as ScatterND index tuples ``[*shape, rank]``: the index itself on ``axis``, its own
    position (``arange``) on every other axis. ``index`` is int64 of ``shape``; ``op(name, inputs,
    **attrs)`` builds a registry op in the calling frontend.
    """
    rank, columns = len(shape), []
    for d in range(rank):
        if d == axis:
            columns.append(op("reshape", [index], shape=[*shape, 1]))
            continue
        grid = op("arange", [], shape=[shape[d]], dtype="int64")
        grid = op("reshape", [grid], shape=[shape[d] if k == d else 1 for k in range(rank)] + [1])
        columns.append(op("expand", [grid], shape=[*shape, 1]))
    return columns[0] if rank == 1 else op("concat", columns, axis=rank)
