"""What a data source holds: its volumes, their labels, declared splits and subjects, its classes.

A source is one of (checked in this order):

- a folder with ``labels.csv``: columns ``path`` and ``label``, optional ``split``
  (train/val/test; empty: decided by the data seed) and ``subject``; paths are relative to the
  folder (or absolute);
- a folder with one sub-folder per class, the volumes directly inside each;
- a ``.csv`` file in that format (its folder holds the relative paths);
- a ``.npz`` file holding a whole data set (the MedMNIST layout, see
  :func:`volclf.data.formats.read_npz_labels`); its train/val split is used as given (without a
  val array, its train array is split by the data seed); test is kept aside.

Scanning reads the labels and lists (``stat``) the files, never the volumes: it is cheap, and
every problem it can see (missing files, missing labels, bad split names) is reported before
any volume is read.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from volclf.data.formats import VOLUME_SUFFIXES, read_npz_labels, volume_suffix
from volclf.errors import DataError

LABELS_FILE = "labels.csv"
SPLIT_ALIASES = {"": "", "train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MAX_LISTED = 10  # problems named in one error message; the rest are counted


@dataclass(frozen=True)
class Item:
    """One volume of the data set."""

    key: str  # names the volume in messages and in the cache index: a path, or "set.npz:train_images[3]"
    file: str  # the file holding it, relative to the catalog root (absolute when outside it)
    label: str
    split: str  # "" (decided by the data seed), "train", "val" or "test"
    subject: str  # "" when not given: the volume is its own subject
    member: tuple[str, int] | None = None  # (array name, index) inside a data-set .npz


@dataclass(frozen=True)
class FileStat:
    """What identifies a source file cheaply: its size and modification time."""

    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Catalog:
    """The volumes of a data source, in a fixed order, with what identifies them."""

    source: Path  # the resolved data source (folder, .csv or .npz)
    root: Path  # the folder that item files are relative to
    layout: str  # "labels.csv", "class folders" or "npz"
    items: tuple[Item, ...]
    classes: tuple[str, ...]
    files: dict[str, FileStat]  # every source file, by its name in Item.file

    @property
    def labels(self) -> np.ndarray:
        """Class index of every item (position in ``classes``)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[it.label] for it in self.items], dtype=np.int64)

    def path(self, file: str) -> Path:
        return self.root / file

    def digest(self) -> str:
        """A hash of the item list (names, labels, splits, subjects): changes when the listing changes."""
        rows = [[it.key, it.file, it.label, it.split, it.subject, list(it.member or ())] for it in self.items]
        return hashlib.sha256(json.dumps([self.layout, rows]).encode()).hexdigest()


def dataset_name(source: str) -> str:
    """A short name for a data source, the default campaign name: the folder's name or the file's stem."""
    if source == "synthetic":
        return "synthetic"
    path = Path(source).expanduser().resolve()
    if path.is_dir() or path.suffix == "":
        name = path.name
    elif path.name.lower() == LABELS_FILE:
        name = path.parent.name  # the folder's labels file: the folder is the data set
    else:
        name = path.stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return name or "data"


def scan(source: str) -> Catalog:
    """The catalog of a real data source (a folder, a labels .csv, or a data-set .npz)."""
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise DataError(
            f"data source {source!r} ({path}) does not exist; give a folder of volumes, a labels .csv, "
            "an .npz data set, or 'synthetic'"
        )
    if path.is_dir():
        if (path / LABELS_FILE).is_file():
            return _scan_csv(path / LABELS_FILE, source=path)
        return _scan_class_folders(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _scan_npz(path)
    if suffix == ".csv":
        return _scan_csv(path, source=path)
    raise DataError(
        f"data source {path}: expected a folder, a labels .csv or an .npz data set (a single volume file "
        "is not a data set)"
    )


def sort_classes(labels: set[str]) -> tuple[str, ...]:
    """Class names in a stable order: numerically when every name is an integer, else alphabetically."""
    if all(re.fullmatch(r"[+-]?\d+", c) for c in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def _listing(problems: list[str]) -> str:
    shown = "; ".join(problems[:MAX_LISTED])
    more = len(problems) - MAX_LISTED
    return shown + (f"; and {more} more" if more > 0 else "")


def _stat(path: Path) -> FileStat:
    st = path.stat()
    return FileStat(st.st_size, st.st_mtime_ns)


def _scan_csv(csv_path: Path, source: Path) -> Catalog:
    root = csv_path.parent
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: not a readable CSV file ({exc}); it needs a header row 'path,label'") from exc
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("path", "label") if c not in table.columns]
    if missing:
        raise DataError(
            f"{csv_path}: no column(s) {', '.join(missing)} (columns found: {', '.join(table.columns) or 'none'}); "
            "labels.csv needs the columns path,label and optionally split,subject"
        )
    if table.empty:
        raise DataError(f"{csv_path}: lists no volumes; add one row per volume (path,label)")
    items, problems, missing_files, seen = [], [], [], {}
    files: dict[str, FileStat] = {}
    for row_number, row in enumerate(table.to_dict("records"), start=2):  # row 1 is the header
        where = f"{csv_path.name} row {row_number}"
        raw_path = str(row["path"]).strip()
        label = str(row["label"]).strip()
        split_raw = str(row.get("split", "")).strip().lower()
        subject = str(row.get("subject", "")).strip()
        if not raw_path:
            problems.append(f"{where}: empty path")
            continue
        if not label:
            problems.append(f"{raw_path} ({where}): missing label")
        if split_raw not in SPLIT_ALIASES:
            problems.append(f"{raw_path} ({where}): split {split_raw!r} is not one of train, val, test (or empty)")
        if volume_suffix(raw_path) is None:
            problems.append(f"{raw_path} ({where}): not a supported volume format ({', '.join(VOLUME_SUFFIXES)})")
        file_path = (root / raw_path).resolve()
        if file_path in seen:
            problems.append(f"{raw_path} ({where}): listed twice (first on row {seen[file_path]})")
            continue
        seen[file_path] = row_number
        file = _relative(file_path, root)
        try:
            if not file_path.is_file():
                raise FileNotFoundError
            files[file] = _stat(file_path)
        except (FileNotFoundError, NotADirectoryError):
            missing_files.append(f"{raw_path} ({where})")
            continue
        items.append(Item(key=raw_path, file=file, label=label, split=SPLIT_ALIASES.get(split_raw, ""), subject=subject))
    if missing_files:
        raise DataError(
            f"{csv_path}: {len(missing_files)} listed file(s) do not exist: {_listing(missing_files)}. "
            f"Paths are relative to {root}; fix them or remove the rows"
        )
    if problems:
        raise DataError(f"{csv_path}: {len(problems)} problem(s): {_listing(problems)}. Fix labels.csv: one row per volume, each with a path and a label")
    return Catalog(
        source=source, root=root, layout=LABELS_FILE, items=tuple(items),
        classes=sort_classes({it.label for it in items}), files=files,
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _scan_class_folders(root: Path) -> Catalog:
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    folders = [p for p in entries if p.is_dir()]
    loose = [p.name for p in entries if p.is_file() and volume_suffix(p.name)]
    if not folders:
        raise DataError(
            f"{root}: no {LABELS_FILE} and no class sub-folders; put each class's volumes in a sub-folder named "
            f"after the class, or add a {LABELS_FILE} with columns path,label"
        )
    if loose:
        raise DataError(
            f"{root}: volume(s) outside any class folder have no label: {_listing(loose)}; move each into "
            f"its class's sub-folder, or list every volume in a {LABELS_FILE}"
        )
    items, files, problems = [], {}, []
    for folder in folders:
        label = folder.name
        volumes = []
        for p in sorted(folder.iterdir()):
            if p.name.startswith("."):
                continue
            rel = p.relative_to(root).as_posix()
            if p.is_dir():
                problems.append(f"{rel}: a folder inside a class folder (use {LABELS_FILE} for nested layouts)")
            elif volume_suffix(p.name) is None:
                problems.append(f"{rel}: not a supported volume format ({', '.join(VOLUME_SUFFIXES)})")
            else:
                volumes.append(p)
        if not volumes:
            problems.append(f"class folder {label}/ holds no volumes")
        for p in volumes:
            rel = p.relative_to(root).as_posix()
            files[rel] = _stat(p)
            items.append(Item(key=rel, file=rel, label=label, split="", subject=""))
    if problems:
        raise DataError(f"{root}: {len(problems)} problem(s) in the class folders: {_listing(problems)}")
    return Catalog(
        source=root, root=root, layout="class folders", items=tuple(items),
        classes=sort_classes({it.label for it in items}), files=files,
    )


def _scan_npz(path: Path) -> Catalog:
    items = []
    arrays = read_npz_labels(path)
    for split, (images_key, labels) in arrays.items():
        if split == "train" and "val" not in arrays:
            split = ""  # no validation set given: the data seed splits the training set
        items += [
            Item(key=f"{path.name}:{images_key}[{i}]", file=path.name, label=str(int(lab)), split=split, subject="",
                 member=(images_key, i))
            for i, lab in enumerate(labels)
        ]
    if not items:
        raise DataError(f"{path}: holds no volumes")
    return Catalog(
        source=path, root=path.parent, layout="npz", items=tuple(items),
        classes=sort_classes({it.label for it in items}), files={path.name: _stat(path)},
    )
