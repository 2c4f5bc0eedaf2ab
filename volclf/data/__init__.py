"""Data sets for training: the synthetic set now, prepared real volumes through the same door."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from volclf.config import DataConfig
from volclf.data import synthetic
from volclf.data.splits import holdout_split, kfold_split
from volclf.errors import DataError

# Materialise the synthetic set in memory below this size; generate on access above it.
IN_MEMORY_LIMIT_BYTES = 1 << 30


class VolumeSource(Protocol):
    """Anything indexable that returns one (D, H, W) float32 volume."""

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> np.ndarray: ...


class SyntheticSource:
    """The synthetic set, volume ``i`` generated on access (deterministic)."""

    def __init__(self, cfg: DataConfig, shape: tuple[int, int, int], labels: np.ndarray):
        self.cfg, self.shape, self.labels = cfg, shape, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> np.ndarray:
        return synthetic.make_volume(index, int(self.labels[index]), self.shape, self.cfg.data_seed, self.cfg.noise)


class VolumeDataset(Dataset):
    """(volume (1, D, H, W) float32, label) pairs for a subset of a source."""

    def __init__(self, source: VolumeSource, labels: np.ndarray, indices: np.ndarray, augment: bool = False):
        self.source, self.labels, self.indices, self.augment = source, labels, indices, augment

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        x = torch.from_numpy(np.array(self.source[j], dtype=np.float32, copy=True)).unsqueeze(0)  # (1, D, H, W)
        if self.augment:
            # Random flips along each spatial axis and a mild intensity jitter (torch's RNG:
            # seeded per worker by the DataLoader, restored on resume).
            for axis in (1, 2, 3):
                if torch.rand(()) < 0.5:
                    x = x.flip(axis)
            x = x * (1 + 0.1 * (torch.rand(()) - 0.5)) + 0.1 * (torch.rand(()) - 0.5)
        return x, int(self.labels[j])


@dataclass(frozen=True)
class DataSplits:
    """What training needs: the two subsets, the class names, and what identifies the data."""

    train: VolumeDataset
    val: VolumeDataset
    classes: list[str]
    fingerprint: str
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_data(cfg: DataConfig, input_shape: tuple[int, int, int], fold: int = 0) -> DataSplits:
    """The train/val split for a data configuration at the model's input shape."""
    if cfg.source != "synthetic":
        raise DataError(
            f"data source {cfg.source!r}: only the synthetic set is supported in this version; "
            "use --data synthetic"
        )
    return _synthetic_splits(cfg, tuple(input_shape), fold)


def _synthetic_splits(cfg: DataConfig, shape: tuple[int, int, int], fold: int) -> DataSplits:
    if cfg.num_classes < 2:
        raise DataError(f"data.num_classes={cfg.num_classes}: a classifier needs at least 2 classes")
    labels = synthetic.synthetic_labels(cfg.num_samples, cfg.num_classes, cfg.data_seed)
    source: VolumeSource = SyntheticSource(cfg, shape, labels)
    if cfg.num_samples * int(np.prod(shape)) * 4 <= IN_MEMORY_LIMIT_BYTES:
        source = np.stack([source[i] for i in range(len(source))])
    train_idx, val_idx = _split(cfg, labels, fold)
    spec = {
        "generator": synthetic.GENERATOR_VERSION,
        "shape": list(shape),
        "num_classes": cfg.num_classes,
        "num_samples": cfg.num_samples,
        "data_seed": cfg.data_seed,
        "noise": cfg.noise,
    }
    fingerprint = "synthetic-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return DataSplits(
        train=VolumeDataset(source, labels, train_idx, augment=cfg.augment),
        val=VolumeDataset(source, labels, val_idx),
        classes=synthetic.class_names(cfg.num_classes),
        fingerprint=fingerprint,
        source="synthetic",
    )


def _split(cfg: DataConfig, labels: np.ndarray, fold: int, groups: np.ndarray | None = None):
    if cfg.split == "kfold":
        return kfold_split(labels, cfg.folds, fold, cfg.data_seed, groups)
    if cfg.split == "holdout":
        return holdout_split(labels, cfg.val_fraction, cfg.data_seed, groups)
    raise DataError(f"data.split={cfg.split!r}: choose 'holdout' or 'kfold'")
