"""Shared helpers for the reference models: seeded BatchNorm statistics and image inputs.

Freshly constructed BatchNorm layers hold mean 0, var 1, weight 1, bias 0, which makes BN folding
and branch merging look correct even when they are not; every factory with BN randomizes them.
"""

from __future__ import annotations

import torch
from torch import nn


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm in ``module`` non-trivial running stats and affine parameters.

    Values are drawn from a private generator seeded with ``seed`` so the result does not depend
    on (or disturb) the global RNG: mean ~ N(0, 0.1), var ~ U(0.5, 1.5), weight ~ U(0.5, 1.5),
    bias ~ N(0, 0.1).
    """
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                    m.bias.copy_(0.1 * torch.randn(n, generator=gen))
    return module


def image_inputs(batch: int, size: int = 224, seed: int = 0) -> tuple[torch.Tensor]:
    """A deterministic float32 image batch ``[batch, 3, size, size]`` drawn from N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=gen),)


def finalize(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode, float32, with gradients off (the reference-model contract)."""
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def conv_bn(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
) -> nn.Sequential:
    """A bias-free conv followed by BatchNorm, the branch unit of RepVGG and MobileOne."""
    seq = nn.Sequential()
    seq.add_module(
        "conv",
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
    )
    seq.add_module("bn", nn.BatchNorm2d(out_ch))
    return seq


def fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold inference-mode BN into a bias-free conv kernel: W' = W * g/s, b' = beta - mu * g/s.

    ``s = sqrt(running_var + eps)``; this is equation (3) of the RepVGG paper.
    """
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    return kernel * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


def identity_kernel(channels: int, groups: int, kernel: int) -> torch.Tensor:
    """The ``kernel x kernel`` conv weight (``groups`` groups) that computes the identity map."""
    in_per_group = channels // groups
    w = torch.zeros(channels, in_per_group, kernel, kernel)
    c = kernel // 2
    for i in range(channels):
        w[i, i % in_per_group, c, c] = 1.0
    return w
