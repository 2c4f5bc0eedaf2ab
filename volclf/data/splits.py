"""Train/validation splits, stratified and fixed by the data seed (never by the model seed).

:func:`assign_splits` is the whole rule for real data: a volume's declared split (labels.csv's
``split`` column, or the .npz's own arrays) wins; ``test`` volumes are kept aside; the rest are
split stratified by class with :func:`holdout_split` or :func:`kfold_split`, all volumes of one
subject on the same side.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

from volclf.errors import DataError

METHODS = ("holdout", "kfold")


def holdout_split(
    labels: np.ndarray, val_fraction: float, data_seed: int, groups: np.ndarray | None = None,
    class_names: Sequence[str] | None = None, context: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): stratified by label; all items of one group (subject) on one side."""
    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction={val_fraction}: must be between 0 and 1 (e.g. 0.25)")
    _check_counts(labels, 2, class_names, groups, context)
    idx = np.arange(len(labels))
    try:
        if groups is None:
            _check_holdout_sizes(labels, val_fraction)
            train, val = train_test_split(idx, test_size=val_fraction, stratify=labels, random_state=data_seed)
            return np.sort(train), np.sort(val)
        # One fold of a stratified group k-fold is the closest to a stratified group hold-out.
        n_splits = max(2, round(1 / val_fraction))
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=data_seed)
        train, val = next(splitter.split(idx, labels, groups))
    except ValueError as exc:  # sklearn's word on a split it cannot make
        raise DataError(f"cannot split {len(labels)} volumes with data.val_fraction={val_fraction}: {exc}") from exc
    return np.sort(train), np.sort(val)


def kfold_split(
    labels: np.ndarray, folds: int, fold: int, data_seed: int, groups: np.ndarray | None = None,
    class_names: Sequence[str] | None = None, context: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of fold ``fold`` of a stratified (group) k-fold."""
    if folds < 2:
        raise DataError(f"data.folds={folds}: k-fold needs at least 2 folds")
    if not 0 <= fold < folds:
        raise DataError(f"fold {fold} does not exist with folds={folds}; run k uses fold k, so use --n {folds} or fewer")
    _check_counts(labels, folds, class_names, groups, context)
    idx = np.arange(len(labels))
    try:
        if groups is None:
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=data_seed)
            parts = list(splitter.split(idx, labels))
        else:
            parts = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=data_seed).split(idx, labels, groups))
    except ValueError as exc:
        raise DataError(f"cannot split {len(labels)} volumes into data.folds={folds} folds: {exc}") from exc
    train, val = parts[fold]
    return np.sort(train), np.sort(val)


def assign_splits(
    labels: np.ndarray,
    declared: Sequence[str],
    subjects: Sequence[str],
    *,
    method: str,
    val_fraction: float,
    folds: int,
    fold: int,
    data_seed: int,
    class_names: Sequence[str],
    keys: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of a real data set; ``declared`` splits win, ``test`` stays aside."""
    if method not in METHODS:
        raise DataError(f"data.split={method!r}: choose one of {', '.join(METHODS)}")
    declared = np.asarray(declared, dtype=object)
    groups = _groups(subjects, declared, keys)
    pool = np.flatnonzero(declared == "")
    train = [np.flatnonzero(declared == "train")]
    val = [np.flatnonzero(declared == "val")]
    if len(pool):
        pool_groups = None if groups is None else groups[pool]
        context = " among the volumes without a declared split" if len(pool) < len(labels) else ""
        if method == "kfold":
            t, v = kfold_split(labels[pool], folds, fold, data_seed, pool_groups, class_names, context)
        else:
            t, v = holdout_split(labels[pool], val_fraction, data_seed, pool_groups, class_names, context)
        train.append(pool[t])
        val.append(pool[v])
    elif method == "kfold":
        raise DataError(
            "data.split='kfold' but every volume has a declared split (labels.csv's split column, or the .npz's "
            "own train/val arrays): every fold would be the same. Use data.split='holdout', or leave the split "
            "empty for the volumes to be cross-validated"
        )
    train_idx, val_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    if len(train_idx) == 0 or len(val_idx) == 0:
        side = "training" if len(train_idx) == 0 else "validation"
        raise DataError(f"the {side} split is empty; declare some volumes as '{'train' if side == 'training' else 'val'}' "
                        "in the split column, or leave the split empty to let the data seed decide")
    _check_trained(labels, train_idx, np.flatnonzero(declared != "train"), class_names, keys, declared)
    return train_idx, val_idx


def _groups(subjects: Sequence[str], declared: np.ndarray, keys: Sequence[str]) -> np.ndarray | None:
    """Group ids for a split that keeps subjects together; None when no subject is given."""
    subjects = np.asarray(subjects, dtype=object)
    if not (subjects != "").any():
        return None
    # A volume without a subject is a subject of its own.
    groups = np.array([s if s else f"\0{i}" for i, s in enumerate(subjects)], dtype=object)
    problems = []
    for subject in np.unique(subjects[subjects != ""]):
        splits = sorted(set(declared[subjects == subject]))
        if len(splits) > 1:
            names = ", ".join(repr(s or "(empty)") for s in splits)
            problems.append(f"subject {subject!r} has volumes with split {names}")
    if problems:
        raise DataError(
            "all volumes of one subject must be on the same side, but " + "; ".join(problems[:10])
            + ". Give every volume of a subject the same split (or leave all of them empty)"
        )
    return groups


def _check_trained(
    labels: np.ndarray, train_idx: np.ndarray, others: np.ndarray, class_names: Sequence[str],
    keys: Sequence[str], declared: np.ndarray,
) -> None:
    """Every class outside training (val, test) must be trained on too: else it is an unknown label."""
    trained = set(labels[train_idx].tolist())
    for i in others:
        if labels[i] not in trained:
            name = class_names[labels[i]]
            raise DataError(
                f"{keys[i]}: label {name!r} has no volume in the training split (it appears only in "
                f"'{declared[i] or 'val'}'), so the model cannot learn it. Add training volumes of {name!r}, "
                "or remove its volumes from the data set"
            )


def _check_holdout_sizes(labels: np.ndarray, val_fraction: float) -> None:
    n, k = len(labels), len(np.unique(labels))
    n_val = int(np.ceil(val_fraction * n))
    if n_val < k or n - n_val < k:
        raise DataError(
            f"a stratified split of {n} volumes in {k} classes with data.val_fraction={val_fraction} gives "
            f"{n_val} validation and {n - n_val} training volumes; each side needs at least one per class "
            f"({k}). Add volumes or change data.val_fraction"
        )


def _check_counts(
    labels: np.ndarray, need: int, class_names: Sequence[str] | None = None, groups: np.ndarray | None = None,
    context: str = "",
) -> None:
    values = np.unique(labels)
    unit = "volumes" if groups is None else "subjects"
    few = []
    for v in values:
        members = labels == v
        count = int(members.sum()) if groups is None else len(set(groups[members].tolist()))
        if count < need:
            few.append(f"{'class ' + repr(class_names[v]) if class_names is not None else f'label {int(v)}'} has {count}")
    if few:
        raise DataError(
            f"class(es) with too few {unit} to split{context}: " + ", ".join(few)
            + f"; each class needs at least {need}. Add volumes or merge/drop the class."
        )
