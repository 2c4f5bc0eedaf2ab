"""``python -m volclf.data prepare SRC --arch vit --preset seed`` (or ``--shape D H W``).

Lists, checks, splits and prepares a data source once, the way training will read it, and
prints a summary: run it on the login node after adding or changing volumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from volclf.config import ARCHS, PRESETS, DataConfig, make_run_config
from volclf.data import check_data
from volclf.errors import VolclfError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m volclf.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="check a data source and prepare its cache for a model's input shape")
    p.add_argument("source", help="a folder (labels.csv or class sub-folders), a labels .csv, or an .npz data set")
    p.add_argument("--arch", choices=ARCHS, help="take the input shape (and data settings) from this model's preset")
    p.add_argument("--preset", choices=PRESETS, default="seed", help="the preset of --arch (default: seed)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), help="the input shape, instead of --arch")
    p.add_argument("--cache-dir", default=None, help="where to cache (default: .volclf-cache next to the data)")
    p.add_argument("--split", choices=("holdout", "kfold"), default=None)
    p.add_argument("--folds", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--data-seed", type=int, default=None)
    p.add_argument("--workers", type=int, default=0, help="reading threads (default: up to 4)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if not args.arch and not args.shape:
        parser.error("give --arch (with --preset) or --shape D H W")
    overrides: dict[str, Any] = {"source": args.source}
    for name in ("cache_dir", "split", "folds", "val_fraction", "data_seed"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    try:
        if args.arch:
            run = make_run_config(campaign="prepare", arch=args.arch, run=0, seed=0, preset=args.preset,
                                  overrides={"data": overrides})
            data, shape = run.data, tuple(args.shape or run.model.input_shape)
        else:
            data, shape = DataConfig(**overrides), tuple(args.shape)
        started = time.time()
        summary = check_data(data, shape, workers=args.workers)
        summary["seconds"] = round(time.time() - started, 2)
    except VolclfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return 0


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    shape = "×".join(map(str, s["input_shape"]))
    table = Table(title=f"{s['dataset']}: {s['volumes']} volumes, {s['num_classes']} classes ({s['layout']})")
    table.add_column("class")
    table.add_column("volumes", justify="right")
    for name, count in s["classes"].items():
        table.add_row(name, str(count))
    console.print(table)
    splits = s["splits"]
    console.print(f"split ({s['split']}{', fold 0 of ' + str(s['folds']) if s['folds'] else ''}): "
                  f"{splits['train']} train, {splits['val']} val, {splits['test']} test kept aside")
    if s["source_shapes"]:
        lo, hi = ("×".join(map(str, v)) for v in (s["source_shapes"]["min"], s["source_shapes"]["max"]))
        console.print(f"source volumes from {lo} to {hi}, prepared at {shape}")
    if s["cache"] is None:
        console.print("synthetic set: generated when training, nothing to prepare")
    else:
        state = "prepared now" if s["cache_built"] else "already prepared, sources unchanged"
        console.print(f"cache: {s['cache']} ({state}, {s['seconds']} s)")
    console.print(f"data fingerprint: {s['fingerprint']}")


if __name__ == "__main__":
    sys.exit(main())
