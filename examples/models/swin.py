"""Swin Transformer block (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows", ICCV 2021).

One stage-1 block of Swin-T: input ``[B, 56, 56, 96]`` (channels last), LayerNorm, optional cyclic
shift by ``window // 2`` (torch.roll), partition into 7x7 windows by reshape/permute, 3-head window
self-attention with a relative position bias (a learned ``[(2*7-1)^2, heads]`` table gathered
through a fixed index buffer) and, when shifted, the precomputed -100 attention mask; then window
reverse, reverse shift, residual, LayerNorm -> GELU MLP x4 -> residual.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import finalize


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B * H/ws * W/ws, ws*ws, C]``, batch left symbolic (-1)."""
    _, h, w, c = x.shape
    x = x.reshape(-1, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``[B*nW, ws*ws, C]`` -> ``[B, H, W, C]``."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(ws: int) -> torch.Tensor:
    """The ``[ws*ws, ws*ws]`` int64 index into the bias table, as in the reference code."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """``[nW, ws*ws, ws*ws]`` additive mask: -100 between tokens from different shifted regions."""
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = window_partition(img, ws).squeeze(-1)
    mask = win[:, None, :] - win[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    """Window multi-head self-attention with a gathered relative position bias."""

    def __init__(self, dim: int, ws: int, num_heads: int) -> None:
        super().__init__()
        self.ws, self.num_heads = ws, num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, num_heads) * 0.02)
        self.register_buffer("relative_position_index", relative_position_index(ws))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, c = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(-1, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.reshape(-1, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.reshape(-1, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(out)


class SwinBlock(nn.Module):
    """A (shifted-)window transformer block on a fixed ``resolution x resolution`` feature map."""

    def __init__(
        self,
        dim: int = 96,
        resolution: int = 56,
        num_heads: int = 3,
        window: int = 7,
        shift: int = 3,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        mask = shifted_window_mask(resolution, resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = w = self.resolution
        shortcut = x
        x = self.norm1(x)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn(window_partition(x, self.window), self.attn_mask)
        x = window_reverse(windows, self.window, h, w)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


def swin_block(seed: int = 0, shifted: bool = True) -> nn.Module:
    """Seeded Swin-T stage-1 block, input/output ``[B, 56, 56, 96]``; SW-MSA when ``shifted``."""
    torch.manual_seed(seed)
    model = SwinBlock(shift=3 if shifted else 0)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight, mean=1.0, std=0.1)
            nn.init.normal_(m.bias, std=0.02)
    return finalize(model)


def swin_example_inputs(batch: int = 1, seed: int = 0) -> tuple[torch.Tensor]:
    """A deterministic ``[batch, 56, 56, 96]`` float32 input."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 56, 56, 96, generator=gen),)
