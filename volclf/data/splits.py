"""Train/validation splits, stratified and fixed by the data seed (never by the model seed)."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from volclf.errors import DataError


def holdout_split(
    labels: np.ndarray, val_fraction: float, data_seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): stratified by label; all items of one group (subject) on one side."""
    _check_counts(labels, 2)
    idx = np.arange(len(labels))
    if groups is None:
        train, val = train_test_split(idx, test_size=val_fraction, stratify=labels, random_state=data_seed)
        return np.sort(train), np.sort(val)
    # One fold of a stratified group k-fold is the closest to a stratified group hold-out.
    n_splits = max(2, round(1 / val_fraction))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=data_seed)
    train, val = next(splitter.split(idx, labels, groups))
    return np.sort(train), np.sort(val)


def kfold_split(
    labels: np.ndarray, folds: int, fold: int, data_seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of fold ``fold`` of a stratified (group) k-fold."""
    if not 0 <= fold < folds:
        raise DataError(f"fold {fold} does not exist with folds={folds}; run k uses fold k, so use --n {folds} or fewer")
    _check_counts(labels, folds)
    idx = np.arange(len(labels))
    if groups is None:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=data_seed)
        parts = list(splitter.split(idx, labels))
    else:
        parts = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=data_seed).split(idx, labels, groups))
    train, val = parts[fold]
    return np.sort(train), np.sort(val)


def _check_counts(labels: np.ndarray, need: int) -> None:
    values, counts = np.unique(labels, return_counts=True)
    few = [(int(v), int(c)) for v, c in zip(values, counts) if c < need]
    if few:
        raise DataError(
            "class(es) with too few volumes to split: "
            + ", ".join(f"label {v} has {c}" for v, c in few)
            + f"; each class needs at least {need}. Add volumes or merge/drop the class."
        )
