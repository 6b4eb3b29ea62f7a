"""fp32 3x3 stride-1 conv for CPU by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, CVPR 2016).

Each 2x2 block of output pixels (a tile) is ``Y = A^T [(G g G^T) * (B^T d B)] A`` for the tile's
4x4 input patch ``d`` and the 3x3 filter ``g`` (Lavin & Gray Eq. 8): 16 multiplies per tile and
channel pair instead of 36, so the conv's GEMM work drops 2.25x. Three kernels:

1. input transform: ``V[xi, tile, c] = (B^T d B)[xi]``, 16 channels per vector (the input rows are
   staged channel-last first; the transform is adds only);
2. 16 independent GEMMs ``M[xi] = V[xi] @ U[xi]`` through the packed dense kernel of
   ``dense_cpu.py`` (``U = G g G^T`` computed at build time, packed per ``xi``);
3. output transform: ``Y = A^T M A`` + bias (+ ReLU), 16 output channels per vector, stored
   channel-strided into NCHW or into the next conv's zero padded input (``OutputLayout``).

The input is the zero padded image flattened to ``[n, c, grid_rows * row]`` (the direct kernels'
input), so any padding works; the output height and width must be even and the channel counts
multiples of 16. Rounding differs from the direct conv by the transforms (a few 1e-7 relative).
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as Tb

from reshift.codegen.tvm.kernels.conv2d_ocvec_cpu import OutputLayout
from reshift.codegen.tvm.kernels.dense_cpu import pack_panels

LANES = 16
TILE = 2  # output pixels per tile side (F(2x2, 3x3): 4x4 input patches)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)


def applies(kernel, stride, dilation, channels: int, out_channels: int, out_hw: tuple[int, int]) -> bool:
    """3x3, stride 1, no dilation, channel counts in whole vectors, an even output size."""
    return (
        tuple(kernel) == (3, 3)
        and tuple(stride) == (1, 1)
        and tuple(dilation) == (1, 1)
        and channels % LANES == 0
        and out_channels % LANES == 0
        and out_hw[0] % TILE == 0
        and out_hw[1] % TILE == 0
    )


def transformed_filters(w: np.ndarray) -> np.ndarray:
    """``float32 [OC, C, 3, 3]`` -> ``U = G g G^T`` packed per tile position: ``[16, OC/16, C, 16]``."""
    u = np.einsum("ai,ocij,bj->abco", G, w.astype(np.float64), G).reshape(16, w.shape[1], w.shape[0])
    return np.stack([pack_panels(np.ascontiguousarray(u[xi].T).astype(np.float32)) for xi in range(16)])


def _bt(d):
    """``B^T`` applied to four values (rows or columns of a patch)."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _at(m):
    """``A^T`` applied to four values."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def _header(name: str) -> None:
    Tb.func_name(name)
    Tb.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})


def input_transform_func(channels: int, row: int, plane: int, tiles_hw: tuple[int, int]) -> tirx.PrimFunc:
    """``V[xi, n*T + t, c]`` for ``x [n, channels, plane]`` (rows of ``row``), ``T`` tiles per image.

    A job (image, tile row, 16 channels) first copies its four input rows channel-last into a scratch
    buffer, so the transform then works on 16-channel vectors loaded and stored contiguously
    (gathering them with the NCHW channel stride, or vectorizing over tiles 2 pixels apart, ran 4x
    slower). ``x`` is
    passed twice and the copy's last row read through the second one: Relax's RewriteDataflowReshape
    takes a PrimFunc that reads one input and has no blocks for a reshape (see ``softmax_cpu.py``)."""
    th, tw = tiles_hw
    per_image = th * tw
    with IRBuilder() as ib, Tb.prim_func(is_private=True):
        _header("winograd_input")
        x_h, x2_h, v_h = Tb.arg("x", Tb.handle()), Tb.arg("x_again", Tb.handle()), Tb.arg("v", Tb.handle())
        n = Tb.int64()
        x = Tb.match_buffer(x_h, (n, channels, plane), "float32")
        x_again = Tb.match_buffer(x2_h, (n, channels, plane), "float32")
        v = Tb.match_buffer(v_h, (16, n * per_image, channels), "float32")
        cv = channels // LANES
        with Tb.parallel(0, n * th * cv) as job:  # (image, tile row, 16 channels)
            img, ty, c0 = job // (th * cv), job % (th * cv) // cv, job % cv
            rows = Tb.alloc_buffer((4 * row * LANES,), "float32")  # [i][col][c] of input rows 2ty..2ty+3
            with Tb.serial(0, LANES) as c:
                for i in range(4):
                    source = x if i < 3 else x_again
                    with Tb.serial(0, row) as col:
                        value = source[img, c0 * LANES + c, (ty * TILE + i) * row + col]
                        Tb.buffer_store(rows, value, [(i * row + col) * LANES + c])
            with Tb.serial(0, tw) as tx:
                d = [[rows[tirx.Ramp((i * row + tx * TILE + j) * LANES, 1, LANES)] for j in range(4)] for i in range(4)]
                columns = [_bt([d[i][j] for i in range(4)]) for j in range(4)]  # B^T d, column j
                for a in range(4):
                    for b, value in enumerate(_bt([columns[j][a] for j in range(4)])):  # (B^T d B)[a, b]
                        index = [a * 4 + b, img * per_image + ty * tw + tx, tirx.Ramp(c0 * LANES, 1, LANES)]
                        Tb.buffer_store(v, value, index)
    return ib.get()


def output_transform_func(
    width: int,
    tiles_hw: tuple[int, int],
    out_hw: tuple[int, int],
    out: OutputLayout,
    relu: bool,
    residual: bool = False,
) -> tirx.PrimFunc:
    """``y[n, oc, ...] = (A^T M A)[...] + b[oc]`` from ``M [16, n*T, width]``, into layout ``out``
    (the border of a padded layout written as zero), ``+ r[n, oc, oh*ow]`` when ``residual`` (a
    ResNet block's add; ``r`` is not read otherwise), then ReLU'd when ``relu``."""
    th, tw = tiles_hw
    oh, ow = out_hw
    per_image = th * tw
    plane = out.plane
    zero_vec = tirx.Broadcast(tirx.const(0, "float32"), LANES)
    zero = tirx.const(0, "float32")
    with IRBuilder() as ib, Tb.prim_func(is_private=True):
        _header("winograd_output")
        m_h, b_h = Tb.arg("m", Tb.handle()), Tb.arg("b", Tb.handle())
        r_h, y_h = Tb.arg("r", Tb.handle()), Tb.arg("y", Tb.handle())
        n = Tb.int64()
        m = Tb.match_buffer(m_h, (16, n * per_image, width), "float32")
        b = Tb.match_buffer(b_h, (width,), "float32")
        if residual:
            r3 = Tb.match_buffer(r_h, (n, width, oh * ow), "float32")
        y = Tb.match_buffer(y_h, (n, width, plane), "float32")
        yf = Tb.decl_buffer((n * width * plane,), "float32", data=y.data)
        if residual:
            r = Tb.decl_buffer((n * width * oh * ow,), "float32", data=r3.data)
        cv = width // LANES
        with Tb.parallel(0, n * th * cv) as job:  # (image, tile row, 16 channels)
            img, ty, c0 = job // (th * cv), job % (th * cv) // cv, job % cv
            with Tb.serial(0, tw) as tx:
                lanes = tirx.Ramp(c0 * LANES, 1, LANES)
                vals = [m[xi, img * per_image + ty * tw + tx, lanes] for xi in range(16)]
                rows = [_at([vals[a * 4 + c] for a in range(4)]) for c in range(4)]  # A^T M, column c
                for p in range(TILE):
                    for q, value in enumerate(_at([rows[c][p] for c in range(4)])):
                        value = value + b[lanes]
                        if residual:
                            at = (img * width + c0 * LANES) * (oh * ow) + (ty * TILE + p) * ow + tx * TILE + q
                            value = value + r[tirx.Ramp(at, oh * ow, LANES)]
                        pos = (img * width + c0 * LANES) * plane + (ty * TILE + p + out.top) * out.row
                        index = tirx.Ramp(pos + out.left + tx * TILE + q, plane, LANES)
                        Tb.buffer_store(yf, tirx.max(value, zero_vec) if relu else value, [index])
            if out != OutputLayout.plain(oh, ow):  # the zero border beside these rows, above and below the image
                with Tb.serial(c0 * LANES, c0 * LANES + LANES) as oc:
                    for p in range(TILE):
                        r = (ty * TILE + p + out.top) * out.row
                        with Tb.serial(0, out.left) as col:
                            Tb.buffer_store(y, zero, [img, oc, r + col])
                        with Tb.serial(0, out.row - out.left - ow) as col:
                            Tb.buffer_store(y, zero, [img, oc, r + out.left + ow + col])
                    with Tb.If(ty == 0), Tb.Then(), Tb.serial(0, out.top * out.row) as q:
                        Tb.buffer_store(y, zero, [img, oc, q])
                    with Tb.If(ty == th - 1), Tb.Then():
                        with Tb.serial(0, (out.grid_rows - out.top - oh) * out.row) as q:
                            Tb.buffer_store(y, zero, [img, oc, (out.top + oh) * out.row + q])
    return ib.get()
