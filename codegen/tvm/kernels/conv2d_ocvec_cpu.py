"""fp32 conv2d for CPU vectorized over output channels (groups=1): no wasted pixels, any stride.

``conv2d_cpu.py`` puts 16 output *pixels* in a vector, so a row of ``ow`` pixels is computed on the
padded grid (``Wp`` columns) and rounded up to whole vectors: a 7x7 image computes 64 pixels for
49 (ResNet-18's last stage), a 14x14 one 240 for 196, and a strided conv needs an im2col copy.
Here a vector holds 16 *output channels* instead (the direct convolution of Georganas et al.,
SC'18, with output channels innermost, as oneDNN's ``nChw16c`` kernels): for a tile of ``pt``
consecutive output pixels of one row and ``vo`` channel vectors,

    acc[t, v] += broadcast(xpad[c, (oh*s + i*d) * Wp + (ow0 + t)*s + j*d]) * w[ob, (c, i, j), 16v : 16v + 16]

so the input is read as scalar broadcasts (any stride, exactly the valid pixels) and the filter as
vectors packed ``[OC / (16 vo), C*KH*KW, 16 vo]``. ``pt * vo <= 14`` accumulators stay in
registers (under the 1 KiB where TVM moves local buffers to the heap). A job is (image, channel
block, output row), rows innermost, so a thread reuses one filter block (L2-resident) across rows.
The result is stored channel-strided into NCHW ``y[n, oc, oh*ow]``, or, when the next conv reads this
one's output (through a ReLU), straight into that conv's zero padded input layout
(:class:`OutputLayout`) with the ReLU applied: no padding copy and no ReLU pass between the two
(oneDNN's post-op fusion; onnxruntime's NCHWc convs keep their padding in the kernel the same way).
While a job computes row ``r`` of channel block ``ob``, it prefetches ``1/oh`` of block ``ob + 1``'s
filter into L2, so the first row of the next block does not wait on memory (the filter stream,
not the FMAs, bounds that row when weights are cold, as in a real layer sequence).

Knobs (``KNOBS``, searched per shape by ``codegen/tvm/tune_knobs.py``): the register tile, ``pt``
pixels (a divisor of ``ow``) x ``vo`` channel vectors; ``vo = 2`` only where it keeps the output
width (``oc`` a multiple of 32). Every tile sums each output in the same order, bit-identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from reshift.codegen.tvm import knobs as knob_db
from reshift.codegen.tvm.kernels import conv2d_cpu

LANES = 16
MAX_ACCUMULATORS = 14


@dataclass(frozen=True)
class OutputLayout:
    """Where a conv's output pixels go: a zero padded ``[n, oc, grid_rows * row]`` image.

    Pixel ``(r, c)`` lands at ``(r + top) * row + left + c``; every other position of the grid is
    written as zero. ``OutputLayout.plain(oh, ow)`` is the unpadded NCHW layout.
    """

    top: int
    left: int
    row: int
    grid_rows: int

    @staticmethod
    def plain(oh: int, ow: int) -> OutputLayout:
        return OutputLayout(0, 0, ow, oh)

    @property
    def plane(self) -> int:
        return self.grid_rows * self.row


def choose_tile(out_channels: int, ow: int) -> tuple[int, int] | None:
    """``(pt, vo)``: pixels per tile (a divisor of ``ow``) and channel vectors, or None when no tile fits."""
    vo = 2 if out_channels % (2 * LANES) == 0 else 1
    for pt in range(MAX_ACCUMULATORS // vo, 3, -1):
        if ow % pt == 0:
            return pt, vo
    return None


def shape_key(
    n: int,
    channels: int,
    kernel,
    stride,
    dilation,
    row: int,
    plane: int,
    out_hw,
    oc: int,
    out: OutputLayout,
    relu: bool,
    residual: bool = False,
) -> knob_db.Shape:
    """Everything one ocvec kernel instance is specialized to, as the knob database's shape (``residual``
    only where set, so the keys of instances without one, in databases tuned before it, still match)."""
    names = ("n", "c", "kh", "kw", "sh", "sw", "dh", "dw", "row", "plane", "oh", "ow", "oc")
    values = (n, channels, *kernel, *stride, *dilation, row, plane, *out_hw, oc)
    layout = {"out_top": out.top, "out_left": out.left, "out_row": out.row, "out_rows": out.grid_rows}
    key = {**dict(zip(names, (int(v) for v in values), strict=True)), **layout, "relu": int(relu)}
    return {**key, "residual": 1} if residual else key


def default_knobs(shape: knob_db.Shape) -> knob_db.Knobs:
    tile = choose_tile(shape["oc"], shape["ow"])
    pt, vo = tile if tile is not None else (1, 1)
    return {"pt": pt, "vo": vo}


def check_knobs(shape: knob_db.Shape, knobs: knob_db.Knobs) -> str | None:
    pt, vo = knobs["pt"], knobs["vo"]
    if vo not in (1, 2) or (vo == 2 and shape["oc"] % (2 * LANES)):
        return f"vo={vo} must be 1, or 2 when the {shape['oc']} output channels are a multiple of 32"
    if not 1 <= pt <= shape["ow"] or shape["ow"] % pt:
        return f"pt={pt} must divide the output width {shape['ow']}"
    if pt * vo > MAX_ACCUMULATORS:
        return f"a {pt}x{vo} tile needs more than {MAX_ACCUMULATORS} accumulator registers"
    return None


def candidate_knobs(shape: knob_db.Shape) -> list[knob_db.Knobs]:
    """The default, then for each ``vo`` the three widest pixel tiles dividing ``ow``."""
    found = [default_knobs(shape)]
    for vo in (2, 1):
        tiles = [pt for pt in range(MAX_ACCUMULATORS // vo, 1, -1) if shape["ow"] % pt == 0][:3]
        found += [{"pt": pt, "vo": vo} for pt in tiles]
    unique = {tuple(sorted(c.items())): c for c in found if check_knobs(shape, c) is None}
    return list(unique.values())


def instance(shape: knob_db.Shape, knobs: knob_db.Knobs, rng: np.random.Generator) -> knob_db.Instance:
    kernel, oc = (shape["kh"], shape["kw"]), shape["oc"]
    out = OutputLayout(shape["out_top"], shape["out_left"], shape["out_row"], shape["out_rows"])
    x = rng.standard_normal((shape["n"], shape["c"], shape["plane"])).astype(np.float32)
    w = rng.standard_normal((oc, shape["c"], *kernel)).astype(np.float32)
    packed = pack_filters(w, knobs["vo"])
    width = packed.shape[0] * packed.shape[2]
    b = rng.standard_normal(width).astype(np.float32)
    residual = bool(shape.get("residual", 0))
    res = rng.standard_normal((shape["n"], width, shape["oh"] * shape["ow"])).astype(np.float32) if residual else b
    func = conv_ocvec_func(
        shape["c"],
        kernel,
        (shape["sh"], shape["sw"]),
        (shape["dh"], shape["dw"]),
        shape["row"],
        shape["plane"],
        (shape["oh"], shape["ow"]),
        packed.shape[0],
        knobs["pt"],
        knobs["vo"],
        out,
        bool(shape["relu"]),
        residual,
    )
    return knob_db.Instance(func, [x, packed, b, res], [((shape["n"], width, out.plane), "float32")])


KNOBS = knob_db.register(knob_db.KnobSpace("conv2d_ocvec_f32", default_knobs, candidate_knobs, check_knobs, instance))


def pack_filters(w: np.ndarray, vo: int) -> np.ndarray:
    """``float32 [OC, C, KH, KW]`` -> ``[ceil(OC / 16vo), C*KH*KW, 16vo]``, zero padded (the pixel
    kernel's packing with a 16vo-channel block)."""
    return conv2d_cpu.pack_filters(w, LANES * vo)


def conv_ocvec_func(
    channels: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    row: int,
    plane: int,
    out_hw: tuple[int, int],
    oc_blocks: int,
    pt: int,
    vo: int,
    out: OutputLayout | None = None,
    relu: bool = False,
    residual: bool = False,
) -> tirx.PrimFunc:
    """``y[n, oc, p] = b[oc] + sum_{c,i,j} w[oc / 16vo, (c*kh + i)*kw + j, oc % 16vo] * xpad[n, c, ...]``.

    ``x`` is the zero padded image flattened to ``[n, channels, plane]`` (rows of ``row`` columns);
    ``y`` is ``[n, oc_blocks * 16 * vo, out.plane]`` (default: unpadded, ``oh * ow``). When ``residual``,
    ``+ res[n, oc, p]`` (``[n, oc_blocks * 16 * vo, oh * ow]``, the other operand of a ResNet block's
    ``add``), then ``max(., 0)`` when ``relu``: the add and ReLU that would each re-read and re-write
    the output; without ``residual`` the ``res`` operand is not read (pass any tensor). The batch
    ``n`` is symbolic.
    """
    kh, kw = kernel
    s0, s1 = stride
    d0, d1 = dilation
    oh, ow = out_hw
    k = channels * kh * kw
    width = LANES * vo
    out_channels = oc_blocks * width
    out = out or OutputLayout.plain(oh, ow)
    out_plane = out.plane
    tiles = ow // pt
    lanes = T.Ramp(0, 1, LANES)
    lines_per_c = kh * kw * width // LANES  # 64-byte lines of one input channel's filter taps
    zero = T.Broadcast(T.float32(0), LANES)
    padded = out != OutputLayout.plain(oh, ow)
    jobs = conv2d_cpu.job_loop(out_channels * k * oh * ow)

    @T.prim_func(private=True)
    def conv(
        x_h: T.handle,
        w: T.Buffer((oc_blocks, k, width), "float32"),
        b: T.Buffer((out_channels,), "float32"),
        res_h: T.handle,
        y_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(x_h, (n, channels, plane), "float32")
        y = T.match_buffer(y_h, (n, out_channels, out_plane), "float32")
        if residual:
            res = T.match_buffer(res_h, (n, out_channels, oh * ow), "float32")
        xf = T.decl_buffer((n * channels * plane,), "float32", data=x.data)
        wf = T.decl_buffer((oc_blocks * k * width,), "float32", data=w.data)
        yf = T.decl_buffer((n * out_channels * out_plane,), "float32", data=y.data)
        if residual:
            resf = T.decl_buffer((n * out_channels * oh * ow,), "float32", data=res.data)
        for job in jobs(n * oc_blocks * oh):
            img = job // (oc_blocks * oh)
            ob = job % (oc_blocks * oh) // oh
            r = job % oh
            for tile in range(tiles):
                acc = T.alloc_buffer((pt, vo, LANES), "float32", scope="global")
                wv = T.alloc_buffer((vo, LANES), "float32", scope="global")
                for t in T.unroll(pt):
                    for v in T.unroll(vo):
                        acc[t, v, lanes] = b[T.Ramp(ob * width + v * LANES, 1, LANES)]
                for c in range(channels):
                    if tile == 0 and T.Cast("int64", c * oh // channels) == r:  # this row's share of ob+1
                        for line in range(lines_per_c):
                            T.evaluate(
                                T.call_intrin(
                                    "",
                                    "tirx.prefetch",
                                    T.address_of(
                                        wf[(T.min(ob + 1, oc_blocks - 1) * k + c * kh * kw) * width + line * LANES]
                                    ),
                                    0,  # read
                                    2,  # locality: keep in L2
                                    1,  # data cache
                                )
                            )
                    for i in range(kh):
                        for j in range(kw):
                            for v in T.unroll(vo):
                                wv[v, lanes] = wf[
                                    T.Ramp((ob * k + (c * kh + i) * kw + j) * width + v * LANES, 1, LANES)
                                ]
                            for t in T.unroll(pt):
                                for v in T.unroll(vo):
                                    acc[t, v, lanes] = (
                                        acc[t, v, lanes]
                                        + T.Broadcast(
                                            xf[
                                                (img * channels + c) * plane
                                                + (r * s0 + i * d0) * row
                                                + (tile * pt + t) * s1
                                                + j * d1
                                            ],
                                            LANES,
                                        )
                                        * wv[v, lanes]
                                    )
                for t in T.unroll(pt):
                    for v in T.unroll(vo):
                        if residual:
                            acc[t, v, lanes] = (
                                acc[t, v, lanes]
                                + resf[
                                    T.Ramp(
                                        (img * out_channels + ob * width + v * LANES) * (oh * ow)
                                        + r * ow
                                        + tile * pt
                                        + t,
                                        oh * ow,
                                        LANES,
                                    )
                                ]
                            )
                        if relu:
                            acc[t, v, lanes] = T.max(acc[t, v, lanes], zero)
                        yf[
                            T.Ramp(
                                (img * out_channels + ob * width + v * LANES) * out_plane
                                + (r + out.top) * out.row
                                + out.left
                                + tile * pt
                                + t,
                                out_plane,
                                LANES,
                            )
                        ] = acc[t, v, lanes]
            if padded:  # the zero border around this output row (and above / below the image)
                for oc in range(width):
                    base = (img * out_channels + ob * width + oc) * out_plane
                    for col in range(out.left):
                        yf[base + (r + out.top) * out.row + col] = T.float32(0)
                    for col in range(out.row - out.left - ow):
                        yf[base + (r + out.top) * out.row + out.left + ow + col] = T.float32(0)
                    if r == 0:
                        for q in range(out.top * out.row):
                            yf[base + q] = T.float32(0)
                    if r == oh - 1:
                        for q in range((out.grid_rows - out.top - oh) * out.row):
                            yf[base + (out.top + oh) * out.row + q] = T.float32(0)

    return conv
