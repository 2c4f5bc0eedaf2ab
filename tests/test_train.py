"""Training: the run folder, exact resumption after a kill or a stop signal, NaN, no retraining."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, subprocess_env
from volclf import runs
from volclf.config import make_run_config
from volclf.errors import ConfigError
from volclf.train import lr_factor, train

TIMING_KEYS = {"epoch_time_s", "samples_per_s"}


def tiny(results: Path, arch: str = "vit", epochs: int = 2, samples: int = 48, **train_over) -> object:
    over = {"train": {"epochs": epochs, "threads": 1, "num_workers": 0, **train_over},
            "data": {"num_samples": samples}}
    return make_run_config(campaign="c", arch=arch, run=0, seed=7, preset="tiny", overrides=over, results=results)


def comparable(run_dir: Path) -> tuple[list, dict, dict]:
    """What must be equal between an interrupted and an uninterrupted run of the same seed."""
    metrics = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in runs.read_jsonl(run_dir / runs.METRICS)]
    final = runs.read_json(run_dir / runs.FINAL)
    keep = ("status", "best_epoch", "epochs", "train_loss", "train_acc", "val_loss", "val_acc", "confusion_matrix", "per_class")
    weights = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    return metrics, {k: final[k] for k in keep}, weights


def assert_same_run(a: Path, b: Path) -> None:
    ma, fa, wa = comparable(a)
    mb, fb, wb = comparable(b)
    assert ma == mb
    assert fa == fb
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("arch", ["vit", "cnn"])
def test_run_folder_has_every_spec_key(results, arch):
    final = train(tiny(results, arch))
    run_dir = results / "c" / arch / "run-0"
    assert set(runs.FINAL_KEYS) <= set(final)
    assert final["status"] == "completed" and final["error"] is None and final["slurm_job_id"] is None
    assert final["epochs"] == 2 and 1 <= final["best_epoch"] <= 2
    cm = final["confusion_matrix"]
    assert len(cm) == 3 and sum(map(sum, cm)) == runs.read_json(run_dir / "config.json")["val_samples"]
    assert final["gpu_hours"] == 0  # CPU run
    rows = runs.read_jsonl(run_dir / runs.METRICS)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(set(runs.METRIC_KEYS) <= set(r) for r in rows)
    best = rows[final["best_epoch"] - 1]
    assert (final["val_acc"], final["val_loss"]) == (best["val_acc"], best["val_loss"])
    doc = runs.read_json(run_dir / "config.json")
    assert doc["run_config"]["seed"] == 7 and doc["data_fingerprint"].startswith("synthetic-")
    assert doc["code_version"]
    for name in ("last.pt", "best.pt"):
        assert (run_dir / "checkpoints" / name).stat().st_size > 0
    assert not list(run_dir.rglob("*.tmp")), "a temporary file was left behind"


def test_completed_run_is_not_retrained(results):
    cfg = tiny(results)
    first = train(cfg)
    run_dir = cfg.run_dir
    stamp = (run_dir / runs.METRICS).stat().st_mtime_ns, (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns
    again = train(cfg)
    assert again == first
    assert stamp == ((run_dir / runs.METRICS).stat().st_mtime_ns, (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns)


def test_nan_loss_ends_the_run_as_failed(results):
    cfg = tiny(results, epochs=3, lr=1e12, grad_clip=0.0, warmup_epochs=0.0)
    final = train(cfg)
    assert final["status"] == "failed"
    assert "NonFiniteLoss" in final["error"] and "epoch" in final["error"]
    on_disk = json.loads((cfg.run_dir / runs.FINAL).read_text())  # strict JSON: no NaN tokens
    assert on_disk["status"] == "failed"


def test_a_run_folder_of_another_configuration_is_refused(results):
    train(tiny(results))
    other = tiny(results, lr=5e-3)
    (other.run_dir / runs.FINAL).unlink()  # even an unfinished run must not be continued with other settings
    with pytest.raises(ConfigError, match="train.lr"):
        train(other)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    values = [lr_factor(s, 10, 100, 0.01) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert values[-1] == pytest.approx(0.01, abs=1e-3)


TRAIN_SCRIPT = """
import signal, sys
from volclf.config import RunConfig
import json
from volclf.train import Trainer, JobInfo
cfg = RunConfig.from_dict(json.loads(sys.argv[1]))
trainer = Trainer(cfg, JobInfo(cpus=1))
def on_stop(signum, frame):
    # What submitit does on the requeue signal: call the job's checkpoint(), then exit.
    trainer.checkpoint()
    sys.exit(3)
signal.signal(signal.SIGUSR2, on_stop)
trainer.fit()
"""


def start_training(cfg) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-c", TRAIN_SCRIPT, json.dumps(cfg.to_dict())], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result_as_an_uninterrupted_one(tmp_path):
    straight = tiny(tmp_path / "a", epochs=4)
    train(straight)
    cfg = tiny(tmp_path / "b", epochs=4)
    proc = start_training(cfg)
    wait_for(lambda: (cfg.run_dir / "checkpoints" / "last.pt").exists())
    proc.kill()  # no warning: what a node failure or an outside requeue does
    proc.wait()
    assert not (cfg.run_dir / runs.FINAL).exists()
    final = train(cfg)
    assert final["attempts"] == 2
    assert_same_run(straight.run_dir, cfg.run_dir)


@pytest.mark.slow
def test_stop_signal_mid_epoch_checkpoints_and_resumes_exactly(tmp_path):
    # Many small batches, so the signal lands inside an epoch.
    over = dict(epochs=3, batch_size=2, samples=400)
    straight = tiny(tmp_path / "a", **over)
    train(straight)
    cfg = tiny(tmp_path / "b", **over)
    proc = start_training(cfg)
    wait_for(lambda: (cfg.run_dir / runs.METRICS).exists())  # epoch 1 done
    time.sleep(0.3)  # now well inside epoch 2 (~150 steps of ~10 ms)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out
    state = torch.load(cfg.run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert state["batch_in_epoch"] > 0, "the signal's checkpoint should be mid-epoch"
    final = train(cfg)
    assert final["status"] == "completed" and final["attempts"] == 2
    assert_same_run(straight.run_dir, cfg.run_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA to make the run fail")
def test_a_python_error_is_recorded_as_failed_with_its_reason(results):
    cfg = tiny(results, device="cuda")
    with pytest.raises((AssertionError, RuntimeError)):
        train(cfg)
    final = runs.read_json(cfg.run_dir / runs.FINAL)
    assert final["status"] == "failed" and "CUDA" in final["error"]
    assert set(runs.FINAL_KEYS) <= set(final)


def test_loader_workers_give_the_same_run_as_the_main_process(tmp_path):
    # Persistent workers serve every epoch; the numbers must not depend on how data is loaded.
    a = train(tiny(tmp_path / "a", epochs=2))
    b = train(tiny(tmp_path / "b", epochs=2, num_workers=2))
    keep = ("best_epoch", "train_loss", "train_acc", "val_loss", "val_acc", "confusion_matrix")
    assert {k: a[k] for k in keep} == {k: b[k] for k in keep}
