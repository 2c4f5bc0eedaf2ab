"""Run folders -> records: read each file once, classify every run, drop nothing silently.

A campaign is ``RESULTS_DIR/<campaign>/`` with ``<arch>/run-<k>/`` folders and optionally
``launches.jsonl``. Each run ends up in exactly one state:

- ``completed`` / ``failed``: a readable ``final.json`` with that status;
- ``unfinished``: a folder without ``final.json`` (running, pending a requeue, interrupted);
- ``never_started``: named in ``launches.jsonl`` but without a folder;
- ``unreadable``: ``final.json`` is not valid JSON, lacks keys, or names another run.

Only ``completed`` runs enter the statistics. Problems with files that do not decide a run's
state (``config.json``, ``metrics.jsonl``, ``job.json``, a line of ``launches.jsonl``) are kept
as warnings that name the file.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from volclf import runs

COMPLETED, FAILED, UNFINISHED, NEVER_STARTED, UNREADABLE = (
    "completed", "failed", "unfinished", "never_started", "unreadable")
LAUNCHES = "launches.jsonl"
JOB = "job.json"
NOT_CAMPAIGNS = {"report", "logs"}  # folders the toolkit writes beside the runs
RUN_DIR = re.compile(r"run-(\d+)")
# Values of a completed run that the statistics need as numbers.
NUMERIC = ("best_epoch", "train_loss", "train_acc", "val_loss", "val_acc")
KNOWN_ARCHS = ("vit", "cnn")  # shown first, in this order; others follow alphabetically


@dataclass
class Run:
    """One run of a campaign, whatever its state."""

    campaign: str
    arch: str
    run: int
    path: Path
    status: str
    seed: int | None = None
    final: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows
    queue_wait_s: float | None = None
    slurm_job_id: str | None = None
    reason: str | None = None  # why failed or unreadable; what is known of a never-started run


@dataclass
class Campaign:
    """Every run found for one campaign, plus warnings about files that could not be read."""

    name: str
    path: Path
    runs: list[Run]
    warnings: list[tuple[Path, str]]  # (file, problem)

    @property
    def archs(self) -> list[str]:
        return arch_order({r.arch for r in self.runs})

    def with_status(self, *status: str) -> list[Run]:
        return [r for r in self.runs if r.status in status]


class Unreadable(Exception):
    """A file whose content cannot be used; the message names the problem."""


def arch_order(archs: set[str] | list[str]) -> list[str]:
    """vit, cnn, then any other architecture alphabetically."""
    return sorted(set(archs), key=lambda a: (KNOWN_ARCHS.index(a) if a in KNOWN_ARCHS else len(KNOWN_ARCHS), a))


def find_campaigns(results_dir: Path) -> list[str]:
    """Names of the campaign folders under ``results_dir`` (those with runs or a launch log)."""
    names = []
    for entry in _subdirs(results_dir):
        if entry.name in NOT_CAMPAIGNS:
            continue
        path = Path(entry.path)
        if (path / LAUNCHES).is_file() or any(_run_dirs(Path(a.path)) for a in _subdirs(path)):
            names.append(entry.name)
    return sorted(names)


def collect_campaign(results_dir: Path, name: str) -> Campaign:
    """Read every run folder of one campaign and its launch log."""
    root = Path(results_dir) / name
    warnings: list[tuple[Path, str]] = []
    found: dict[tuple[str, int], Run] = {}
    for arch_entry in _subdirs(root):
        if arch_entry.name in NOT_CAMPAIGNS:
            continue
        for k, run_path in _run_dirs(Path(arch_entry.path), warnings):
            found[(arch_entry.name, k)] = read_run(name, arch_entry.name, k, run_path, warnings)
    for (arch, k), launch in _read_launches(root / LAUNCHES, warnings).items():
        run = found.get((arch, k))
        if run is None:
            found[(arch, k)] = Run(name, arch, k, root / arch / f"run-{k}", NEVER_STARTED,
                                   slurm_job_id=launch["job_id"], reason=launch["text"])
        elif run.slurm_job_id is None and launch["job_id"] and run.status == UNFINISHED:
            run.slurm_job_id = launch["job_id"]
    order = {a: i for i, a in enumerate(arch_order({a for a, _ in found}))}
    ordered = sorted(found.values(), key=lambda r: (order[r.arch], r.run))
    return Campaign(name, root, ordered, warnings)


def read_run(campaign: str, arch: str, k: int, path: Path, warnings: list[tuple[Path, str]]) -> Run:
    """One run folder -> a :class:`Run` (never raises for bad content)."""
    run = Run(campaign, arch, k, path, UNFINISHED)
    try:
        run.config = _read_json(path / runs.CONFIG)
    except FileNotFoundError:
        pass
    except Unreadable as exc:
        warnings.append((path / runs.CONFIG, str(exc)))
    try:
        run.curve = read_metrics(path / runs.METRICS)
    except FileNotFoundError:
        pass
    except Unreadable as exc:
        warnings.append((path / runs.METRICS, f"{exc}; learning curve left out"))
    run.queue_wait_s = _queue_wait(path / JOB, warnings)
    try:
        final = _read_json(path / runs.FINAL)
    except FileNotFoundError:
        final = None
    except Unreadable as exc:
        run.status, run.reason, run.seed, run.curve = UNREADABLE, f"final.json: {exc}", _seed(run), []
        return run
    if final is not None:
        problem = check_final(final, arch, k)
        if problem:
            run.status, run.reason, run.seed, run.curve = UNREADABLE, f"final.json: {problem}", _seed(run), []
            return run
        run.final, run.status = final, final["status"]
        run.slurm_job_id = final.get("slurm_job_id")
        run.reason = final.get("error")
    run.seed = _seed(run)
    return run


def check_final(final: Any, arch: str, k: int) -> str | None:
    """What is wrong with a final record, or None if the report can use it."""
    if not isinstance(final, dict):
        return f"expected a JSON object, got {type(final).__name__}"
    missing = [key for key in runs.FINAL_KEYS if key not in final]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    if final["arch"] != arch or final["run"] != k:
        return f"records arch={final['arch']!r} run={final['run']!r}, but the folder is {arch}/run-{k}"
    if final["status"] not in (COMPLETED, FAILED):
        return f"status {final['status']!r} is neither 'completed' nor 'failed'"
    if final["status"] == FAILED:
        return None
    bad = [key for key in NUMERIC if not _is_number(final[key])]
    if bad:
        return f"completed, but {', '.join(bad)} not a number"
    classes, cm = final["classes"], final["confusion_matrix"]
    if not isinstance(classes, list) or not classes:
        return "completed, but 'classes' is not a non-empty list"
    if not (isinstance(cm, list) and len(cm) == len(classes) and all(
            isinstance(row, list) and len(row) == len(classes) and all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in row) for row in cm)):
        return f"completed, but confusion_matrix is not a {len(classes)}x{len(classes)} table of counts"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _seed(run: Run) -> int | None:
    for source in (run.final, (run.config or {}).get("run_config"), run.curve[-1] if run.curve else None):
        if isinstance(source, dict) and isinstance(source.get("seed"), int):
            return source["seed"]
    return None


def _read_json(path: Path) -> Any:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise Unreadable(f"cannot read ({exc.strerror})") from None
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unreadable(f"not valid JSON ({exc})" if text.strip() else "empty file") from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (a job killed mid-write) is dropped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise Unreadable(f"cannot read ({exc})") from None
    lines = [line for line in text.splitlines() if line.strip()]
    try:  # one parse for the whole file: the common case, and much faster than a parse per line
        rows = json.loads("[" + ",".join(lines) + "]")
    except ValueError:
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if i < len(lines) - 1:
                    raise Unreadable(f"line {i + 1} is not valid JSON") from None
    if not all(isinstance(row, dict) for row in rows):
        raise Unreadable("every line must be a JSON object")
    return rows


def _queue_wait(path: Path, warnings: list[tuple[Path, str]]) -> float | None:
    """Seconds between submission and start, where ``job.json`` says both."""
    try:
        job = _read_json(path)
    except FileNotFoundError:
        return None
    except Unreadable as exc:
        warnings.append((path, f"{exc}; queue wait unknown"))
        return None
    if not job.get("submitted_at") or not job.get("started_at"):
        return None  # a run trained outside a scheduler's queue: no wait to speak of
    try:
        return _timestamp(job["started_at"]) - _timestamp(job["submitted_at"])
    except (TypeError, ValueError) as exc:
        warnings.append((path, f"needs submitted_at and started_at as times ({exc!r}); queue wait unknown"))
        return None


def _timestamp(value: Any) -> float:
    """Seconds since the epoch from a number or an ISO 8601 string."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return datetime.fromisoformat(value).timestamp()


def _read_launches(path: Path, warnings: list[tuple[Path, str]]) -> dict[tuple[str, int], dict[str, Any]]:
    """(arch, run) -> the latest launch that named it: its job id and a line describing it."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        warnings.append((path, f"cannot read ({exc}); never-started runs unknown"))
        return {}
    launched: dict[tuple[str, int], dict[str, Any]] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            arch, run_ids = entry["arch"], entry["runs"]
            job_ids = entry.get("job_ids") or {}
            if not isinstance(arch, str) or not all(isinstance(k, int) for k in run_ids):
                raise TypeError("arch must be text and runs a list of integers")
        except (ValueError, KeyError, TypeError) as exc:
            warnings.append((path, f"line {i} unusable ({exc!r})"))
            continue
        for k in run_ids:
            job_id = job_ids.get(str(k))
            how = f"{entry.get('backend', '?')} job {job_id}" if job_id else f"{entry.get('backend', '?')} backend"
            launched[(arch, k)] = {"job_id": job_id, "text": f"launched {entry.get('time', '?')} ({how})"}
    return launched


def _subdirs(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return [e for e in it if e.is_dir() and not e.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _run_dirs(arch_dir: Path, warnings: list[tuple[Path, str]] | None = None) -> list[tuple[int, Path]]:
    """The ``run-<k>`` folders of one architecture folder, by run index."""
    found = []
    for entry in _subdirs(arch_dir):
        match = RUN_DIR.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), Path(entry.path)))
        elif entry.name.startswith("run-") and warnings is not None:
            warnings.append((Path(entry.path), "not a run folder name (expected run-<integer>); left out"))
    return sorted(found)
