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

    Runs forward passes on the meta device (no memory, no compute), in fp32 and in bf16, and
    adds up every tensor autograd saves for the backward pass, excluding the parameters. Under
    autocast some tensors stay fp32 (norms, the residual stream), so the bf16 figure is a lower
    bound; bench/ compares both with measured peaks.
    """
    with torch.device("meta"):
        model = build_model(cfg, num_classes)
    model.train()
    per_sample = {name: _saved_bytes_per_sample(model.to(dtype), cfg.input_shape, dtype)
                  for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    params = count_parameters(model)
    return {
        "per_sample_fp32": per_sample["fp32"],
        "per_sample_bf16": per_sample["bf16"],
        # fp32 weights + gradients + two AdamW moments.
        "fixed": params * 4 * 4,
    }


def _saved_bytes_per_sample(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    param_ids = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in param_ids and id(t) not in param_ids:
            saved[id(base)] = base.numel() * base.element_size()
        return t

    totals = []
    for batch in (1, 2):  # the per-sample figure is the difference: fixed saves cancel out
        saved.clear()
        x = torch.empty(batch, 1, *input_shape, device="meta", dtype=dtype)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        totals.append(sum(saved.values()))
    return totals[1] - totals[0]


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
