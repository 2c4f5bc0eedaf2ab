"""The transformer-based volume classifier ("vit") of SPEC §2.

Reading of the patch encoder. The group's summary lists four Conv3D layers (filters 8·256,
4·256, 2·256, 1·256) all with kernel = stride = patch_size and 'same' padding. Four such
strided layers would shrink a 10×190×190 volume to a single patch, contradicting the stated
num_patch = 361. The reading consistent with every stated figure, implemented here: the first
convolution cuts non-overlapping patches (kernel = stride = patch_size, Keras 'same' padding,
i.e. pad so that out = ceil(in / stride)), and the next three project each patch with 1×1×1
convolutions, each followed by ReLU. On 10×190×190 with patch 10 that gives 1×19×19 = 361.

Other readings, stated so that they can be checked:
- attention: ``num_heads`` heads that split ``embed_dim`` (timm), i.e. 4 heads of width 64;
- the MLP follows the Keras ViT example: Dense(mlp_dim, GELU) -> Dropout -> Dense(embed_dim, GELU)
  -> Dropout; pre-norm blocks with LayerNorm(eps=1e-6) and residual connections;
- the decoder concatenates the outputs of ``skip_layers`` along the feature axis, applies
  BatchNorm over those features, then either flattens all patches (``pool="flatten"``, the
  Keras example: 361 × 6·256 = 554 496 features into the 128-unit layer) or averages them
  (``pool="mean"``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from volclf.config import ViTConfig


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Keras 'same' padding (before, after) for one axis: the output has ceil(size / stride)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def patch_grid(input_shape: tuple[int, int, int], patch_size: int) -> tuple[int, int, int]:
    """Number of patches along (D, H, W)."""
    return tuple(math.ceil(s / patch_size) for s in input_shape)  # type: ignore[return-value]


class PatchEmbed(nn.Module):
    """Cut non-overlapping patches (strided conv), then project each (1×1×1 convs), ReLU after each."""

    def __init__(self, input_shape: tuple[int, int, int], patch_size: int, dims: list[int]):
        super().__init__()
        self.patch_size = patch_size
        self.grid = patch_grid(input_shape, patch_size)
        self.num_patches = math.prod(self.grid)
        # F.pad takes (W_before, W_after, H_before, H_after, D_before, D_after).
        pads = [same_padding(s, patch_size, patch_size) for s in input_shape]
        self.padding = tuple(p for pair in reversed(pads) for p in pair)
        self.proj = nn.Conv3d(1, dims[0], kernel_size=patch_size, stride=patch_size)
        self.mix = nn.ModuleList(nn.Conv3d(a, b, kernel_size=1) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.padding)
        x = F.relu(self.proj(x))  # (B, 1, D, H, W) -> (B, C0, d, h, w)
        for conv in self.mix:
            x = F.relu(conv(x))  # (B, Ci, d, h, w) -> (B, Ci+1, d, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, C, d, h, w) -> (B, N, C)


class Attention(nn.Module):
    """Multi-head self-attention; fused (SDPA) or plain, which a test proves equal."""

    def __init__(self, dim: int, num_heads: int, fused: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, heads, N, hd) -> (B, N, C)
        return self.proj(x)


class Dropout(nn.Dropout):
    """``nn.Dropout``, with a faster mask on CPU.

    ATen's CPU dropout draws its mask with ``bernoulli_``, which runs on one thread; comparing
    uniform numbers with ``p`` gives the same mask distribution in half the time: a CPU training
    step 3-7 % faster on 2 cores (bench/README.md). Like ATen's, the mask kept for the backward
    pass holds 0 or 1/(1-p) in the input's dtype. Other devices keep PyTorch's fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu":
            return super().forward(x)
        mask = torch.rand(x.shape, device=x.device).ge_(self.p).mul_(1 / (1 - self.p))  # 0 or 1/(1-p)
        return x * mask.to(x.dtype)


class Mlp(nn.Module):
    """Dense(mlp_dim, GELU) -> Dropout -> Dense(dim, GELU) -> Dropout, as in the Keras ViT example."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.gelu(self.fc1(x)))
        return self.drop(F.gelu(self.fc2(x)))


class Block(nn.Module):
    """Pre-norm transformer layer."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float, fused: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, fused)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer3D(nn.Module):
    """Patch encoder, learned positions, ``depth`` layers, multi-layer decoder, classifier."""

    def __init__(self, cfg: ViTConfig, num_classes: int):
        super().__init__()
        bad = [i for i in cfg.skip_layers if not 1 <= i <= cfg.depth]
        if bad or not cfg.skip_layers:
            raise ValueError(f"skip_layers {cfg.skip_layers} must name layers 1..{cfg.depth}")
        if cfg.pool not in ("flatten", "mean"):
            raise ValueError(f"pool must be 'flatten' or 'mean', got {cfg.pool!r}")
        self.cfg = cfg
        dims = [cfg.embed_dim * m for m in cfg.stem_multipliers]
        if dims[-1] != cfg.embed_dim:
            raise ValueError(f"stem_multipliers {cfg.stem_multipliers} must end with 1")
        self.patch_embed = PatchEmbed(cfg.input_shape, cfg.patch_size, dims)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, cfg.embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, cfg.dropout, cfg.fused_attention)
            for _ in range(cfg.depth)
        )
        concat_dim = cfg.embed_dim * len(cfg.skip_layers)
        self.decoder_norm = nn.BatchNorm1d(concat_dim)
        self.features = concat_dim * (self.num_patches if cfg.pool == "flatten" else 1)
        self.decoder_fc = nn.Linear(self.features, cfg.decoder_dim)
        self.head = nn.Linear(cfg.decoder_dim, num_classes)

    def set_fused_attention(self, fused: bool) -> None:
        for block in self.blocks:
            block.attn.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed  # (B, 1, D, H, W) -> (B, N, C)
        kept = []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i in self.cfg.skip_layers:
                kept.append(x)
        x = torch.cat(kept, dim=-1)  # (B, N, S*C)
        x = self.decoder_norm(x.transpose(1, 2))  # BatchNorm over features: (B, S*C, N)
        x = x.flatten(1) if self.cfg.pool == "flatten" else x.mean(dim=2)  # (B, S*C*N) or (B, S*C)
        x = F.relu(self.decoder_fc(x))
        return self.head(x)
