"""Trainable forms of the low-bit weight ops, each re-coded exactly by ``write_back``.

* ``shift_linear`` / ``shift_conv2d`` (DeepShift-PS, Elhoushi et al. 2021, Sec. 3.2): latent real
  exponent ``P`` and sign ``S``; forward ``W = scale * sign(round(S)) * 2^-clamp(round(P), 0, 2^b - 1)``
  with straight-through rounding; ``scale`` trainable. Activations are quantized per row to int8 as the
  kernel does (``quantize_rows_int8``), straight through. Zero weights start at the smallest level's
  exponent, so one that comes back to life starts small. Codes that use at most 7 levels (exponents
  0..6, ``passes/shift.py``'s default ``shift_levels``) keep that range, so the recovered layer still
  runs on the int8 kernel (``shift_int8.py``): the clamp is at ``max(6, largest exponent)``.
* ``bcq_linear`` (ShiftAddLLM's W = sum_i alpha_i B_i): a latent weight; its codes are re-derived in
  every forward as the nearest of the group's ``2^q`` levels ``sum_i alpha_i b_i`` (so the post-training
  codes are reproduced exactly at step 0), gradients straight through to the latent weight and exactly
  to the alphas.
* ``ternary_linear`` (BitNet b1.58): latent weight, ``T = clamp(round(W / s), -1, 1)``, trainable scale ``s``.
* ``int8_linear`` (and a ``linear`` whose weight a quantizer pass left on a per-channel grid, after a
  ``log2_quant`` / ``quantize_uniform``): latent weight on its ``+-qmax`` grid with trainable weight scales;
  the activation quantizer's scale is trainable, its zero point fixed; per-row dynamic activations stay
  dynamic. ``qmax`` is the smallest ``2^(b-1) - 1`` that holds the codes, so training keeps the bit width.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from reshift.codegen.torch.registry import NodeModule, register_torch_op
from reshift.codegen.torch.ste import pass_through, round_ste, uniform_fake_quant
from reshift.errors import CodegenError
from reshift.ir.graph import Graph, Node
from reshift.ir.ops_lowbit import (
    INT8_QMAX,
    INT32_MAX,
    bcq_weight,
    pack_signs,
    pack_trits,
    shift_accumulator_bound,
    ternary_weight,
    unpack_signs,
)

QUANTIZER_OPS = ("quantize_uniform", "log2_quant")
INT8_LEVELS = 7  # shift exponents 0..6: int8 multiples of the smallest level (shift_int8.py)


def _param(array: np.ndarray) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.from_numpy(np.array(array, dtype=np.float32, copy=True)))


def int8_rows(x2: torch.Tensor) -> torch.Tensor:
    """``quantize_rows_int8`` dequantized, straight through: ``rint(x / s) * s``, ``s = max|row| / 127``;
    rows holding NaN or +-inf give NaN."""
    amax = x2.detach().abs().amax(dim=1) if x2.shape[1] else torch.zeros(x2.shape[0])
    s = amax / INT8_QMAX
    finite = torch.isfinite(s)
    safe = torch.where(finite & (s > 0), s, torch.ones_like(s))[:, None]
    clean = torch.where(finite[:, None], x2, torch.zeros_like(x2))
    q = torch.clamp(round_ste(clean / safe), -INT8_QMAX, INT8_QMAX)
    y = q * safe
    return torch.where(finite[:, None], y, torch.full_like(y, float("nan")))


# -- shift ------------------------------------------------------------------------------------
class ShiftWeights(NodeModule):
    """DeepShift-PS state of a ``[O, K]`` shift matrix (see module docstring)."""

    owned = ("sign", "exponent", "scale")

    def __init__(self, node: Node, graph: Graph):
        super().__init__()
        sign, exponent = node.inputs[1].data, node.inputs[2].data
        self.shape = sign.shape
        self.bits = int(node.attrs["exponent_bits"])
        self.e_max = min(2**self.bits - 1, max(INT8_LEVELS - 1, int(exponent.max(initial=0))))  # the codes' range
        sign2 = sign.reshape(sign.shape[0], -1)
        latent_p = np.where(sign2 == 0, self.e_max, exponent.reshape(sign2.shape)).astype(np.float32)
        self.P = _param(latent_p)
        self.S = _param(sign2.astype(np.float32))
        self.scale = _param(node.inputs[3].data)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = torch.clamp(round_ste(self.P), 0, self.e_max)
        sign = round_ste(torch.clamp(self.S, -1.0, 1.0))
        return sign, exponent

    def weight(self) -> torch.Tensor:
        """``[O, K]`` float weight ``scale * sign * 2^-exponent``."""
        sign, exponent = self.codes()
        return self.scale[:, None] * (sign * torch.exp2(-exponent))

    def project(self) -> None:
        self.P.clamp_(-0.49, self.e_max + 0.49)
        self.S.clamp_(-1.0, 1.0)

    def write_back(self, node: Node, graph: Graph) -> None:
        sign, exponent = (t.detach().numpy() for t in self.codes())
        sign = sign.astype(np.int8)
        exponent = np.where(sign == 0, 0, exponent).astype(np.uint8)
        self._renormalize(node, sign, exponent)
        sign, exponent = (t.detach().numpy() for t in self.codes())
        sign = sign.astype(np.int8)
        exponent = np.where(sign == 0, 0, exponent).astype(np.uint8)
        self.set_input(node, graph, 1, sign.reshape(self.shape), "sign")
        self.set_input(node, graph, 2, exponent.reshape(self.shape), "exponent")
        self.set_input(node, graph, 3, self.scale.detach().numpy().astype(np.float32), "scale")

    def _renormalize(self, node: Node, sign: np.ndarray, exponent: np.ndarray) -> None:
        """Rows whose int32 accumulator could overflow: ``scale * 2^k`` and every exponent ``+ k`` (the same
        weight, exactly), in this module too; refused when the smallest level would fall off the range."""
        bound = shift_accumulator_bound(sign, exponent, self.bits)
        for row in np.nonzero(bound > INT32_MAX)[0]:
            live = sign[row] != 0
            k = int(np.ceil(np.log2(bound[row] / INT32_MAX)))
            if int(exponent[row][live].max()) + k > self.e_max:
                raise CodegenError(
                    f"node {node.name} ({node.op}): after recovery, output channel {row} can overflow the int32 "
                    f"accumulator and its exponents cannot shift by {k}; lower the learning rate or exponent_bits"
                )
            self.P[row] += k
            self.scale[row] *= 2.0**k


def _shift_linear_forward(module: ShiftWeights, x, bias):
    lead, k = x.shape[:-1], x.shape[-1]
    y = F.linear(int8_rows(x.reshape(-1, k)), module.weight(), bias)
    return y.reshape(*lead, y.shape[-1])


class ShiftLinear(ShiftWeights):
    def forward(self, x, sign, exponent, scale, bias, exponent_bits):
        return _shift_linear_forward(self, x, bias)


def conv_rows(x, kernel, stride, padding, dilation, groups) -> tuple[torch.Tensor, tuple[int, int]]:
    """``conv_patches`` in torch: ``[groups, N*OH*OW, C/groups*kh*kw]`` and ``(OH, OW)``."""
    top, left, bottom, right = padding
    xp = F.pad(x, (left, right, top, bottom)) if any(padding) else x
    n, c = x.shape[:2]
    cols = F.unfold(xp, kernel, dilation=dilation, stride=stride)  # [N, C*kh*kw, L]
    oh = (xp.shape[2] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (xp.shape[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    per = c // groups * kernel[0] * kernel[1]
    cols = cols.reshape(n, groups, per, oh * ow).permute(1, 0, 3, 2).reshape(groups, n * oh * ow, per)
    return cols, (oh, ow)


class ShiftConv2d(ShiftWeights):
    def forward(self, x, sign, exponent, scale, bias, stride, padding, dilation, groups, exponent_bits):
        rows, (oh, ow) = conv_rows(x, self.shape[2:], stride, padding, dilation, groups)
        w = self.weight()
        per = w.shape[0] // groups
        y = torch.cat([int8_rows(rows[g]) @ w[g * per : (g + 1) * per].T for g in range(groups)], dim=1)
        if bias is not None:
            y = y + bias
        return y.reshape(x.shape[0], oh, ow, -1).permute(0, 3, 1, 2).contiguous()


register_torch_op("shift_linear", module=ShiftLinear, params=("bias",))
register_torch_op("shift_conv2d", module=ShiftConv2d, params=("bias",))


# -- bcq ---------------------------------------------------------------------------------------
def _grouped(w: torch.Tensor, group_size: int, groups: int) -> torch.Tensor:
    """``[O, K]`` -> ``[O, G, group_size]`` (zero padded)."""
    pad = groups * group_size - w.shape[1]
    return F.pad(w, (0, pad)).reshape(w.shape[0], groups, group_size)


class BCQLinear(NodeModule):
    """Latent weight, nearest-level codes, trainable alphas (see module docstring)."""

    owned = ("bits", "alpha")

    def __init__(self, node: Node, graph: Graph):
        super().__init__()
        bits, alpha = node.inputs[1].data, node.inputs[2].data
        self.group_size, self.k = int(node.attrs["group_size"]), int(node.attrs["in_features"])
        self.q = bits.shape[0]
        self.W = _param(bcq_weight(bits, alpha, self.group_size, self.k))
        self.alpha = _param(alpha)
        combos = np.array(np.meshgrid(*[[-1.0, 1.0]] * self.q, indexing="ij")).reshape(self.q, -1).T
        self.register_buffer("combos", torch.from_numpy(combos.astype(np.float32)), persistent=False)  # [2^q, q]

    def _sum_planes(self, signs: torch.Tensor) -> torch.Tensor:
        """``sum_i alpha[..., i] * signs[..., i]`` in order from 0, as ``bcq_weight`` sums (bit-identical)."""
        total = torch.zeros(signs.shape[:-1])
        for i in range(self.q):
            total = total + self.alpha[:, :, None, i] * signs[..., i]
        return total

    def codes(self) -> torch.Tensor:
        """``[O, G, group_size, q]`` signs of the nearest level to the latent weight."""
        groups = self.alpha.shape[1]
        levels = torch.zeros(self.alpha.shape[:2] + (len(self.combos),))
        for i in range(self.q):
            levels = levels + self.alpha.detach()[:, :, i, None] * self.combos[:, i]
        w = _grouped(self.W.detach(), self.group_size, groups)
        nearest = torch.argmin((w[..., None] - levels[:, :, None, :]).abs(), dim=-1)  # [O, G, gs]
        return self.combos[nearest]

    def weight(self) -> torch.Tensor:
        w = self._sum_planes(self.codes()).reshape(self.alpha.shape[0], -1)[:, : self.k]
        return pass_through(w, self.W)

    def forward(self, x, bits, alpha, bias, group_size, in_features, lut_dtype="float32"):
        return F.linear(x, self.weight(), bias)

    def write_back(self, node: Node, graph: Graph) -> None:
        signs = self.codes().reshape(self.alpha.shape[0], -1, self.q)[:, : self.k]  # [O, K, q]
        planes = np.ascontiguousarray(signs.permute(2, 0, 1).numpy())
        self.set_input(node, graph, 1, pack_signs(planes), "bits")
        self.set_input(node, graph, 2, self.alpha.detach().numpy().astype(np.float32), "alpha")
        assert np.array_equal(unpack_signs(node.inputs[1].data, self.k), planes.astype(np.int8))


register_torch_op("bcq_linear", module=BCQLinear, params=("bias",))


# -- ternary -----------------------------------------------------------------------------------
class TernaryLinear(NodeModule):
    owned = ("trits", "scale")

    def __init__(self, node: Node, graph: Graph):
        super().__init__()
        trits, scale = node.inputs[1].data, node.inputs[2].data
        self.group_size, self.k = int(node.attrs["group_size"]), int(node.attrs["in_features"])
        self.W = _param(ternary_weight(trits, scale, self.group_size, self.k))
        self.scale = _param(scale)

    def _scale_per_weight(self) -> torch.Tensor:
        return torch.repeat_interleave(self.scale, self.group_size, dim=1)[:, : self.k]

    def weight(self) -> torch.Tensor:
        s = self._scale_per_weight()
        safe = torch.where(s != 0, s, torch.ones_like(s))
        return torch.where(s != 0, uniform_fake_quant(self.W, safe, torch.zeros(()), -1, 1), torch.zeros_like(s))

    def trits(self) -> np.ndarray:
        s = self._scale_per_weight().detach()
        safe = torch.where(s != 0, s, torch.ones_like(s))
        return torch.clamp(torch.round(self.W.detach() / safe), -1, 1).numpy().astype(np.int8)

    def forward(self, x, trits, scale, bias, group_size, in_features, lut_dtype="float32"):
        return F.linear(x, self.weight(), bias)

    def write_back(self, node: Node, graph: Graph) -> None:
        self.set_input(node, graph, 1, pack_trits(self.trits()), "trits")
        self.set_input(node, graph, 2, self.scale.detach().numpy().astype(np.float32), "scale")


register_torch_op("ternary_linear", module=TernaryLinear, params=("bias",))


# -- int8_linear and grid weights ----------------------------------------------------------------
def code_qmax(codes: np.ndarray) -> int:
    """The smallest ``2^(b-1) - 1`` (b in 2..8) that holds every ``|code|``."""
    largest = int(np.abs(codes.astype(np.int64)).max()) if codes.size else 1
    return next(2 ** (b - 1) - 1 for b in range(2, 9) if 2 ** (b - 1) - 1 >= largest)


class GridWeight(torch.nn.Module):
    """A latent ``[O, K]`` weight on the per-channel grid ``codes * scale[o]``, ``|codes| <= qmax``."""

    def __init__(self, codes: np.ndarray, scale: np.ndarray, qmax: int):
        super().__init__()
        self.qmax = qmax
        self.W = _param(codes.astype(np.float32) * scale.astype(np.float32)[:, None])
        self.scale = _param(scale)

    def weight(self) -> torch.Tensor:
        return uniform_fake_quant(self.W, self.scale[:, None], torch.zeros(()), -self.qmax, self.qmax)

    def codes(self) -> np.ndarray:
        q = torch.clamp(torch.round(self.W.detach() / self.scale.detach()[:, None]), -self.qmax, self.qmax)
        return q.numpy().astype(np.int8)

    def project(self) -> None:
        self.scale.clamp_(min=1e-12)


class ActivationScale(torch.nn.Module):
    """A per-tensor static activation quantizer (trainable scale, fixed zero point) or per-row dynamic."""

    def __init__(self, scale: float, zero_point: int, bits: int, granularity: str):
        super().__init__()
        self.bits, self.granularity, self.zero_point = bits, granularity, int(zero_point)
        self.scale = torch.nn.Parameter(torch.tensor(np.float32(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qmax = 2**self.bits - 1
        if self.granularity == "row":
            x2 = x.reshape(-1, x.shape[-1])
            clean = torch.where(torch.isnan(x2), torch.zeros_like(x2), x2).detach()
            lo = torch.clamp(clean.amin(dim=1, keepdim=True), max=0.0)
            hi = torch.clamp(clean.amax(dim=1, keepdim=True), min=0.0)
            s = (hi - lo) / qmax
            s = torch.where((s > 0) & torch.isfinite(s), s, torch.ones_like(s))
            z = torch.clamp(torch.round(-lo / s), 0, qmax)
            return uniform_fake_quant(x2, s, z, 0, qmax).reshape(x.shape)
        return uniform_fake_quant(x, self.scale, torch.tensor(float(self.zero_point)), 0, qmax)

    def project(self) -> None:
        self.scale.clamp_(min=1e-12)


class Int8Linear(NodeModule):
    owned = ("wq", "w_scale")

    def __init__(self, node: Node, graph: Graph):
        super().__init__()
        wq, w_scale = node.inputs[1].data, node.inputs[2].data
        self.grid = GridWeight(wq, w_scale, code_qmax(wq))
        a = node.attrs
        self.act = ActivationScale(a["x_scale"], a["x_zero_point"], a["x_bits"], a["x_granularity"])

    def forward(self, x, wq, w_scale, bias, x_scale, x_zero_point, x_bits, x_granularity):
        return F.linear(self.act(x), self.grid.weight(), bias)

    def project(self) -> None:
        self.grid.project()
        self.act.project()

    def write_back(self, node: Node, graph: Graph) -> None:
        self.set_input(node, graph, 1, self.grid.codes(), "wq")
        self.set_input(node, graph, 2, self.grid.scale.detach().numpy().astype(np.float32), "w_scale")
        if self.act.granularity == "tensor":
            node.attrs["x_scale"] = float(self.act.scale.detach())


register_torch_op("int8_linear", module=Int8Linear, params=("bias",))


def weight_grid(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
    """``(codes, scales, qmax)`` when every row of ``w`` lies on its own ``b``-bit grid (b <= 8), else None."""
    if w.ndim != 2 or w.dtype != np.float32 or not w.size:
        return None
    amax = np.abs(w).max(axis=1)
    for bits in range(2, 9):
        qmax = 2 ** (bits - 1) - 1
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        codes = w / scale[:, None]
        if np.all(np.abs(codes - np.rint(codes)) < 1e-3):
            return np.rint(codes).astype(np.int8), scale, qmax
    return None


class GridLinear(NodeModule):
    """A float ``linear`` whose weight a quantizer pass fake-quantized (its input is already quantized)."""

    owned = ("weight",)

    def __init__(self, node: Node, codes: np.ndarray, scale: np.ndarray, qmax: int):
        super().__init__()
        self.grid = GridWeight(codes, scale, qmax)

    def forward(self, x, weight, bias):
        return F.linear(x, self.grid.weight(), bias)

    def project(self) -> None:
        self.grid.project()

    def write_back(self, node: Node, graph: Graph) -> None:
        self.set_input(node, graph, 1, self.grid.weight().detach().numpy().astype(np.float32), "wq")


def _linear_module(node: Node, graph: Graph) -> GridLinear | None:
    x, weight = node.inputs[0], node.inputs[1]
    producer = graph.producers().get(x)
    if weight is None or not weight.is_constant or producer is None or producer.op not in QUANTIZER_OPS:
        return None
    grid = weight_grid(weight.data)
    return GridLinear(node, *grid) if grid is not None else None


register_torch_op(
    "linear", fn=lambda x, weight, bias: F.linear(x, weight, bias), module=_linear_module, params=("weight", "bias")
)


__all__ = [
    "BCQLinear",
    "GridLinear",
    "Int8Linear",
    "ShiftConv2d",
    "ShiftLinear",
    "TernaryLinear",
    "code_qmax",
    "conv_rows",
    "int8_rows",
    "weight_grid",
]
