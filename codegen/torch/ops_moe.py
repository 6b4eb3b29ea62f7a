"""Trainable ``moe_linear`` (ShiftAddViT, You et al., NeurIPS 2023, Sec. 4.3): router, multiplication
expert and shift expert, with the latency-aware load-balancing loss.

Forward (training and eval alike, the value the kernel computes): each row is quantized to int8 as the
kernel does (straight through), the router score ``d = x_q . r_q + b`` uses the int8-coded router
``r_q = round(r / s_r) * s_r`` (``s_r = max|r| / 127``, straight through), the row takes the shift
expert iff ``d > 0`` (hard top-1, ties to the multiplication expert), and both experts' outputs are
mixed by that hard gate. The router learns through a straight-through gate ``g = hard + p - p.detach()``
with ``p = sigmoid(d)`` (the two-way softmax of ShiftAddViT's router), so ``dL/dp = <dL/dy, y_shift -
y_mult>``: a row drifts to the expert that lowers the loss. The multiplication expert is a float
weight; the shift expert is DeepShift-PS's latent sign and exponent (``ops_lowbit.ShiftWeights``).

:meth:`MoELinear.extra_loss` is the latency-aware load-balancing loss (Sec. 4.3, Eq. 7): the squared
coefficient of variation of the experts' latency-weighted importances ``alpha_e * I_e`` (``I_e``: the
sum of the gate probabilities of expert ``e`` over the batch's rows, ``alpha_e``: its measured seconds
per token), minimal when ``alpha_m I_m = alpha_s I_s``; for two experts ``CV^2 = ((a - b) / (a + b))^2``.
The latencies are reshift's own compiled kernels timed on this host for the layer's shape
(:func:`reshift.codegen.tvm.kernels.moe_dispatch.expert_latencies`, cached per shape); the weight is
:data:`BALANCE_WEIGHT`.

``write_back`` re-codes router (int8 codes, scale, bias), the float weight and the shift codes (with the
same int32-overflow renormalisation as ``shift_linear``) into the node.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from reshift.codegen.torch.ops_lowbit import ShiftWeights, _param, int8_rows
from reshift.codegen.torch.registry import NodeModule, register_torch_op
from reshift.codegen.torch.ste import round_ste
from reshift.ir.graph import Graph, Node

BALANCE_WEIGHT = 0.01  # Switch Transformer's and ShiftAddViT's auxiliary-loss coefficient
SIGN, EXPONENT, SCALE = 5, 6, 7  # moe_linear's shift-expert input slots
_LATENCY_CACHE: dict[tuple[int, ...], dict[str, float]] = {}


def layer_latency(out_features: int, in_features: int, rows: int, bits: int, levels: int):
    """Seconds per token of each expert's compiled kernel on this host (measured once per shape and code
    range: ``bits`` / ``levels`` as :func:`expert_latencies`)."""
    key = (out_features, in_features, rows, bits, levels)
    if key not in _LATENCY_CACHE:
        from reshift.codegen.tvm.kernels.moe_dispatch import expert_latencies

        _LATENCY_CACHE[key] = expert_latencies(
            out_features, in_features, rows=rows, repeat=10, exponent_bits=bits, levels=levels
        )
    return _LATENCY_CACHE[key]


def _tokens(node: Node) -> int:
    """Rows of one sample: the product of the input's static leading dims past the batch (at least 1)."""
    dims = [d for d in node.inputs[0].shape[:-1] if isinstance(d, int)]
    return max(1, int(np.prod(dims[1:] if len(dims) == len(node.inputs[0].shape) - 1 else dims)))


def _shift_view(node: Node) -> SimpleNamespace:
    """A ``shift_linear``-shaped view of the node's shift expert (``ShiftWeights`` reads slots 1..3)."""
    inputs = [node.inputs[0], node.inputs[SIGN], node.inputs[EXPONENT], node.inputs[SCALE]]
    return SimpleNamespace(name=node.name, op=node.op, inputs=inputs, attrs=node.attrs)


class MoELinear(NodeModule):
    owned = ("router", "router_scale", "router_bias", "weight", "sign", "exponent", "scale")

    def __init__(self, node: Node, graph: Graph):
        super().__init__()
        router, router_scale, router_bias = (node.inputs[i].data for i in (1, 2, 3))
        self.r = _param(router.astype(np.float32) * router_scale[0])
        self.b = _param(router_bias.astype(np.float32))
        self.weight = _param(node.inputs[4].data)
        self.shift = ShiftWeights(_shift_view(node), graph)
        out_features, in_features = node.inputs[4].shape
        bits, top = int(node.attrs["exponent_bits"]), int(node.inputs[EXPONENT].data.max(initial=0)) + 1
        self.latency = layer_latency(out_features, in_features, _tokens(node), bits, top)
        self._p: torch.Tensor | None = None

    def router_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r_q, s_r)``: the int8-coded router (straight through) and its scale."""
        s_r = (self.r.detach().abs().max() / 127.0).clamp_min(1e-30)
        return torch.clamp(round_ste(self.r / s_r), -127, 127) * s_r, s_r

    def forward(self, x, router, router_scale, router_bias, weight, sign, exponent, scale, bias, exponent_bits):
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        xq = int8_rows(x2)
        r_q, _ = self.router_codes()
        d = torch.nan_to_num(xq, nan=0.0) @ r_q + self.b
        d = torch.where(torch.isfinite(xq).all(dim=1), d, torch.full_like(d, -1.0))  # NaN rows: multiplication
        p = torch.sigmoid(d)
        hard = (d > 0).to(x.dtype)
        gate = (hard + p - p.detach())[:, None]
        self._p = p
        y_mult = x2 @ self.weight.T
        y_shift = xq @ self.shift.weight().T
        y = y_mult + gate * (y_shift - y_mult)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, y.shape[-1])

    def extra_loss(self) -> torch.Tensor | None:
        """ShiftAddViT's latency-aware load-balancing loss on the last forward's gate probabilities."""
        if self._p is None:
            return None
        importance_shift = self._p.sum() * self.latency["shift"]
        importance_mult = (1.0 - self._p).sum() * self.latency["mult"]
        cv2 = ((importance_mult - importance_shift) / (importance_mult + importance_shift).clamp_min(1e-30)) ** 2
        return BALANCE_WEIGHT * cv2

    def project(self) -> None:
        self.shift.project()

    def write_back(self, node: Node, graph: Graph) -> None:
        r_q, s_r = self.router_codes()
        codes = torch.round(r_q.detach() / s_r).numpy().astype(np.int8)
        self.set_input(node, graph, 1, codes, "router")
        self.set_input(node, graph, 2, np.array([s_r.item()], np.float32), "router_scale")
        self.set_input(node, graph, 3, self.b.detach().numpy().astype(np.float32), "router_bias")
        self.set_input(node, graph, 4, self.weight.detach().numpy().astype(np.float32), "weight")
        view = _shift_view(node)
        self.shift.write_back(view, graph)
        for slot, index in ((1, SIGN), (2, EXPONENT), (3, SCALE)):
            node.inputs[index] = view.inputs[slot]


def shift_share(module: MoELinear) -> float | None:
    """The share of the last forward's rows the router sent to the shift expert."""
    return None if module._p is None else float((module._p > 0.5).float().mean())


register_torch_op("moe_linear", module=MoELinear, params=("bias",))

__all__ = ["BALANCE_WEIGHT", "MoELinear", "layer_latency", "shift_share"]
