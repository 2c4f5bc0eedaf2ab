"""The status of a campaign: run folders, the launch record and the scheduler, in one table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from volclf import runs, slurm
from volclf.campaign import latest_jobs, read_launches


def campaign_status(root: Path, campaign: str) -> list[dict[str, Any]]:
    """One row per run of the campaign (folders on disk and runs named in the launch record)."""
    latest = latest_jobs(read_launches(root, campaign))
    keys = set(latest)
    cdir = root / campaign
    for arch_dir in sorted(p for p in cdir.iterdir() if p.is_dir() and p.name not in ("logs", "report")):
        for run_dir in arch_dir.glob("run-*"):
            try:
                keys.add((arch_dir.name, int(run_dir.name.split("-", 1)[1])))
            except ValueError:
                continue
    slurm_ids = [v["job_id"] for v in latest.values() if v.get("backend") == "slurm"]
    live = slurm.squeue(slurm_ids)
    finished_ids = [j for j in slurm_ids if j not in live]
    acct = slurm.sacct(finished_ids) if finished_ids else {}
    rows = []
    for arch, run in sorted(keys):
        run_dir = cdir / arch / f"run-{run}"
        job = latest.get((arch, run), {})
        job_id = job.get("job_id") if job.get("backend") == "slurm" else None
        rows.append(_row(arch, run, run_dir, job_id, live, acct))
    return rows


def _row(arch: str, run: int, run_dir: Path, job_id: str | None, live: dict, acct: dict | None) -> dict[str, Any]:
    row: dict[str, Any] = {"arch": arch, "run": run, "job_id": job_id or "", "state": "", "reason": "",
                           "elapsed": "", "node": "", "epoch": "", "val_acc": None, "note": ""}
    metrics = []
    if (run_dir / runs.METRICS).exists():
        try:
            metrics = runs.read_jsonl(run_dir / runs.METRICS)
        except (OSError, ValueError) as exc:
            row["note"] = f"unreadable metrics ({exc})"
    epochs = _epochs(run_dir)
    if metrics:
        row["epoch"] = f"{metrics[-1].get('epoch')}/{epochs or '?'}"
    final = None
    if (run_dir / runs.FINAL).exists():
        try:
            final = runs.read_json(run_dir / runs.FINAL)
        except (OSError, ValueError):
            row["note"] = "final.json unreadable"
    if job_id and job_id in live:
        info = live[job_id]
        row.update(state=info["state"].lower(), reason=info["reason"], elapsed=info["elapsed"], node=info["node"])
        if final is None and info["state"] == "PENDING" and metrics:
            row["note"] = "requeued: resumes from its checkpoint"
        return row
    if final is not None:
        row["state"] = final.get("status", "?")
        row["val_acc"] = final.get("val_acc")
        row["elapsed"] = f"{final.get('wall_time_s', 0):.0f} s"
        row["node"] = final.get("host", "")
        if final.get("status") == "failed":
            tail = slurm.traceback_tail(_stderr_text(run_dir))
            row["note"] = f"Python error: {final.get('error')}" + (f" [{tail}]" if tail and tail not in str(final.get("error")) else "")
        elif final.get("attempts", 1) > 1:
            row["note"] = f"completed after {final['attempts'] - 1} requeue(s)"
        return row
    if not job_id:
        row["state"] = "unfinished" if metrics else "not started"
        return row
    # The job is gone from the queue and left no final record: why?
    entry = (acct or {}).get(job_id)
    log_text = _stderr_text(run_dir)
    category = slurm.describe_state(entry) if entry else slurm.log_category(log_text)
    row["state"] = "stopped"
    if entry:
        row.update(elapsed=entry["elapsed"], node=entry["node"])
    tail = slurm.traceback_tail(log_text)
    row["note"] = (category or "unknown (no accounting, nothing in the job's log)") + (f": {tail}" if tail else "")
    return row


def _epochs(run_dir: Path) -> int | None:
    try:
        return runs.read_json(run_dir / runs.CONFIG)["run_config"]["train"]["epochs"]
    except (OSError, ValueError, KeyError):
        return None


def _stderr_text(run_dir: Path) -> str:
    """The job's stderr (linked from the run folder), last 64 kB."""
    path = run_dir / "stderr.log"
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def status_table(root: Path, campaign: str) -> Table:
    table = Table(title=f"campaign {campaign}")
    for col in ("arch", "run", "job", "state", "reason", "elapsed", "node", "epoch", "val_acc", "note"):
        table.add_column(col, overflow="fold")
    for r in campaign_status(root, campaign):
        table.add_row(r["arch"], str(r["run"]), r["job_id"], r["state"], r["reason"], r["elapsed"], r["node"],
                      r["epoch"], "-" if r["val_acc"] is None else f"{r['val_acc']:.3f}", r["note"])
    return table
