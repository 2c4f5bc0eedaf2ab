"""Everything that speaks SLURM: sinfo/scontrol checks, squeue/sacct state, failure categories.

The only module that runs scheduler commands (submission itself goes through submitit in
:mod:`volclf.cluster`). Each query is one call for all jobs, whatever N.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volclf.cluster import parse_time
from volclf.config import ResourceConfig
from volclf.errors import PreflightError

ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}
# sacct's final states, as a researcher would name them.
CATEGORIES = {
    "FAILED": "Python error",
    "OUT_OF_MEMORY": "out of memory",
    "TIMEOUT": "time limit",
    "NODE_FAIL": "node failure",
    "CANCELLED": "cancelled",
    "PREEMPTED": "preempted",
    "BOOT_FAIL": "node failure",
    "DEADLINE": "time limit",
    "COMPLETED": "completed",
}


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise PreflightError(f"`{cmd[0]}` is not on PATH: run this on a SLURM login node, or use --cluster local")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ pre-flight
@dataclass(frozen=True)
class NodeInfo:
    partition: str
    default: bool
    node: str
    cpus: int
    memory_mb: int
    gres: str
    time_limit_min: int | None  # None: infinite


def nodes() -> list[NodeInfo]:
    """One line per (partition, node) from a single ``sinfo`` call."""
    proc = _run(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G|%l"])
    if proc.returncode != 0:
        raise PreflightError(f"sinfo failed: {proc.stderr.strip()}")
    out = []
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        part, node, cpus, mem, gres, limit = line.split("|")
        out.append(NodeInfo(part.rstrip("*"), part.endswith("*"), node, int(cpus), int(re.sub(r"\D", "", mem) or 0),
                            gres, None if limit in ("infinite", "UNLIMITED") else parse_time(limit)))
    return out


def gres_gpus(gres: str) -> dict[str, int]:
    """``"gpu:a100:1(S:0),gpu:v100:2"`` -> ``{"a100": 1, "v100": 2}`` (untyped GPUs under "")."""
    found: dict[str, int] = {}
    for item in gres.split(","):
        item = re.sub(r"\(.*?\)", "", item).strip()
        parts = item.split(":")
        if not parts or parts[0] != "gpu":
            continue
        if len(parts) == 2:
            typ, count = "", parts[1]
        elif len(parts) >= 3:
            typ, count = parts[1], parts[2]
        else:
            continue
        try:
            found[typ] = found.get(typ, 0) + int(count)
        except ValueError:
            continue
    return found


def max_array_size() -> int | None:
    proc = _run(["scontrol", "show", "config"])
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", proc.stdout, re.M)
    return int(m.group(1)) if m else None


def preflight(res: ResourceConfig, n_tasks: int) -> None:
    """The request fits the cluster: partition, GPU type, CPUs, memory, time, array size."""
    table = nodes()
    partitions = sorted({n.partition for n in table})
    name = res.partition or next((n.partition for n in table if n.default), "")
    if not name:
        raise PreflightError(f"no partition given and the cluster has no default; pass --partition (one of {', '.join(partitions)})")
    members = [n for n in table if n.partition == name]
    if not members:
        raise PreflightError(f"partition {name!r} does not exist; partitions here: {', '.join(partitions)}. Pass --partition or fix the profile.")
    problems = []
    if res.gpus > 0:
        offered = {t: c for n in members for t, c in gres_gpus(n.gres).items()}
        if not offered:
            problems.append(f"partition {name!r} has no GPUs (GRES: {', '.join(sorted({n.gres for n in members}))}); choose a GPU partition")
        elif res.gpu_type and res.gpu_type not in offered:
            typed = ", ".join(sorted(t for t in offered if t)) or "untyped GPUs only"
            problems.append(f"GPU type {res.gpu_type!r} is not offered in partition {name!r} (it has: {typed}); pass --gpu-type with one of those")
        elif max(offered.get(res.gpu_type, 0) if res.gpu_type else sum(offered.values()), 0) < res.gpus:
            problems.append(f"{res.gpus} GPUs per job asked, partition {name!r} nodes have at most {max(offered.values())}")
    max_cpus = max(n.cpus for n in members)
    if res.cpus_per_task > max_cpus:
        problems.append(f"{res.cpus_per_task} CPUs per job asked, nodes of partition {name!r} have at most {max_cpus}; lower resources.cpus_per_task")
    max_mem = max(n.memory_mb for n in members)
    if res.mem_gb * 1024 > max_mem:
        problems.append(f"{res.mem_gb} GB per job asked, nodes of partition {name!r} have at most {max_mem // 1024} GB; lower resources.mem_gb")
    limits = [n.time_limit_min for n in members]
    want = parse_time(res.time)
    if None not in limits and want > max(limits):  # type: ignore[type-var]
        from volclf.cluster import format_time

        problems.append(f"time limit {res.time} exceeds partition {name!r}'s limit {format_time(max(limits))}; pass a shorter --time")  # type: ignore[type-var]
    if n_tasks > 1:
        limit = max_array_size()
        if limit is not None and n_tasks > limit:  # array indices run 0..n-1 < MaxArraySize
            problems.append(f"{n_tasks} runs exceed the cluster's MaxArraySize={limit}; launch fewer runs at once (--runs)")
    if problems:
        raise PreflightError("the job does not fit the cluster; nothing was submitted:\n  - " + "\n  - ".join(problems))


# ------------------------------------------------------------------ live state
def squeue(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """Live jobs among ``job_ids`` (array tasks as ``123_4``): state, reason, elapsed, node."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    proc = _run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i|%T|%r|%M|%N"])
    if proc.returncode != 0:  # ids the controller has forgotten make squeue fail: none is live
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 5:
            jid, state, reason, elapsed, node = parts
            out[jid] = {"state": state, "reason": "" if reason == "None" else reason, "elapsed": elapsed, "node": node}
    return out


def sacct(job_ids: list[str]) -> dict[str, dict[str, str]] | None:
    """Final states of ``job_ids`` from accounting; ``None`` where the cluster has no accounting."""
    if not job_ids or shutil.which("sacct") is None:
        return None
    arrays = sorted({j.split("_")[0] for j in job_ids})
    proc = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(arrays), "-o", "JobID,State,ExitCode,Elapsed,NodeList"])
    if proc.returncode != 0 or "not enabled" in proc.stderr or "accounting_storage/none" in proc.stderr:
        return None
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 5:
            jid, state, code, elapsed, node = parts
            out[jid] = {"state": state.split()[0], "exit_code": code, "elapsed": elapsed, "node": node}
    return out


def active_runs(results: str | Path, campaign: str) -> dict[tuple[str, int], str]:
    """Runs of the campaign whose latest job is still pending or running: never submit them twice."""
    from volclf.campaign import latest_jobs, read_launches

    latest = {k: v for k, v in latest_jobs(read_launches(results, campaign)).items() if v.get("backend") == "slurm"}
    live = squeue([v["job_id"] for v in latest.values()])
    return {k: v["job_id"] for k, v in latest.items() if live.get(v["job_id"], {}).get("state") in ACTIVE_STATES}


def log_category(stderr_text: str) -> str | None:
    """What slurmstepd wrote into the job's stderr when it killed the job, as a category."""
    if "DUE TO TIME LIMIT" in stderr_text:
        return "time limit"
    if "oom-kill" in stderr_text or "Out Of Memory" in stderr_text or "OUT_OF_MEMORY" in stderr_text:
        return "out of memory"
    if "DUE TO PREEMPTION" in stderr_text:
        return "preempted"
    if "DUE TO NODE FAILURE" in stderr_text:
        return "node failure"
    if re.search(r"CANCELLED AT", stderr_text):
        return "cancelled"
    if "Traceback (most recent call last)" in stderr_text:
        return "Python error"
    return None


def traceback_tail(stderr_text: str, lines: int = 3) -> str:
    """The last lines of the last Python traceback in a log."""
    idx = stderr_text.rfind("Traceback (most recent call last)")
    if idx < 0:
        return ""
    tail = [ln for ln in stderr_text[idx:].splitlines() if ln.strip()]
    return " | ".join(tail[-lines:])


def describe_state(entry: dict[str, Any]) -> str:
    return CATEGORIES.get(entry.get("state", ""), entry.get("state", "").lower())
