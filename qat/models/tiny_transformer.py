"""A small vision transformer for image classification: patch embedding -> pre-norm encoder blocks
(nn.MultiheadAttention + MLP) -> LayerNorm -> mean over tokens -> linear head.

Small enough to train on CIFAR in minutes and to exercise the quantization of Linear, LayerNorm, GELU
and attention. FX-traceable; dropout lives in modules, so a traced model still follows .train()/.eval().

    >>> import torch
    >>> model = TinyTransformer(num_classes=10, image_size=32, patch_size=4).eval()
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""
import torch
from torch import nn


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)). Tokens are [N, T, D]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.drop1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        attended, _ = self.attn(normed, normed, normed, need_weights=False)
        x = x + self.drop1(attended)
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Image classifier on non-overlapping patches (a Conv2d with stride = kernel = patch_size)."""

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        self.blocks = nn.Sequential(*[EncoderBlock(dim, num_heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)  # [N, D, H/p, W/p]
        tokens = tokens.flatten(2).transpose(1, 2)  # [N, T, D]
        tokens = self.blocks(tokens + self.pos_embed)
        pooled = self.norm(tokens).mean(dim=1)  # [N, D]
        return self.head(pooled)
