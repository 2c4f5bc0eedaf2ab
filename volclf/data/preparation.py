"""Preparation: every volume brought once to the model's input shape and intensity scale, cached.

The method (``PREP_VERSION`` 1; changing it changes the cache key):

- **Shape.** Each axis is resampled to the target size by trilinear interpolation
  (``torch.nn.functional.interpolate``, ``align_corners=False``: voxel centres, the volume's
  full extent kept). An axis that shrinks by a factor f > 1 is first smoothed with a Gaussian of
  sigma (f - 1) / 2 voxels against aliasing (the rule of ``skimage.transform.resize``). Each
  axis is stretched on its own: voxel spacing and aspect ratio are not kept, as in the group's
  pipeline (every scan becomes the same grid).
- **Intensity.** Per volume, a robust z-score: clip to the volume's 0.5th and 99.5th
  percentiles (hot voxels, artefacts), then subtract the mean and divide by the standard
  deviation. A constant volume has no scale and is refused as broken.
- **Storage.** float32, one channel implied: ``volumes.npy`` is (N, D, H, W), rows in the
  catalog's order; the Dataset adds the channel axis.

The cache of a data source lives in ``.volclf-cache/`` inside the data folder (for an .npz or
.csv source: ``.volclf-cache/<file name>/`` beside it), or under ``data.cache_dir``::

    .volclf-cache/<D>x<H>x<W>-<method>-v<version>/<fingerprint>/volumes.npy, index.json

One array holds every volume (test ones too, kept aside by the split): the train/val split
depends on the run's data seed, split method and fold, so it is a set of row indices chosen at
load time, and one cache serves every split and every fold.

A version folder is immutable and appears in one ``rename`` once complete: a reader never sees
half a cache, and a failed or killed preparation leaves at most a ``.tmp-*`` folder that nothing
trusts. The index records every source file's size, modification time and SHA-256. A cache is
valid when the source listing is the same and every file has the recorded size and time; a file
whose size or time changed is hashed again, and a different hash makes the cache stale: the
next use prepares a new version and removes the old one. Concurrent preparations of the same
data are safe (the second rename loses and its copy is dropped), only wasted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from volclf import __version__
from volclf.data.catalog import Catalog, FileStat, Item, dataset_name
from volclf.data.formats import check_volume, read_npz_images, read_volume
from volclf.errors import DataError

log = logging.getLogger("volclf.data")

PREP_VERSION = 1
METHOD = "trilinear-robustz"
CLIP_PERCENTILES = (0.5, 99.5)
DTYPE = np.dtype(np.float32)
CACHE_DIRNAME = ".volclf-cache"
INDEX_FILE = "index.json"
VOLUMES_FILE = "volumes.npy"
INDEX_FORMAT = 1
MAX_PROBLEMS = 20  # stop reading after this many bad volumes: the user has enough to fix
STALE_TMP_S = 24 * 3600  # another node's .tmp-* folder this old belongs to a preparation that died


# ---------------------------------------------------------------- the method
def preprocess(volume: np.ndarray, shape: tuple[int, int, int], where: str = "volume") -> np.ndarray:
    """One (D, H, W) volume at the target shape and intensity scale, float32."""
    return scale_intensity(resample(volume, shape), where)


def resample(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear resampling to ``shape``, Gaussian-smoothed first along axes that shrink."""
    x = np.asarray(volume, dtype=np.float32)
    if x.shape == tuple(shape):
        return np.array(x, copy=True)
    factors = np.array(x.shape, dtype=np.float64) / np.array(shape, dtype=np.float64)
    sigma = np.maximum(0.0, (factors - 1) / 2)
    if (sigma > 0).any():
        x = ndimage.gaussian_filter(x, sigma, mode="nearest")
    x = np.ascontiguousarray(x)
    if not x.flags.writeable:
        x = x.copy()  # torch.from_numpy wants memory it may write to
    t = torch.from_numpy(x)[None, None]  # (D, H, W) -> (1, 1, D, H, W)
    out = F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def scale_intensity(volume: np.ndarray, where: str = "volume") -> np.ndarray:
    """Robust per-volume z-score: clip to the 0.5–99.5th percentiles, zero mean, unit std (in place)."""
    lo, hi = np.percentile(volume, CLIP_PERCENTILES)
    np.clip(volume, lo, hi, out=volume)
    mean, std = float(volume.mean(dtype=np.float64)), float(volume.std(dtype=np.float64))
    if not std > 0:
        raise DataError(
            f"{where}: every voxel has the value {mean:g} (after clipping to the "
            f"{CLIP_PERCENTILES[0]}–{CLIP_PERCENTILES[1]}th percentiles): an empty or broken volume. "
            "Remove it from the data set"
        )
    volume -= np.float32(mean)
    volume /= np.float32(std)
    return volume


def cache_key(shape: tuple[int, int, int]) -> str:
    """The cache folder name for a target shape and this preparation method."""
    return "x".join(str(int(n)) for n in shape) + f"-{METHOD}-v{PREP_VERSION}"


def cache_root(catalog: Catalog, cache_dir: str = "") -> Path:
    """Where the caches of a data source live: next to the data, or under ``cache_dir``."""
    source = catalog.source
    if cache_dir:
        tag = hashlib.sha256(str(source).encode()).hexdigest()[:8]
        return Path(cache_dir).expanduser().resolve() / f"{dataset_name(str(source))}-{tag}"
    if source.is_dir():
        return source / CACHE_DIRNAME
    return source.parent / CACHE_DIRNAME / source.name  # several .npz/.csv sources may share a folder


# ---------------------------------------------------------------- the cache
@dataclass(frozen=True)
class Prepared:
    """A valid cache: its version folder, its index, and whether it was built by this call."""

    path: Path
    index: dict[str, Any]
    built: bool

    @property
    def volumes_path(self) -> Path:
        return self.path / VOLUMES_FILE


def ensure_prepared(
    catalog: Catalog, shape: tuple[int, int, int], cache_dir: str = "", workers: int = 0
) -> Prepared:
    """The valid cache of ``catalog`` at ``shape``, prepared now if missing or stale."""
    key_dir = cache_root(catalog, cache_dir) / cache_key(shape)
    found = find_valid(catalog, key_dir)
    if found is not None:
        return Prepared(found, read_index(found), built=False)
    log.info("preparing %d volumes of %s at %s into %s", len(catalog.items), catalog.source, shape, key_dir)
    path = build(catalog, shape, key_dir, workers)
    index = read_index(path)
    log.info("prepared %s in %.1f s (%s)", path, index["seconds"], index["fingerprint"])
    return Prepared(path, index, built=True)


def read_index(version_dir: Path) -> dict[str, Any]:
    with open(version_dir / INDEX_FILE) as fh:
        return json.load(fh)


def find_valid(catalog: Catalog, key_dir: Path) -> Path | None:
    """The version folder under ``key_dir`` that matches the sources as they are now, if any."""
    if not key_dir.is_dir():
        return None
    digest = catalog.digest()
    for version in sorted(key_dir.iterdir()):
        if version.name.startswith(".") or not version.is_dir():
            continue
        try:
            index = read_index(version)
        except (OSError, ValueError):
            continue  # not a cache this code wrote: never trusted, removed by the next build
        if index.get("format") == INDEX_FORMAT and index.get("catalog_digest") == digest and _unchanged(catalog, index):
            return version
    return None


def _unchanged(catalog: Catalog, index: dict[str, Any]) -> bool:
    recorded = index.get("files", {})
    for file, stat in catalog.files.items():
        rec = recorded.get(file)
        if rec is None:
            return False
        if rec["size"] == stat.size and rec["mtime_ns"] == stat.mtime_ns:
            continue
        # Touched or copied without its times: the content decides.
        if rec["size"] != stat.size or file_sha256(catalog.path(file)) != rec["sha256"]:
            return False
    return True


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def build(catalog: Catalog, shape: tuple[int, int, int], key_dir: Path, workers: int = 0) -> Path:
    """Prepare every volume into a new version folder under ``key_dir``; all or nothing."""
    started = time.time()
    created = _make_dirs(key_dir)
    n = len(catalog.items)
    nbytes = n * int(np.prod(shape)) * DTYPE.itemsize
    _remove_dead_tmp(key_dir)  # space left by a preparation that was killed
    free = shutil.disk_usage(key_dir).free
    if free < nbytes * 1.02 + (64 << 20):
        _remove_empty(created)
        raise DataError(
            f"preparing {n} volumes at {shape} needs {nbytes / 2**30:.1f} GiB in {key_dir}, but only "
            f"{free / 2**30:.1f} GiB are free; free space or set data.cache_dir to a larger disk"
        )
    tmp = Path(tempfile.mkdtemp(dir=key_dir, prefix=f".tmp-{socket.gethostname()}-{os.getpid()}-"))
    try:
        files, source_shapes = _write_volumes(catalog, shape, tmp / VOLUMES_FILE, workers)
        fingerprint = data_fingerprint(catalog, shape, {f: r["sha256"] for f, r in files.items()})
        index = {
            "format": INDEX_FORMAT,
            "fingerprint": fingerprint,
            "dataset": dataset_name(str(catalog.source)),
            "source": str(catalog.source),
            "layout": catalog.layout,
            "shape": list(shape),
            "dtype": DTYPE.name,
            "method": {
                "name": METHOD, "version": PREP_VERSION,
                "resample": "per-axis trilinear (align_corners=False) after Gaussian anti-aliasing, sigma=(f-1)/2",
                "intensity": f"clip to percentiles {list(CLIP_PERCENTILES)}, then zero mean and unit std per volume",
            },
            "classes": list(catalog.classes),
            "catalog_digest": catalog.digest(),
            "files": files,
            "items": [
                {"key": it.key, "file": it.file, "label": it.label, "split": it.split, "subject": it.subject,
                 "source_shape": list(s)}
                for it, s in zip(catalog.items, source_shapes)
            ],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - started, 3),
            "volclf": __version__,
        }
        with open(tmp / INDEX_FILE, "w") as fh:
            fh.write(json.dumps(index, indent=1) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the cache is for the whole group
        final = key_dir / fingerprint.removeprefix("data-")
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process prepared the same data first: use its copy if it is sound.
            if find_valid(catalog, key_dir) != final:
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # its own error is secondary to the one raised
        _remove_empty(created)
        raise
    _remove_stale(key_dir, keep=final)
    return final


def data_fingerprint(catalog: Catalog, shape: tuple[int, int, int], hashes: dict[str, str]) -> str:
    """What identifies prepared data: the listing, every file's content, the shape and method."""
    doc = {
        "catalog": catalog.digest(),
        "content": sorted(hashes.items()),
        "shape": list(shape),
        "method": [METHOD, PREP_VERSION],
    }
    return "data-" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _write_volumes(
    catalog: Catalog, shape: tuple[int, int, int], path: Path, workers: int
) -> tuple[dict[str, dict[str, Any]], list[tuple[int, ...]]]:
    """Read, prepare and write every volume in order; collect the problems of all bad ones."""
    n = len(catalog.items)
    files: dict[str, dict[str, Any]] = {}
    source_shapes: list[tuple[int, ...]] = []
    problems: list[str] = []
    tasks = _tasks(catalog, shape, files)
    with open(path, "wb") as fh:
        header = {"descr": np.lib.format.dtype_to_descr(DTYPE), "fortran_order": False, "shape": (n, *shape)}
        np.lib.format.write_array_header_2_0(fh, header)
        for result in _ordered_map(tasks, n, workers or default_workers()):
            if isinstance(result, DataError):
                problems.append(str(result))
                if len(problems) >= MAX_PROBLEMS:
                    break
                continue
            volume, source_shape = result
            if not problems:  # after a problem the file is discarded anyway
                fh.write(volume.tobytes())
            source_shapes.append(source_shape)
        if problems:
            stopped = f" (stopped after {MAX_PROBLEMS})" if len(problems) >= MAX_PROBLEMS else ""
            raise DataError(
                f"{len(problems)} unusable volume(s) in {catalog.source}{stopped}:\n  " + "\n  ".join(problems)
                + "\nFix or remove these files; nothing was cached"
            )
        fh.flush()
        os.fsync(fh.fileno())
    return files, source_shapes


def _tasks(catalog: Catalog, shape: tuple[int, int, int], files: dict[str, dict[str, Any]]) -> Callable[[int], Any]:
    """``task(i)`` -> (prepared volume i, its source shape); records each source file's identity."""
    if catalog.layout == "npz":
        file = next(iter(catalog.files))
        files[file] = _identify(catalog, file)
        arrays: dict[str, np.ndarray] = {}
        for key in sorted({it.member[0] for it in catalog.items if it.member}):
            arrays[key] = read_npz_images(catalog.path(file), key)

        def task(i: int) -> tuple[np.ndarray, tuple[int, ...]]:
            item = catalog.items[i]
            key, j = item.member
            raw = check_volume(arrays[key][j], item.key)
            return preprocess(raw, shape, item.key), raw.shape

        return task

    def task(i: int) -> tuple[np.ndarray, tuple[int, ...]]:
        item: Item = catalog.items[i]
        identity = _identify(catalog, item.file)
        raw = read_volume(catalog.path(item.file))
        if _stat(catalog.path(item.file)) != (identity["size"], identity["mtime_ns"]):
            raise DataError(f"{catalog.path(item.file)}: changed while it was being prepared; prepare again")
        files[item.file] = identity
        return preprocess(raw, shape, str(catalog.path(item.file))), raw.shape

    return task


def _identify(catalog: Catalog, file: str) -> dict[str, Any]:
    path = catalog.path(file)
    size, mtime_ns = _stat(path)
    listed: FileStat = catalog.files[file]
    if (size, mtime_ns) != (listed.size, listed.mtime_ns):
        raise DataError(f"{path}: changed after the data set was listed; prepare again")
    return {"size": size, "mtime_ns": mtime_ns, "sha256": file_sha256(path)}


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def default_workers() -> int:
    """Threads for preparation: a few (it may run on a shared login node)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def _ordered_map(task: Callable[[int], Any], n: int, workers: int) -> Iterator[Any]:
    """``task(0) .. task(n-1)`` in order, a DataError returned as the result; at most 2×workers ahead."""

    def call(i: int) -> Any:
        try:
            return task(i)
        except DataError as exc:
            return exc

    if workers <= 1:
        for i in range(n):
            yield call(i)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="volclf-prepare")
    try:
        pending: deque = deque()
        nxt = 0
        while pending or nxt < n:
            while nxt < n and len(pending) < 2 * workers:
                pending.append(pool.submit(call, nxt))
                nxt += 1
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p that returns the folders it created (to remove them again after a failure)."""
    created = []
    p = path
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the preparation cache {path} ({exc.strerror}); set data.cache_dir to a writable "
            "folder (--set data.cache_dir=DIR)"
        ) from exc
    if not os.access(path, os.W_OK):
        raise DataError(f"the preparation cache {path} is not writable; set data.cache_dir to a writable folder")
    return created[::-1]


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders this call created, deepest first, if they are empty."""
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            break  # not empty: another preparation uses it


def _remove_stale(key_dir: Path, keep: Path) -> None:
    """Drop the older versions: a running job keeps reading its open map of one."""
    for p in key_dir.iterdir():
        if p != keep and p.is_dir() and not p.name.startswith("."):
            # Best effort: a concurrent cleaner, or NFS's placeholders of open files, may be in the way.
            shutil.rmtree(p, ignore_errors=True)
    _remove_dead_tmp(key_dir)


def _remove_dead_tmp(key_dir: Path) -> None:
    """Remove ``.tmp-<host>-<pid>-*`` folders of preparations that died (killed, node lost)."""
    host, now = socket.gethostname(), time.time()
    for p in key_dir.glob(".tmp-*"):
        owner, _, rest = p.name.removeprefix(".tmp-").rpartition("-")
        owner_host, _, pid = owner.rpartition("-")
        if owner_host == host and pid.isdigit():
            dead = not _alive(int(pid))
        else:  # another node's: only its age tells
            try:
                dead = now - p.stat().st_mtime > STALE_TMP_S
            except FileNotFoundError:
                continue
        if dead:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- reading
class CachedVolumes:
    """The prepared volumes of a cache, memory-mapped; pickles as its path (a worker maps it again)."""

    def __init__(self, path: Path, n: int, shape: tuple[int, int, int]):
        self.path, self.n, self.shape = Path(path), n, tuple(shape)
        self._array: np.ndarray | None = None

    def open(self) -> CachedVolumes:
        """Map the file now (a forked DataLoader worker then shares the map)."""
        if self._array is None:
            try:
                array = np.load(self.path, mmap_mode="r")
            except FileNotFoundError:
                raise DataError(
                    f"{self.path}: the prepared volumes are gone (the cache was rebuilt after a source changed, "
                    "or deleted) while this run was using them; start the run again"
                ) from None
            if array.shape != (self.n, *self.shape):
                raise DataError(f"{self.path}: holds {array.shape}, expected {(self.n, *self.shape)}; delete the folder")
            self._array = array
        return self

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> np.ndarray:
        return self.open()._array[index]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_array"] = None  # a memmap would pickle as a full copy of the data
        return state
