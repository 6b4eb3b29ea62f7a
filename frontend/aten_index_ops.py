"""ATen indexing with run-time index tensors and bicubic upsampling, as gather_nd / scatter_nd / resize2d.

Registered into :data:`reshift.frontend.aten_ops.ATEN_CONVERTERS` (imported by aten_shape_ops.py).

- ``x[i0, i1, ...]`` (``aten.index.Tensor``) with several index tensors computed at run time:
  the broadcast indices stacked into tuples ``[..., M]`` and one ``gather_nd`` (indexed axes moved
  to the front first when a full slice precedes them, then back where torch puts them).
- ``x[i0, i1, ...] = v`` (``aten.index_put``, functionalized ``index_put_``): ``scatter_nd``
  (``accumulate=True``: reduction add).
- ``torch.scatter`` / ``scatter_add`` / ``scatter_reduce`` (``include_self=True``): element-wise
  scatter as ``scatter_nd`` over full coordinate tuples (the run-time index on ``dim``, ``arange``
  on every other axis).
- ``F.interpolate(mode="bicubic")`` (``aten.upsample_bicubic2d``): ``resize2d`` cubic with torch's
  ``a = -0.75``, edge taps clamped, ``align_corners`` or ``half_pixel`` (at ``1 / scale_factor``
  when one is given, as torch samples); ``antialias=True`` (bilinear and bicubic): resize2d's
  ``antialias`` with the taps outside excluded, PIL's ``a = -0.5`` for bicubic.
"""

from __future__ import annotations

from typing import Any

from reshift.frontend.aten_ops import Unsupported, _axis, _operand, converts
from reshift.frontend.decompose import element_coordinates
from reshift.ir import Value


def _index_tuples(cx, tensors: list[Value]) -> Value:
    """Index tensors broadcast to one shape ``B`` and stacked on a new last axis: ``[*B, M]`` int64."""
    shape = _broadcast_shape([t.shape for t in tensors])
    columns = []
    for t in tensors:
        if t.dtype == "bool":
            raise Unsupported("boolean mask indexing (its result size depends on the values)")
        t = cx.cast(t, "int64")
        if t.shape != shape:
            t = cx.emit("reshape", [t], shape=(1,) * (len(shape) - t.type.rank) + t.shape)
            t = cx.emit("expand", [t], shape=shape)
        columns.append(cx.emit("reshape", [t], shape=shape + (1,)))
    return columns[0] if len(columns) == 1 else cx.emit("concat", columns, axis=len(shape))


def _broadcast_shape(shapes: list[tuple]) -> tuple:
    rank = max(len(s) for s in shapes)
    out = []
    for dims in zip(*[(1,) * (rank - len(s)) + tuple(s) for s in shapes], strict=True):
        distinct = {d for d in dims if d != 1}
        if len(distinct) > 1:
            raise Unsupported(f"index tensors of shapes {shapes} do not broadcast")
        out.append(distinct.pop() if distinct else 1)
    return tuple(out)


def _indexed_front(cx, x: Value, positions: list[int]) -> tuple[Value, tuple[int, ...]]:
    """``x`` with the indexed axes first (in order), and the permutation used (identity: none)."""
    rest = [d for d in range(x.type.rank) if d not in positions]
    perm = tuple(positions + rest)
    if perm == tuple(range(x.type.rank)):
        return x, perm
    return cx.emit("transpose", [x], perm=perm), perm


def gather_with_run_time_indices(cx, x: Value, indices: list, positions: list[int]) -> Value:
    """``x[..., i0, i1, ...]`` with adjacent index tensors (some run-time) as one ``gather_nd``."""
    if positions != list(range(positions[0], positions[-1] + 1)):
        raise Unsupported("non-adjacent index tensors computed from the inputs (torch moves their axes first)")
    tuples = _index_tuples(cx, [cx.value(indices[i]) for i in positions])
    front, perm = _indexed_front(cx, x, positions)
    y = cx.emit("gather_nd", [front, tuples], batch_dims=0)  # [*B, leading axes, trailing axes]
    first, block = positions[0], tuples.type.rank - 1
    if first:  # torch keeps the leading full slices in front of the index block
        order = tuple(range(block, block + first)) + tuple(range(block)) + tuple(range(block + first, y.type.rank))
        y = cx.emit("transpose", [y], perm=order)
    return y


@converts("index_put", "index_put_")
def _index_put(cx, a):
    """``x[i0, i1, ...] = values`` (``accumulate``: ``+=``) as ``scatter_nd`` of the index tuples."""
    x = cx.value(a["self"])
    indices = list(a["indices"])
    positions = [i for i, t in enumerate(indices) if t is not None]
    if not positions:
        raise Unsupported("index_put without an index tensor")
    if positions != list(range(positions[0], positions[-1] + 1)):
        raise Unsupported("index_put with non-adjacent index tensors")
    tuples = _index_tuples(cx, [cx.value(indices[i]) for i in positions])
    front, perm = _indexed_front(cx, x, positions)
    slice_shape = tuples.shape[:-1] + front.shape[len(positions) :]
    values = _operand(cx, a["values"], x.dtype)
    if values.shape != slice_shape:
        if len(values.shape) < len(slice_shape):
            values = cx.emit("reshape", [values], shape=(1,) * (len(slice_shape) - values.type.rank) + values.shape)
        values = cx.emit("expand", [values], shape=slice_shape)
    y = cx.emit("scatter_nd", [front, tuples, values], reduction="add" if a.get("accumulate") else "none")
    if perm == tuple(range(x.type.rank)):
        return y
    inverse = tuple(perm.index(d) for d in range(x.type.rank))
    return cx.emit("transpose", [y], perm=inverse)


_SCATTER_REDUCE = {"add": "add", "sum": "add", "multiply": "mul", "prod": "mul", "amax": "max", "amin": "min"}


@converts("scatter.src", "scatter.value", "scatter.reduce", "scatter.value_reduce", "scatter_add", "scatter_reduce.two")
def _scatter(cx, a):
    """Element-wise scatter (``out[..., index[i, j], ...] = src[i, j]`` on ``dim``) as ``scatter_nd``."""
    x = cx.value(a["self"])
    dim = _axis(a["dim"], x.type.rank)
    index = cx.value(a["index"])
    reduce = a.get("reduce")
    if str(cx.node.target).startswith("aten.scatter_add"):
        reduce = "add"
    if reduce is not None and reduce not in _SCATTER_REDUCE:
        raise Unsupported(f"scatter reduce={reduce!r} (supported: sum/add, prod/multiply, amax, amin)")
    if reduce is not None and not a.get("include_self", True):
        raise Unsupported("scatter_reduce with include_self=False")
    shape = index.shape
    if index.type.rank != x.type.rank:
        raise Unsupported(f"scatter index of rank {index.type.rank} for a rank-{x.type.rank} tensor")
    tuples = element_coordinates(cx.cast(index, "int64"), shape, dim, lambda op, ins, **at: cx.emit(op, ins, **at))
    src = a.get("src")
    updates = _source_block(cx, src, shape, x.dtype) if src is not None else _filled(cx, a["value"], shape, x.dtype)
    return cx.emit("scatter_nd", [x, tuples, updates], reduction=_SCATTER_REDUCE.get(reduce, "none"))


def _source_block(cx, src: Any, shape: tuple, dtype: str) -> Value:
    """The leading ``shape`` block of ``src`` (torch reads ``src[i][j]`` only where ``index`` has an entry)."""
    src = _operand(cx, src, dtype)
    if src.shape == shape:
        return src
    if any(isinstance(s, str) or isinstance(d, str) for s, d in zip(src.shape, shape, strict=True) if s != d):
        raise Unsupported("scatter src larger than index on the batch dimension")
    axes = [d for d in range(len(shape)) if src.shape[d] != shape[d]]
    return cx.emit(
        "slice",
        [src],
        starts=(0,) * len(axes),
        ends=tuple(shape[d] for d in axes),
        axes=tuple(axes),
        steps=(1,) * len(axes),
    )


def _filled(cx, value: Any, shape: tuple, dtype: str) -> Value:
    scalar = _operand(cx, value, dtype)
    scalar = cx.emit("reshape", [scalar], shape=(1,) * len(shape)) if scalar.type.rank != len(shape) else scalar
    return cx.emit("expand", [scalar], shape=shape)


def sampling_scales(x: Value, size: tuple, a: dict) -> dict:
    """``resize2d``'s ``scales`` where torch samples at ``1 / scale_factor`` and that differs from
    ``in / out`` (a factor whose product with the input size is not whole); ``align_corners`` ignores it."""
    factors = a.get("scale_factors") or [a.get("scales_h"), a.get("scales_w")]
    if a["align_corners"] or any(f is None for f in factors):
        return {}
    if all(length * factor == out for length, out, factor in zip(x.shape[2:], size, factors, strict=True)):
        return {}
    return {"scales": tuple(float(f) for f in factors)}


@converts("upsample_bicubic2d.vec", "upsample_bicubic2d.default")
def _upsample_bicubic(cx, a):
    """Bicubic upsampling (torch: Keys kernel a = -0.75, edge taps clamped, no antialias) to torch's size,
    sampled at ``1 / scale_factor`` when a factor is given (``in / out`` otherwise, as torch)."""
    x = cx.value(a["input"] if "input" in a else a["self"])
    size = tuple(cx.out_type.shape[2:])
    mode = "align_corners" if a["align_corners"] else "half_pixel"
    scales = sampling_scales(x, size, a)
    return cx.emit("resize2d", [x], size=size, mode="cubic", coordinate_transformation=mode, **scales)


@converts("_upsample_bilinear2d_aa.default", "_upsample_bilinear2d_aa.vec")
def _upsample_bilinear_aa(cx, a):
    """``F.interpolate(mode="bilinear", antialias=True)``: the stretched triangle filter, taps outside
    the input dropped and the rest renormalized (resize2d ``antialias`` with ``exclude_outside``)."""
    return _antialiased(cx, a, "linear", -0.75)


@converts("_upsample_bicubic2d_aa.default", "_upsample_bicubic2d_aa.vec")
def _upsample_bicubic_aa(cx, a):
    """``F.interpolate(mode="bicubic", antialias=True)``: as bilinear, with PIL's cubic (``a = -0.5``)."""
    return _antialiased(cx, a, "cubic", -0.5)


def _antialiased(cx, a, mode: str, coefficient: float) -> Value:
    x = cx.value(a["input"] if "input" in a else a["self"])
    if a["align_corners"]:
        raise Unsupported("antialiased interpolation with align_corners=True")
    size = tuple(cx.out_type.shape[2:])
    attrs = {"cubic_coeff_a": coefficient, "exclude_outside": True, "antialias": True}
    return cx.emit("resize2d", [x], size=size, mode=mode, **attrs, **sampling_scales(x, size, a))
