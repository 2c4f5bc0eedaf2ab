"""Model construction and description: the only entry point the rest of volclf uses."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from volclf.config import ModelConfig, ResNetConfig, ViTConfig
from volclf.models.resnet import ResNet3D
from volclf.models.vit import VisionTransformer3D


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The network for a model configuration."""
    if isinstance(cfg, ViTConfig):
        return VisionTransformer3D(cfg, num_classes)
    if isinstance(cfg, ResNetConfig):
        return ResNet3D(cfg, num_classes)
    raise TypeError(f"no model for {type(cfg).__name__}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_memory_estimate(cfg: ModelConfig, num_classes: int) -> dict[str, int]:
    """Bytes that training needs: per sample (tensors saved for backward) and fixed (weights, AdamW).

    Runs one forward pass on the meta device (no memory, no compute) and adds up every tensor
    autograd saves for the backward pass, excluding the parameters themselves. Kernels that
    recompute (fused attention) or keep fp32 copies under autocast make the real figure differ;
    bench/ checks the estimate against measured peaks.
    """
    with torch.device("meta"):
        model = build_model(cfg, num_classes)
    model.train()
    param_ids = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in param_ids and id(t) not in param_ids:
            saved[id(base)] = base.numel() * base.element_size()
        return t

    batch = 2  # two samples: the per-sample figure is the difference to one
    per = []
    for b in (1, batch):
        saved.clear()
        x = torch.empty(b, 1, *cfg.input_shape, device="meta", requires_grad=False)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        per.append(sum(saved.values()))
    per_sample_fp32 = per[1] - per[0]
    params = count_parameters(model)
    return {
        "per_sample_fp32": per_sample_fp32,
        # Under bf16 autocast most saved activations are half the size; norms keep fp32 inputs.
        "per_sample_bf16": per_sample_fp32 // 2,
        # fp32 weights + gradients + two AdamW moments.
        "fixed": params * 4 * 4,
    }


def describe(cfg: ModelConfig, num_classes: int) -> dict[str, Any]:
    """The model's structure in figures (what ``python -m volclf describe`` prints)."""
    with torch.device("meta"):
        model = build_model(cfg, num_classes)
    info: dict[str, Any] = {
        "arch": "vit" if isinstance(cfg, ViTConfig) else "cnn",
        "input_shape": [1, *cfg.input_shape],
        "num_classes": num_classes,
        "parameters": count_parameters(model),
    }
    if isinstance(model, VisionTransformer3D):
        info["tokens"] = model.num_patches
        info["patch_grid"] = list(model.patch_embed.grid)
        info["decoder_features"] = model.features
        info["pool"] = cfg.pool
    else:
        info["flatten_features"] = model.flatten_features
        info["feature_shape"] = list(model.feature_shape)
        info["residual_blocks"] = model.num_blocks
    mem = training_memory_estimate(cfg, num_classes)
    info["memory_per_sample_bytes"] = {"fp32": mem["per_sample_fp32"], "bf16": mem["per_sample_bf16"]}
    info["memory_fixed_bytes"] = mem["fixed"]
    info["memory_per_sample_gib"] = {k: round(v / 2**30, 3) for k, v in info["memory_per_sample_bytes"].items()}
    return info


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


__all__ = ["build_model", "count_parameters", "describe", "training_memory_estimate", "human_bytes"]
