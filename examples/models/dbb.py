"""Diverse Branch Block (Ding et al., "Diverse Branch Block: Building a Convolution as an
Inception-like Unit", CVPR 2021), after DingXiaoH/DiverseBranchBlock: KxK+BN, 1x1+BN,
1x1 -> BNAndPad -> KxK -> BN, and 1x1 -> BNAndPad -> avg pool -> BN (plain avg pool -> BN for a
depthwise block). BNAndPad pads the BN output with the BN's own bias, so the padded border equals
the 1x1 branch applied to a zero-padded input; it is written as ``pad(y - b) + b``. Input
``[B, 8, 16, 16]``; ``dbb_net(deploy=True)`` merges every block into one KxK conv by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import conv_bn, finalize, fuse_bn, randomize_batchnorm


class BNAndPad(nn.Module):
    """BatchNorm, then pad by ``pad`` with the BN's per-channel bias (its output for a zero input)."""

    def __init__(self, channels: int, pad: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def pad_values(self) -> torch.Tensor:
        bn = self.bn
        return bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if self.pad == 0:
            return y
        values = self.pad_values().view(1, -1, 1, 1)
        return F.pad(y - values, [self.pad] * 4) + values


class DBBBlock(nn.Module):
    """The sum of DBB's four branches followed by ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        pad = kernel // 2
        self.in_ch, self.out_ch, self.kernel, self.stride, self.groups = in_ch, out_ch, kernel, stride, groups
        self.origin = conv_bn(in_ch, out_ch, kernel, stride, pad, groups)
        self.depthwise = groups == out_ch
        if not self.depthwise:
            self.avg_conv = nn.Conv2d(in_ch, out_ch, 1, 1, 0, groups=groups, bias=False)
            self.avg_pad = BNAndPad(out_ch, pad)
            self.avg = nn.AvgPool2d(kernel, stride, 0)
            self.branch_1x1 = conv_bn(in_ch, out_ch, 1, stride, 0, groups)
        else:
            self.avg = nn.AvgPool2d(kernel, stride, pad)
        self.avg_bn = nn.BatchNorm2d(out_ch)
        internal = in_ch if not self.depthwise else 2 * in_ch
        self.kxk_1x1 = nn.Conv2d(in_ch, internal, 1, 1, 0, groups=groups, bias=False)
        self.kxk_pad = BNAndPad(internal, pad)
        self.kxk = conv_bn(internal, out_ch, kernel, stride, 0, groups)
        self.fused: nn.Conv2d | None = None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.act(self.fused(x))
        out = self.origin(x)
        if not self.depthwise:
            out = out + self.branch_1x1(x)
            out = out + self.avg_bn(self.avg(self.avg_pad(self.avg_conv(x))))
        else:
            out = out + self.avg_bn(self.avg(x))
        out = out + self.kxk(self.kxk_pad(self.kxk_1x1(x)))
        return self.act(out)

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """One KxK conv: each branch's equivalent kernel and bias, found by probing its linear map."""
        k, pad = self.kernel, self.kernel // 2
        fused = nn.Conv2d(self.in_ch, self.out_ch, k, self.stride, pad, groups=self.groups, bias=True)
        # the block before ReLU is affine in x: recover bias and kernel from impulse responses
        act, self.act = self.act, nn.Identity()
        size = 2 * k + 1
        zero = torch.zeros(1, self.in_ch, size, size)
        centre = size // 2
        bias = self.forward(zero)[0, :, centre // self.stride, centre // self.stride]
        weight = torch.zeros(self.out_ch, self.in_ch // self.groups, k, k)
        per_group_in, per_group_out = self.in_ch // self.groups, self.out_ch // self.groups
        for i in range(self.in_ch):
            g = i // per_group_in
            for dy in range(k):
                for dx in range(k):
                    probe = zero.clone()
                    probe[0, i, centre - pad + dy, centre - pad + dx] = 1.0
                    # output at the centre (stride 1) reads the input window starting at centre - pad
                    response = self.forward(probe)[0, :, centre, centre] - bias
                    rows = slice(g * per_group_out, (g + 1) * per_group_out)
                    weight[rows, i % per_group_in, dy, dx] = response[rows]
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        self.fused = fused.requires_grad_(False)
        self.act = act


class DBBNet(nn.Module):
    """Three DBB blocks: dense, grouped and depthwise 3x3."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(DBBBlock(8, 16), DBBBlock(16, 16, groups=2), DBBBlock(16, 16, groups=16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def dbb_net(seed: int = 0, deploy: bool = False) -> nn.Module:
    """Three stride-1 DBB blocks on ``[B, 8, 16, 16]``; ``deploy`` replaces each by one 3x3 conv."""
    torch.manual_seed(seed)
    model = finalize(randomize_batchnorm(DBBNet(), seed))
    if deploy:
        for block in model.blocks:
            block.switch_to_deploy()
    return model


def dbb_example_inputs(batch: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 8, 16, 16, generator=gen),)


__all__ = ["BNAndPad", "DBBBlock", "dbb_example_inputs", "dbb_net", "fuse_bn"]
