"""Reading volumes from disk: NIfTI (nibabel), NumPy ``.npy``/``.npz``, the MedMNIST ``.npz`` layout.

Every reader returns arrays with axes (D, H, W) and raises :class:`DataError` naming the file
and what to do. Axis order:

- ``.npy``/``.npz``: the array's own order is taken as (D, H, W); a single channel, first or
  last, is dropped.
- NIfTI: nibabel's voxel array is first reoriented to the closest canonical orientation (RAS+:
  axes x→Right, y→Anterior, z→Superior), so volumes from scanners that store slices
  differently line up; the axes are then reversed to (z, y, x) = (D, H, W), so depth runs along
  the slice axis as in a stack of slices saved with NumPy. A 190 × 190 × 10 scan (10 slices)
  becomes the transformer's 10 × 190 × 190 input unchanged. A fourth axis of length 1 is dropped.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from volclf.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NUMPY_SUFFIXES = (".npy", ".npz")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + NUMPY_SUFFIXES
SPLITS = ("train", "val", "test")

# What nibabel, numpy, gzip and zipfile raise for a truncated or damaged file (the usual ones checked in
# tests/test_data_errors.py): reported as "cannot read", with the library's own words.
READ_ERRORS = (
    OSError, EOFError, ValueError, zlib.error, zipfile.BadZipFile, ImageFileError, HeaderDataError, WrapStructError,
)
_FIX_DAMAGED = "the file is truncated or damaged: copy it again from its origin, or remove it from the data set"


def volume_suffix(path: str | Path) -> str | None:
    """The volume format of a file name (``.nii.gz``, ``.nii``, ``.npy``, ``.npz``), or None."""
    name = str(path).lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)


def read_volume(path: Path) -> np.ndarray:
    """One volume file as a finite (D, H, W) array (its dtype as stored)."""
    suffix = volume_suffix(path)
    if suffix is None:
        raise DataError(f"{path}: not a supported volume format; use one of {', '.join(VOLUME_SUFFIXES)}")
    try:
        if suffix in NIFTI_SUFFIXES:
            array = _read_nifti(path)
        elif suffix == ".npy":
            array = _channel_squeezed(np.load(path, allow_pickle=False), str(path))
        else:
            array = _read_single_npz(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; fix its path in labels.csv or restore the file") from None
    except READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read it ({type(exc).__name__}: {exc}); {_FIX_DAMAGED}") from exc
    return check_volume(array, str(path))


def _read_nifti(path: Path) -> np.ndarray:
    image = nib.load(path)
    if len(image.shape) == 4 and image.shape[3] == 1:  # a 4D file holding one volume
        image = image.slicer[..., 0]
    if len(image.shape) == 3:
        image = nib.as_closest_canonical(image)
    array = np.asanyarray(image.dataobj)  # the voxel data, scaled by scl_slope/inter when set
    if array.ndim == 3:
        array = array.transpose(2, 1, 0)  # (x, y, z) RAS -> (D, H, W) = (z, y, x)
    return array


def _read_single_npz(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as npz:
        if len(npz.files) != 1:
            raise DataError(
                f"{path}: holds {len(npz.files)} arrays ({', '.join(npz.files) or 'none'}); a volume file "
                "must hold exactly one. Save one volume per file, or give the .npz itself as the data "
                "source if it is a whole data set (keys train_images/train_labels/... or images/labels)"
            )
        return _channel_squeezed(npz[npz.files[0]], str(path))


def _channel_squeezed(array: np.ndarray, where: str) -> np.ndarray:
    """Drop a single channel axis, first (1, D, H, W) or last (D, H, W, 1)."""
    if array.ndim == 4 and array.shape[0] == 1:
        return array[0]
    if array.ndim == 4 and array.shape[-1] == 1:
        return array[..., 0]
    return array


def check_volume(array: np.ndarray, where: str) -> np.ndarray:
    """The array itself if it is one finite, non-empty, real-valued 3D volume; else a DataError."""
    if array.ndim != 3:
        raise DataError(
            f"{where}: a volume of shape {tuple(array.shape)} (rank {array.ndim}); volclf needs one 3D volume "
            "(D, H, W) per file, with at most one channel. Save each volume on its own, or select its channel"
        )
    if array.size == 0:
        raise DataError(f"{where}: an empty volume of shape {tuple(array.shape)}; remove it from the data set")
    if array.dtype.kind not in "biuf":
        raise DataError(
            f"{where}: voxels of type {array.dtype}; volclf reads real numbers (integers or floats). "
            "Convert the volume (e.g. the magnitude of complex data)"
        )
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            nan = int(np.isnan(array).sum())
            inf = int(array.size - finite.sum()) - nan
            raise DataError(
                f"{where}: {nan} NaN and {inf} infinite voxel(s) out of {array.size}; replace them (e.g. "
                "numpy.nan_to_num) or remove the volume from the data set"
            )
    return array


def read_npz_labels(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """The labels of a whole data set in one .npz: split -> (name of its volume array, labels (N,) int64).

    Two layouts: MedMNIST's ``train_images``, ``train_labels``, ``val_images``, ... (volumes
    (N, D, H, W), labels (N,) or (N, 1)), or ``images`` and ``labels`` with no split (split "").
    Only the labels and the volume arrays' headers are read: this is cheap.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if "train_images" in keys:
                names = {s: (f"{s}_images", f"{s}_labels") for s in SPLITS if f"{s}_images" in keys}
            elif "images" in keys:
                names = {"": ("images", "labels")}
            else:
                raise DataError(
                    f"{path}: no data set layout recognised (keys: {', '.join(sorted(keys)) or 'none'}); an .npz "
                    "data source needs train_images/train_labels (and val_/test_, the MedMNIST layout) or "
                    "images/labels"
                )
            out = {}
            for split, (images_key, labels_key) in names.items():
                if labels_key not in keys:
                    raise DataError(f"{path}: has {images_key} but no {labels_key}; every image array needs its labels")
                shape, dtype = _npz_member_header(npz, images_key)
                _images_shape(shape, dtype, f"{path}:{images_key}")
                out[split] = (images_key, _npz_labels(npz[labels_key], shape[0], f"{path}:{labels_key}"))
            return out
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check data.source") from None
    except READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read it ({type(exc).__name__}: {exc}); {_FIX_DAMAGED}") from exc


def read_npz_images(path: Path, key: str) -> np.ndarray:
    """The volume array ``key`` of a data-set .npz, as (N, D, H, W) in its stored dtype."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            images = npz[key]
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; check data.source") from None
    except READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read {key} ({type(exc).__name__}: {exc}); {_FIX_DAMAGED}") from exc
    _images_shape(images.shape, images.dtype, f"{path}:{key}")
    if images.ndim == 5:
        images = images[..., 0] if images.shape[-1] == 1 else images[:, 0]
    return images


def _npz_member_header(npz: np.lib.npyio.NpzFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an array inside an .npz, from its header alone."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    with npz.zip.open(key + ".npy") as fh:
        version = np.lib.format.read_magic(fh)
        if version in readers:
            shape, _fortran, dtype = readers[version](fh)
            return shape, dtype
    array = npz[key]  # a header version without a public reader: read the array itself
    return array.shape, array.dtype


def _images_shape(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    ok = len(shape) == 4 or (len(shape) == 5 and 1 in (shape[1], shape[-1]))
    if not ok:
        raise DataError(f"{where}: shape {tuple(shape)}; a data set array must be (N, D, H, W) one-channel volumes")
    if dtype.kind not in "biuf":
        raise DataError(f"{where}: voxels of type {dtype}; volclf reads real numbers")


def _npz_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(
            f"{where}: labels of shape {tuple(labels.shape)}; volclf needs one class per volume, (N,) or (N, 1) "
            "(multi-label data sets are not supported)"
        )
    if len(labels) != n:
        raise DataError(f"{where}: {len(labels)} labels for {n} volumes; there must be one label per volume")
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}[{i}]: label {labels[i]!r} is missing or not a whole number; labels are class indices")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{where}: labels of type {labels.dtype}; an .npz data set needs integer class indices")
    return labels.astype(np.int64)
