"""ONNX convolution, pooling, normalization and activation converters (registered into ``ONNX_CONVERTERS``).

What each ONNX op becomes (semantics: https://onnx.ai/onnx/operators/):

- ``Conv``: ``conv2d``; 1-D as ``conv2d`` over a unit height (the tuned 2-D kernels serve it);
  3-D ``conv3d``.
- ``ConvTranspose``: ``conv_transpose2d``/``3d``; 1-D over a unit height; ``output_shape`` and
  ``auto_pad`` become explicit pads as the ONNX spec derives them.
- ``MaxPool``/``AveragePool``: the 2-D pools; 1-D over a unit height; 3-D as a pool over (H, W)
  then one over D (``frontend/decompose.py``, shared with the ATen converters).
- ``PRelu``/``Elu``/``Selu``: ``relu(x) + f(min(x, 0))``, elementwise and exact.
- ``LRN``: the square sum over the channel window as an ``avg_pool2d`` (count_include_pad) over
  the channel axis, times ``size``.
- ``InstanceNormalization``: ``layer_norm`` over the spatial axes, then the per-channel affine;
  ``GroupNormalization`` the same over channel groups.
- ``Sign``/``Shrink``: comparisons, casts and ``where``.
- ``Pad``: ``pad`` (constant); reflect/edge/wrap as slices concatenated around x.
- ``Tile``: folded on known x, else ``reshape`` + ``expand`` + ``reshape``.
"""

from __future__ import annotations

import math

import numpy as np

from reshift.frontend.decompose import pool3d_as_2d
from reshift.frontend.onnx_ops import NotConvertible, _axes_arg, _ints, _known, _norm, _scalar, converter
from reshift.frontend.onnx_ops import _tile as tile_known
from reshift.frontend.shape_eval import Sym
from reshift.ir.types import dim_mul, dims_product


def window_pads(in_dims, kernel, strides, dilations, at) -> list[int]:
    """ONNX ``pads``/``auto_pad`` as the IR's begins-then-ends padding (SAME_* from the input size)."""
    rank = len(kernel)
    auto = at.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = list(at.get("pads", [0] * (2 * rank)))
        if len(pads) != 2 * rank:
            raise NotConvertible(f"pads {pads} must hold {2 * rank} values for a {rank}-D window")
        return pads
    if auto == "VALID":
        return [0] * (2 * rank)
    begins, ends = [], []
    for size, k, s, d in zip(in_dims, kernel, strides, dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begins.append(small if auto == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins + ends


def _spatial_rank(ctx, x, what: str, ranks=(1, 2, 3)) -> int:
    rank = len(ctx.shape(x)) - 2
    if rank not in ranks:
        listed = ", ".join(f"{r}-D (rank {r + 2})" for r in ranks)
        raise NotConvertible(f"{what}: only {listed} inputs are supported, got rank {rank + 2}")
    return rank


def _weight_kernel(ctx, x, w, what: str) -> list[int]:
    """The kernel size from the weight, which must have x's rank (``[O, C/groups, k1, ...]``)."""
    if len(ctx.shape(w)) != len(ctx.shape(x)):
        raise NotConvertible(f"{what}: weight {list(ctx.shape(w))} must have the input's rank {len(ctx.shape(x))}")
    return list(ctx.shape(w)[2:])


def _window_attrs(ctx, x, kernel, at) -> tuple[list[int], list[int], list[int]]:
    rank = len(kernel)
    strides, dilations = list(at.get("strides", [1] * rank)), list(at.get("dilations", [1] * rank))
    if len(strides) != rank or len(dilations) != rank:
        raise NotConvertible(f"strides {strides} and dilations {dilations} must hold {rank} values each")
    return strides, window_pads(ctx.shape(x)[2:], kernel, strides, dilations, at), dilations


def _unit_height(ctx, x):
    """``[N, C, L]`` as ``[N, C, 1, L]`` (a constant weight is reshaped in numpy)."""
    dims = list(ctx.shape(x))
    return ctx.op("reshape", x, shape=dims[:2] + [1] + dims[2:])


def _drop_height(ctx, y):
    dims = list(ctx.shape(y))
    return ctx.op("reshape", y, shape=dims[:2] + dims[3:])


@converter("Conv")
def _conv(ctx, node, ins, at):
    x, w, b = (list(ins) + [None])[:3]
    rank = _spatial_rank(ctx, x, "Conv")
    kernel = _weight_kernel(ctx, x, w, "Conv")
    strides, pads, dilations = _window_attrs(ctx, x, kernel, at)
    group = at.get("group", 1)
    if rank == 3:
        return ctx.op("conv3d", x, w, b, stride=strides, padding=pads, dilation=dilations, groups=group)
    if rank == 1:
        y = ctx.op(
            "conv2d",
            _unit_height(ctx, x),
            _unit_height(ctx, w),
            b,
            stride=[1, strides[0]],
            padding=[0, pads[0], 0, pads[1]],
            dilation=[1, dilations[0]],
            groups=group,
        )
        return _drop_height(ctx, y)
    return ctx.op("conv2d", x, w, b, stride=strides, padding=pads, dilation=dilations, groups=group)


def _transpose_pads(in_dims, kernel, strides, dilations, output_padding, at) -> list[int]:
    """ConvTranspose pads: explicit, or from ``output_shape`` / ``auto_pad`` SAME_* (output = input * stride)
    with the total split as the ONNX spec says (SAME_UPPER puts the odd one at the end)."""
    rank = len(kernel)
    auto = at.get("auto_pad", "NOTSET")
    shape = list(at.get("output_shape", []))[-rank:] if "output_shape" in at else None
    if shape is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        shape = [size * s for size, s in zip(in_dims, strides, strict=True)]
    if shape is None:
        return [0] * (2 * rank) if auto == "VALID" else list(at.get("pads", [0] * (2 * rank)))
    begins, ends = [], []
    for size, k, s, d, extra, want in zip(in_dims, kernel, strides, dilations, output_padding, shape, strict=True):
        total = s * (size - 1) + extra + (k - 1) * d + 1 - want
        if total < 0:
            raise NotConvertible(
                f"ConvTranspose output_shape {shape} is larger than the full output; set output_padding instead"
            )
        small = total // 2
        begins.append(small if auto == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins + ends


@converter("ConvTranspose")
def _conv_transpose(ctx, node, ins, at):
    x, w, b = (list(ins) + [None])[:3]
    rank = _spatial_rank(ctx, x, "ConvTranspose")
    kernel = _weight_kernel(ctx, x, w, "ConvTranspose")
    strides, dilations = list(at.get("strides", [1] * rank)), list(at.get("dilations", [1] * rank))
    output_padding = list(at.get("output_padding", [0] * rank))
    if len(strides) != rank or len(dilations) != rank or len(output_padding) != rank:
        raise NotConvertible(
            f"ConvTranspose strides {strides}, dilations {dilations} and output_padding {output_padding} "
            f"must hold {rank} values each"
        )
    pads = _transpose_pads(ctx.shape(x)[2:], kernel, strides, dilations, output_padding, at)
    attrs = {"groups": at.get("group", 1)}
    if rank > 1:
        attrs.update(stride=strides, padding=pads, output_padding=output_padding, dilation=dilations)
        return ctx.op(f"conv_transpose{rank}d", x, w, b, **attrs)
    attrs.update(
        stride=[1, strides[0]],
        padding=[0, pads[0], 0, pads[1]],
        output_padding=[0, output_padding[0]],
        dilation=[1, dilations[0]],
    )
    return _drop_height(ctx, ctx.op("conv_transpose2d", _unit_height(ctx, x), _unit_height(ctx, w), b, **attrs))


def _pool2d(ctx, op_type, x, kernel, strides, pads, dilations, at):
    attrs = {"kernel": kernel, "stride": strides, "padding": pads, "ceil_mode": bool(at.get("ceil_mode", 0))}
    if op_type == "MaxPool":
        return ctx.op("max_pool2d", x, dilation=dilations, **attrs)
    return ctx.op("avg_pool2d", x, count_include_pad=bool(at.get("count_include_pad", 0)), **attrs)


@converter("MaxPool", "AveragePool")
def _pool(ctx, node, ins, at):
    x = ins[0]
    rank = _spatial_rank(ctx, x, node.op_type)
    if len(node.output) > 1 and node.output[1]:
        raise NotConvertible(f"{node.op_type} with an Indices output is not supported; export without indices")
    kernel = list(at["kernel_shape"])
    if len(kernel) != rank:
        raise NotConvertible(f"kernel_shape {kernel} must hold {rank} values for rank-{rank + 2} input")
    strides, pads, dilations = _window_attrs(ctx, x, kernel, at)
    if node.op_type == "AveragePool" and any(d != 1 for d in dilations):
        raise NotConvertible("AveragePool with dilations is not supported")
    if rank == 2:
        return _pool2d(ctx, node.op_type, x, kernel, strides, pads, dilations, at)
    if rank == 1:
        y = _pool2d(
            ctx,
            node.op_type,
            _unit_height(ctx, x),
            [1, kernel[0]],
            [1, strides[0]],
            [0, pads[0], 0, pads[1]],
            [1, dilations[0]],
            at,
        )
        return _drop_height(ctx, y)
    return pool3d_as_2d(
        x,
        ctx.shape(x),
        kernel,
        strides,
        pads,
        dilations,
        pool2d=lambda v, k, s, p, d: _pool2d(ctx, node.op_type, v, k, s, p, d, at),
        reshape=lambda v, shape: ctx.op("reshape", v, shape=shape),
        shape_of=ctx.shape,
    )


# -- activations --------------------------------------------------------------------------------
def _const(ctx, x, value) -> np.ndarray:
    return np.asarray(value, dtype=np.dtype(ctx.dtype(x)))


def _elu(ctx, x, alpha: float):
    """``relu(x) + alpha * (exp(min(x, 0)) - 1)``: ONNX Elu (the exp never sees a positive x)."""
    negative = ctx.op("sub", ctx.op("exp", ctx.op("minimum", x, _const(ctx, x, 0))), _const(ctx, x, 1))
    return ctx.op("add", ctx.op("relu", x), ctx.op("mul", negative, _const(ctx, x, alpha)))


@converter("Elu")
def _elu_converter(ctx, node, ins, at):
    return _elu(ctx, ins[0], at.get("alpha", 1.0))


@converter("Selu")
def _selu(ctx, node, ins, at):
    x = ins[0]
    alpha, gamma = at.get("alpha", 1.67326319217681884765625), at.get("gamma", 1.05070102214813232421875)
    return ctx.op("mul", _elu(ctx, x, alpha), _const(ctx, x, gamma))


@converter("PRelu")
def _prelu(ctx, node, ins, at):
    """``relu(x) + slope * min(x, 0)``; slope broadcasts to x (unidirectionally, numpy rules).

    A 1-D slope of x's channel count that does not broadcast to the last axis is per channel (axis 1):
    opset 6 PRelu's meaning, which ``onnx.version_converter`` leaves unchanged when upgrading.
    """
    x, slope = ins
    if isinstance(slope, np.ndarray) and slope.dtype.name != ctx.dtype(x):
        raise NotConvertible(f"PRelu slope is {slope.dtype.name}, x is {ctx.dtype(x)}; they must be one dtype")
    dims, slope_dims = ctx.shape(x), ctx.shape(slope)
    if len(slope_dims) == 1 and len(dims) > 2 and slope_dims[0] not in (1, dims[-1]) and slope_dims[0] == dims[1]:
        slope = ctx.op("reshape", slope, shape=[dims[1]] + [1] * (len(dims) - 2))
    return ctx.op("add", ctx.op("relu", x), ctx.op("mul", ctx.op("minimum", x, _const(ctx, x, 0)), slope))


@converter("Sign")
def _sign(ctx, node, ins, at):
    """``where(x > 0, 1, where(x < 0, -1, x))``: zeros and NaN pass through, as ``np.sign`` (no
    ``x == x`` test, which compilers fold to true)."""
    x = ins[0]
    if isinstance(x, np.ndarray):
        return np.sign(x)
    if ctx.dtype(x) == "bool":
        raise NotConvertible("Sign of a bool tensor; ONNX Sign takes numbers")
    zero = _const(ctx, x, 0)
    unsigned = ctx.dtype(x).startswith("uint")
    rest = x if unsigned else ctx.op("where", ctx.op("less", x, zero), _const(ctx, x, -1), x)
    return ctx.op("where", ctx.op("greater", x, zero), _const(ctx, x, 1), rest)


@converter("Shrink")
def _shrink(ctx, node, ins, at):
    """``x + bias`` below ``-lambd``, ``x - bias`` above ``lambd``, else 0 (ONNX Shrink)."""
    x = ins[0]
    bias, lambd = _const(ctx, x, at.get("bias", 0.0)), _const(ctx, x, at.get("lambd", 0.5))
    upper = ctx.op("where", ctx.op("greater", x, lambd), ctx.op("sub", x, bias), _const(ctx, x, 0))
    return ctx.op("where", ctx.op("less", x, ctx.op("neg", lambd)), ctx.op("add", x, bias), upper)


# -- normalizations -----------------------------------------------------------------------------
@converter("LRN")
def _lrn(ctx, node, ins, at):
    """``x / (bias + alpha / size * sum of x^2 over channels c - (size-1)//2 .. c + ceil((size-1)/2))^beta``."""
    x = ins[0]
    dims = list(ctx.shape(x))
    if len(dims) < 3:
        raise NotConvertible(f"LRN input must have rank 3 or more (N, C, D1, ...), got rank {len(dims)}")
    size = int(at["size"])
    alpha, beta, bias = at.get("alpha", 1e-4), at.get("beta", 0.75), at.get("bias", 1.0)
    squares = ctx.op("reshape", ctx.op("mul", x, x), shape=[dims[0], 1, dims[1], dims_product(dims[2:])])
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    mean = ctx.op(
        "avg_pool2d", squares, kernel=[size, 1], padding=[before, 0, after, 0], count_include_pad=True
    )  # sum / size, zeros past the channel ends
    base = ctx.op("add", ctx.op("mul", mean, _const(ctx, x, alpha)), _const(ctx, x, bias))
    return ctx.op("div", x, ctx.op("reshape", ctx.op("pow", base, _const(ctx, x, beta)), shape=dims))


@converter("InstanceNormalization")
def _instance_norm(ctx, node, ins, at):
    """``scale[c] * (x - mean) / sqrt(var + epsilon) + bias[c]``, mean and var per (n, c) over the spatial axes."""
    x, scale, bias = ins
    dims = ctx.shape(x)
    if len(dims) < 3:
        raise NotConvertible(f"InstanceNormalization input must have rank 3 or more, got rank {len(dims)}")
    normalized = ctx.op("layer_norm", x, None, None, axis=2, eps=at.get("epsilon", 1e-5))
    channel = [dims[1]] + [1] * (len(dims) - 2)
    scaled = ctx.op("mul", normalized, ctx.op("reshape", scale, shape=channel))
    return ctx.op("add", scaled, ctx.op("reshape", bias, shape=channel))


@converter("GroupNormalization")
def _group_norm(ctx, node, ins, at):
    """``layer_norm`` of x viewed as ``[N, groups, C/groups * spatial]``, then the per-channel affine
    (opset 21; the checker refuses opset 18's per-group scale as deprecated)."""
    x, scale, bias = ins
    dims = list(ctx.shape(x))
    groups = int(at["num_groups"])
    if len(dims) < 3 or groups < 1 or dims[1] % groups:
        raise NotConvertible(f"GroupNormalization: {dims[1] if len(dims) > 1 else '?'} channels, num_groups={groups}")
    grouped = ctx.op("reshape", x, shape=[dims[0], groups, dims_product(dims[1:]) // groups])
    normalized = ctx.op("layer_norm", grouped, None, None, axis=2, eps=at.get("epsilon", 1e-5))
    if any(tuple(ctx.shape(p)) != (dims[1],) for p in (scale, bias)):
        raise NotConvertible(f"GroupNormalization scale and bias must be [{dims[1]}] (one value per channel)")
    channel = [dims[1]] + [1] * (len(dims) - 2)
    scaled = ctx.op("mul", ctx.op("reshape", normalized, shape=dims), ctx.op("reshape", scale, shape=channel))
    return ctx.op("add", scaled, ctx.op("reshape", bias, shape=channel))


# -- padding and tiling -------------------------------------------------------------------------
@converter("Pad")
def _pad(ctx, node, ins, at):
    """ONNX Pad: ``constant`` is the ``pad`` op; ``reflect``, ``edge`` and ``wrap`` are slices of x
    concatenated around it along each padded axis (exact; no new kernel)."""
    x = ins[0]
    mode = at.get("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise NotConvertible(f"Pad mode {mode!r} is not supported; expected constant, reflect, edge or wrap")
    rank = len(ctx.shape(x))
    pads = _ints(ins[1], "Pad pads")
    value = _scalar(ins[2], "Pad value") if len(ins) > 2 and ins[2] is not None else 0.0
    axes = _axes_arg(ctx, ins, {}, index=3)
    if axes is not None:
        full = [0] * (2 * rank)
        for i, axis in enumerate(_norm(a, rank) for a in axes):
            full[axis], full[axis + rank] = pads[i], pads[i + len(axes)]
        pads = full
    if len(pads) != 2 * rank:
        raise NotConvertible(f"Pad pads {pads} must hold {2 * rank} values for rank {rank}")
    if not any(pads):
        return x
    if mode == "constant":
        return ctx.op("pad", x, pads=pads, value=float(value))
    for axis in range(rank):
        if pads[axis] or pads[axis + rank]:
            x = _pad_axis(ctx, x, axis, pads[axis], pads[axis + rank], mode)
    return x


def _pad_axis(ctx, x, axis: int, before: int, after: int, mode: str):
    size = ctx.shape(x)[axis]
    if isinstance(size, str):
        raise NotConvertible(f"Pad mode {mode!r} along the symbolic axis {axis}")
    if min(before, after) < 0:
        raise NotConvertible(f"Pad mode {mode!r} with negative pads {before}, {after} (cropping) is not supported")
    limit = size - 1 if mode == "reflect" else size
    if mode != "edge" and max(before, after) > limit:
        raise NotConvertible(f"Pad mode {mode!r}: pads {before}, {after} exceed axis {axis} of size {size}")

    def take(start: int, end: int, step: int = 1):
        return ctx.op("slice", x, starts=[start], ends=[end], axes=[axis], steps=[step])

    def edge(index: int, count: int):
        dims = list(ctx.shape(x))
        dims[axis] = count
        return ctx.op("expand", take(index, index + 1), shape=dims)

    def side(at_end: bool, count: int):
        if mode == "edge":  # x[0] or x[size-1], repeated
            return edge(size - 1 if at_end else 0, count)
        if mode == "reflect":  # x[count], ..., x[1] | x | x[size-2], ..., x[size-1-count]
            return (
                take(size - 2, size - 2 - count if count < size - 1 else -size - 1, -1)
                if at_end
                else take(count, 0, -1)
            )
        return take(0, count) if at_end else take(size - count, size)  # wrap: the other end's elements

    parts = ([side(False, before)] if before else []) + [x] + ([side(True, after)] if after else [])
    return ctx.op("concat", *parts, axis=axis)


@converter("Tile")
def _tile(ctx, node, ins, at):
    """ONNX Tile: folded when x is known, else ``reshape`` to ``[1, d0, 1, d1, ...]``, ``expand`` to
    ``[r0, d0, r1, d1, ...]`` and ``reshape`` to ``[r0*d0, r1*d1, ...]`` (a repeat count per axis)."""
    x, repeats = ins
    if isinstance(x, np.ndarray):
        return tile_known(x, _known(repeats, "Tile repeats"))
    dims = list(ctx.shape(x))
    counts = _ints(repeats, "Tile repeats")
    if len(counts) != len(dims) or any(isinstance(r, Sym) or r < 0 for r in counts):
        raise NotConvertible(f"Tile repeats {counts} must be {len(dims)} non-negative constant counts")
    if all(r == 1 for r in counts):
        return x
    split = [d for dim, r in zip(dims, counts, strict=True) for d in ((1, dim) if r != 1 else (dim,))]
    spread = [d for dim, r in zip(dims, counts, strict=True) for d in ((r, dim) if r != 1 else (dim,))]
    tiled = ctx.op("expand", ctx.op("reshape", x, shape=split), shape=spread)
    return ctx.op("reshape", tiled, shape=[dim_mul(dim, r) for dim, r in zip(dims, counts, strict=True)])
