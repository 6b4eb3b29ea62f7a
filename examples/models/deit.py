"""DeiT-S with a distillation token (Touvron et al., "Training data-efficient image transformers &
distillation through attention", ICML 2021, Sec. 4-5).

ViT-S/16 (``vit.Block``) with a class token and a distillation token; at inference the two heads are
averaged: ``(head(x[:, 0]) + head_dist(x[:, 1])) / 2``. Deploy form: one head over the two tokens
read as one vector, ``head([x0; x1]) = [W | Wd] / 2 [x0; x1] + (b + bd) / 2`` (same MACs, one GEMV
instead of two, no add or divide). Input ``[B, 3, 224, 224]``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .common import finalize
from .vit import Block, init_transformer_weights


class DistilledVisionTransformer(nn.Module):
    """DeiT with class + distillation tokens (timm ``VisionTransformerDistilled`` layout)."""

    def __init__(
        self, img_size: int = 224, patch: int = 16, dim: int = 384, depth: int = 12, num_heads: int = 6, classes=1000
    ) -> None:
        super().__init__()
        num_patches = (img_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 2, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        self.head_dist = nn.Linear(dim, classes)
        self.deploy = False
        for p in (self.pos_embed, self.cls_token, self.dist_token):
            nn.init.trunc_normal_(p, std=0.02)
        init_transformer_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = (self.cls_token.expand(x.shape[0], -1, -1), self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*tokens, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        if self.deploy:
            return self.head(x[:, :2].flatten(1))
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        dim, classes = self.head.in_features, self.head.out_features
        head = nn.Linear(2 * dim, classes)
        head.weight.copy_(torch.cat([self.head.weight, self.head_dist.weight], dim=1) / 2)
        head.bias.copy_((self.head.bias + self.head_dist.bias) / 2)
        self.head = head
        del self.head_dist
        self.deploy = True


def deit_to_deploy(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    model.switch_to_deploy()
    return finalize(model)


def deit_s_distilled(
    num_classes: int = 1000, seed: int = 0, depth: int = 12, img_size: int = 224, deploy: bool = False
) -> nn.Module:
    """Seeded DeiT-S (dim 384, 6 heads) with a distillation head; ``depth`` and ``img_size`` shrink it."""
    torch.manual_seed(seed)
    model = finalize(DistilledVisionTransformer(img_size=img_size, depth=depth, classes=num_classes))
    return deit_to_deploy(model) if deploy else model
