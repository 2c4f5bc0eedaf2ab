"""The command line of ``launch.py``: parse, resolve, check, hand over to the library."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from volclf import campaign as camp
from volclf import data as data_mod
from volclf import runs
from volclf.cluster import (BACKENDS, TrainingJob, batch_script, default_backend, make_executor, run_local,
                            submit_array)
from volclf.config import ARCHS, PRESETS, RunConfig, load_profile, make_run_config, parse_override
from volclf.errors import PreflightError, VolclfError
from volclf.models import build_model

console = Console(stderr=False, highlight=False)


def launch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch.py",
        description="Train N runs of an architecture: one SLURM job array on a login node, "
        "or on this machine without SLURM. `launch.py status` shows a campaign.",
    )
    p.add_argument("--arch", required=True, choices=ARCHS, help="vit (transformer) or cnn (3D ResNet)")
    p.add_argument("--n", type=int, default=5, help="runs 0..N-1, seed = base seed + run index (default 5)")
    p.add_argument("--runs", help="explicit run indices instead of --n, e.g. 0,3 or 2-4")
    p.add_argument("--preset", default="seed", choices=PRESETS, help="model/training preset (default seed: full size)")
    p.add_argument("--data", default="synthetic", help="data folder, .npz file, or 'synthetic' (default)")
    p.add_argument("--campaign", help="campaign name (default: the data set's name)")
    p.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--profile", default="default", help="cluster profile from jobs/profiles/ (default: default)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--qos", help="SLURM QoS")
    p.add_argument("--time", help="wall-time limit per job, e.g. 24:00:00 or 2-00:00:00")
    p.add_argument("--gpu-type", help="GPU type for the request, e.g. a100-sxm4-40gb")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any configuration field, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--cluster", choices=BACKENDS, help="force a backend (default: slurm if sbatch is on PATH, else local)")
    p.add_argument("--parallel", type=int, default=0, help="local backend: runs at once (default: one per core)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved runs and the batch script; submit nothing")
    return p


def status_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py status", description="One table of a campaign's runs.")
    p.add_argument("--campaign", help="campaign name (default: every campaign under the results folder)")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["status"]:
            return status(status_parser().parse_args(argv[1:]))
        return launch(launch_parser().parse_args(argv))
    except VolclfError as exc:
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: launch the same command again to resume; finished runs are kept.")
        return 130


# ---------------------------------------------------------------------- launch
def resolve(args: argparse.Namespace) -> list[RunConfig]:
    """Every run's frozen configuration: preset < profile < flags < --set."""
    overrides: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "train": {}, "resources": {}}
    overrides["resources"].update(load_profile(args.profile))
    overrides["data"]["source"] = args.data
    if args.epochs is not None:
        overrides["train"]["epochs"] = args.epochs
    for flag, key in (("partition", "partition"), ("account", "account"), ("qos", "qos"), ("time", "time"),
                      ("gpu_type", "gpu_type")):
        if getattr(args, flag) is not None:
            overrides["resources"][key] = getattr(args, flag)
    for text in args.overrides:
        section, key, value = parse_override(text)
        overrides[section][key] = value
    name = args.campaign or data_mod.dataset_name(args.data)
    return [
        make_run_config(campaign=name, arch=args.arch, run=k, seed=args.seed + k, preset=args.preset,
                        overrides=overrides, results=args.results)
        for k in camp.validate_runs(args.n, args.runs)
    ]


def preflight(cfgs: list[RunConfig], backend: str) -> dict[str, Any]:
    """Checks on this machine before anything is submitted: a mistake costs seconds."""
    cfg = cfgs[0]
    if cfg.data.split == "kfold":
        beyond = [c.run for c in cfgs if c.run >= cfg.data.folds]
        if beyond:
            raise PreflightError(f"runs {beyond} have no fold: with data.split=kfold run k uses fold k of "
                                 f"data.folds={cfg.data.folds}; use --n {cfg.data.folds} or raise data.folds")
    camp.check_writable(cfg.results, cfg.campaign)
    summary = data_mod.check_data(cfg.data, cfg.model.input_shape)
    try:
        import torch

        with torch.device("meta"):
            model = build_model(cfg.model, summary["num_classes"])
            model(torch.empty(2, 1, *cfg.model.input_shape))
    except (ValueError, RuntimeError) as exc:
        raise PreflightError(f"the {cfg.arch} model does not build for input {cfg.model.input_shape}: {exc}") from None
    if backend == "slurm":
        from volclf import slurm

        slurm.preflight(cfg.resources, n_tasks=len(cfgs))
    return summary


def launch(args: argparse.Namespace) -> int:
    backend = args.cluster or default_backend()
    cfgs = resolve(args)
    cfg0 = cfgs[0]
    active: dict[tuple[str, int], str] = {}
    if backend == "slurm":
        from volclf import slurm

        active = slurm.active_runs(cfg0.results, cfg0.campaign)
    planned = camp.plan(cfgs, active)
    todo = [p for p in planned if p.action != "skip"]
    print_plan(planned, backend)
    if not todo:
        console.print(f"Nothing to do: every asked-for run of [bold]{cfg0.campaign}[/] is completed or queued.")
        return 0
    name = f"volclf-{cfg0.arch}-{cfg0.campaign}"
    logs = camp.campaign_dir(cfg0.results, cfg0.campaign) / "logs"
    if args.dry_run:  # the script first, then the same checks a submission runs
        dry_run(todo, backend, name, logs)
    summary = preflight([p.cfg for p in todo], backend)
    classes = ", ".join(f"{name} {count}" for name, count in summary["classes"].items())
    console.print(f"data: {summary['source']} — {summary['volumes']} volumes; classes: {classes}")
    if args.dry_run:
        console.print("checks passed; nothing was submitted (drop --dry-run to submit).")
        return 0
    if backend == "slurm":
        return submit_slurm(todo, name, logs, args)
    return run_here(todo, backend, logs, args)


def print_plan(planned: list[camp.PlannedRun], backend: str) -> None:
    cfg = planned[0].cfg
    table = Table(title=f"campaign {cfg.campaign} · {cfg.arch} · preset {cfg.preset} · backend {backend}")
    for col in ("run", "seed", "folder", "state", "action", "note"):
        table.add_column(col)
    for p in planned:
        table.add_row(str(p.cfg.run), str(p.cfg.seed), str(p.cfg.run_dir), p.state, p.action, p.note)
    console.print(table)


def dry_run(todo: list[camp.PlannedRun], backend: str, name: str, logs: Path) -> None:
    res = todo[0].cfg.resources
    console.print(f"[bold]dry run[/]: {len(todo)} run(s) would be submitted, nothing is submitted.")
    if backend == "slurm":
        console.print(f"resources per job: {res.cpus_per_task} CPUs, {res.mem_gb} GB, {res.gpus} GPU(s)"
                      f"{' of type ' + res.gpu_type if res.gpu_type else ''}, time {res.time}")
        print(batch_script(res, name, logs, len(todo)))
    else:
        console.print("backend local: the runs would train on this machine")


def submit_slurm(todo: list[camp.PlannedRun], name: str, logs: Path, args: argparse.Namespace) -> int:
    cfg0 = todo[0].cfg
    executor = make_executor("slurm", logs, cfg0.resources, name)
    jobs = [TrainingJob(p.cfg) for p in todo]
    handles = submit_array(executor, jobs)
    ids = {str(p.cfg.run): h.job_id for p, h in zip(todo, handles)}
    record(todo, "slurm", ids, args)
    kind = "job array" if len(handles) > 1 else "job"
    console.print(f"submitted {len(handles)} run(s) as one {kind} {handles[0].job_id.split('_')[0]} ({name}).")
    console.print(f"follow it: squeue -u $USER, or python launch.py status --campaign {cfg0.campaign}")
    return 0


def record(todo: list[camp.PlannedRun], backend: str, ids: dict[str, str], args: argparse.Namespace) -> None:
    from volclf.train import code_version

    cfg0 = todo[0].cfg
    camp.record_launch(cfg0.results, cfg0.campaign, {
        "arch": cfg0.arch, "preset": cfg0.preset, "runs": [p.cfg.run for p in todo],
        "seeds": [p.cfg.seed for p in todo], "backend": backend, "job_ids": ids,
        "profile": args.profile, "resources": cfg0.to_dict()["resources"], "code_version": code_version(),
        "command": " ".join(sys.argv),
    })


def run_here(todo: list[camp.PlannedRun], backend: str, logs: Path, args: argparse.Namespace) -> int:
    """Train on this machine, a few runs at a time, with a live table of progress."""
    from rich.live import Live

    cores = len(os.sched_getaffinity(0))
    parallel = args.parallel or min(len(todo), cores)
    threads = max(1, cores // parallel)
    executor = make_executor(backend, logs, todo[0].cfg.resources, "volclf")
    jobs = [TrainingJob(p.cfg, cpus=threads) for p in todo]
    if backend == "debug":  # in this process, one after the other (for a debugger)
        for job in jobs:
            executor.submit(job).result()
        return summarize(todo)
    console.print(f"training {len(jobs)} run(s) here, {parallel} at a time, {threads} thread(s) each")
    record(todo, backend, {}, args)
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with Live(progress_table(todo, {}), console=console, refresh_per_second=2, transient=False) as live:
            def poll(started: list) -> None:
                live.update(progress_table(todo, {id(j.cfg): h for j, h in started}))

            results = run_local(executor, jobs, parallel, poll)
        console.print()
    finally:
        signal.signal(signal.SIGTERM, old)
    for job, handle in results:
        if handle is not None and handle.state not in ("FINISHED",) and runs.run_state(job.cfg.run_dir) != "completed":
            console.print(f"[red]run-{job.cfg.run} did not finish[/]: see {handle.paths.stderr}")
    return summarize(todo)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def progress_table(todo: list[camp.PlannedRun], handles: dict[int, Any]) -> Table:
    table = Table(title="runs on this machine")
    for col in ("run", "seed", "state", "epoch", "val_acc", "best val_acc"):
        table.add_column(col)
    for p in todo:
        cfg = p.cfg
        rows = _metrics(cfg.run_dir)
        state = runs.run_state(cfg.run_dir)
        if state not in ("completed", "failed"):
            state = "running" if id(cfg) in handles and not handles[id(cfg)].done() else (
                "waiting" if id(cfg) not in handles else "stopped")
        last = rows[-1] if rows else {}
        best = max((r.get("val_acc") or 0 for r in rows), default=None)
        table.add_row(str(cfg.run), str(cfg.seed), state, f"{last.get('epoch', 0)}/{cfg.train.epochs}",
                      _fmt(last.get("val_acc")), _fmt(best))
    return table


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return runs.read_jsonl(run_dir / runs.METRICS)
    except (OSError, ValueError):
        return []


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def summarize(todo: list[camp.PlannedRun]) -> int:
    """Final table of the runs just trained; exit status 1 if any failed."""
    table = Table(title="result")
    for col in ("run", "seed", "status", "best epoch", "val_acc", "val_loss", "wall s", "error"):
        table.add_column(col)
    failed = 0
    for p in todo:
        path = p.cfg.run_dir / runs.FINAL
        try:
            f = runs.read_json(path)
        except (OSError, ValueError):
            failed += 1
            table.add_row(str(p.cfg.run), str(p.cfg.seed), "[red]not finished[/]", "", "", "", "", "")
            continue
        ok = f["status"] == "completed"
        failed += not ok
        table.add_row(str(f["run"]), str(f["seed"]), f["status"] if ok else f"[red]{f['status']}[/]",
                      str(f["best_epoch"]), _fmt(f["val_acc"]), _fmt(f["val_loss"]), f"{f['wall_time_s']:.0f}",
                      f.get("error") or "")
    console.print(table)
    return 1 if failed else 0


# ---------------------------------------------------------------------- status
def status(args: argparse.Namespace) -> int:
    from volclf.status import status_table

    root = Path(args.results)
    if not root.is_dir():
        raise PreflightError(f"results folder {root} does not exist; pass --results DIR")
    names = [args.campaign] if args.campaign else sorted(
        d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        console.print(f"no campaign under {root}")
        return 0
    for name in names:
        if not (root / name).is_dir():
            raise PreflightError(f"no campaign {name!r} under {root}; campaigns: {', '.join(sorted(p.name for p in root.iterdir() if p.is_dir()))}")
        console.print(status_table(root, name))
    return 0


__all__ = ["main", "launch_parser", "status_parser"]
