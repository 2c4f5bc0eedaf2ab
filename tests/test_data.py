"""Real data: formats, layouts, splits, the preparation cache, and training on a folder of volumes.

Every data set is written into tmp_path by the test itself (volclf.data.synthetic.write_dataset
or a few lines of nibabel/numpy), so the tests show what a user's folder looks like.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import volclf.data.preparation as prep
from volclf.config import DataConfig, make_run_config
from volclf.data import check_data, dataset_name, load_data, prepare
from volclf.data.__main__ import main as data_cli
from volclf.data.formats import read_volume
from volclf.data.synthetic import write_dataset
from volclf.train import train

SHAPE = (12, 12, 12)  # the tiny cnn preset's input


def cfg_for(source: Path | str, **kw) -> DataConfig:
    return DataConfig(source=str(source), **kw)


def all_indices(data) -> tuple[set[int], set[int]]:
    return set(data.train.indices.tolist()), set(data.val.indices.tolist())


@pytest.fixture
def count_reads(monkeypatch):
    """How many volume files the preparation reads."""
    calls = []
    real = prep.read_volume

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(prep, "read_volume", counting)
    return calls


# ------------------------------------------------------------------ formats
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".npy", ".npz"])
def test_each_format_reads_back_the_written_volume(tmp_path, suffix):
    folder = write_dataset(tmp_path / "d", num_samples=3, shape=(5, 6, 7), suffix=suffix)
    files = sorted(folder.rglob(f"*{suffix}"))
    assert len(files) == 3
    from volclf.data.synthetic import make_volume, synthetic_labels

    labels = synthetic_labels(3, 3, 0)
    by_index = {int(p.name[3:7]): p for p in files}
    for i, path in by_index.items():
        volume = read_volume(path)
        assert volume.shape == (5, 6, 7)
        np.testing.assert_allclose(volume, make_volume(i, int(labels[i]), (5, 6, 7), 0, 0.6), rtol=1e-6)


def test_nifti_is_read_in_canonical_orientation_with_depth_along_the_slices(tmp_path):
    xyz = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)  # x=4, y=5, z=3 (3 slices)
    nib.save(nib.Nifti1Image(xyz, np.eye(4)), tmp_path / "ras.nii.gz")
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # stored right-to-left: canonical order flips x back
    nib.save(nib.Nifti1Image(xyz, flipped), tmp_path / "las.nii.gz")
    ras = read_volume(tmp_path / "ras.nii.gz")
    assert ras.shape == (3, 5, 4)  # (D, H, W) = (z, y, x)
    np.testing.assert_array_equal(ras, xyz.transpose(2, 1, 0))
    np.testing.assert_array_equal(read_volume(tmp_path / "las.nii.gz"), ras[:, :, ::-1])


def test_a_single_channel_is_dropped(tmp_path):
    v = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    np.save(tmp_path / "first.npy", v[None])
    np.save(tmp_path / "last.npy", v[..., None])
    nib.save(nib.Nifti1Image(v.transpose(2, 1, 0)[..., None], np.eye(4)), tmp_path / "t1.nii.gz")
    for name in ("first.npy", "last.npy", "t1.nii.gz"):
        np.testing.assert_array_equal(read_volume(tmp_path / name), v)


# ------------------------------------------------------------------ layouts
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".npy"])
def test_class_folders_load_at_the_input_shape(tmp_path, suffix):
    folder = write_dataset(tmp_path / "scans", num_samples=24, num_classes=3, shape=(14, 15, 16), suffix=suffix)
    data = load_data(cfg_for(folder), SHAPE)
    assert data.classes == ["ball", "rod", "shell"]  # from the folder names, sorted
    assert data.num_classes == 3
    assert len(data.train) + len(data.val) == 24 and len(data.val) == 6
    x, y = data.train[0]
    assert x.shape == (1, *SHAPE) and x.dtype == torch.float32 and 0 <= y < 3
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(unbiased=False)) - 1) < 1e-3  # the z-score
    val_labels = {data.val[i][1] for i in range(len(data.val))}
    assert val_labels == {0, 1, 2}  # stratified: every class on both sides
    assert data.fingerprint.startswith("data-") and data.source == str(folder)


def test_labels_csv_with_npy_volumes(tmp_path):
    folder = write_dataset(tmp_path / "set", num_samples=20, num_classes=2, shape=(8, 8, 8), layout="csv", suffix=".npy")
    data = load_data(cfg_for(folder), (4, 16, 16))  # the tiny vit input: a different shape on each axis
    assert data.classes == ["ball", "shell"]
    assert data.train[0][0].shape == (1, 4, 16, 16)
    # The same source given as the .csv file itself.
    same = load_data(cfg_for(folder / "labels.csv"), (4, 16, 16))
    assert same.fingerprint == data.fingerprint and all_indices(same) == all_indices(data)


def test_numeric_class_names_sort_as_numbers(tmp_path):
    folder = write_dataset(tmp_path / "n", num_samples=24, num_classes=3, shape=(6, 6, 6), layout="csv", suffix=".npy")
    table = pd.read_csv(folder / "labels.csv")
    table["label"] = table["label"].map({"ball": "2", "shell": "10", "rod": "1"})
    table.to_csv(folder / "labels.csv", index=False)
    assert load_data(cfg_for(folder), SHAPE).classes == ["1", "2", "10"]


def make_medmnist(path: Path, n=(30, 9, 9), shape=(8, 8, 8), classes=3, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(k, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(k) % classes).reshape(k, 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return path


def test_medmnist_npz_keeps_its_own_splits(tmp_path):
    path = make_medmnist(tmp_path / "organmnist3d.npz")
    data = load_data(cfg_for(path), SHAPE)
    assert (len(data.train), len(data.val)) == (30, 9)  # test (9) kept aside
    assert data.classes == ["0", "1", "2"]
    assert dataset_name(str(path)) == "organmnist3d"
    # Rows of the cache are the .npz's volumes in order, prepared by the documented method.
    with np.load(path) as npz:
        raw_val = npz["val_images"][4]
    np.testing.assert_allclose(data.val[4][0][0].numpy(), prep.preprocess(raw_val, SHAPE), atol=1e-6)
    assert data.val[4][1] == 4 % 3
    summary = check_data(cfg_for(path), SHAPE)
    assert summary["splits"] == {"train": 30, "val": 9, "test": 9}
    assert summary["layout"] == "npz" and summary["volumes"] == 48


def test_npz_without_splits_is_split_by_the_data_seed(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "set.npz", images=rng.normal(size=(24, 6, 6, 6)).astype(np.float32), labels=np.arange(24) % 2)
    data = load_data(cfg_for(tmp_path / "set.npz"), SHAPE)
    assert (len(data.train), len(data.val)) == (18, 6) and data.classes == ["0", "1"]


def test_dataset_name(tmp_path):
    (tmp_path / "My Scans").mkdir()
    assert dataset_name("synthetic") == "synthetic"
    assert dataset_name(str(tmp_path / "My Scans")) == "My-Scans"
    assert dataset_name(str(tmp_path / "My Scans") + "/") == "My-Scans"
    assert dataset_name(str(tmp_path / "My Scans" / "labels.csv")) == "My-Scans"
    assert dataset_name(str(tmp_path / "cohort_b.csv")) == "cohort_b"
    assert dataset_name(str(tmp_path / "nodulemnist3d.npz")) == "nodulemnist3d"


# ------------------------------------------------------------------ splits
def write_subject_csv(folder: Path, subjects: int = 12, per_subject: int = 3, classes: int = 3) -> Path:
    """labels.csv with several volumes per subject; a subject's volumes share its class."""
    write_dataset(folder, num_samples=subjects * per_subject, num_classes=classes, shape=(6, 6, 6), layout="csv",
                  suffix=".npy")
    table = pd.read_csv(folder / "labels.csv")
    table["subject"] = [f"s{i // per_subject:02d}" for i in range(len(table))]
    table["label"] = [f"c{(i // per_subject) % classes}" for i in range(len(table))]
    table.to_csv(folder / "labels.csv", index=False)
    return folder


@pytest.mark.parametrize("split", ["holdout", "kfold"])
def test_a_subject_is_never_on_both_sides(tmp_path, split):
    folder = write_subject_csv(tmp_path / "subj")
    subject = pd.read_csv(folder / "labels.csv")["subject"].to_numpy()
    for data_seed in range(4):
        cfg = cfg_for(folder, split=split, folds=3, data_seed=data_seed)
        for fold in range(3 if split == "kfold" else 1):
            train_idx, val_idx = all_indices(load_data(cfg, SHAPE, fold))
            assert not set(subject[list(train_idx)]) & set(subject[list(val_idx)])
            assert len(val_idx) > 0


def test_kfold_folds_partition_the_data(tmp_path):
    folder = write_dataset(tmp_path / "k", num_samples=30, num_classes=3, shape=(6, 6, 6), suffix=".npy")
    cfg = cfg_for(folder, split="kfold", folds=5, data_seed=3)
    vals = []
    for fold in range(5):
        train_idx, val_idx = all_indices(load_data(cfg, SHAPE, fold))
        assert not train_idx & val_idx and len(train_idx | val_idx) == 30
        vals.append(val_idx)
    assert set().union(*vals) == set(range(30)) and sum(map(len, vals)) == 30


def test_the_data_seed_fixes_the_split(tmp_path):
    folder = write_dataset(tmp_path / "s", num_samples=24, num_classes=2, shape=(6, 6, 6), suffix=".npy")
    a, b = (all_indices(load_data(cfg_for(folder, data_seed=s), SHAPE)) for s in (0, 0))
    c = all_indices(load_data(cfg_for(folder, data_seed=1), SHAPE))
    assert a == b and a != c


def test_an_explicit_split_column_wins(tmp_path):
    folder = write_dataset(tmp_path / "e", num_samples=24, num_classes=2, shape=(6, 6, 6), layout="csv", suffix=".npy")
    table = pd.read_csv(folder / "labels.csv")
    declared = ["train"] * 14 + ["val"] * 6 + ["test"] * 4
    table["split"] = declared
    table.to_csv(folder / "labels.csv", index=False)
    for data_seed in (0, 7):
        train_idx, val_idx = all_indices(load_data(cfg_for(folder, data_seed=data_seed), SHAPE))
        assert train_idx == set(range(14)) and val_idx == set(range(14, 20))
    # Rows left empty are split by the data seed, next to the declared ones.
    table["split"] = ["train"] * 4 + [""] * 16 + ["test"] * 4
    table.to_csv(folder / "labels.csv", index=False)
    train_idx, val_idx = all_indices(load_data(cfg_for(folder), SHAPE))
    assert set(range(4)) <= train_idx and not (train_idx | val_idx) & set(range(20, 24))
    assert len(val_idx) == 4  # a quarter of the 16 undecided volumes


# ------------------------------------------------------------------ the cache
def sources(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.rglob(f"*{suffix}") if ".volclf-cache" not in p.parts)


def cache_versions(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / ".volclf-cache").glob("*/*") if not p.name.startswith("."))


def test_the_cache_is_reused_without_reading_the_sources(tmp_path, count_reads):
    folder = write_dataset(tmp_path / "c", num_samples=12, num_classes=2, shape=(10, 10, 10))
    first = load_data(cfg_for(folder), SHAPE)
    assert len(count_reads) == 12
    (version,) = cache_versions(folder)
    stamp = (version / "volumes.npy").stat().st_mtime_ns
    second = load_data(cfg_for(folder), SHAPE)
    assert len(count_reads) == 12  # nothing read again
    assert (version / "volumes.npy").stat().st_mtime_ns == stamp
    assert second.fingerprint == first.fingerprint
    np.testing.assert_array_equal(second.train[0][0].numpy(), first.train[0][0].numpy())
    index = json.loads((version / "index.json").read_text())
    assert index["shape"] == list(SHAPE) and index["classes"] == first.classes
    assert index["fingerprint"] == first.fingerprint and len(index["files"]) == 12
    assert version.parent.name == "12x12x12-trilinear-robustz-v1"
    # Training reads the cache through a memory map.
    assert isinstance(first.train.source._array, np.memmap)


def test_a_changed_source_invalidates_the_cache(tmp_path, count_reads):
    folder = write_dataset(tmp_path / "c", num_samples=12, num_classes=2, shape=(10, 10, 10), suffix=".npy")
    first = load_data(cfg_for(folder), SHAPE)
    (old,) = cache_versions(folder)
    target = sources(folder, ".npy")[0]
    np.save(target, np.load(target)[::-1].copy())  # same size, new content
    count_reads.clear()
    second = load_data(cfg_for(folder), SHAPE)
    assert len(count_reads) == 12
    assert second.fingerprint != first.fingerprint
    (new,) = cache_versions(folder)  # the stale version is gone
    assert new != old
    # The run that mapped the old version keeps reading it (a running job is not disturbed).
    assert first.train[0][0].shape == (1, *SHAPE)


def test_a_touched_but_unchanged_source_keeps_the_cache(tmp_path, count_reads):
    folder = write_dataset(tmp_path / "c", num_samples=12, num_classes=2, shape=(10, 10, 10))
    first = load_data(cfg_for(folder), SHAPE)
    target = sources(folder, ".nii.gz")[3]
    os.utime(target, ns=(1, 1))  # e.g. copied without its times: the content hash decides
    count_reads.clear()
    assert load_data(cfg_for(folder), SHAPE).fingerprint == first.fingerprint
    assert count_reads == []


def test_a_new_volume_or_label_invalidates_the_cache(tmp_path):
    folder = write_dataset(tmp_path / "c", num_samples=12, num_classes=2, shape=(8, 8, 8), layout="csv", suffix=".npy")
    first = load_data(cfg_for(folder), SHAPE).fingerprint
    table = pd.read_csv(folder / "labels.csv")
    table.loc[0, "label"] = "shell" if table.loc[0, "label"] == "ball" else "ball"
    table.to_csv(folder / "labels.csv", index=False)
    assert load_data(cfg_for(folder), SHAPE).fingerprint != first


def test_each_shape_has_its_own_cache_and_cache_dir_moves_it(tmp_path):
    folder = write_dataset(tmp_path / "c", num_samples=12, num_classes=2, shape=(8, 8, 8))
    prepare(cfg_for(folder), SHAPE)
    prepare(cfg_for(folder), (4, 16, 16))
    assert sorted(p.name for p in (folder / ".volclf-cache").iterdir()) == [
        "12x12x12-trilinear-robustz-v1", "4x16x16-trilinear-robustz-v1"]
    elsewhere = tmp_path / "scratch"
    path = prepare(cfg_for(folder, cache_dir=str(elsewhere)), SHAPE)
    assert elsewhere in path.parents and (path / "volumes.npy").exists()


def test_a_killed_preparation_leaves_nothing_trusted_and_its_leftovers_are_removed(tmp_path):
    import socket
    import subprocess
    import sys

    folder = write_dataset(tmp_path / "c", num_samples=12, num_classes=2, shape=(8, 8, 8), suffix=".npy")
    key_dir = folder / ".volclf-cache" / "12x12x12-trilinear-robustz-v1"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dead = key_dir / f".tmp-{host}-{int(done.stdout)}-abc"  # what a killed preparation leaves
    alive = key_dir / f".tmp-{host}-{os.getpid()}-def"  # one still at work
    for p in (dead, alive):
        p.mkdir(parents=True)
        (p / "volumes.npy").write_bytes(b"half")
    load_data(cfg_for(folder), SHAPE)  # never takes a .tmp folder for a cache
    assert not dead.exists() and alive.exists()
    assert len(cache_versions(folder)) == 1


def test_the_dataset_pickles_small_and_works_in_loader_workers(tmp_path):
    folder = write_dataset(tmp_path / "c", num_samples=16, num_classes=2, shape=(8, 8, 8))
    data = load_data(cfg_for(folder), SHAPE)
    assert len(pickle.dumps(data.train)) < 5_000  # the path, not the volumes
    clone = pickle.loads(pickle.dumps(data.train))
    np.testing.assert_array_equal(clone[1][0].numpy(), data.train[1][0].numpy())
    plain = [b for b in DataLoader(data.train, batch_size=4)]
    # Forked workers (Linux's default) share the map; the pickle round trip above is what a
    # spawned worker gets.
    workers = list(DataLoader(data.train, batch_size=4, num_workers=2, multiprocessing_context="fork"))
    assert len(workers) == len(plain)
    for (x0, y0), (x1, y1) in zip(plain, workers):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_augmentation_is_off_by_default_and_keeps_shape(tmp_path):
    folder = write_dataset(tmp_path / "c", num_samples=12, num_classes=2, shape=(8, 8, 8), suffix=".npy")
    plain = load_data(cfg_for(folder), SHAPE)
    assert torch.equal(plain.train[0][0], plain.train[0][0])
    augmented = load_data(cfg_for(folder, augment=True), SHAPE)
    torch.manual_seed(0)
    draws = [augmented.train[0][0] for _ in range(4)]
    assert all(d.shape == (1, *SHAPE) for d in draws) and not all(torch.equal(draws[0], d) for d in draws[1:])
    assert not augmented.val.augment


def test_preprocess_scales_and_resamples():
    rng = np.random.default_rng(0)
    volume = (rng.normal(size=(40, 30, 6)) * 50 + 300).astype(np.int16)
    volume[0, 0, 0] = 30000  # a hot voxel: clipped, does not squash the rest
    out = prep.preprocess(volume, (10, 30, 12))
    assert out.shape == (10, 30, 12) and out.dtype == np.float32
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-4 and out.max() < 6


# ------------------------------------------------------------------ pre-flight, CLI, training
def test_check_data_summarises_and_prepares(tmp_path):
    folder = write_dataset(tmp_path / "c", num_samples=18, num_classes=3, shape=(14, 12, 10))
    summary = check_data(cfg_for(folder), SHAPE)
    assert summary["volumes"] == 18 and summary["classes"] == {"ball": 6, "rod": 6, "shell": 6}
    assert summary["num_classes"] == 3 and summary["splits"] == {"train": 13, "val": 5, "test": 0}
    assert summary["cache_built"] is True and Path(summary["cache"]).is_dir()
    assert summary["source_shapes"] == {"min": [14, 12, 10], "max": [14, 12, 10]}
    again = check_data(cfg_for(folder), SHAPE)
    assert again["cache_built"] is False and again["fingerprint"] == summary["fingerprint"]
    assert load_data(cfg_for(folder), SHAPE).fingerprint == summary["fingerprint"]
    synthetic = check_data(DataConfig(num_samples=48), SHAPE)
    assert synthetic["volumes"] == 48 and synthetic["cache"] is None
    assert synthetic["fingerprint"] == load_data(DataConfig(num_samples=48), SHAPE).fingerprint


def test_the_synthetic_set_is_unchanged():
    # Values from the synthetic loader before real data was added: same data, same splits.
    data = load_data(DataConfig(num_samples=48), (12, 12, 12))
    assert data.fingerprint == "synthetic-d2ede1405f240bcb"
    assert data.val.indices.tolist() == [0, 2, 5, 6, 9, 14, 15, 16, 23, 38, 40, 47]
    kfold = load_data(DataConfig(num_samples=60, split="kfold", folds=3, data_seed=5, num_classes=4), (4, 16, 16), 2)
    assert kfold.fingerprint == "synthetic-c7d4aa9d56dcfa67"
    assert kfold.val.indices.tolist() == [1, 2, 5, 6, 9, 11, 13, 14, 15, 16, 17, 18, 24, 33, 36, 37, 40, 47, 48, 56]


def test_prepare_command_line(tmp_path, capsys):
    folder = write_dataset(tmp_path / "c", num_samples=12, num_classes=2, shape=(8, 8, 8))
    assert data_cli(["prepare", str(folder), "--arch", "vit", "--preset", "tiny", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["input_shape"] == [4, 16, 16] and summary["cache_built"] is True
    assert data_cli(["prepare", str(folder), "--shape", "4", "16", "16"]) == 0
    out = capsys.readouterr().out
    assert "already prepared" in out and summary["fingerprint"] in out
    assert data_cli(["prepare", str(tmp_path / "nowhere"), "--shape", "8", "8", "8"]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_train_the_tiny_preset_on_a_folder_of_nifti_volumes(tmp_path, arch):
    folder = write_dataset(tmp_path / "scans", num_samples=24, num_classes=3, shape=(14, 14, 14), dtype="int16")
    cfg = make_run_config(campaign="t", arch=arch, run=0, seed=0, preset="tiny",
                          overrides={"data": {"source": str(folder)}, "train": {"num_workers": 0}},
                          results=tmp_path / "results")
    final = train(cfg)
    assert final["status"] == "completed"
    assert final["classes"] == ["ball", "rod", "shell"]
    config = json.loads((cfg.run_dir / "config.json").read_text())
    assert config["data_fingerprint"] == final["data_fingerprint"] == check_data(cfg.data, cfg.model.input_shape)["fingerprint"]
    assert config["train_samples"] + config["val_samples"] == 24
