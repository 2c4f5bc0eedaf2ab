"""launch.py on this machine: a real campaign through submitit's local executor, in subprocesses."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, launch_cmd, subprocess_env
from volclf import runs


def launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(launch_cmd(*args), capture_output=True, text=True, cwd=ROOT, env=subprocess_env(),
                          timeout=timeout)


def finals(root: Path, campaign: str, arch: str) -> dict[int, dict]:
    out = {}
    for path in sorted((root / campaign / arch).glob("run-*/final.json")):
        doc = json.loads(path.read_text())
        out[doc["run"]] = doc
    return out


@pytest.mark.slow
def test_local_campaign_runs_n_seeds_then_relaunch_does_nothing(results):
    args = ["--arch", "cnn", "--n", "3", "--preset", "tiny", "--cluster", "local", "--results", str(results),
            "--seed", "10"]
    proc = launch(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = finals(results, "synthetic", "cnn")  # default campaign: the data set's name
    assert sorted(done) == [0, 1, 2]
    assert [done[k]["seed"] for k in range(3)] == [10, 11, 12]
    assert all(d["status"] == "completed" for d in done.values())
    launches = runs.read_jsonl(results / "synthetic" / "launches.jsonl")
    assert len(launches) == 1 and launches[0]["runs"] == [0, 1, 2] and launches[0]["backend"] == "local"
    stamps = {k: (results / "synthetic" / "cnn" / f"run-{k}" / "final.json").stat().st_mtime_ns for k in range(3)}

    again = launch(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Nothing to do" in again.stdout and again.stdout.count("completed") >= 3
    assert stamps == {k: (results / "synthetic" / "cnn" / f"run-{k}" / "final.json").stat().st_mtime_ns for k in range(3)}
    assert len(runs.read_jsonl(results / "synthetic" / "launches.jsonl")) == 1


@pytest.mark.slow
def test_interrupted_campaign_relaunch_finishes_without_retraining(results):
    args = ["--arch", "vit", "--n", "3", "--preset", "tiny", "--cluster", "local", "--results", str(results),
            "--parallel", "1", "--epochs", "8", "--set", "data.num_samples=600", "--set", "train.batch_size=4"]
    proc = subprocess.Popen(launch_cmd(*args), cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = results / "synthetic" / "vit"
    end = time.time() + 240
    # Stop the launcher once run-0 is done and run-1 has finished an epoch.
    while not ((base / "run-0" / "final.json").exists() and (base / "run-1" / "metrics.jsonl").exists()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < end, "campaign did not progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "launch the same command again to resume" in out
    time.sleep(1.5)
    assert not (base / "run-1" / "final.json").exists(), "the interrupted run should have stopped"
    run0 = (base / "run-0" / "final.json").stat().st_mtime_ns

    again = launch(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    plan = again.stdout
    assert "resume" in plan and "skip" in plan
    done = finals(results, "synthetic", "vit")
    assert sorted(done) == [0, 1, 2] and all(d["status"] == "completed" for d in done.values())
    assert (base / "run-0" / "final.json").stat().st_mtime_ns == run0, "a finished run was retrained"
    assert done[1]["attempts"] == 2 and done[0]["attempts"] == 1
    assert [r["epoch"] for r in runs.read_jsonl(base / "run-1" / "metrics.jsonl")] == list(range(1, 9))


def test_changed_configuration_for_an_existing_campaign_is_refused(results):
    base = ["--arch", "vit", "--n", "1", "--preset", "tiny", "--cluster", "local", "--results", str(results)]
    assert launch(*base).returncode == 0
    proc = launch(*base, "--set", "train.lr=0.5")
    assert proc.returncode == 2
    assert "train.lr" in proc.stdout and "another --campaign" in proc.stdout


@pytest.mark.parametrize("args,expected", [
    (["--n", "0"], "--n 0"),
    (["--set", "train.nope=1"], "unknown key(s) nope"),
    (["--set", "trainlr"], "section.key=value"),
    (["--set", "model.depth=two"], "expected int"),
    (["--profile", "nowhere"], "no cluster profile 'nowhere'"),
    (["--data", "/no/such/folder"], "/no/such/folder"),
])
def test_bad_options_are_refused_with_a_message_naming_them(results, args, expected):
    proc = launch("--arch", "vit", "--preset", "tiny", "--cluster", "local", "--results", str(results), *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stdout
    assert not list(results.rglob("final.json")) and not list(results.rglob("launches.jsonl"))


def test_dry_run_local_submits_nothing(results):
    proc = launch("--arch", "cnn", "--n", "2", "--preset", "tiny", "--cluster", "local", "--results", str(results),
                  "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run" in proc.stdout
    assert not list(results.rglob("run-*")) and not list(results.rglob("launches.jsonl"))
