"""RepVGG (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021).

Training form: every block is ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)), the identity branch
present only when in == out channels and stride 1. Deploy form: the three branches merged by hand
(the paper's Sec. 3.3: fold each BN into its conv, pad the 1x1 kernel to 3x3, write the identity as
a 3x3 kernel, sum kernels and biases) into one 3x3 conv with bias. RepVGG-A0: depths [2, 4, 14, 1],
widths 48, 48, 96, 192, 1280 (multipliers a = 0.75, b = 2.5). Input ``[B, 3, 224, 224]``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .common import conv_bn, finalize, fuse_bn, identity_kernel, randomize_batchnorm


class RepVGGBlock(nn.Module):
    """A 3x3 RepVGG block: three parallel branches in training form, one conv in deploy form."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int = 1,
        groups: int = 1,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.stride, self.groups = (
            in_ch,
            out_ch,
            stride,
            groups,
        )
        self.deploy = deploy
        self.nonlinearity = nn.ReLU()
        if deploy:
            self.rbr_reparam = nn.Conv2d(in_ch, out_ch, 3, stride, 1, groups=groups, bias=True)
        else:
            has_identity = in_ch == out_ch and stride == 1
            self.rbr_identity = nn.BatchNorm2d(in_ch) if has_identity else None
            self.rbr_dense = conv_bn(in_ch, out_ch, 3, stride, 1, groups)
            self.rbr_1x1 = conv_bn(in_ch, out_ch, 1, stride, 0, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.nonlinearity(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.nonlinearity(out)

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single 3x3 kernel and bias equal to the sum of the three training branches."""
        k3, b3 = fuse_bn(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        k1, b1 = fuse_bn(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        kernel, bias = k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1
        if self.rbr_identity is not None:
            kid, bid = fuse_bn(identity_kernel(self.in_ch, self.groups, 3), self.rbr_identity)
            kernel, bias = kernel + kid, bias + bid
        return kernel, bias

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Replace the three branches by the merged 3x3 conv, in place."""
        if self.deploy:
            return
        kernel, bias = self.equivalent_kernel_bias()
        conv = nn.Conv2d(self.in_ch, self.out_ch, 3, self.stride, 1, groups=self.groups, bias=True)
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        self.rbr_reparam = conv
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity
        self.deploy = True


class RepVGG(nn.Module):
    """RepVGG backbone + global average pool + linear head (official layer naming)."""

    def __init__(
        self,
        num_blocks: tuple[int, ...],
        width_multiplier: tuple[float, ...],
        num_classes: int = 1000,
        groups_map: dict[int, int] | None = None,
        deploy: bool = False,
    ) -> None:
        super().__init__()
        self.deploy = deploy
        self.groups_map = groups_map or {}
        self.in_planes = min(64, int(64 * width_multiplier[0]))
        self.stage0 = RepVGGBlock(3, self.in_planes, stride=2, deploy=deploy)
        self.cur_layer_idx = 1
        widths = [int(w * m) for w, m in zip((64, 128, 256, 512), width_multiplier, strict=True)]
        self.stage1 = self._make_stage(widths[0], num_blocks[0])
        self.stage2 = self._make_stage(widths[1], num_blocks[1])
        self.stage3 = self._make_stage(widths[2], num_blocks[2])
        self.stage4 = self._make_stage(widths[3], num_blocks[3])
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)

    def _make_stage(self, planes: int, num_blocks: int) -> nn.Sequential:
        blocks = []
        for stride in [2] + [1] * (num_blocks - 1):
            groups = self.groups_map.get(self.cur_layer_idx, 1)
            blocks.append(RepVGGBlock(self.in_planes, planes, stride, groups, self.deploy))
            self.in_planes = planes
            self.cur_layer_idx += 1
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.stage0(x)))))
        return self.linear(torch.flatten(self.gap(x), 1))

    def switch_to_deploy(self) -> None:
        """Merge every block's branches in place (see :meth:`RepVGGBlock.switch_to_deploy`)."""
        for m in self.modules():
            if isinstance(m, RepVGGBlock):
                m.switch_to_deploy()
        self.deploy = True


def repvgg_to_deploy(model: nn.Module) -> nn.Module:
    """A deploy-form copy of ``model``; every :class:`RepVGGBlock` inside is merged by hand."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, RepVGGBlock):
            m.switch_to_deploy()
    return finalize(model)


def repvgg_a0(num_classes: int = 1000, seed: int = 0, deploy: bool = False) -> nn.Module:
    """Seeded RepVGG-A0; ``deploy=True`` returns the hand-merged form of the same seeded model."""
    torch.manual_seed(seed)
    model = RepVGG((2, 4, 14, 1), (0.75, 0.75, 0.75, 2.5), num_classes)
    randomize_batchnorm(model, seed)
    model = finalize(model)
    return repvgg_to_deploy(model) if deploy else model


class GroupedStage(nn.Module):
    """A RepVGG stem block plus a stage mixing dense and grouped (g2, g4) 3x3 blocks."""

    def __init__(self, width: int = 128, groups: tuple[int, ...] = (1, 2, 1, 4, 2)) -> None:
        super().__init__()
        self.stem = RepVGGBlock(3, 64, stride=2)
        blocks = [RepVGGBlock(64, width, stride=2, groups=groups[0])]
        blocks += [RepVGGBlock(width, width, 1, g) for g in groups[1:]]
        self.stage = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(self.stem(x))


def repvgg_grouped_stage(seed: int = 0, deploy: bool = False) -> nn.Module:
    """RepVGG-B g2/g4-style grouped blocks: input ``[B, 3, 224, 224]``, output ``[B, 128, 56, 56]``.

    The g2/g4 blocks have grouped 3x3 and 1x1 convs and, where in == out, an identity BN whose
    merged kernel is block-diagonal per group.
    """
    torch.manual_seed(seed)
    model = GroupedStage()
    randomize_batchnorm(model, seed)
    model = finalize(model)
    return repvgg_to_deploy(model) if deploy else model
