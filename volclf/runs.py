"""The run folder: atomic writes, the files every run leaves, and reading them back.

A run folder is the run's identity (``results/<campaign>/<arch>/run-<k>/``) and is readable
without volclf: ``config.json``, ``metrics.jsonl``, ``final.json``, ``checkpoints/``,
``train.log`` and links to the job's stdout/stderr.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

CONFIG = "config.json"
METRICS = "metrics.jsonl"
FINAL = "final.json"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
LOG = "train.log"

# The keys of each metrics.jsonl line and of final.json (SPEC §3): one name everywhere.
METRIC_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "samples_per_s")
FINAL_KEYS = (
    "campaign", "arch", "run", "seed", "status", "best_epoch", "epochs", "train_loss", "train_acc",
    "val_loss", "val_acc", "classes", "confusion_matrix", "wall_time_s", "gpu_hours", "slurm_job_id", "error",
)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for the whole group
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda fh: fh.write(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n"))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write(path, lambda fh: fh.writelines(json.dumps(_clean(r)) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one line; a single write() of a short line, flushed to disk."""
    with open(path, "a") as fh:
        fh.write(json.dumps(_clean(row)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines of a JSON-lines file; a torn last line (a job killed mid-write) is ignored."""
    rows = []
    with open(path) as fh:
        lines = fh.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


def _clean(obj: Any) -> Any:
    """JSON has no NaN/Infinity: write them as null so any reader can parse the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def run_state(run_dir: Path) -> str:
    """``completed``, ``failed``, ``partial`` (a checkpoint or metrics, no final record) or ``new``."""
    run_dir = Path(run_dir)
    final = run_dir / FINAL
    if final.exists():
        try:
            return str(read_json(final).get("status", "failed"))
        except (OSError, ValueError):
            return "failed"
    if (run_dir / CHECKPOINTS / LAST).exists() or (run_dir / METRICS).exists():
        return "partial"
    return "new"
