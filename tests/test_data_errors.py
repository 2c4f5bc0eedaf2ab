"""Bad input is refused by the pre-flight (check_data) with a message naming the file or class
and the fix, and leaves no cache behind that a later run would trust."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from volclf.config import DataConfig
from volclf.data import check_data, load_data
from volclf.data.synthetic import write_dataset
from volclf.errors import DataError

SHAPE = (12, 12, 12)


def folder_of(tmp_path: Path, suffix: str = ".nii.gz", layout: str = "folders", n: int = 12) -> Path:
    return write_dataset(tmp_path / "scans", num_samples=n, num_classes=2, shape=(8, 8, 8), layout=layout, suffix=suffix)


def a_volume(folder: Path, suffix: str, k: int = 0) -> Path:
    return sorted(p for p in folder.rglob(f"*{suffix}") if ".volclf-cache" not in p.parts)[k]


def refused(folder: Path | str, *needles: str, **cfg) -> str:
    """check_data raises a DataError whose message holds every needle; no cache is left."""
    with pytest.raises(DataError) as info:
        check_data(DataConfig(source=str(folder), **cfg), SHAPE)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    root = Path(folder) if Path(folder).is_dir() else Path(folder).parent
    assert not (root / ".volclf-cache").exists(), "a failed check left a cache folder"
    return message


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------ unreadable files
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".npy", ".npz"])
def test_a_truncated_file_is_named(tmp_path, suffix):
    folder = folder_of(tmp_path, suffix)
    bad = a_volume(folder, suffix, 5)
    truncate(bad)
    refused(folder, bad.name, "cannot read", "truncated or damaged")


def test_a_file_that_is_not_what_its_name_says(tmp_path):
    folder = folder_of(tmp_path)
    bad = a_volume(folder, ".nii.gz", 2)
    bad.write_bytes(b"<html>404 not found</html>")
    refused(folder, bad.name, "cannot read")


def test_every_bad_volume_is_named_in_one_message(tmp_path):
    folder = folder_of(tmp_path, ".npy")
    first, second = a_volume(folder, ".npy", 1), a_volume(folder, ".npy", 7)
    truncate(first)
    np.save(second, np.full((8, 8, 8), np.nan, dtype=np.float32))
    message = refused(folder, first.name, second.name, "2 unusable volume(s)")
    assert "nothing was cached" in message


# ------------------------------------------------------------------ wrong content
def test_a_volume_of_the_wrong_rank(tmp_path):
    folder = folder_of(tmp_path, ".npy")
    bad = a_volume(folder, ".npy", 3)
    np.save(bad, np.zeros((8, 8), dtype=np.float32))
    refused(folder, bad.name, "rank 2", "3D volume")


def test_a_nifti_with_several_volumes(tmp_path):
    folder = folder_of(tmp_path)
    bad = a_volume(folder, ".nii.gz", 4)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), dtype=np.float32), np.eye(4)), bad)
    refused(folder, bad.name, "(8, 8, 8, 2)", "rank 4")


@pytest.mark.parametrize("value, words", [(np.nan, "1 NaN"), (np.inf, "1 infinite")])
def test_nan_or_inf_voxels(tmp_path, value, words):
    folder = folder_of(tmp_path, ".nii")
    bad = a_volume(folder, ".nii", 6)
    volume = np.asanyarray(nib.load(bad).dataobj).copy()
    volume[1, 2, 3] = value
    nib.save(nib.Nifti1Image(volume, np.eye(4)), bad)
    refused(folder, bad.name, words, "nan_to_num")


def test_a_constant_volume(tmp_path):
    folder = folder_of(tmp_path, ".npy")
    bad = a_volume(folder, ".npy", 0)
    np.save(bad, np.zeros((8, 8, 8), dtype=np.float32))
    refused(folder, bad.name, "empty or broken volume")


# ------------------------------------------------------------------ labels and listing
def edit_csv(folder: Path, edit) -> None:
    table = pd.read_csv(folder / "labels.csv", dtype=str, keep_default_na=False)
    edit(table)
    table.to_csv(folder / "labels.csv", index=False)


def test_a_missing_label(tmp_path):
    folder = folder_of(tmp_path, ".npy", layout="csv")
    edit_csv(folder, lambda t: t.__setitem__("label", ["", *t["label"][1:]]))
    refused(folder, "vol0000.npy", "missing label", "row 2")


def test_a_volume_outside_the_class_folders_has_no_label(tmp_path):
    folder = folder_of(tmp_path, ".npy")
    np.save(folder / "stray.npy", np.ones((8, 8, 8), dtype=np.float32))
    refused(folder, "stray.npy", "outside any class folder")


def test_a_label_that_never_appears_in_training(tmp_path):
    folder = folder_of(tmp_path, ".npy", layout="csv")

    def edit(t):
        t["split"] = ["train"] * 9 + ["val"] * 3
        t.loc[10, "label"] = "cube"  # only in val: the model can never learn it

    edit_csv(folder, edit)
    refused(folder, "vol0010.npy", "'cube'", "no volume in the training split")


def test_a_listed_file_that_does_not_exist(tmp_path):
    folder = folder_of(tmp_path, ".npy", layout="csv")
    edit_csv(folder, lambda t: t.__setitem__("path", [*t["path"][:-1], "scans/lost.npy"]))
    refused(folder, "scans/lost.npy", "do not exist", "relative to")


def test_a_class_with_too_few_volumes(tmp_path):
    folder = folder_of(tmp_path, ".npy", layout="csv")
    edit_csv(folder, lambda t: t.__setitem__("label", [*t["label"][:-1], "rare"]))
    refused(folder, "'rare' has 1", "too few volumes to split")
    refused(folder, "'shell' has 6", "at least 8", split="kfold", folds=8)


def test_too_few_subjects_in_a_class(tmp_path):
    folder = folder_of(tmp_path, ".npy", layout="csv")
    edit_csv(folder, lambda t: t.__setitem__("subject", ["same" if lab == "ball" else f"s{i}" for i, lab in enumerate(t["label"])]))
    refused(folder, "'ball' has 1", "too few subjects")


def test_a_subject_declared_on_both_sides(tmp_path):
    folder = folder_of(tmp_path, ".npy", layout="csv")

    def edit(t):
        t["split"] = ["train"] * 8 + ["val"] * 4
        t["subject"] = [f"s{i}" for i in range(12)]
        t.loc[[0, 11], "subject"] = "p7"

    edit_csv(folder, edit)
    refused(folder, "subject 'p7'", "same side")


def test_a_bad_split_value_and_a_bad_header(tmp_path):
    folder = folder_of(tmp_path, ".npy", layout="csv")
    edit_csv(folder, lambda t: t.__setitem__("split", ["training"] + [""] * 11))
    refused(folder, "vol0000.npy", "'training'", "train, val, test")
    (folder / "labels.csv").write_text("file,class\nscans/a.npy,x\n")
    refused(folder, "labels.csv", "no column(s) path, label")


def test_kfold_needs_volumes_without_a_declared_split(tmp_path):
    folder = folder_of(tmp_path, ".npy", layout="csv")
    edit_csv(folder, lambda t: t.__setitem__("split", ["train"] * 9 + ["val"] * 3))
    refused(folder, "kfold", "every fold would be the same", split="kfold")


def test_a_single_class_and_a_missing_source(tmp_path):
    folder = folder_of(tmp_path, ".npy", layout="csv")
    edit_csv(folder, lambda t: t.__setitem__("label", ["only"] * 12))
    refused(folder, "only one class")
    refused(tmp_path / "typo", "typo", "does not exist")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "no labels.csv and no class sub-folders")


# ------------------------------------------------------------------ .npz data sets
def test_npz_data_set_problems_name_the_file_and_key(tmp_path):
    images = np.zeros((10, 6, 6, 6), dtype=np.uint8)
    path = tmp_path / "set.npz"
    np.savez(path, train_images=images)
    refused(path, "set.npz", "no train_labels")
    np.savez(path, train_images=images, train_labels=np.zeros((10, 3)))
    refused(path, "set.npz:train_labels", "multi-label")
    np.savez(path, volumes=images)
    refused(path, "set.npz", "keys: volumes")
    np.savez(path, train_images=images[:, :, :, 0], train_labels=np.arange(10) % 2)
    refused(path, "set.npz:train_images", "(N, D, H, W)")
    np.savez(path, images=images, labels=np.arange(10) % 2)
    truncate(path)
    refused(path, "set.npz", "cannot read")


# ------------------------------------------------------------------ the cache after a failure
def test_a_failed_rebuild_leaves_the_old_cache_untrusted(tmp_path):
    folder = folder_of(tmp_path, ".npy")
    good = load_data(DataConfig(source=str(folder)), SHAPE).fingerprint
    bad = a_volume(folder, ".npy", 2)
    saved = bad.read_bytes()
    truncate(bad)
    for attempt in (check_data, load_data):  # the pre-flight and a job: the same refusal
        with pytest.raises(DataError, match=bad.name):
            attempt(DataConfig(source=str(folder)), SHAPE)
    leftovers = [p.name for p in (folder / ".volclf-cache").rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []
    bad.write_bytes(saved)  # fixed: the content is the old one again, so is the fingerprint
    assert load_data(DataConfig(source=str(folder)), SHAPE).fingerprint == good


def test_a_cache_that_cannot_be_created_asks_for_a_cache_dir(tmp_path):
    folder = folder_of(tmp_path, ".npy")
    (folder / ".volclf-cache").write_text("not a folder")  # as good as a read-only data folder
    with pytest.raises(DataError, match="set data.cache_dir"):
        check_data(DataConfig(source=str(folder)), SHAPE)
    summary = check_data(DataConfig(source=str(folder), cache_dir=str(tmp_path / "cache")), SHAPE)
    assert summary["cache"].startswith(str(tmp_path / "cache"))
