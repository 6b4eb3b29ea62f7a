"""ACNet (Ding et al., "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via Asymmetric
Convolution Blocks", ICCV 2019): each 3x3 conv+BN gets parallel 1x3 and 3x1 conv+BN branches that
add onto the kernel's skeleton. A small net of such blocks (a grouped one included) at input
``[B, 3, 32, 32]``; ``deploy=True`` builds the merged form (one 3x3 conv with bias per block).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import conv_bn, finalize, fuse_bn, randomize_batchnorm


class ACBlock(nn.Module):
    """ReLU(BN(3x3 conv) + BN(1x3 conv) + BN(3x1 conv)); the asymmetric ones padded to line up."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.square = conv_bn(in_ch, out_ch, 3, stride, 1, groups)
        self.hor = conv_bn(in_ch, out_ch, 1, stride, 0, groups)
        self.ver = conv_bn(in_ch, out_ch, 1, stride, 0, groups)
        self.hor.conv = nn.Conv2d(in_ch, out_ch, (1, 3), stride, (0, 1), groups=groups, bias=False)
        self.ver.conv = nn.Conv2d(in_ch, out_ch, (3, 1), stride, (1, 0), groups=groups, bias=False)
        self.fused: nn.Conv2d | None = None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.act(self.fused(x))
        return self.act(self.square(x) + self.hor(x) + self.ver(x))

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        k, b = fuse_bn(self.square.conv.weight, self.square.bn)
        kh, bh = fuse_bn(self.hor.conv.weight, self.hor.bn)
        kv, bv = fuse_bn(self.ver.conv.weight, self.ver.bn)
        k = k.clone()
        k[:, :, 1:2, :] += kh
        k[:, :, :, 1:2] += kv
        conv = self.square.conv
        self.fused = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, groups=conv.groups, bias=True)
        self.fused.weight.copy_(k)
        self.fused.bias.copy_(b + bh + bv)
        del self.square, self.hor, self.ver


class ACNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ACBlock(3, 16, 2), ACBlock(16, 16), ACBlock(16, 32, 2, groups=2), ACBlock(32, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def acnet_small(seed: int = 0, deploy: bool = False) -> nn.Module:
    """Four ACNet blocks (one grouped, two strided): ``[B, 3, 32, 32]`` -> ``[B, 32, 8, 8]``."""
    torch.manual_seed(seed)
    model = finalize(randomize_batchnorm(ACNet(), seed))
    if deploy:
        for block in model.blocks:
            block.switch_to_deploy()
    return model
