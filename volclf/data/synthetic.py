"""A deterministic synthetic data set whose classes differ in 3D shape, not brightness.

Each volume holds one object at a random position, size and orientation, over a smooth
random background and Gaussian noise. The object's class is its shape: a solid ball, a
hollow shell, a rod along a random axis, a pair of small balls, a cube, a cross. Contrast
varies at random within each class and every volume is centred to zero mean, so a classifier
has to find structure (a convolution's or attention's job), not a brightness threshold.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

GENERATOR_VERSION = 1  # bump when make_volume changes: it is part of the data fingerprint
SHAPES = ("ball", "shell", "rod", "pair", "cube", "cross")


def class_names(num_classes: int) -> list[str]:
    """Names of the synthetic classes: shapes, repeated with a suffix beyond six."""
    return [SHAPES[k % len(SHAPES)] + ("" if k < len(SHAPES) else f"-{k // len(SHAPES)}") for k in range(num_classes)]


def synthetic_labels(num_samples: int, num_classes: int, data_seed: int) -> np.ndarray:
    """Balanced labels in a fixed random order."""
    rng = np.random.default_rng([data_seed, 0xC1A55])
    return rng.permutation(np.arange(num_samples) % num_classes).astype(np.int64)


def make_volume(
    index: int, label: int, shape: tuple[int, int, int], data_seed: int, noise: float
) -> np.ndarray:
    """Volume ``index`` of the set, as float32 (D, H, W) with roughly zero mean and unit scale."""
    rng = np.random.default_rng([data_seed, index])
    # Normalised coordinates in [-1, 1] on every axis: shapes scale with each axis.
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    centre = rng.uniform(-0.35, 0.35, size=3).astype(np.float32)
    r = np.float32(rng.uniform(0.3, 0.5))
    dz, dy, dx = z - centre[0], y - centre[1], x - centre[2]
    dist = np.sqrt(dz**2 + dy**2 + dx**2)
    kind = SHAPES[label % len(SHAPES)]
    if kind == "ball":
        obj = dist < r
    elif kind == "shell":
        obj = np.abs(dist - r) < 0.12
    elif kind == "rod":
        d = [dz, dy, dx]
        axis = int(rng.integers(3))
        across = np.sqrt(sum(d[i] ** 2 for i in range(3) if i != axis))
        obj = (across < 0.18) & (np.abs(d[axis]) < 1.6 * r)
    elif kind == "pair":
        offset = r * 0.7
        axis = int(rng.integers(3))
        d = [dz, dy, dx]
        a = sum((d[i] - (offset if i == axis else 0)) ** 2 for i in range(3))
        b = sum((d[i] + (offset if i == axis else 0)) ** 2 for i in range(3))
        obj = (np.sqrt(a) < r * 0.45) | (np.sqrt(b) < r * 0.45)
    elif kind == "cube":
        obj = np.maximum(np.maximum(np.abs(dz), np.abs(dy)), np.abs(dx)) < r * 0.8
    else:  # cross: three orthogonal bars
        thin = 0.12
        bars = [(np.abs(dy) < thin) & (np.abs(dx) < thin), (np.abs(dz) < thin) & (np.abs(dx) < thin),
                (np.abs(dz) < thin) & (np.abs(dy) < thin)]
        obj = (bars[0] | bars[1] | bars[2]) & (dist < 1.3 * r)
    obj = obj.astype(np.float32)
    # Smooth background: a random low-frequency field.
    freq = rng.uniform(0.5, 1.5, size=3).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3).astype(np.float32)
    background = 0.3 * np.sin(freq[0] * np.pi * z + phase[0]) * np.cos(freq[1] * np.pi * y + phase[1]) * np.sin(
        freq[2] * np.pi * x + phase[2]
    )
    contrast = np.float32(rng.uniform(1.5, 2.5))
    volume = contrast * obj + background + rng.normal(0.0, noise, size=shape).astype(np.float32)
    return (volume - volume.mean()).astype(np.float32)


def write_dataset(
    folder: str | Path,
    num_samples: int = 24,
    num_classes: int = 3,
    shape: tuple[int, int, int] = (16, 16, 16),
    *,
    layout: str = "folders",
    suffix: str = ".nii.gz",
    dtype: str = "float32",
    data_seed: int = 0,
    noise: float = 0.6,
) -> Path:
    """Write the synthetic set as files, the way a user's data set looks: for demos, tests, benchmarks.

    ``layout``: "folders" (one sub-folder per class) or "csv" (``labels.csv`` with path,label).
    ``suffix``: .nii.gz, .nii, .npy or .npz (one volume per file). An integer ``dtype`` stores
    round(100 × volume), like a scanner's integer voxels. NIfTI files are written so that
    volclf reads back the same (D, H, W) array (identity affine, axes (x, y, z) = (W, H, D)).
    """
    import nibabel as nib

    if layout not in ("folders", "csv"):
        raise ValueError(f"layout={layout!r}: choose 'folders' or 'csv'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = synthetic_labels(num_samples, num_classes, data_seed)
    names = class_names(num_classes)
    rows = ["path,label"]
    for i, label in enumerate(labels):
        volume = make_volume(i, int(label), shape, data_seed, noise)
        if np.dtype(dtype).kind in "iu":
            volume = np.round(volume * 100)
        volume = volume.astype(dtype)
        rel = Path(names[label]) / f"vol{i:04d}{suffix}" if layout == "folders" else Path(f"vol{i:04d}{suffix}")
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix in (".nii", ".nii.gz"):
            nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.eye(4)), path)  # (D, H, W) -> (x, y, z)
        elif suffix == ".npy":
            np.save(path, volume)
        elif suffix == ".npz":
            np.savez_compressed(path, volume=volume)
        else:
            raise ValueError(f"suffix={suffix!r}: choose .nii.gz, .nii, .npy or .npz")
        rows.append(f"{rel.as_posix()},{names[label]}")
    if layout == "csv":
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder
