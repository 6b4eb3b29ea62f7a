"""Trainable forms of the activation quantizers: scales trainable (:mod:`.ste`), bits and zero points fixed.

* ``quantize_uniform``: per-tensor or per-channel scales trainable, zero points fixed integers.
* ``log2_quant``: the log-domain quantizer's ``scale`` trainable (base and bits fixed), see :mod:`.ste`.
* ``log2_matmul``: its ``p`` log2 quantizer and its per-tensor ``v`` quantizer, both scales trainable;
  the product runs as a float matmul of the two dequantized operands, which equals the integer
  shift-add kernel up to float32 summation order.
"""

from __future__ import annotations

import numpy as np
import torch

from reshift.codegen.torch.registry import NodeModule, register_torch_op
from reshift.codegen.torch.ste import log2_fake_quant, uniform_fake_quant
from reshift.ir.graph import Graph, Node
from reshift.ir.ops_quant import last_kept_code, uniform_range

MIN_SCALE = 1e-12


def _scalar(value: float) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(np.float32(value)))


class QuantizeUniform(NodeModule):
    def __init__(self, node: Node, graph: Graph):
        super().__init__()
        a = node.attrs
        self.scale = torch.nn.Parameter(torch.tensor(np.array(a["scale"], np.float32)))
        self.register_buffer("zero_point", torch.tensor(np.array(a["zero_point"], np.float32)), persistent=False)

    def _per_axis(self, values: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
        if values.numel() == 1:
            return values.reshape(())
        shape = [1] * x.dim()
        shape[axis] = values.numel()
        return values.reshape(shape)

    def forward(self, x, scale, zero_point, bits, axis, signed):
        axis = axis % x.dim() if x.dim() else 0
        lo, hi = uniform_range(bits, signed)
        return uniform_fake_quant(
            x, self._per_axis(self.scale, x, axis), self._per_axis(self.zero_point, x, axis), lo, hi
        )

    def project(self) -> None:
        self.scale.clamp_(min=MIN_SCALE)

    def write_back(self, node: Node, graph: Graph) -> None:
        node.attrs["scale"] = tuple(float(s) for s in self.scale.detach().numpy())


class Log2Quant(NodeModule):
    def __init__(self, node: Node, graph: Graph):
        super().__init__()
        self.scale = _scalar(node.attrs["scale"])

    def forward(self, x, bits, base_kind, base, scale, table_size):
        return log2_fake_quant(x, self.scale, bits, base_kind, base, table_size)

    def project(self) -> None:
        self.scale.clamp_(min=MIN_SCALE)

    def write_back(self, node: Node, graph: Graph) -> None:
        node.attrs["scale"] = float(self.scale.detach())


class Log2Matmul(NodeModule):
    def __init__(self, node: Node, graph: Graph):
        super().__init__()
        self.scale = _scalar(node.attrs["scale"])
        self.v_scale = _scalar(node.attrs["v_scale"])

    def forward(
        self, p, v, bits, base_kind, scale, v_scale, v_zero_point, v_bits, v_signed, base, table_size, floor_exponent=-1
    ):
        lo, hi = uniform_range(v_bits, v_signed)
        last = last_kept_code(bits, base_kind, base, table_size, floor_exponent)
        pq = log2_fake_quant(p, self.scale, bits, base_kind, base, table_size, last)
        vq = uniform_fake_quant(v, self.v_scale, torch.tensor(float(v_zero_point)), lo, hi)
        return torch.matmul(pq, vq)

    def project(self) -> None:
        self.scale.clamp_(min=MIN_SCALE)
        self.v_scale.clamp_(min=MIN_SCALE)

    def write_back(self, node: Node, graph: Graph) -> None:
        node.attrs["scale"] = float(self.scale.detach())
        node.attrs["v_scale"] = float(self.v_scale.detach())


register_torch_op("quantize_uniform", module=QuantizeUniform)
register_torch_op("log2_quant", module=Log2Quant)
register_torch_op("log2_matmul", module=Log2Matmul)

__all__ = ["Log2Matmul", "Log2Quant", "QuantizeUniform"]
