"""ViT-S/16 (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; the "S" size from
Touvron et al., DeiT, 2021).

Patch embedding by a 16x16/16 conv, class token, learned position embedding, ``depth`` pre-norm
blocks (LayerNorm -> 6-head self-attention, dim 384 -> residual; LayerNorm -> GELU MLP x4 ->
residual), final LayerNorm and a linear head on the class token. Attention is written out
(qkv Linear -> reshape -> permute -> q @ k^T * scale -> softmax -> @ v) so the exported graph shows
every matmul. Input ``[B, 3, 224, 224]``.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import finalize


def init_transformer_weights(module: nn.Module) -> None:
    """Non-trivial random weights: truncated-normal linears, LayerNorm affine away from 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.normal_(m.bias, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight, mean=1.0, std=0.1)
            nn.init.normal_(m.bias, std=0.02)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, written as explicit matmuls."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(-1, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with class-token pooling (timm layer naming)."""

    def __init__(
        self,
        img_size: int = 224,
        patch: int = 16,
        dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        num_patches = (img_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        init_transformer_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_s16(num_classes: int = 1000, seed: int = 0, depth: int = 12) -> nn.Module:
    """Seeded, eval-mode ViT-S/16 (dim 384, 6 heads, MLP ratio 4) with ``depth`` blocks."""
    torch.manual_seed(seed)
    model = VisionTransformer(depth=depth, num_classes=num_classes)
    return finalize(model)
