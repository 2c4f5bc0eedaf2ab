"""launch.py against a real SLURM controller: the project's one-node test cluster.

Start it with `make slurm-up` (Debian, root). The node advertises a CEDIA node (12 CPUs, 64 GB,
one `gpu:a100`); the GPU is the one thing mocked: gres.conf points it at /dev/null, since no
A100 exists here, and the jobs train on the CPU. Everything else is real: sbatch, job arrays,
squeue, sacct, preemption, requeue. Outside CI these tests skip when no cluster is up; with
CI=true they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, launch_cmd, subprocess_env
from volclf import runs, slurm
from volclf.config import make_run_config
from volclf.train import train

pytestmark = pytest.mark.slurm
SCRIPT = ROOT / "scripts" / "slurm-test-cluster.sh"
# The test jobs take a whole (fake) node, so they run one after another; tiny runs take ~10 s.
JOB_TIMEOUT = 300


def cluster_up() -> bool:
    try:
        proc = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and "UP" in proc.stdout


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    if not cluster_up():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no SLURM controller answers: .ci/run must start scripts/slurm-test-cluster.sh")
        pytest.skip("no SLURM test cluster: run `make slurm-up` (Debian, as root) to run these tests")
    yield


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {proc.stdout}{proc.stderr}")
    return proc


def launch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(launch_cmd(*args), capture_output=True, text=True, cwd=ROOT, env=subprocess_env(),
                          timeout=timeout)


def campaign_name() -> str:
    return "t" + uuid.uuid4().hex[:8]  # job ids restart with the cluster: never reuse a folder


def wait_for(predicate, timeout: float = JOB_TIMEOUT, what: str = "condition") -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise TimeoutError(f"timed out waiting for {what}; squeue:\n{sh('squeue', check=False).stdout}")
        time.sleep(0.5)


def array_id(stdout: str) -> str:
    m = re.search(r"as one job (?:array )?(\d+)", stdout)
    assert m, stdout
    return m.group(1)


def queue_of(name: str) -> str:
    return sh("squeue", "-h", "-r", "-n", name, "-o", "%i %T").stdout


def finals(results: Path, campaign: str, arch: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / campaign / arch).glob("run-*/final.json"))]


@pytest.mark.parametrize("arch", ["vit", "cnn"])
def test_one_array_of_five_with_the_cedia_request_then_relaunch_submits_nothing(results, arch):
    campaign = campaign_name()
    args = ["--arch", arch, "--n", "5", "--preset", "tiny", "--epochs", "1", "--campaign", campaign,
            "--results", str(results), "--cluster", "slurm"]
    proc = launch(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array = array_id(proc.stdout)
    shown = sh("scontrol", "show", "job", array).stdout
    tasks = re.findall(r"ArrayTaskId=(\S+)", shown)
    assert tasks, shown
    assert "NumCPUs=12" in shown and "CPUs/Task=12" in shown
    assert "mem=64G" in shown and "gres/gpu=1" in shown
    assert f"JobName=volclf-{arch}-{campaign}" in shown
    assert "TimeLimit=1-00:00:00" in shown  # the profile's 24 h, never submitit's 5 minutes
    launches = runs.read_jsonl(results / campaign / "launches.jsonl")
    assert len(launches) == 1
    assert sorted(launches[0]["job_ids"].values()) == [f"{array}_{k}" for k in range(5)]

    # While they are queued or running, a second launch refuses to submit them again.
    again = launch(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Nothing to do" in again.stdout and "still queued or running" in again.stdout
    assert len(runs.read_jsonl(results / campaign / "launches.jsonl")) == 1

    wait_for(lambda: len(finals(results, campaign, arch)) == 5, what="five final.json")
    done = finals(results, campaign, arch)
    assert [d["status"] for d in done] == ["completed"] * 5
    assert sorted(d["slurm_job_id"] for d in done) == [f"{array}_{k}" for k in range(5)]
    assert sorted(d["seed"] for d in done) == [0, 1, 2, 3, 4]
    wait_for(lambda: not queue_of(f"volclf-{arch}-{campaign}").strip(), what="the array to leave the queue")

    third = launch(*args)
    assert third.returncode == 0 and "Nothing to do" in third.stdout
    assert not queue_of(f"volclf-{arch}-{campaign}").strip()
    assert len(runs.read_jsonl(results / campaign / "launches.jsonl")) == 1


def test_dry_run_script_is_the_script_submitit_submits(results):
    campaign = campaign_name()
    args = ["--arch", "vit", "--n", "2", "--preset", "tiny", "--epochs", "1", "--campaign", campaign,
            "--results", str(results), "--cluster", "slurm"]
    dry = launch(*args, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert not (results / campaign / "launches.jsonl").exists()
    assert not queue_of(f"volclf-vit-{campaign}").strip()
    script = dry.stdout[dry.stdout.index("#!/bin/bash"):]
    proc = launch(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array = array_id(proc.stdout)
    submitted = (results / campaign / "logs" / array / f"{array}_submission.sh").read_text()
    expected = [ln for ln in submitted.splitlines() if ln.startswith("#SBATCH")]
    assert expected and expected == [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    wait_for(lambda: len(finals(results, campaign, "vit")) == 2, what="two runs")


PREFLIGHT_CASES = [
    (["--partition", "nosuch"], "partition 'nosuch' does not exist"),
    (["--gpu-type", "h100"], "GPU type 'h100' is not offered"),
    (["--set", "resources.cpus_per_task=13"], "13 CPUs per job"),
    (["--set", "resources.mem_gb=128"], "128 GB per job"),
    (["--partition", "short", "--time", "01:00:00"], "exceeds partition 'short'"),
    (["--time", "3-00:00:00"], "exceeds partition 'gpu'"),
    (["--data", "/no/such/volumes"], "/no/such/volumes"),
]


@pytest.mark.parametrize("extra,message", PREFLIGHT_CASES)
def test_preflight_refuses_before_anything_is_submitted(results, extra, message):
    campaign = campaign_name()
    proc = launch("--arch", "vit", "--n", "2", "--preset", "tiny", "--campaign", campaign,
                  "--results", str(results), "--cluster", "slurm", *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stdout
    assert "nothing was submitted" in proc.stdout or "error" in proc.stdout
    assert not queue_of(f"volclf-vit-{campaign}").strip()
    assert not (results / campaign / "launches.jsonl").exists()


def reference_run(tmp: Path, campaign: str, epochs: int, extra: dict) -> dict:
    """The same run, uninterrupted, in this process (same seed, same thread count)."""
    cfg = make_run_config(campaign=campaign, arch="vit", run=0, seed=0, preset="tiny", results=tmp,
                          overrides={"train": {"epochs": epochs, "threads": 1, **extra.get("train", {})},
                                     "data": extra.get("data", {})})
    return train(cfg)


SAME = ("best_epoch", "epochs", "train_loss", "train_acc", "val_loss", "val_acc", "confusion_matrix")
# Long enough to be interrupted mid-run: ~1 s per epoch here.
SLOW_RUN = ["--epochs", "12", "--set", "train.threads=1", "--set", "data.num_samples=600",
            "--set", "train.batch_size=4"]
SLOW_EXTRA = {"train": {"batch_size": 4}, "data": {"num_samples": 600}}


def start_slow_run(results: Path, campaign: str) -> tuple[str, Path]:
    proc = launch("--arch", "vit", "--n", "1", "--preset", "tiny", "--campaign", campaign, "--results", str(results),
                  "--cluster", "slurm", "--partition", "gpu", *SLOW_RUN)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = results / campaign / "vit" / "run-0"
    wait_for(lambda: (run_dir / "metrics.jsonl").exists(), what="the first epoch")
    return array_id(proc.stdout), run_dir


def test_preempted_run_is_requeued_and_ends_like_an_uninterrupted_one(results, tmp_path):
    campaign = campaign_name()
    job, run_dir = start_slow_run(results, campaign)
    # A job in the higher-priority partition needs the whole node: SLURM preempts ours
    # (USR2 first: submitit calls checkpoint() and requeues).
    sh("sbatch", "-p", "urgent", "--cpus-per-task=12", "--mem=64G", "-J", f"urgent-{campaign}", "-o", "/dev/null",
       "--wrap", "sleep 3")
    wait_for(lambda: "Restarts=1" in sh("scontrol", "show", "job", job, check=False).stdout, what="a requeue")
    wait_for(lambda: (run_dir / "final.json").exists(), what="the requeued run to finish")
    final = runs.read_json(run_dir / "final.json")
    assert final["status"] == "completed" and final["attempts"] >= 2, final
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log
    ref = reference_run(tmp_path / "ref", campaign, 12, SLOW_EXTRA)
    assert {k: final[k] for k in SAME} == {k: ref[k] for k in SAME}


def test_outside_requeue_resumes_from_the_run_folder(results, tmp_path):
    campaign = campaign_name()
    job, run_dir = start_slow_run(results, campaign)
    # `scontrol requeue` sends no USR2, only SIGTERM (submitit ignores it; the trainer writes a
    # checkpoint at the next step and exits): the job restarts its function from the start,
    # and the training function resumes by itself from the last checkpoint.
    sh("scontrol", "requeue", job)
    wait_for(lambda: (run_dir / "final.json").exists(), what="the requeued run to finish")
    final = runs.read_json(run_dir / "final.json")
    assert final["status"] == "completed" and final["attempts"] == 2, final
    assert "SIGTERM at epoch" in (run_dir / "train.log").read_text()
    ref = reference_run(tmp_path / "ref", campaign, 12, SLOW_EXTRA)
    assert {k: final[k] for k in SAME} == {k: ref[k] for k in SAME}


def status_rows(results: Path, campaign: str) -> str:
    proc = launch("status", "--campaign", campaign, "--results", str(results))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_status_names_cancelled_and_python_error_failures(results):
    campaign = campaign_name()
    job, run_dir = start_slow_run(results, campaign)
    sh("scancel", job)
    wait_for(lambda: not queue_of(f"volclf-vit-{campaign}").strip(), what="the cancelled job to leave")
    # A job that fails in Python: CUDA asked for where there is none (the login node cannot know).
    proc = launch("--arch", "cnn", "--n", "1", "--preset", "tiny", "--campaign", campaign, "--results", str(results),
                  "--cluster", "slurm", "--set", "train.device=cuda")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(lambda: (results / campaign / "cnn" / "run-0" / "final.json").exists(), what="the failing job")
    wait_for(lambda: not queue_of(f"volclf-cnn-{campaign}").strip(), what="the failed job to leave")
    out = status_rows(results, campaign)
    vit_line = next(ln for ln in out.splitlines() if " vit " in f" {ln} " and job in ln)
    assert "stopped" in vit_line and "cancelled" in vit_line
    cnn_line = next(ln for ln in out.splitlines() if " cnn " in f" {ln} ")
    assert "failed" in cnn_line and "Python error" in cnn_line


@pytest.fixture
def no_accounting():
    """The cluster restarted without slurmdbd (sacct has nothing), then restored."""
    sh("bash", str(SCRIPT), "up", "--no-accounting", timeout=180)
    try:
        yield
    finally:
        sh("bash", str(SCRIPT), "up", timeout=180)


def test_status_works_without_accounting(results, no_accounting):
    campaign = campaign_name()
    proc = launch("--arch", "vit", "--n", "1", "--preset", "tiny", "--epochs", "1", "--campaign", campaign,
                  "--results", str(results), "--cluster", "slurm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(lambda: (results / campaign / "vit" / "run-0" / "final.json").exists(), what="the run")
    job, run_dir = start_slow_run(results, campaign + "b")
    assert slurm.sacct([f"{job}_0"]) is None  # the cluster really has no accounting
    sh("scancel", job)
    wait_for(lambda: not queue_of(f"volclf-vit-{campaign}b").strip(), what="the cancelled job to leave")
    done = status_rows(results, campaign)
    assert "completed" in done
    stopped = status_rows(results, campaign + "b")
    assert "stopped" in stopped and "cancelled" in stopped
