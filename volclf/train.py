"""``train(cfg) -> final record``: one run, writing its run folder, resuming by itself.

The function needs nothing but the run description: started again on a folder with a
checkpoint it continues from there (a requeue, a node failure, a relaunch), and a completed
run is returned without training. Resumption is exact: the batch order of each epoch comes
from (seed, epoch), and the random state, optimiser, schedule and the epoch's partial sums
travel in the checkpoint, so an interrupted run ends with the same numbers as one that never
stopped (same hardware, deterministic kernels).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch.utils.data import DataLoader, Sampler

from volclf import __version__, runs
from volclf.config import RunConfig
from volclf.data import DataSplits, load_data
from volclf.errors import ConfigError
from volclf.models import build_model, count_parameters

log = logging.getLogger("volclf.train")

# Signals on which a job may be stopped (submitit handles USR2: checkpoint and requeue).
# Their handlers run only between steps (``Trainer.safe_point``), so that a checkpoint
# written from a handler is always a consistent state.
DEFERRED_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


@dataclass(frozen=True)
class JobInfo:
    """What the scheduler says about the job running this run (filled in by volclf.cluster)."""

    slurm_job_id: str | None = None
    host: str = field(default_factory=socket.gethostname)
    cpus: int = 0  # 0: as many as this process may use
    gpus: int = 0
    stdout: str | None = None
    stderr: str | None = None
    submitted_at: str | None = None  # when the launcher submitted the job (ISO 8601)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or Inf."""


def train(cfg: RunConfig, job: JobInfo | None = None) -> dict[str, Any]:
    """Train one run to completion (or resume it) and return its final record."""
    return Trainer(cfg, job or JobInfo()).fit()


class EpochBatches(Sampler[list[int]]):
    """Batches of one epoch in an order fixed by (seed, epoch), starting at batch ``start``.

    ``set_epoch`` moves it on, so that one DataLoader serves every epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int = 0, start: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.set_epoch(epoch, start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        self.batches = [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        # A batch of one breaks batch norm in training: fold it into the previous batch.
        if len(self.batches) > 1 and len(self.batches[-1]) == 1:
            self.batches[-2] += self.batches.pop()
        self.start = start

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches[self.start :])

    def __len__(self) -> int:
        return len(self.batches) - self.start


def _ignore_stop_signals(_worker_id: int) -> None:
    # Data-loader workers share the job's process group: the scheduler's USR2 is for the
    # main process, which checkpoints; a worker would die of it.
    for sig in DEFERRED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def code_version() -> str:
    """The git commit of the code (with ``+dirty`` for local changes), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty=+dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return rev or __version__
    except (OSError, subprocess.SubprocessError):
        return __version__


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """The state of one run in training; ``fit()`` runs it, ``checkpoint()`` saves it."""

    def __init__(self, cfg: RunConfig, job: JobInfo):
        self.cfg, self.job = cfg, job
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / runs.CHECKPOINTS
        self.at_safe_point = False
        self._started = time.time()

    # ----------------------------------------------------------------- set-up
    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.device = torch.device("cuda" if t.device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if t.device == "auto" else t.device))
        precision = t.precision if t.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        if precision not in ("bf16", "fp32"):
            raise ConfigError(f"train.precision={t.precision!r}: choose auto, bf16 or fp32")
        self.amp_dtype = torch.bfloat16 if precision == "bf16" else None
        self.precision = precision
        threads = t.threads or self.job.cpus or len(os.sched_getaffinity(0))
        torch.set_num_threads(max(1, threads))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = not t.deterministic
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed)
        fold = cfg.run if cfg.data.split == "kfold" else 0
        self.data: DataSplits = load_data(cfg.data, cfg.model.input_shape, fold=fold)
        self.model = build_model(cfg.model, self.data.num_classes).to(self.device)
        self.memory_format = torch.contiguous_format
        if getattr(cfg.model, "channels_last", False):
            self.memory_format = torch.channels_last_3d
            self.model = self.model.to(memory_format=self.memory_format)
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=fused or None
        )
        self.batches = EpochBatches(len(self.data.train), t.batch_size, cfg.seed)
        self.steps_per_epoch = math.ceil(len(self.batches.batches) / t.grad_accum)
        total = self.steps_per_epoch * t.epochs
        warmup = min(total, round(t.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, total, t.min_lr_ratio)
        )
        self.step_model = torch.compile(self.model) if t.compile else self.model
        num_workers = t.num_workers if t.num_workers >= 0 else max(0, threads - 1)
        loader_kwargs: dict[str, Any] = dict(
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            # Not persistent: workers kept alive past the last epoch can hold the job's
            # process open after training ends (seen here: a finished run never exited).
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals if num_workers else None,
            # A DataLoader draws its workers' base seed from this generator; from the global
            # one it would shift the dropout masks of a run resumed mid-epoch.
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self.train_loader = DataLoader(self.data.train, batch_sampler=self.batches, **loader_kwargs)
        self.val_loader = DataLoader(self.data.val, batch_size=t.batch_size, shuffle=False, **loader_kwargs)
        # Progress: epochs done, batches done in the current epoch, the epoch's partial sums.
        self.epoch = 0
        self.batch_in_epoch = 0
        self.sums = self._zero_sums()
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.elapsed_before = 0.0  # wall time of earlier attempts
        self.attempts = 0

    def _zero_sums(self) -> torch.Tensor:
        return torch.zeros(3, dtype=torch.float64, device=self.device)  # loss·n, correct, n

    # ------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "format": 1,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "sums": self.sums.cpu(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "best": self.best,
            "elapsed": self.elapsed_before + (time.time() - self._started),
            "attempts": self.attempts,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/last.pt`` atomically; returns its path."""
        path = self.ckpt_dir / runs.LAST
        state = self._state()
        runs.atomic_write(path, lambda fh: torch.save(state, fh), mode="wb")
        return path

    def checkpoint(self) -> bool:
        """Called from a signal handler (preemption, time limit): save if at a consistent point."""
        if self.at_safe_point and hasattr(self, "model"):
            self.save_checkpoint()
            log.info("checkpoint written on signal at epoch %d, batch %d", self.epoch + 1, self.batch_in_epoch)
            return True
        return False

    def _resume(self) -> bool:
        path = self.ckpt_dir / runs.LAST
        if not path.exists():
            return False
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:  # a checkpoint we cannot read must not be trusted silently
            raise RuntimeError(f"{path}: cannot read the checkpoint ({exc}); delete it to restart the run") from exc
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.sums = state["sums"].to(self.device)
        self.history, self.best = state["history"], state["best"]
        self.elapsed_before, self.attempts = state["elapsed"], state["attempts"]
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        # The metrics file must say what the checkpoint says (a line may have been written
        # after the last checkpoint, before the job died).
        runs.write_jsonl(self.run_dir / runs.METRICS, self.history)
        log.info("resumed from %s at epoch %d, batch %d", path, self.epoch + 1, self.batch_in_epoch)
        return True

    # ----------------------------------------------------------------- loop
    @contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        """Hold stop signals until ``safe_point()``.

        A handler may only act between steps: a checkpoint taken in the middle of an optimiser
        step would not be a state the run ever had. The deferring handler only notes the
        signal; whichever thread the kernel delivered it to, Python runs it in this one.
        USR2 keeps its owner's handler (submitit: checkpoint and requeue), run at the next safe
        point; SIGTERM (scancel, requeue, preemption, time limit: the job is ending) always
        gets a checkpoint and a clean exit.
        """
        if not threading_main():
            yield
            return
        self._held: dict[int, Any] = {}
        self._pending: list[int] = []
        for sig in DEFERRED_SIGNALS:
            handler = signal.getsignal(sig)
            if callable(handler) or sig == signal.SIGTERM:
                self._held[sig] = handler
                signal.signal(sig, lambda signum, frame: self._pending.append(signum))
        try:
            yield
        finally:
            for sig, handler in self._held.items():
                signal.signal(sig, handler)
            self._held = {}

    def safe_point(self) -> None:
        """Act on the stop signals that arrived: here the state is consistent."""
        while getattr(self, "_pending", None):
            signum = self._pending.pop(0)
            self.at_safe_point = True
            try:
                if signum == signal.SIGTERM:
                    self.save_checkpoint()
                    log.warning("SIGTERM at epoch %d, batch %d: checkpoint written, stopping (the run resumes "
                                "from it when started again)", self.epoch + 1, self.batch_in_epoch)
                    raise SystemExit(128 + signal.SIGTERM)
                self._held[signum](signum, None)
            finally:
                self.at_safe_point = False

    def _train_epoch(self) -> None:
        t, model = self.cfg.train, self.step_model
        model.train()
        batches = self.batches
        batches.set_epoch(self.epoch, self.batch_in_epoch)
        for x, y in self.train_loader:
            x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
            y = y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=t.label_smoothing)
            (loss / t.grad_accum).backward()
            self.batch_in_epoch += 1
            last = self.batch_in_epoch == len(batches.batches)
            if self.batch_in_epoch % t.grad_accum == 0 or last:
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
            # Sums stay on the device: no host synchronisation inside the step.
            n = y.numel()
            # torch.full, not torch.tensor: a GPU tensor made from a Python number is a blocking
            # host-to-device copy at every step.
            self.sums += torch.stack([loss.detach().double() * n, (logits.argmax(1) == y).sum().double(),
                                      torch.full((), float(n), dtype=torch.float64, device=self.device)])
            if self.batch_in_epoch % t.grad_accum == 0:
                self.safe_point()

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float, np.ndarray, np.ndarray]:
        model = self.step_model
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        preds, trues = [], []
        for x, y in self.val_loader:
            x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
            y = y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            preds.append(logits.argmax(1))
            trues.append(y)
        y_pred, y_true = torch.cat(preds).cpu().numpy(), torch.cat(trues).cpu().numpy()
        n = len(y_true)
        return float(loss_sum) / n, float((y_pred == y_true).mean()), y_true, y_pred

    def fit(self) -> dict[str, Any]:
        """Run the remaining epochs and write the final record."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        final_path = self.run_dir / runs.FINAL
        if final_path.exists():
            final = runs.read_json(final_path)
            if final.get("status") == "completed":
                return final
            # A failed run started again: keep the old record beside, resume from the last checkpoint.
            k = len(list(self.run_dir.glob("final.failed-*.json")))
            os.replace(final_path, self.run_dir / f"final.failed-{k}.json")
        handler = _file_log(self.run_dir / runs.LOG)
        try:
            self._write_config()
            self._record_job()
            with self._signals_deferred():
                try:
                    return self._fit()
                except Exception as exc:
                    # The record says why; the exception still ends the job as failed.
                    log.exception("run failed")
                    self._finish(f"{type(exc).__name__}: {exc}")
                    raise
        finally:
            logging.getLogger("volclf").removeHandler(handler)
            handler.close()

    def _write_config(self) -> None:
        path = self.run_dir / runs.CONFIG
        mine = self.cfg.to_dict()
        if path.exists():
            old = runs.read_json(path).get("run_config", {})
            from volclf.campaign import identity_diff

            diff = identity_diff(old, mine)
            if diff:
                raise ConfigError(
                    f"{path} was written by a different configuration ({'; '.join(diff)}). "
                    "Use another --campaign, or delete the run folder to start it again."
                )
        self._config_doc = mine

    def _record_job(self) -> None:
        """``job.json`` (which job ran this run, where, since when) and links to the job's logs."""
        path = self.run_dir / "job.json"
        doc = runs.read_json(path) if path.exists() else {}
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if doc.get("submitted_at") != self.job.submitted_at:  # a new submission, not a requeue
            doc = {"submitted_at": self.job.submitted_at, "started_at": now}
        # started_at - submitted_at is the queue wait; a requeue only moves last_started_at.
        doc.update(slurm_job_id=self.job.slurm_job_id, host=self.job.host, last_started_at=now,
                   stdout=self.job.stdout, stderr=self.job.stderr)
        runs.write_json(path, doc)
        for name, target in (("stdout.log", self.job.stdout), ("stderr.log", self.job.stderr)):
            if not target:
                continue
            link = self.run_dir / name
            tmp = self.run_dir / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(os.path.relpath(target, self.run_dir))
            os.replace(tmp, link)

    def _fit(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        self._setup()
        resumed = self._resume()
        self.attempts += 1
        runs.write_json(self.run_dir / runs.CONFIG, {
            "run_config": self._config_doc,
            "num_classes": self.data.num_classes,
            "classes": self.data.classes,
            "data_fingerprint": self.data.fingerprint,
            "train_samples": len(self.data.train),
            "val_samples": len(self.data.val),
            "parameters": count_parameters(self.model),
            "pool": getattr(cfg.model, "pool", None),
            "code_version": code_version(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(self.device),
            "precision": self.precision,
        })
        log.info("%s run %d (seed %d) on %s, %s: %s epochs, %d train / %d val volumes%s",
                 cfg.arch, cfg.run, cfg.seed, self.device, self.precision, t.epochs, len(self.data.train),
                 len(self.data.val), " (resumed)" if resumed else "")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        error = None
        try:
            while self.epoch < t.epochs:
                start = time.time()
                self._train_epoch()
                loss_n, correct, n = self.sums.tolist()
                train_loss, train_acc = loss_n / n, correct / n
                if not math.isfinite(train_loss):
                    raise NonFiniteLoss(f"training loss became {train_loss} in epoch {self.epoch + 1}")
                val_loss, val_acc, y_true, y_pred = self._evaluate()
                if not math.isfinite(val_loss):
                    raise NonFiniteLoss(f"validation loss became {val_loss} in epoch {self.epoch + 1}")
                self.epoch += 1
                elapsed = time.time() - start
                row = {
                    "epoch": self.epoch, "train_loss": train_loss, "train_acc": train_acc,
                    "val_loss": val_loss, "val_acc": val_acc, "lr": self.optimizer.param_groups[0]["lr"],
                    "epoch_time_s": elapsed, "samples_per_s": n / elapsed,
                    "campaign": cfg.campaign, "arch": cfg.arch, "run": cfg.run, "seed": cfg.seed,
                }
                self._update_best(row, y_true, y_pred)
                self.history.append(row)
                self.batch_in_epoch, self.sums = 0, self._zero_sums()
                runs.append_jsonl(self.run_dir / runs.METRICS, row)
                self.save_checkpoint()
                log.info("epoch %d/%d train_loss %.4f train_acc %.3f val_loss %.4f val_acc %.3f (%.1f s)",
                         self.epoch, t.epochs, train_loss, train_acc, val_loss, val_acc, elapsed)
                self.safe_point()
        except NonFiniteLoss as exc:
            error = f"NonFiniteLoss: {exc}"
            log.error("run failed: %s", error)
        return self._finish(error)

    def _update_best(self, row: dict[str, Any], y_true: np.ndarray, y_pred: np.ndarray) -> None:
        best = self.best
        better = best is None or row["val_acc"] > best["val_acc"] or (
            row["val_acc"] == best["val_acc"] and row["val_loss"] < best["val_loss"])
        if not better:
            return
        labels = list(range(self.data.num_classes))
        cm = confusion_matrix(y_true, y_pred, labels=labels)
        p, r, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
        self.best = {
            **{k: row[k] for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")},
            "confusion_matrix": cm.tolist(),
            "per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]),
                                 "support": int(support[i])} for i, name in enumerate(self.data.classes)},
        }
        path = self.ckpt_dir / runs.BEST
        state = {"model": self.model.state_dict(), "epoch": row["epoch"], "metrics": self.best,
                 "config": self.cfg.to_dict()}
        runs.atomic_write(path, lambda fh: torch.save(state, fh), mode="wb")

    def _finish(self, error: str | None) -> dict[str, Any]:
        cfg = self.cfg
        wall = getattr(self, "elapsed_before", 0.0) + (time.time() - self._started)
        best = getattr(self, "best", None) or {}
        device = getattr(self, "device", torch.device("cpu"))
        data = getattr(self, "data", None)
        gpus = 1 if device.type == "cuda" else 0
        if device.type == "cuda" and torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
        final = {
            "campaign": cfg.campaign, "arch": cfg.arch, "run": cfg.run, "seed": cfg.seed,
            "status": "failed" if error else "completed",
            "best_epoch": best.get("epoch"), "epochs": getattr(self, "epoch", 0),
            "train_loss": best.get("train_loss"), "train_acc": best.get("train_acc"),
            "val_loss": best.get("val_loss"), "val_acc": best.get("val_acc"),
            "classes": data.classes if data else None,
            "confusion_matrix": best.get("confusion_matrix"),
            "per_class": best.get("per_class"),
            "wall_time_s": wall,
            "gpu_hours": wall * gpus / 3600,
            "peak_memory_bytes": int(peak),
            "peak_memory_kind": "cuda_allocated" if gpus else "cpu_max_rss",
            "host": self.job.host,
            "slurm_job_id": self.job.slurm_job_id,
            "attempts": getattr(self, "attempts", 1),
            "device": str(device),
            "data_fingerprint": data.fingerprint if data else None,
            "error": error,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        runs.write_json(self.run_dir / runs.FINAL, final)
        log.info("run %s: best epoch %s val_acc %s", final["status"], final["best_epoch"], final["val_acc"])
        return final


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _file_log(path: Path) -> logging.Handler:
    """Plain lines to the run's train.log (and to stderr, which is the job's log)."""
    logger = logging.getLogger("volclf")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    if not any(getattr(h, "_volclf_stderr", False) for h in logger.handlers):
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        err._volclf_stderr = True  # type: ignore[attr-defined]
        logger.addHandler(err)
    return handler
