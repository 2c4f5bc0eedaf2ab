"""A campaign: the runs a launch asks for, what the run folders say of them, and the launch record.

Every run has a stable identity (campaign, arch, run index, seed) and a fixed folder. A launch
compares what is asked with what is on disk (and, on SLURM, with what is queued) and submits
only what is missing or failed; ``launches.jsonl`` keeps each submission, so that status and
the report work from a new shell days later.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volclf import runs
from volclf.config import RunConfig, config_diff
from volclf.errors import ConfigError, PreflightError

LAUNCHES = "launches.jsonl"

# Differences in these keys do not make a run another run: where it runs and how it is executed.
EXECUTION_KEYS = ("results", "resources", "train.threads", "train.num_workers", "train.device", "data.cache_dir")


@dataclass(frozen=True)
class PlannedRun:
    cfg: RunConfig
    state: str  # new | partial | failed | completed | queued (SLURM: pending or running)
    action: str  # submit | resume | retry | skip
    note: str = ""


def campaign_dir(results: str | Path, campaign: str) -> Path:
    return Path(results) / campaign


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Differences between two resolved configurations that change what a run computes."""
    return [d for d in config_diff(old, new) if not d.startswith(EXECUTION_KEYS)]


def plan(cfgs: list[RunConfig], active: dict[tuple[str, int], str] | None = None) -> list[PlannedRun]:
    """What to do with each asked-for run; refuses a run folder made by another configuration."""
    active = active or {}
    out = []
    for cfg in cfgs:
        run_dir = cfg.run_dir
        config_path = run_dir / runs.CONFIG
        if config_path.exists():
            try:
                old = runs.read_json(config_path)["run_config"]
            except (OSError, ValueError, KeyError) as exc:
                raise PreflightError(f"{config_path}: unreadable ({exc}); delete the run folder to start the run again") from None
            diff = identity_diff(old, cfg.to_dict())
            if diff:
                raise PreflightError(
                    f"{run_dir} belongs to a run with another configuration:\n  " + "\n  ".join(diff)
                    + "\nUse another --campaign for a new configuration, or delete that run folder."
                )
        state = runs.run_state(run_dir)
        job = active.get((cfg.arch, cfg.run))
        if job and state != "completed":
            out.append(PlannedRun(cfg, "queued", "skip", f"job {job} is still queued or running"))
        elif state == "completed":
            out.append(PlannedRun(cfg, state, "skip", "completed"))
        elif state == "failed":
            out.append(PlannedRun(cfg, state, "retry", _failure(run_dir)))
        elif state == "partial":
            out.append(PlannedRun(cfg, state, "resume", "resumes from its last checkpoint"))
        else:
            out.append(PlannedRun(cfg, state, "submit", ""))
    return out


def _failure(run_dir: Path) -> str:
    try:
        error = runs.read_json(run_dir / runs.FINAL).get("error")
    except (OSError, ValueError):
        error = None
    return f"failed before: {error}" if error else "failed before"


def check_writable(results: str | Path, campaign: str) -> None:
    """The campaign folder can be created and written (before anything is submitted)."""
    folder = campaign_dir(results, campaign)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise PreflightError(f"results folder {folder} is not writable ({exc.strerror}); pass --results DIR") from None


def record_launch(results: str | Path, campaign: str, entry: dict[str, Any]) -> None:
    """Append one submission to the campaign's ``launches.jsonl``."""
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "user": getpass.getuser(),
        "host": socket.gethostname(),
        **entry,
    }
    runs.append_jsonl(campaign_dir(results, campaign) / LAUNCHES, entry)


def read_launches(results: str | Path, campaign: str) -> list[dict[str, Any]]:
    path = campaign_dir(results, campaign) / LAUNCHES
    if not path.exists():
        return []
    return runs.read_jsonl(path)


def latest_jobs(launches: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """The most recent submission of each (arch, run): job id, backend, time."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for entry in launches:
        for run, job_id in (entry.get("job_ids") or {}).items():
            out[(entry["arch"], int(run))] = {"job_id": str(job_id), "backend": entry.get("backend"),
                                              "time": entry.get("time")}
    return out


def validate_runs(n: int, runs_arg: str | None) -> list[int]:
    """Run indices from ``--n`` or an explicit ``--runs 0,3,4`` / ``--runs 2-4``."""
    if runs_arg:
        out: list[int] = []
        for part in runs_arg.split(","):
            part = part.strip()
            try:
                if "-" in part:
                    a, b = part.split("-", 1)
                    out += range(int(a), int(b) + 1)
                else:
                    out.append(int(part))
            except ValueError:
                raise ConfigError(f"--runs {runs_arg!r}: use indices like 0,2,4 or a range 0-4") from None
        if any(k < 0 for k in out):
            raise ConfigError(f"--runs {runs_arg!r}: run indices start at 0")
        return sorted(set(out))
    if n < 1:
        raise ConfigError(f"--n {n}: launch at least one run")
    return list(range(n))
