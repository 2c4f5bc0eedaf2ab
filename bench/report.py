"""How long ``python -m volclf.report`` takes over many run folders.

Writes N synthetic run folders (default 1000: two architectures, a few failed, unfinished and
never-started runs, EPOCHS lines of metrics each) into a temporary folder, builds the full
report (every format, figures included) REPEATS times and prints the median time, then one
JSON line with the result.

    .venv/bin/python bench/report.py [--runs 1000] [--epochs 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from volclf.report import build_report

CLASSES = ["CN", "MCI", "AD"]


def write_runs(root: Path, n: int, epochs: int, seed: int = 0) -> None:
    """N run folders of campaign ``bench``, half vit and half cnn, plus a launch log."""
    rng = random.Random(seed)
    camp = root / "bench"
    per_arch = {"vit": (n + 1) // 2, "cnn": n // 2}
    launches = []
    for arch, count in per_arch.items():
        base = 0.78 if arch == "vit" else 0.6
        for k in range(count):
            d = camp / arch / f"run-{k}"
            d.mkdir(parents=True)
            state = "unfinished" if k % 97 == 5 else "failed" if k % 61 == 3 else "completed"
            (d / "config.json").write_text(json.dumps({
                "run_config": {"campaign": "bench", "arch": arch, "run": k, "seed": k, "preset": "seed"},
                "classes": CLASSES, "data_fingerprint": "fp-bench", "code_version": "bench"}))
            done = epochs if state == "completed" else epochs // 2
            rows, best = [], None
            for e in range(1, done + 1):
                acc = base * (1 - 0.5 * 0.95**e) + rng.gauss(0, 0.02)
                row = {"epoch": e, "train_loss": 1.5 * 0.97**e + rng.random() * 0.05, "train_acc": acc + 0.08,
                       "val_loss": 1.6 * 0.975**e + rng.random() * 0.05, "val_acc": acc, "lr": 3e-4,
                       "epoch_time_s": 30.0, "samples_per_s": 4.0, "campaign": "bench", "arch": arch, "run": k,
                       "seed": k}
                rows.append(row)
                if best is None or acc > best["val_acc"]:
                    best = row
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            if state == "unfinished":
                continue
            correct = [rng.randint(20, 36) for _ in CLASSES]
            cm = [[correct[i] if j == i else (40 - correct[i]) // 2 + (j > i and (40 - correct[i]) % 2)
                   for j in range(3)] for i in range(3)]
            final = {"campaign": "bench", "arch": arch, "run": k, "seed": k, "status": state,
                     "best_epoch": best["epoch"], "epochs": done,
                     **{m: best[m] for m in ("train_loss", "train_acc", "val_loss", "val_acc")},
                     "classes": CLASSES, "confusion_matrix": cm, "per_class": None, "wall_time_s": 3600.0,
                     "gpu_hours": 1.0, "peak_memory_bytes": 1, "host": "gpu01", "slurm_job_id": f"7_{k}",
                     "error": "NonFiniteLoss: training loss became nan" if state == "failed" else None,
                     "attempts": 1, "finished_at": "2024-05-01T12:00:00+0000"}
            (d / "final.json").write_text(json.dumps(final))
            (d / "job.json").write_text(json.dumps({"submitted_at": 0, "started_at": rng.randint(0, 3600)}))
        launches.append({"time": "2024-05-01T10:00:00", "arch": arch, "runs": list(range(count + 2)),
                         "backend": "slurm", "job_ids": {str(k): f"7_{k}" for k in range(count + 2)}})
    (camp / "launches.jsonl").write_text("".join(json.dumps(x) + "\n" for x in launches))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="volclf-bench-report-") as tmp:
        root = Path(tmp)
        write_runs(root, args.runs, args.epochs)
        times, files = [], []
        for _ in range(args.repeats):
            console = Console(file=io.StringIO(), width=160)
            start = time.perf_counter()
            files = build_report(root, console=console)
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"report over {args.runs} run folders ({args.epochs} epochs each): median {median:.2f} s "
          f"over {args.repeats} repeats (min {min(times):.2f}, max {max(times):.2f}); {len(files)} files written")
    print(json.dumps({"bench": "report", "runs": args.runs, "epochs": args.epochs, "repeats": args.repeats,
                      "median_s": round(median, 4), "times_s": [round(t, 4) for t in times], "files": len(files)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
