"""Trainable form of ``binary_attention`` (ShiftAddViT binary-code attention) for recovery fine-tuning.

Forward: the op's value (``ir/ops_attention.py``): codes ``c = +1 where h >= 0 else -1``, weights
``w_ij = 1 + (b + c_qi . c_kj) / 2``, ``out = sum_j w_ij v_j / sum_j w_ij``; non-causal as the
linear form ``((1 + b/2) S_v + c_q (c_k^T V) / 2) / ((1 + b/2) S + c_q (c_k^T 1) / 2)`` (no T x S
matrix), causal with the weight matrix and its triangle. Backward: the codes pass the gradient to
the hash projections ``qh``, ``kh`` through the clipped straight-through estimator of BinaryNet
(Courbariaux et al. 2016, Sec. 1.3: the gradient of ``htanh``, cancelled where ``|h|`` is large), as
ShiftAddViT's binary attention clamps its inputs: ``d c / d h = 1 / s`` where ``|h| < s``, else 0,
with ``s = STE_CLIP * mean |h|`` per code bit over the batch. Measured on the cluttered-digits ViT
(``benchmarks/shiftadd_vit_ablation.py``, 2000 recovery steps): the plain identity estimator reached
71.00% top-1 at lr 3e-4 and diverged at 1e-3 (23.94%); the clipped one with ``STE_CLIP = 2`` 79.44%
and 81.72%, with ``STE_CLIP = 1`` 82.61% at lr 1e-3 (fp32 84.11%). So the q / k linears feeding
the codes learn codes that reproduce the teacher's attention. The pass's hash matrices themselves are
``matmul`` constants, frozen buffers in the generated module (``matmul`` has no trainable slots); the
q and k projections in front of them train (``train="all"``).
"""

from __future__ import annotations

import torch

from reshift.codegen.torch.registry import register_torch_op
from reshift.codegen.torch.ste import pass_through

STE_CLIP = 1.0  # the estimator's window, in units of mean |h| per bit (2.0: 81.72%, 1.0: 82.61%)


def binary_codes_ste(h: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``h >= 0`` (NaN: -1) forward; backward ``1 / s`` inside ``|h| < s``, 0 outside and at
    a NaN (``s = STE_CLIP * mean |h|`` per bit, see module docstring)."""
    codes = torch.where(h.detach() >= 0, torch.ones_like(h), -torch.ones_like(h))
    clean = torch.nan_to_num(h, nan=0.0)
    axes = tuple(range(h.dim() - 1))
    window = (STE_CLIP * clean.detach().abs().mean(dim=axes, keepdim=True)).clamp_min(1e-12)
    return pass_through(codes, torch.clamp(clean / window, -1.0, 1.0))


def binary_attention_torch(qh: torch.Tensor, kh: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    bits = qh.shape[-1]
    cq, ck = binary_codes_ste(qh), binary_codes_ste(kh)
    base = 1.0 + bits / 2
    if causal:
        w = base + 0.5 * (cq @ ck.transpose(-1, -2))
        w = w * torch.tril(torch.ones(w.shape[-2:], dtype=w.dtype, device=w.device))
        return (w @ v) / w.sum(-1, keepdim=True)
    kv = ck.transpose(-1, -2) @ v  # [..., b, Dv]
    num = base * v.sum(-2, keepdim=True) + 0.5 * (cq @ kv)
    den = base * v.shape[-2] + 0.5 * (cq @ ck.sum(-2).unsqueeze(-1))
    return num / den


register_torch_op("binary_attention", fn=binary_attention_torch)

__all__ = ["STE_CLIP", "binary_attention_torch", "binary_codes_ste"]
