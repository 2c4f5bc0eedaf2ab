"""Executing runs: the job object and the executors. The only module that imports submitit.

Scheduler-specific commands (sbatch, squeue, sacct, sinfo, scontrol) live in
:mod:`volclf.slurm`; this module maps volclf's generic resource names onto submitit's.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import submitit

from volclf.config import ResourceConfig, RunConfig
from volclf.errors import ConfigError
from volclf.train import JobInfo, Trainer

BACKENDS = ("slurm", "local", "debug")
GPU_REQUESTS = ("gres", "gpus", "gpus-per-node")


def default_backend() -> str:
    """SLURM where ``sbatch`` is on PATH (a login node), else this machine."""
    return "slurm" if shutil.which("sbatch") else "local"


class TrainingJob:
    """What a scheduler runs: one run. ``checkpoint()`` only saves and resubmits itself;
    the training function resumes from the run folder on any restart (FAIR's pattern)."""

    def __init__(self, cfg: RunConfig, cpus: int = 0, submitted_at: str | None = None):
        self.cfg = cfg
        self.cpus = cpus  # local runs: threads for this run; 0: what the scheduler granted
        self.submitted_at = submitted_at or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._trainer: Trainer | None = None

    def __call__(self) -> dict[str, Any]:
        self._trainer = Trainer(self.cfg, job_info(self.cpus, self.submitted_at))
        return self._trainer.fit()

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Runs inside submitit's handler for the requeue signal (preemption, time limit).
        if self._trainer is not None:
            self._trainer.checkpoint()
        return submitit.helpers.DelayedSubmission(TrainingJob(self.cfg, self.cpus, self.submitted_at))

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "cpus": self.cpus, "submitted_at": self.submitted_at, "_trainer": None}


def job_info(cpus: int = 0, submitted_at: str | None = None) -> JobInfo:
    """What the running job knows about itself (read at the job's boundary, not deep inside)."""
    try:
        env = submitit.JobEnvironment()
        paths = env.paths
        job_id, stdout, stderr = env.job_id, str(paths.stdout), str(paths.stderr)
    except RuntimeError:  # not inside a submitit job (a direct call of train())
        job_id, stdout, stderr = None, None, None
    slurm_id = job_id if os.environ.get("SLURM_JOB_ID") else None
    if not cpus:
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
    gpus = len([d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()])
    return JobInfo(slurm_job_id=slurm_id, host=socket.gethostname(), cpus=cpus, gpus=gpus,
                   stdout=stdout, stderr=stderr, submitted_at=submitted_at)


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time(text: str) -> int:
    """SLURM time ("MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS") in whole minutes."""
    m = _TIME.match(text.strip())
    if not m:
        raise ConfigError(f"time limit {text!r} is not a SLURM time; use e.g. 24:00:00 or 2-00:00:00")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = int(a), int(b or 0), int(c or 0)
        total_s = int(days) * 86400 + h * 3600 + mi * 60 + s
    elif c is not None:  # HH:MM:SS
        total_s = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        total_s = int(a) * 60 + int(b)
    else:  # MM
        total_s = int(a) * 60
    return max(1, -(-total_s // 60))


def format_time(minutes: int) -> str:
    d, rest = divmod(minutes, 1440)
    return f"{d}-{rest // 60:02d}:{rest % 60:02d}:00" if d else f"{rest // 60:02d}:{rest % 60:02d}:00"


def gpu_parameters(res: ResourceConfig) -> dict[str, Any]:
    """submitit parameters for the GPU request in the form the site wants."""
    if res.gpu_request not in GPU_REQUESTS:
        raise ConfigError(f"resources.gpu_request={res.gpu_request!r}; choose one of {', '.join(GPU_REQUESTS)}")
    if res.gpus <= 0:
        return {}
    typed = f"{res.gpu_type}:{res.gpus}" if res.gpu_type else str(res.gpus)
    if res.gpu_request == "gres":
        return {"slurm_gres": f"gpu:{typed}"}
    if res.gpu_request == "gpus":
        return {"slurm_additional_parameters": {"gpus": typed}}
    if res.gpu_type:
        return {"slurm_additional_parameters": {"gpus_per_node": typed}}
    return {"gpus_per_node": res.gpus}


def slurm_parameters(res: ResourceConfig, name: str) -> dict[str, Any]:
    """All submitit parameters of a SLURM job array."""
    params: dict[str, Any] = {
        "name": name,
        "cpus_per_task": res.cpus_per_task,
        "mem_gb": res.mem_gb,
        "timeout_min": parse_time(res.time),  # never submitit's 5-minute default
        "tasks_per_node": 1,
        "nodes": 1,
        # submitit writes --wckey=submitit unless told otherwise; sites that track wckeys
        # reject unknown ones, so it stays empty unless the profile names one.
        "slurm_wckey": res.wckey,
        "slurm_signal_delay_s": res.signal_delay_s,
    }
    if res.partition:
        params["slurm_partition"] = res.partition
    if res.account:
        params["slurm_account"] = res.account
    if res.qos:
        params["slurm_qos"] = res.qos
    # submitit throttles arrays to 256 tasks at once by default; 0 here means no throttle.
    params["slurm_array_parallelism"] = res.array_parallelism or 1_000_000
    if res.setup:
        params["slurm_setup"] = list(res.setup)
    gpu = gpu_parameters(res)
    extra = {**params.pop("slurm_additional_parameters", {}), **gpu.pop("slurm_additional_parameters", {})}
    params.update(gpu)
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def make_executor(backend: str, folder: Path, res: ResourceConfig, name: str) -> submitit.AutoExecutor:
    """A submitit executor for ``backend`` with the resource request applied (generic names)."""
    if backend not in BACKENDS:
        raise ConfigError(f"--cluster {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "slurm":
        executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster="slurm",
                                         slurm_max_num_timeout=res.max_requeues)
        executor.update_parameters(**slurm_parameters(res, name))
        return executor
    # Local job ids are process ids: one folder holds them all.
    executor = submitit.AutoExecutor(folder=folder, cluster=backend, local_max_num_timeout=res.max_requeues) \
        if backend == "local" else submitit.AutoExecutor(folder=folder, cluster="debug")
    if backend == "local":
        executor.update_parameters(timeout_min=parse_time(res.time))
    return executor


def submit_array(executor: submitit.Executor, jobs: list[TrainingJob]) -> list[submitit.Job]:
    """One submission for all jobs: a single job array on SLURM."""
    with executor.batch():
        handles = [executor.submit(job) for job in jobs]
    return handles


def batch_script(res: ResourceConfig, name: str, folder: Path, n_tasks: int) -> str:
    """The exact sbatch script submitit writes for an array of ``n_tasks`` (for --dry-run).

    Uses submitit's own script writer, as the submission does; the test cluster's tests
    compare this text with the script of a real submission.
    """
    slurm_executor = make_executor("slurm", folder, res, name)._executor
    if n_tasks > 1:
        slurm_executor.parameters["map_count"] = n_tasks  # what submitit sets for an array
    return slurm_executor._make_submission_file_text(slurm_executor._submitit_command_str, "dry-run")


def run_local(
    executor: submitit.Executor,
    jobs: list[TrainingJob],
    parallel: int,
    poll: Any = None,
    interval_s: float = 0.5,
) -> list[tuple[TrainingJob, submitit.Job | None]]:
    """Run jobs on this machine, at most ``parallel`` at once; ``poll(started)`` is called while waiting.

    submitit's local executor starts every job it is given at once, so the throttle lives here.
    On an interrupt the running jobs are cancelled (each resumes from its checkpoint next time).
    """
    import time

    waiting = list(jobs)
    started: list[tuple[TrainingJob, submitit.Job]] = []
    try:
        while waiting or any(not h.done() for _, h in started):
            running = sum(1 for _, h in started if not h.done())
            while waiting and running < parallel:
                job = waiting.pop(0)
                started.append((job, executor.submit(job)))
                running += 1
            if poll is not None:
                poll(started)
            time.sleep(interval_s)
        if poll is not None:
            poll(started)
    except BaseException:
        for _, handle in started:
            if not handle.done():
                handle.cancel(check=False)
        raise
    return [(job, handle) for job, handle in started] + [(job, None) for job in waiting]
