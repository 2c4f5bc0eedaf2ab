"""Volumes per second: read from the preparation cache vs read from the .nii.gz sources.

For each input size (the cnn presets' ``small`` 24³ and ``seed`` 190³ by default) it writes N
synthetic volumes as int16 ``.nii.gz`` files (a scanner's usual format) into a temporary
folder, prepares them (timed), then reads every volume REPEATS times both ways and reports the
median of the repeats:

- cache: through the training Dataset (memory-mapped ``volumes.npy`` -> (1, D, H, W) tensor);
- nifti: nibabel load + the same preprocessing (resample, robust z-score) -> the same tensor.

The sources are written at the input shape itself, so the direct path only decompresses and
scales (no resampling): the ratio is a lower bound for real scans, which need resampling too.
Both paths read files that are in the page cache (a warm node); a cold read from network storage
widens the gap further. Prints a table, the ratios, and one JSON line per result.

    .venv/bin/python bench/data.py [--sizes small seed] [--n-small 64] [--n-seed 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from volclf.config import DataConfig, load_preset
from volclf.data import VolumeDataset, load_data
from volclf.data.catalog import scan
from volclf.data.formats import read_volume
from volclf.data.preparation import preprocess
from volclf.data.synthetic import write_dataset


def input_shape(preset: str) -> tuple[int, int, int]:
    return tuple(load_preset("cnn", preset)["model"]["input_shape"])


def median_time(fn, repeats: int, min_s: float = 0.2) -> float:
    """Median seconds of one call of ``fn``; a fast ``fn`` is called several times per repeat."""
    start = time.perf_counter()
    fn()
    calls = max(1, math.ceil(min_s / max(time.perf_counter() - start, 1e-9)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def bench_size(name: str, n: int, repeats: int, root: Path) -> list[dict]:
    shape = input_shape(name)
    folder = root / name
    start = time.perf_counter()
    write_dataset(folder, num_samples=n, num_classes=2, shape=shape, dtype="int16", suffix=".nii.gz")
    write_s = time.perf_counter() - start
    source_mb = sum(p.stat().st_size for p in folder.rglob("*.nii.gz")) / 1e6

    start = time.perf_counter()
    data = load_data(DataConfig(source=str(folder)), shape)  # prepares the cache
    prepare_s = time.perf_counter() - start
    everything = VolumeDataset(data.train.source, data.train.labels, np.arange(n))

    def from_cache() -> None:
        for i in range(len(everything)):
            x, _ = everything[i]
            assert x.shape == (1, *shape)

    catalog = scan(str(folder))
    paths = [catalog.path(item.file) for item in catalog.items]

    def from_nifti() -> None:
        for path in paths:
            x = torch.from_numpy(preprocess(read_volume(path), shape)).unsqueeze(0)
            assert x.shape == (1, *shape)

    # The two paths give the same volumes (the cache holds exactly what the direct path computes).
    np.testing.assert_allclose(everything[0][0][0].numpy(), preprocess(read_volume(paths[0]), shape), atol=1e-5)
    cache_s, nifti_s = median_time(from_cache, repeats), median_time(from_nifti, repeats)
    common = {"bench": "data", "size": name, "shape": list(shape), "volumes": n, "repeats": repeats,
              "source_mb": round(source_mb, 2), "prepare_s": round(prepare_s, 3), "write_s": round(write_s, 2),
              "torch_threads": torch.get_num_threads()}
    return [
        {**common, "path": "cache", "median_s": cache_s, "volumes_per_s": n / cache_s,
         "speedup_vs_nifti": nifti_s / cache_s},
        {**common, "path": "nifti", "median_s": nifti_s, "volumes_per_s": n / nifti_s},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=("tiny", "small", "seed"), default=["small", "seed"])
    parser.add_argument("--n-small", type=int, default=64, help="volumes at the small and tiny sizes")
    parser.add_argument("--n-seed", type=int, default=8, help="volumes at the seed size (27 MB each prepared)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the volumes (default: a temp folder)")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="volclf-bench-data-") as tmp:
        for name in args.sizes:
            n = args.n_seed if name == "seed" else args.n_small
            console.print(f"[dim]{name}: writing {n} volumes of {input_shape(name)} as .nii.gz, preparing, reading...[/]")
            results += bench_size(name, n, args.repeats, Path(tmp))
    table = Table(title="volumes per second (median of repeats), one process")
    for col in ("size", "input", "volumes", "prepare s/vol", "cache vol/s", ".nii.gz vol/s", "cache speed-up"):
        table.add_column(col, justify="left" if col == "size" else "right")
    for cache, nifti in zip(results[::2], results[1::2]):
        table.add_row(
            cache["size"], "×".join(map(str, cache["shape"])), str(cache["volumes"]),
            f"{cache['prepare_s'] / cache['volumes']:.3f}", f"{cache['volumes_per_s']:.1f}",
            f"{nifti['volumes_per_s']:.1f}", f"{cache['speedup_vs_nifti']:.1f}×",
        )
    Console(width=120).print(table)
    for row in results:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
