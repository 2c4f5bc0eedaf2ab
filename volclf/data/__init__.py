"""Data sets for training: real volumes through a preparation cache, and the synthetic set.

The API for the rest of volclf:

- :func:`load_data` — the train/val split a run trains on (real data: read from the cache,
  prepared on first use);
- :func:`check_data` — the launcher's pre-flight on the login node: lists, splits and prepares
  the data, so that every problem is a :class:`~volclf.errors.DataError` before a job is queued;
- :func:`prepare` — preparation alone (also ``python -m volclf.data prepare SRC ...``);
- :func:`dataset_name` — a source's short name, the default campaign name.

Modules: ``formats`` (reading files), ``catalog`` (what a source holds), ``splits``,
``preparation`` (the method and the cache), ``synthetic``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from volclf.config import DataConfig
from volclf.data import synthetic
from volclf.data.catalog import Catalog, dataset_name, scan
from volclf.data.preparation import CachedVolumes, ensure_prepared
from volclf.data.splits import assign_splits, holdout_split, kfold_split
from volclf.errors import DataError

__all__ = ["DataSplits", "VolumeDataset", "check_data", "dataset_name", "load_data", "prepare"]

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
    shape = _input_shape(input_shape)
    if cfg.source == "synthetic":
        return _synthetic_splits(cfg, shape, fold)
    catalog = scan(cfg.source)
    train_idx, val_idx = _real_split(cfg, catalog, fold)  # before reading any volume: split errors come first
    prepared = ensure_prepared(catalog, shape, cfg.cache_dir)
    # Mapped here, in the main process: forked DataLoader workers share the map, and keep it
    # even if a later preparation replaces this cache version while the run goes on.
    volumes = CachedVolumes(prepared.volumes_path, len(catalog.items), shape).open()
    labels = catalog.labels
    return DataSplits(
        train=VolumeDataset(volumes, labels, train_idx, augment=cfg.augment),
        val=VolumeDataset(volumes, labels, val_idx),
        classes=list(catalog.classes),
        fingerprint=prepared.index["fingerprint"],
        source=str(catalog.source),
    )


def prepare(cfg: DataConfig, input_shape: tuple[int, int, int], workers: int = 0) -> Path:
    """Prepare a real data source at ``input_shape`` (or find its valid cache); the cache version folder."""
    if cfg.source == "synthetic":
        raise DataError("the synthetic set is generated, not prepared; give a folder or .npz as the source")
    return ensure_prepared(scan(cfg.source), _input_shape(input_shape), cfg.cache_dir, workers).path


def check_data(cfg: DataConfig, input_shape: tuple[int, int, int], workers: int = 0) -> dict[str, Any]:
    """Pre-flight for the launcher: every split can be made and every volume prepared, or a DataError.

    Returns a summary: source, dataset, layout, volumes, classes (name -> count), num_classes,
    split sizes (fold 0), input shape, fingerprint, the cache folder and whether it was built now.
    Real data is prepared here (on the login node), so that jobs start from a valid cache.
    """
    shape = _input_shape(input_shape)
    folds = range(cfg.folds) if cfg.split == "kfold" else range(1)
    if cfg.source == "synthetic":
        data = _synthetic_splits(cfg, shape, 0, materialise=False)
        for fold in folds[1:]:
            _split(cfg, data.train.labels, fold)
        labels = data.train.labels
        counts = np.bincount(labels, minlength=len(data.classes))
        return {
            "source": "synthetic", "dataset": "synthetic", "layout": "synthetic",
            "volumes": len(labels), "classes": dict(zip(data.classes, counts.tolist())),
            "num_classes": data.num_classes,
            "splits": {"train": len(data.train), "val": len(data.val), "test": 0},
            "split": cfg.split, "folds": cfg.folds if cfg.split == "kfold" else None,
            "input_shape": list(shape), "fingerprint": data.fingerprint, "cache": None, "cache_built": False,
            "source_shapes": None,
        }
    catalog = scan(cfg.source)
    train_idx, val_idx = _real_split(cfg, catalog, 0)
    for fold in folds[1:]:
        _real_split(cfg, catalog, fold)
    prepared = ensure_prepared(catalog, shape, cfg.cache_dir, workers)
    labels = catalog.labels
    counts = np.bincount(labels, minlength=len(catalog.classes))
    source_shapes = np.array([it["source_shape"] for it in prepared.index["items"]])
    return {
        "source": str(catalog.source), "dataset": dataset_name(str(catalog.source)), "layout": catalog.layout,
        "volumes": len(catalog.items), "classes": dict(zip(catalog.classes, counts.tolist())),
        "num_classes": len(catalog.classes),
        "splits": {"train": len(train_idx), "val": len(val_idx),
                   "test": sum(it.split == "test" for it in catalog.items)},
        "split": cfg.split, "folds": cfg.folds if cfg.split == "kfold" else None,
        "input_shape": list(shape), "fingerprint": prepared.index["fingerprint"],
        "cache": str(prepared.path), "cache_built": prepared.built,
        "source_shapes": {"min": source_shapes.min(0).tolist(), "max": source_shapes.max(0).tolist()},
    }


def _input_shape(input_shape: Any) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"input shape {tuple(input_shape)}: expected three positive sizes (D, H, W)")
    return shape


def _real_split(cfg: DataConfig, catalog: Catalog, fold: int) -> tuple[np.ndarray, np.ndarray]:
    if len(catalog.classes) < 2:
        raise DataError(
            f"{catalog.source}: only one class ({', '.join(catalog.classes)}); a classifier needs at least 2"
        )
    return assign_splits(
        catalog.labels,
        [it.split for it in catalog.items],
        [it.subject for it in catalog.items],
        method=cfg.split, val_fraction=cfg.val_fraction, folds=cfg.folds, fold=fold, data_seed=cfg.data_seed,
        class_names=catalog.classes, keys=[it.key for it in catalog.items],
    )


def _synthetic_splits(cfg: DataConfig, shape: tuple[int, int, int], fold: int, materialise: bool = True) -> DataSplits:
    if cfg.num_classes < 2:
        raise DataError(f"data.num_classes={cfg.num_classes}: a classifier needs at least 2 classes")
    labels = synthetic.synthetic_labels(cfg.num_samples, cfg.num_classes, cfg.data_seed)
    source: VolumeSource = SyntheticSource(cfg, shape, labels)
    if materialise and cfg.num_samples * int(np.prod(shape)) * 4 <= IN_MEMORY_LIMIT_BYTES:
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
