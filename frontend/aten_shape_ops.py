"""Shape, data-movement and indexing converters (view, permute, cat, slice, index, roll ...).

Registered into :data:`reshift.frontend.aten_ops.ATEN_CONVERTERS`. Output shapes come from
torch's metadata, so ``view(x, [s0, 16, -1, 32])`` needs no size arithmetic here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reshift.frontend.aten_index_ops import gather_with_run_time_indices, sampling_scales
from reshift.frontend.aten_ops import Unsupported, _axis, _operand, converts
from reshift.ir import Value
from reshift.ir.types import resolve_dim


# -- shape and data movement --------------------------------------------------------------------
@converts(
    "view.default",
    "_unsafe_view",
    "reshape",
    "flatten.using_ints",
    "unflatten.int",
    "unsqueeze",
    "squeeze",
    "expand_copy",
    "view_copy",
)
def _reshape(cx, a):
    x = cx.value(a["self"])
    shape = cx.out_type.shape
    return x if x.shape == shape else cx.emit("reshape", [x], shape=shape)


@converts("expand")
def _expand(cx, a):
    x = cx.value(a["self"])
    shape = cx.out_type.shape
    return x if x.shape == shape else cx.emit("expand", [x], shape=shape)


@converts("permute")
def _permute(cx, a):
    x = cx.value(a["self"])
    perm = tuple(_axis(d, x.type.rank) for d in a["dims"])
    return x if perm == tuple(range(x.type.rank)) else cx.emit("transpose", [x], perm=perm)


@converts("transpose.int")
def _transpose(cx, a):
    x = cx.value(a["self"])
    perm = list(range(x.type.rank))
    i, j = _axis(a["dim0"], x.type.rank), _axis(a["dim1"], x.type.rank)
    perm[i], perm[j] = perm[j], perm[i]
    return x if i == j else cx.emit("transpose", [x], perm=tuple(perm))


@converts("cat")
def _cat(cx, a):
    dtype = cx.out_type.dtype
    parts = [_operand(cx, t, dtype) for t in a["tensors"]]
    parts = [p for p in parts if not (p.type.rank == 1 and p.shape[0] == 0)]  # legacy empty inputs
    if len(parts) == 1:
        return parts[0]
    return cx.emit("concat", parts, axis=_axis(a["dim"], cx.out_type.rank))


@converts("split.Tensor", "split_with_sizes")
def _split(cx, a):
    x = cx.value(a["self"])
    meta = cx.node.meta["val"]
    axis = _axis(a["dim"], x.type.rank)
    sizes = tuple(int(m.shape[axis]) for m in meta)
    if len(sizes) == 1:
        return (x,)
    return cx.emit("split", [x], axis=axis, sizes=sizes)


@converts("slice.Tensor")
def _slice(cx, a):
    x = cx.value(a["self"])
    axis = _axis(a["dim"], x.type.rank)
    step = a["step"] or 1
    if x.shape == cx.out_type.shape and step == 1:
        return x
    size = x.shape[axis]
    if isinstance(size, str):
        raise Unsupported("slicing the batch dimension")
    start, end, _ = slice(a["start"], a["end"], step).indices(size)
    return cx.emit("slice", [x], starts=(start,), ends=(end,), axes=(axis,), steps=(step,))


@converts("select.int")
def _select(cx, a):
    x = cx.value(a["self"])
    index = cx.constant(np.array(a["index"], dtype=np.int64), f"{cx.node.name}_index")
    return cx.emit("gather", [x, index], axis=_axis(a["dim"], x.type.rank))


@converts("embedding")
def _embedding(cx, a):
    return cx.emit("gather", [cx.value(a["weight"]), cx.value(a["indices"])], axis=0)


@converts("index_select")
def _index_select(cx, a):
    x = cx.value(a["self"])
    return cx.emit("gather", [x, cx.value(a["index"])], axis=_axis(a["dim"], x.type.rank))


@converts("repeat")
def _repeat(cx, a):
    """``[r0, r1]`` tiles of ``[d0, d1]``: view as ``[1, d0, 1, d1]``, expand to ``[r0, d0, r1, d1]``."""
    x = cx.value(a["self"])
    repeats = list(a["repeats"])
    dims = (1,) * (len(repeats) - x.type.rank) + x.shape
    interleaved = tuple(d for dim in dims for d in (1, dim))
    wide = tuple(d for r, dim in zip(repeats, dims, strict=True) for d in (r, dim))
    x = cx.emit("expand", [cx.emit("reshape", [x], shape=interleaved)], shape=wide)
    return cx.emit("reshape", [x], shape=cx.out_type.shape)


@converts("flip")
def _flip(cx, a):
    x = cx.value(a["self"])
    for dim in a["dims"]:
        axis = _axis(dim, x.type.rank)
        if isinstance(x.shape[axis], str):
            raise Unsupported("flipping the batch dimension")
        reverse = cx.constant(np.arange(x.shape[axis] - 1, -1, -1, dtype=np.int64), f"{cx.node.name}_index")
        x = cx.emit("gather", [x, reverse], axis=axis)
    return x


@converts("upsample_nearest2d.vec", "upsample_nearest2d.default")
def _upsample_nearest(cx, a):
    """Integer-factor nearest upsampling: ``[N, C, H, 1, W, 1]`` expanded to ``[N, C, H, s, W, t]``."""
    x = cx.value(a["input"] if "input" in a else a["self"])
    n, c, h, w = x.shape
    oh, ow = cx.out_type.shape[2:]
    if oh % h or ow % w:
        raise Unsupported(f"nearest upsampling {h}x{w} -> {oh}x{ow} by a non-integer factor")
    x = cx.emit("reshape", [x], shape=(n, c, h, 1, w, 1))
    x = cx.emit("expand", [x], shape=(n, c, h, oh // h, w, ow // w))
    return cx.emit("reshape", [x], shape=cx.out_type.shape)


@converts("roll")
def _roll(cx, a):
    x = cx.value(a["self"])
    if not a["dims"]:
        raise Unsupported("roll over the flattened tensor")
    for shift, dim in zip(a["shifts"], a["dims"], strict=True):
        axis = _axis(dim, x.type.rank)
        size = x.shape[axis]
        if isinstance(size, str):
            raise Unsupported("rolling the batch dimension")
        cut = size - shift % size
        if cut in (0, size):
            continue
        tail = cx.emit("slice", [x], starts=(cut,), ends=(size,), axes=(axis,), steps=(1,))
        head = cx.emit("slice", [x], starts=(0,), ends=(cut,), axes=(axis,), steps=(1,))
        x = cx.emit("concat", [tail, head], axis=axis)
    return x


@converts("constant_pad_nd")
def _pad(cx, a):
    x = cx.value(a["self"])
    rank, pad = x.type.rank, list(a["pad"])
    if any(p < 0 for p in pad):
        raise Unsupported("negative padding (cropping)")
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    return cx.emit("pad", [x], pads=tuple(begins + ends), value=float(a["value"]))


@converts("index.Tensor")
def _index(cx, a):
    """Advanced indexing ``x[..., i0, i1, ...]`` by constant index tensors, as one gather.

    Index tensors that are ``arange`` over the indexed axis (HF masks index ``mask[arange(B),
    cols]``) are identities: those axes stay, the constant ones are flattened into one gather.
    """
    x = cx.value(a["self"])
    indices = list(a["indices"])
    positions = [i for i, t in enumerate(indices) if t is not None]
    if len(positions) == 1:  # x[:, idx]: a gather, whatever idx is computed from
        index = cx.value(indices[positions[0]])
        if index.dtype == "bool":
            raise Unsupported("boolean mask indexing")
        return cx.emit("gather", [x, index], axis=positions[0])
    if any(isinstance(indices[i], Value) and not indices[i].is_constant for i in positions):
        return gather_with_run_time_indices(cx, x, indices, positions)
    if positions != list(range(positions[0], positions[-1] + 1)):
        raise Unsupported("non-adjacent index tensors")
    return _multi_index(cx, x, indices, positions)


def _multi_index(cx, x: Value, indices: list, positions: list[int]) -> Value:
    first = positions[0]
    metas = cx.meta("indices")
    rank = max(metas[i].dim() for i in positions)
    identity: dict[int, int] = {}  # x axis -> position in the broadcast index shape
    fixed: dict[int, np.ndarray] = {}  # x axis -> constant index, right-aligned to `rank`
    for axis in positions:
        batches, samples = zip(*cx.samples_of(indices[axis]), strict=True)
        samples = [s.numpy().reshape((1,) * (rank - s.dim()) + tuple(s.shape)) for s in samples]
        place = _arange_axis(samples, x.shape[axis], batches)
        if place is not None:
            identity[axis] = place
        elif len(samples) == 1 or all(np.array_equal(samples[0], s) for s in samples[1:]):
            fixed[axis] = samples[0]
        else:
            raise Unsupported("index tensors that vary with the batch size")
    places = sorted(identity.values())
    if len(set(places)) != len(places) or any(f.shape[p] != 1 for f in fixed.values() for p in places):
        raise Unsupported("diagonal indexing")
    order = list(range(first)) + sorted(identity, key=identity.get) + list(fixed)
    order += list(range(positions[-1] + 1, x.type.rank))
    sizes = [x.shape[axis] for axis in fixed]
    if order != list(range(x.type.rank)):
        x = cx.emit("transpose", [x], perm=tuple(order))
    if fixed:
        if any(isinstance(s, str) for s in sizes):
            raise Unsupported("constant indices into the batch dimension")
        lead = x.shape[: first + len(identity)]
        x = cx.emit("reshape", [x], shape=lead + (int(np.prod(sizes)),) + x.shape[first + len(identity) + len(fixed) :])
        strides = [int(np.prod(sizes[k + 1 :])) for k in range(len(sizes))]
        flat = sum(np.mod(f, s) * t for f, s, t in zip(fixed.values(), sizes, strides, strict=True))
        flat = np.asarray(flat, dtype=np.int64)
        flat = flat.reshape([d for p, d in enumerate(flat.shape) if p not in places])
        x = cx.emit("gather", [x, cx.constant(flat, f"{cx.node.name}_index")], axis=first + len(identity))
    else:  # only identities: give the index block its broadcast rank with size-1 axes
        lead = x.shape[: first + len(identity)]
        x = cx.emit("reshape", [x], shape=lead + (1,) * (rank - len(identity)) + x.shape[len(lead) :])
    # Index block is now [identity axes by place, remaining places in order]; move identities home.
    rest = [p for p in range(rank) if p not in places]
    source = {p: k for k, p in enumerate(places)} | {p: len(places) + k for k, p in enumerate(rest)}
    block = [first + source[p] for p in range(rank)]
    perm = tuple(range(first)) + tuple(block) + tuple(range(first + rank, x.type.rank))
    if perm != tuple(range(x.type.rank)):
        x = cx.emit("transpose", [x], perm=perm)
    shape = cx.out_type.shape
    return x if x.shape == shape else cx.emit("reshape", [x], shape=shape)


def _arange_axis(samples: list[np.ndarray], size: Any, batches: tuple) -> int | None:
    """The broadcast position along which every sample is ``arange(size)``, if there is one."""
    place = None
    for sample, batch in zip(samples, batches, strict=True):
        length = resolve_dim(size, {"N": batch}) if batch is not None or isinstance(size, int) else None
        if length is None or length < 2:
            return None
        big = [p for p, d in enumerate(sample.shape) if d != 1]
        if len(big) != 1 or sample.shape[big[0]] != length or not np.array_equal(sample.reshape(-1), np.arange(length)):
            return None
        if place is not None and place != big[0]:
            return None
        place = big[0]
    return place


@converts("cumsum")
def _cumsum(cx, a):
    """``torch.cumsum``: integer inputs accumulate in the result dtype (int64 unless ``dtype``)."""
    x = _operand(cx, a["self"], cx.out_type.dtype)
    return cx.emit("cumsum", [x], axis=_axis(a["dim"], x.type.rank))


@converts("gather")
def _gather_elements(cx, a):
    """``torch.gather(x, dim, index)`` is ``gather_elements`` (ONNX GatherElements), not ``gather``."""
    x = cx.value(a["self"])
    return cx.emit("gather_elements", [x, cx.value(a["index"])], axis=_axis(a["dim"], x.type.rank))


@converts("upsample_bilinear2d.vec", "upsample_bilinear2d.default")
def _upsample_bilinear(cx, a):
    """Bilinear upsampling to torch's output size; coordinates from ``align_corners``.

    torch maps output to input coordinates with ``1 / scale_factor`` when a factor is given and
    with ``in / out`` otherwise; a factor whose product with the input size is not whole becomes
    resize2d's ``scales``, so it samples where torch does.
    """
    x = cx.value(a["input"] if "input" in a else a["self"])
    size = tuple(cx.out_type.shape[2:])
    mode = "align_corners" if a["align_corners"] else "half_pixel"
    scales = sampling_scales(x, size, a)
    return cx.emit("resize2d", [x], size=size, mode="linear", coordinate_transformation=mode, **scales)


@converts("copy")
def _copy(cx, a):
    """Functional ``aten.copy(self, src)`` (a functionalized ``self.copy_(src)``): src, in self's shape and dtype."""
    src = _operand(cx, a["src"], cx.out_type.dtype)
    shape = cx.out_type.shape
    return src if src.shape == shape else cx.emit("expand", [src], shape=shape)
