"""A RePaViT block (Xu et al. 2025, "RePaViT: Scalable Vision Transformer Acceleration via Structural
Reparameterization on Feedforward Network Layers").

Training/inference form: pre-norm attention as in ViT, then an FFN behind a BatchNorm (RePaViT swaps
the FFN's LayerNorm for BN so the whole linear path folds) whose hidden channels are permuted and
split: the first ``(1 - idle_ratio) * hidden`` pass through GELU, the rest are *idle* (no
activation): ``x + fc2(cat(gelu(h[..., :a]), h[..., a:]))`` with ``h = fc1(BN(x))[..., perm]``.
Deploy form (Sec. 3.2): BN folded into fc1, fc1/fc2 restricted to the active channels, and the idle
path plus the residual as one linear ``I + W2i W1i``: ``shortcut(x) + fc2a(gelu(fc1a(x)))``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .common import finalize, randomize_batchnorm
from .vit import Attention


class RePaFFN(nn.Module):
    """The channel-idle FFN; ``switch_to_deploy`` merges the idle channels by hand."""

    def __init__(self, dim: int, hidden: int, idle_ratio: float = 0.75) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.active = hidden - int(hidden * idle_ratio)
        self.register_buffer("perm", torch.randperm(hidden))
        self.deploy = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.shortcut(x) + self.fc2_active(F.gelu(self.fc1_active(x)))
        h = self.fc1(self.norm(x.transpose(1, 2)).transpose(1, 2))[..., self.perm]
        h = torch.cat([F.gelu(h[..., : self.active]), h[..., self.active :]], dim=-1)
        return x + self.fc2(h)

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        bn = self.norm
        k = bn.weight / (bn.running_var + bn.eps).sqrt()
        t = bn.bias - bn.running_mean * k
        w1 = self.fc1.weight.double() * k.double()[None, :]  # fc1(BN(x)) = (W1 diag k) x + (W1 t + b1)
        b1 = self.fc1.bias.double() + self.fc1.weight.double() @ t.double()
        w1, b1 = w1[self.perm], b1[self.perm]
        w2 = self.fc2.weight.double()
        active, idle = slice(0, self.active), slice(self.active, None)
        dim = w2.shape[0]
        self.fc1_active = nn.Linear(dim, self.active)
        self.fc1_active.weight.copy_(w1[active])
        self.fc1_active.bias.copy_(b1[active])
        self.fc2_active = nn.Linear(self.active, dim, bias=False)
        self.fc2_active.weight.copy_(w2[:, active])
        self.shortcut = nn.Linear(dim, dim)
        self.shortcut.weight.copy_(torch.eye(dim, dtype=torch.float64) + w2[:, idle] @ w1[idle])
        self.shortcut.bias.copy_(self.fc2.bias.double() + w2[:, idle] @ b1[idle])
        del self.norm, self.fc1, self.fc2
        self.deploy = True


class RePaBlock(nn.Module):
    """``x + attn(LN(x))``, then the channel-idle FFN (which carries its own BN and residual)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, idle_ratio: float = 0.75) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ffn = RePaFFN(dim, int(dim * mlp_ratio), idle_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x + self.attn(self.norm1(x)))


class RePaViT(nn.Module):
    """Tokens in, tokens out: ``depth`` RePaViT blocks on ``[B, tokens, dim]``."""

    def __init__(self, dim: int = 384, depth: int = 1, num_heads: int = 6, idle_ratio: float = 0.75) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[RePaBlock(dim, num_heads, idle_ratio=idle_ratio) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def repavit_to_deploy(model: nn.Module) -> nn.Module:
    """A deploy-form copy: every :class:`RePaFFN` merged by hand."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, RePaFFN):
            m.switch_to_deploy()
    return finalize(model)


def repavit_block(
    dim: int = 384, depth: int = 1, num_heads: int = 6, idle_ratio: float = 0.75, seed: int = 0, deploy: bool = False
) -> nn.Module:
    """Seeded RePaViT-S-style blocks (dim 384, 6 heads, MLP x4, 75% idle); input ``[B, 197, dim]``."""
    torch.manual_seed(seed)
    model = RePaViT(dim, depth, num_heads, idle_ratio)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.normal_(m.bias, std=0.02)
    randomize_batchnorm(model, seed)
    model = finalize(model)
    return repavit_to_deploy(model) if deploy else model


def repavit_example_inputs(batch: int, tokens: int = 197, dim: int = 384) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(batch, tokens, dim, generator=gen),)
