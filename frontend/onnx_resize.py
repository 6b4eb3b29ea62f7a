"""ONNX ``Resize`` (opset 10-19; ``Upsample`` arrives here through the opset upgrade) as ``resize2d``.

Only the two spatial axes of an NCHW tensor may change. ``nearest``, ``linear`` and ``cubic``
(``cubic_coeff_a``, ``exclude_outside``) modes with the ``half_pixel``, ``half_pixel_symmetric``,
``pytorch_half_pixel``, ``align_corners``, ``asymmetric`` and ``tf_crop_and_resize`` (a constant
``roi`` that leaves the batch and channel axes whole; ``extrapolation_value``) coordinate
transformations are exact. A ``scales`` input whose product with the input size is not whole
(ONNX then samples at ``1 / scale``, not ``in / out``) is carried as resize2d's ``scales`` for the
half-pixel and asymmetric modes and refused for the others. Opset 18's ``axes`` spread roi,
scales and sizes over the four axes, and ``keep_aspect_ratio_policy`` gives them one scale (ONNX's
reference rounds the sizes half up). ``antialias`` (linear and cubic) stretches the kernel when
downsampling.
onnxruntime (1.2x) leaves an axis whose size does not change as it is even under
``tf_crop_and_resize``; reshift crops it as the ONNX specification and reference do.
"""

from __future__ import annotations

import math

import numpy as np

from reshift.frontend.onnx_ops import NotConvertible, _known, converter
from reshift.ir.ops_index import COORDINATE_MODES, NEAREST_MODES, RESIZE_MODES, SCALED_MODES


def _output_size(ctx, x, scales, sizes, coordinate: str) -> tuple[list[int], list[float]]:
    """The static output H, W from ``sizes`` or ``scales`` (batch and channels unchanged), and the
    scales when they are not ``out / in`` (the half-pixel and asymmetric modes sample at ``1 / scale``)."""
    dims = list(ctx.shape(x))
    if sizes is not None and np.asarray(_known(sizes, "Resize sizes")).size:
        out = [int(s) for s in np.asarray(sizes).reshape(-1)]
        kept = len(out) == 4 and all(isinstance(d, str) or d == o for d, o in zip(dims[:2], out[:2], strict=True))
        if not kept:
            raise NotConvertible(f"Resize sizes {out} change the batch or channel axis; only H and W may change")
        return out[2:], []
    if scales is None:
        raise NotConvertible("Resize has neither scales nor sizes")
    factors = [float(f) for f in np.asarray(_known(scales, "Resize scales")).reshape(-1)]
    if len(factors) != 4 or factors[:2] != [1.0, 1.0]:
        raise NotConvertible(f"Resize scales {factors} change the batch or channel axis; only H and W may change")
    out, whole = [], True
    for size, factor in zip(dims[2:], factors[2:], strict=True):
        if isinstance(size, str):
            raise NotConvertible("Resize over a symbolic spatial size; pin it with input_shapes / --input-shape")
        resized = math.floor(size * factor)
        if resized < 1:
            raise NotConvertible(f"Resize scale {factor} on a size of {size} leaves no output")
        whole = whole and math.isclose(resized / size, factor, rel_tol=1e-6)
        out.append(resized)
    if whole:
        return out, []
    if coordinate not in SCALED_MODES:
        raise NotConvertible(
            f"Resize scales {factors[2:]} on sizes {dims[2:]} are not whole output sizes, which "
            f"{coordinate} does not support (half_pixel, pytorch_half_pixel, asymmetric do); pass sizes instead"
        )
    return out, factors[2:]


def _on_every_axis(dims, axes: list[int], roi, scales, sizes):
    """Opset 18's ``axes``: roi, scales and sizes given for those axes only, spread over all four."""
    rank = len(dims)
    axes = [a % rank if -rank <= a < rank else rank for a in axes]
    if len(set(axes)) != len(axes) or any(a >= rank for a in axes):
        raise NotConvertible(f"Resize axes {axes} must be distinct axes of the rank-{rank} input")

    def spread(values, fill: list, what: str):
        if values is None or not np.asarray(_known(values, f"Resize {what}")).size:
            return values
        values = np.asarray(values).reshape(-1)
        if values.size != len(axes) * len(fill) // rank:
            raise NotConvertible(f"Resize {what} has {values.size} values for axes {axes}")
        full = np.asarray(fill, dtype=values.dtype)
        for k, axis in enumerate(axes):
            full[axis] = values[k]
            if len(fill) > rank:  # roi: the starts, then the ends
                full[rank + axis] = values[len(axes) + k]
        return full

    return (
        spread(roi, [0.0] * rank + [1.0] * rank, "roi"),
        spread(scales, [1.0] * rank, "scales"),
        spread(sizes, list(dims), "sizes"),
    )


def _kept_aspect_size(dims, sizes, policy: str, axes, coordinate: str) -> tuple[list[int], list[float]]:
    """``keep_aspect_ratio_policy``: one scale for every listed axis, the smallest (``not_larger``) or
    largest (``not_smaller``) of ``sizes / dims``, and output sizes ``round_half_up(scale * dim)``."""
    if sizes is None or any(isinstance(d, str) for d in dims):
        raise NotConvertible("Resize keep_aspect_ratio_policy needs constant sizes and a static input shape")
    wanted = [int(v) for v in np.asarray(_known(sizes, "Resize sizes")).reshape(-1)]
    axes = [a % len(dims) for a in axes] if axes is not None else list(range(len(dims)))
    ratios = [wanted[a] / dims[a] for a in axes]
    scale = min(ratios) if policy == "not_larger" else max(ratios)
    out = [int(scale * d + 0.5) if i in axes else d for i, d in enumerate(dims)]
    if out[:2] != list(dims[:2]):
        raise NotConvertible(f"Resize keep_aspect_ratio_policy gives sizes {out}, which change the batch or channels")
    factors = [scale if i in axes else 1.0 for i in (2, 3)]
    if all(math.isclose(o / d, f, rel_tol=1e-6) for o, d, f in zip(out[2:], dims[2:], factors, strict=True)):
        return out[2:], []
    if coordinate not in SCALED_MODES:
        raise NotConvertible(f"Resize keep_aspect_ratio_policy with {coordinate}: the scale {scale} is not whole")
    return out[2:], factors


@converter("Resize")
def _resize(ctx, node, ins, at):
    """ONNX Resize of the spatial axes (module docstring: what is exact, what is refused)."""
    x, roi, scales, sizes = (list(ins) + [None] * 4)[:4]  # opset >= 11 (older models are upgraded)
    if len(ctx.shape(x)) != 4:
        raise NotConvertible(f"Resize of a rank-{len(ctx.shape(x))} tensor; only NCHW (rank 4) is supported")
    mode = at.get("mode", "nearest")
    coordinate = at.get("coordinate_transformation_mode", "half_pixel")
    rounding = at.get("nearest_mode", "round_prefer_floor")
    if at.get("antialias", 0) and mode == "nearest":
        raise NotConvertible("Resize antialias=1 with mode 'nearest' is not defined (ONNX: linear and cubic)")
    policy = at.get("keep_aspect_ratio_policy", "stretch")
    if policy not in ("stretch", "not_larger", "not_smaller"):
        raise NotConvertible(f"Resize keep_aspect_ratio_policy {policy!r} is not one ONNX defines")
    if "axes" in at:
        roi, scales, sizes = _on_every_axis(ctx.shape(x), [int(a) for a in at["axes"]], roi, scales, sizes)
    if at.get("exclude_outside", 0) and mode != "cubic":
        raise NotConvertible(f"Resize exclude_outside=1 with mode {mode!r} is not supported (only with cubic)")
    if mode not in RESIZE_MODES:
        raise NotConvertible(f"Resize mode {mode!r} is not supported ({', '.join(RESIZE_MODES)})")
    if coordinate not in COORDINATE_MODES:
        raise NotConvertible(f"Resize coordinate_transformation_mode {coordinate!r} is not supported")
    if policy == "stretch":
        size, factors = _output_size(ctx, x, scales, sizes, coordinate)
    else:
        size, factors = _kept_aspect_size(ctx.shape(x), sizes, policy, at.get("axes"), coordinate)
    if coordinate == "pytorch_half_pixel" and min(size) > 1:
        coordinate = "half_pixel"
    if mode == "nearest" and rounding not in NEAREST_MODES:
        raise NotConvertible(f"Resize nearest_mode {rounding!r} is not supported")
    attrs = {"size": size, "mode": mode, "coordinate_transformation": coordinate, "nearest_mode": rounding}
    if factors:
        attrs["scales"] = factors
    if at.get("antialias", 0):
        attrs["antialias"] = True
    if mode == "cubic":
        attrs |= {
            "cubic_coeff_a": at.get("cubic_coeff_a", -0.75),
            "exclude_outside": bool(at.get("exclude_outside", 0)),
        }
    if coordinate == "tf_crop_and_resize":
        attrs |= {"roi": _crop_roi(roi), "extrapolation_value": at.get("extrapolation_value", 0.0)}
    return ctx.op("resize2d", x, **attrs)


def _crop_roi(roi) -> list[float]:
    """``tf_crop_and_resize``'s ``roi`` input (starts, then ends, normalized) as resize2d's (h0, w0, h1, w1)."""
    if roi is None or not isinstance(roi, np.ndarray) or roi.size != 8:
        raise NotConvertible(
            "Resize tf_crop_and_resize needs a constant roi of 8 values (4 starts, 4 ends); a run-time or "
            "missing roi is not supported"
        )
    starts, ends = [float(v) for v in roi.reshape(-1)[:4]], [float(v) for v in roi.reshape(-1)[4:]]
    if starts[:2] != [0.0, 0.0] or ends[:2] != [1.0, 1.0]:
        raise NotConvertible(f"Resize roi {roi.tolist()} crops the batch or channel axis; only H and W may be cropped")
    return [starts[2], starts[3], ends[2], ends[3]]
