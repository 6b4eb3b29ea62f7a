"""MobileOne-S0 (Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023).

Each stage unit is a depthwise 3x3 MobileOne block (k over-parameterized 3x3 conv+BN branches, a
1x1 conv+BN scale branch and an identity BN branch when shapes allow) followed by a pointwise 1x1
MobileOne block (k 1x1 conv+BN branches and an identity BN branch), ReLU after each sum. Layout and
naming follow apple/ml-mobileone: S0 has depths [2, 8, 10, 1], width multipliers (0.75, 1, 1, 2)
and k = 4 branches. This is the full S0 at input ``[B, 3, 224, 224]``; ``mobileone_to_deploy``
merges the branches by hand, as ``reparameterize()`` does in the reference code.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .common import conv_bn, finalize, fuse_bn, identity_kernel, randomize_batchnorm


class MobileOneBlock(nn.Module):
    """ReLU(sum of k conv+BN branches + optional 1x1 scale branch + optional identity BN)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        num_branches: int = 4,
    ) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.kernel = in_ch, out_ch, kernel
        self.stride, self.groups = stride, groups
        self.activation = nn.ReLU()
        self.reparam_conv: nn.Conv2d | None = None
        pad = kernel // 2
        has_skip = in_ch == out_ch and stride == 1
        self.rbr_skip = nn.BatchNorm2d(in_ch) if has_skip else None
        self.rbr_conv = nn.ModuleList(conv_bn(in_ch, out_ch, kernel, stride, pad, groups) for _ in range(num_branches))
        self.rbr_scale = conv_bn(in_ch, out_ch, 1, stride, 0, groups) if kernel > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.activation(self.reparam_conv(x))
        out = self.rbr_conv[0](x)
        for branch in self.rbr_conv[1:]:
            out = out + branch(x)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        if self.rbr_skip is not None:
            out = out + self.rbr_skip(x)
        return self.activation(out)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every branch into one ``kernel x kernel`` conv with bias, in place."""
        if self.reparam_conv is not None:
            return
        kernel, bias = 0, 0
        for branch in self.rbr_conv:
            k, b = fuse_bn(branch.conv.weight, branch.bn)
            kernel, bias = kernel + k, bias + b
        if self.rbr_scale is not None:
            k, b = fuse_bn(self.rbr_scale.conv.weight, self.rbr_scale.bn)
            p = self.kernel // 2
            kernel, bias = kernel + F.pad(k, [p, p, p, p]), bias + b
        if self.rbr_skip is not None:
            k, b = fuse_bn(identity_kernel(self.in_ch, self.groups, self.kernel), self.rbr_skip)
            kernel, bias = kernel + k, bias + b
        conv = nn.Conv2d(
            self.in_ch,
            self.out_ch,
            self.kernel,
            self.stride,
            self.kernel // 2,
            groups=self.groups,
            bias=True,
        )
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        self.reparam_conv = conv
        del self.rbr_conv, self.rbr_scale, self.rbr_skip
        self.rbr_conv, self.rbr_scale, self.rbr_skip = nn.ModuleList(), None, None


class MobileOne(nn.Module):
    """MobileOne backbone: stem block, four stages of (depthwise, pointwise) pairs, GAP, linear."""

    def __init__(
        self,
        num_blocks: tuple[int, ...] = (2, 8, 10, 1),
        width_multipliers: tuple[float, ...] = (0.75, 1.0, 1.0, 2.0),
        num_classes: int = 1000,
        num_branches: int = 4,
    ) -> None:
        super().__init__()
        self.num_branches = num_branches
        self.in_planes = min(64, int(64 * width_multipliers[0]))
        self.stage0 = MobileOneBlock(3, self.in_planes, 3, stride=2, num_branches=num_branches)
        widths = [int(w * m) for w, m in zip((64, 128, 256, 512), width_multipliers, strict=True)]
        self.stage1 = self._make_stage(widths[0], num_blocks[0])
        self.stage2 = self._make_stage(widths[1], num_blocks[1])
        self.stage3 = self._make_stage(widths[2], num_blocks[2])
        self.stage4 = self._make_stage(widths[3], num_blocks[3])
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)

    def _make_stage(self, planes: int, num_blocks: int) -> nn.Sequential:
        blocks = []
        k = self.num_branches
        for stride in [2] + [1] * (num_blocks - 1):
            c = self.in_planes
            blocks.append(MobileOneBlock(c, c, 3, stride, groups=c, num_branches=k))
            blocks.append(MobileOneBlock(c, planes, 1, 1, groups=1, num_branches=k))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stage0(x)))))
        return self.linear(torch.flatten(self.gap(x), 1))


def mobileone_to_deploy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`MobileOneBlock` reparameterized by hand."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, MobileOneBlock):
            m.reparameterize()
    return finalize(model)


def mobileone_s0(num_classes: int = 1000, seed: int = 0, num_branches: int = 4) -> nn.Module:
    """Seeded training-form MobileOne-S0 (k = ``num_branches``) with randomized BatchNorm."""
    torch.manual_seed(seed)
    model = MobileOne(num_classes=num_classes, num_branches=num_branches)
    randomize_batchnorm(model, seed)
    _balance_branches(model)
    return finalize(model)


@torch.no_grad()
def _balance_branches(model: nn.Module) -> None:
    """Scale each block's BN weights by 1/sqrt(n) and biases by 1/n, n = its branch count.

    With random weights and made-up BN statistics the sum of k + 2 branches grows activations by
    orders of magnitude over 43 blocks; this keeps outputs O(1) without making BN trivial.
    """
    for m in model.modules():
        if isinstance(m, MobileOneBlock) and m.reparam_conv is None:
            bns = [b.bn for b in m.rbr_conv]
            bns += [m.rbr_scale.bn] if m.rbr_scale is not None else []
            bns += [m.rbr_skip] if m.rbr_skip is not None else []
            for bn in bns:
                bn.weight.div_(len(bns) ** 0.5)
                bn.bias.div_(len(bns))
