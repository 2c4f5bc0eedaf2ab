"""The convolution-based volume classifier ("cnn"), a 3D ResNet, of SPEC §2.

Stem: Conv3D 3×3×3 (stride 1, padding 1) -> MaxPool3D (kernel 2, stride 1, padding 1) -> BN
-> ReLU. Then residual stages, each a string of blocks ("d" downsample, "p" plain); the seed
model has 20 blocks of 32 filters. Head: AvgPool3D(kernel 2) -> flatten -> Linear -> Linear
-> Linear. On 190³ the stem gives 191³, the three downsample blocks 96³, 48³, 24³, and the
pool 12³: 32 × 12³ = 55 296 features, as the group's summary states.

Readings, stated so that they can be checked: the summary lists the three Linear layers
without activations; stacked linear layers without one collapse into a single map, so a ReLU
follows each hidden Linear (no parameters, the figures are unchanged).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from volclf.config import ResNetConfig


class ResidualBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN-ReLU plus shortcut, then ReLU; "downsample" halves the size."""

    def __init__(self, channels: int, downsample: bool):
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv3d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(channels)
        self.shortcut: nn.Module = (
            nn.Sequential(nn.Conv3d(channels, channels, 1, stride=2, bias=False), nn.BatchNorm3d(channels))
            if downsample
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class ResNet3D(nn.Module):
    """Stem, residual stages, pooled and flattened features, three dense layers."""

    def __init__(self, cfg: ResNetConfig, num_classes: int):
        super().__init__()
        bad = [s for s in cfg.stages if not s or set(s) - {"d", "p"}]
        if bad:
            raise ValueError(f"stages {bad}: each stage is a string of 'd' (downsample) and 'p' (plain)")
        self.cfg = cfg
        w = cfg.width
        self.stem = nn.Sequential(
            # No bias: the batch norm after the pool removes any constant (the bias's gradient
            # would be zero but for rounding).
            nn.Conv3d(1, w, 3, stride=1, padding=1, bias=False),
            nn.MaxPool3d(kernel_size=2, stride=1, padding=1),
            nn.BatchNorm3d(w),
            nn.ReLU(inplace=True),
        )
        self.stages = nn.Sequential(
            *(nn.Sequential(*(ResidualBlock(w, kind == "d") for kind in stage)) for stage in cfg.stages)
        )
        self.pool = nn.AvgPool3d(cfg.final_pool)
        self.feature_shape = self._feature_shape(cfg)
        self.flatten_features = math.prod(self.feature_shape)
        dims = [self.flatten_features, *cfg.hidden_dims]
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], num_classes)

    @staticmethod
    def _feature_shape(cfg: ResNetConfig) -> tuple[int, ...]:
        """(C, d, h, w) after the final pool, by the layers' size arithmetic."""
        size = [s + 1 for s in cfg.input_shape]  # max-pool kernel 2, stride 1, padding 1: +1
        for _ in range(sum(stage.count("d") for stage in cfg.stages)):
            size = [(s - 1) // 2 + 1 for s in size]  # 3×3×3 conv, stride 2, padding 1
        size = [s // cfg.final_pool for s in size]
        if min(size) < 1:
            raise ValueError(f"input_shape {cfg.input_shape} is too small for {cfg.stages} and final_pool")
        return (cfg.width, *size)

    @property
    def num_blocks(self) -> int:
        return sum(len(s) for s in self.cfg.stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))  # (B, 1, D, H, W) -> (B, C, d, h, w)
        x = self.pool(x).flatten(1)  # (B, C, d', h', w') -> (B, C·d'·h'·w')
        for fc in self.fc:
            x = F.relu(fc(x))
        return self.head(x)
