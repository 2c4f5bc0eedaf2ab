"""Training-step throughput of the two models, side by side, on CPU and (when present) CUDA.

For every (arch, preset) asked for, and for the transformer against a peer implementation
(MONAI's ViT at an equal configuration), this measures one optimiser step as volclf.train does
it, on a fixed random batch (no data loading):

- samples/s (median over repeats), step time median and interquartile range;
- FLOPs per sample (forward + backward, torch.utils.flop_counter on the meta device), the
  achieved TFLOP/s and, on a GPU whose bf16 peak is known, the model FLOP utilisation (MFU);
- peak memory: CUDA max_memory_allocated, or on CPU the peak resident size of a fresh process
  (bench/common.py), next to volclf's own estimate (training_memory_estimate);
- variants, interleaved step by step so that machine noise hits them all alike: volclf as
  shipped, the same model in plain fp32 eager, channels_last_3d (cnn), torch.compile (--compile),
  bf16 autocast on CPU (--variants ... bf16), and MONAI's ViT.

It prints tables for a person and, on stdout, one JSON line per result (``{"kind": ...}``).

    .venv/bin/python bench/train.py                 # CPU: small and seed presets, peer; ~2 min on 2 idle cores
    .venv/bin/python bench/train.py --quick         # CPU: small presets and a short peer run
    .venv/bin/python bench/train.py --device cuda --batch-size vit:seed=64 --budget-s 240
    .venv/bin/python bench/train.py --tiny --device cpu   # smoke test of every code path (seconds)

The MONAI peer needs the benchmark-only extra ``.venv/bin/pip install monai==1.6.1 einops``;
without it that part is skipped with a message. See bench/README.md for the columns.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from common import (  # noqa: E402
    NUM_CLASSES, PARAM_TOLERANCE, VARIANT_HELP, VARIANTS, Case, TrainStep, bf16_peak, count_on_meta,
    device_name, estimated_peak, flops_per_sample, gib, measure_cpu_peaks, mem_available, monai_available,
    peer_configs, preset_config, quartiles, timed_steps,
)
from volclf.models import build_model  # noqa: E402

CPU_MEMORY_SHARE = 0.6  # on CPU, run a case only if volclf's estimate fits this share of MemAvailable
CPU_SEED_BATCH = {"vit": 2, "cnn": 1}  # the seed presets' batches are GPU batches; a CPU step at them takes long
FAST_PATHS = ("channels-last", "compiled", "bf16")  # options beyond volclf's defaults: reported as <option>/volclf


@dataclass
class Result:
    """The measurements of one case."""

    case: Case
    device: torch.device
    status: str = "ok"  # "ok", "skipped: ...", "OOM ..."
    per_repeat_sps: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    first_step_s: float | None = None  # warm-up, includes torch.compile / cudnn autotuning
    flops: int | None = None
    params: int | None = None
    peak_bytes: int | None = None
    peak_kind: str | None = None
    estimate_bytes: int | None = None

    @property
    def sps(self) -> float | None:
        return statistics.median(self.per_repeat_sps) if self.per_repeat_sps else None

    def record(self, peak: float | None, stamp: dict[str, Any]) -> dict[str, Any]:
        c = self.case
        q1, med, q3 = quartiles(self.step_times) if self.step_times else (None, None, None)
        sps = self.sps
        achieved = self.flops * sps if (self.flops and sps) else None
        return {
            "kind": "throughput", "arch": c.arch, "preset": c.preset, "variant": c.variant,
            "device": self.device.type, "batch_size": c.batch_size, "status": self.status,
            "samples_per_s": sps, "step_time_s_median": med, "step_time_s_q1": q1, "step_time_s_q3": q3,
            "repeats": len(self.per_repeat_sps), "steps_per_repeat": len(self.step_times) // max(1, len(self.per_repeat_sps)),
            "first_step_s": self.first_step_s, "params": self.params,
            "flops_per_sample": self.flops, "achieved_tflop_s": achieved / 1e12 if achieved else None,
            "mfu": achieved / peak if (achieved and peak) else None,
            "peak_memory_bytes": self.peak_bytes, "peak_memory_kind": self.peak_kind,
            "estimated_memory_bytes": self.estimate_bytes, **stamp,
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="variants:\n" + "\n".join(f"  {k:14s} {v}" for k, v in VARIANT_HELP.items()))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--archs", nargs="+", choices=("vit", "cnn"), default=["vit", "cnn"])
    p.add_argument("--presets", nargs="*", default=None,
                   help="default: small seed (--quick: small; --tiny: tiny); none given: only the peer comparison")
    p.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != "monai"], default=None,
                   help="default: volclf fp32-eager channels-last (the last for the cnn only)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    p.add_argument("--batch-size", action="append", default=[], metavar="ARCH:PRESET=N[,N]",
                   help="batch size(s) of one (arch, preset), e.g. vit:seed=64 or cnn:seed=2,1 (default: the "
                        f"preset's; on CPU the seed presets use {CPU_SEED_BATCH}); also peer=N")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 5; --quick 3)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 3; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, CUDA 3)")
    p.add_argument("--peer-repeats", type=int, default=None, help="repeats of the peer comparison (default 5; --quick 3)")
    p.add_argument("--no-peer", action="store_true", help="skip the comparison with MONAI's ViT")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory probes")
    p.add_argument("--budget-s", type=float, default=None,
                   help="soft time budget: once spent, no further repeats are started (each case keeps at least one)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="a short CPU run: small presets, fewer repeats")
    p.add_argument("--tiny", action="store_true", help="tiny presets and a tiny peer: checks every code path in seconds")
    p.add_argument("--json-only", action="store_true", help="print only the JSON lines")
    args = p.parse_args(argv)
    if args.presets is None:
        args.presets = ["tiny"] if args.tiny else ["small"] if args.quick else ["small", "seed"]
    short = args.quick or args.tiny
    args.repeats = args.repeats or (3 if short else 5)
    args.steps = args.steps or (2 if short else 3)
    args.peer_repeats = args.peer_repeats or (3 if short else 5)
    if args.variants is None:
        args.variants = ["volclf", "fp32-eager", "channels-last"]
    if args.compile and "compiled" not in args.variants:
        args.variants.append("compiled")
    args.batch = {}
    for item in args.batch_size:
        key, _, value = item.partition("=")
        sizes = value.split(",")
        if not all(v.isdigit() and int(v) > 0 for v in sizes) or (key != "peer" and key.count(":") != 1):
            p.error(f"--batch-size {item!r}: expected ARCH:PRESET=N[,N...] (e.g. vit:seed=64 or cnn:seed=2,1) or peer=N")
        args.batch[key] = [int(v) for v in sizes]
    return args


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False (a CPU build of torch, or no GPU visible)")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


class Bench:
    """Runs the groups of cases and collects their results."""

    def __init__(self, args: argparse.Namespace, device: torch.device, console: Console):
        self.args, self.device, self.console = args, device, console
        self.deadline = time.monotonic() + args.budget_s if args.budget_s else None
        self.warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 2)
        self.results: list[Result] = []
        self.ratios: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def say(self, text: str) -> None:
        if not self.args.json_only:
            self.console.print(text)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def batches_for(self, arch: str, preset: str, preset_batch: int) -> list[int]:
        key = f"{arch}:{preset}"
        if key in self.args.batch:
            return self.args.batch[key]
        if self.device.type == "cpu" and preset == "seed":
            return [CPU_SEED_BATCH[arch]]
        return [preset_batch]

    def fits(self, case: Case) -> str | None:
        """Why a CPU case must not run (volclf's estimate beyond this machine's memory), or None."""
        if self.device.type != "cpu":
            return None
        need, free = estimated_peak(case, self.device), mem_available()
        if need is None or free is None or need <= CPU_MEMORY_SHARE * free:
            return None
        return (f"skipped: needs about {gib(need)} by volclf's estimate, {gib(free)} available "
                f"(run it on a GPU node, or lower --batch-size {case.arch}:{case.preset}=N)")

    # ------------------------------------------------------------------------- one group
    def run_group(self, title: str, cases: list[Case], repeats: int) -> list[Result]:
        """Measure ``cases`` interleaved: each repeat runs every case, in a rotating order."""
        self.say(f"[bold]{title}[/bold]")
        results = [Result(c, self.device) for c in cases]
        self.results += results  # filled in as they run: an interrupted run still reports them
        if self.out_of_time():
            for res in results:
                res.status = "skipped: time budget spent"
            self.notes.append(f"{title}: not run, the time budget was spent")
            return results
        steps: list[TrainStep | None] = []
        flops_cache: dict[tuple, int] = {}
        for res in results:
            c = res.case
            key = (c.arch, c.preset, c.variant == "monai")
            if key not in flops_cache:
                flops_cache[key] = flops_per_sample(c)
            res.flops = flops_cache[key]
            res.estimate_bytes = estimated_peak(c, self.device)
            reason = self.fits(c)
            if reason:
                res.status = reason
                steps.append(None)
                self.say(f"  {c.arch} {c.preset} {c.variant}: {reason}")
                continue
            steps.append(self._prepare(res))
        live = [(r, s) for r, s in zip(results, steps) if s is not None]
        for rep in range(repeats if live else 0):
            # Interleave step by step (A B C A B C ...), starting each repeat with another case,
            # so that a burst of load from elsewhere lands on every case of the repeat alike.
            k = rep % len(live)
            order = live[k:] + live[:k]
            times: dict[int, list[float]] = {id(r): [] for r, _ in live}
            for _ in range(self.args.steps):
                for res, step in order:
                    if res.status == "ok":
                        self._timed_step(res, step, times[id(res)])
            for res, _ in live:
                t = times[id(res)]
                if res.status == "ok" and t:
                    res.step_times += t
                    res.per_repeat_sps.append(res.case.batch_size * len(t) / sum(t))
            ok = [r for r, _ in live if r.status == "ok"]
            self.say(f"  repeat {rep + 1}/{repeats}: samples/s " + ", ".join(
                f"{r.case.variant} {r.per_repeat_sps[-1]:.2f}" for r in ok))
            if self.out_of_time() and ok:
                if rep + 1 < repeats:
                    self.notes.append(f"{title}: time budget spent after {rep + 1} of {repeats} repeats")
                break
        for res, step in live:
            res.params = sum(p.numel() for p in step.model.parameters())
        del live, steps
        self._free()
        return results

    def _prepare(self, res: Result) -> TrainStep | None:
        """Build the case and take the warm-up steps; on CUDA out of memory, mark it and go on."""
        c = res.case
        try:
            step = TrainStep(c, self.device)
            step.activate()
            t0 = time.perf_counter()
            timed_steps(step, 1)
            res.first_step_s = time.perf_counter() - t0
            timed_steps(step, max(0, self.warmup - 1))
            return step
        except torch.OutOfMemoryError:
            res.status = f"OOM at batch {c.batch_size}"
        # out of the except block: its traceback no longer holds the half-built case
        self.say(f"  {c.arch} {c.preset} {c.variant}: out of memory at batch {c.batch_size}")
        self._free()
        return None

    def _timed_step(self, res: Result, step: TrainStep, times: list[float]) -> None:
        step.activate()
        cuda = self.device.type == "cuda"
        try:
            if cuda:
                others = torch.cuda.memory_allocated(self.device) - step.resident_bytes()
                torch.cuda.reset_peak_memory_stats(self.device)
            times += timed_steps(step, 1)
        except torch.OutOfMemoryError:
            res.status = f"OOM at batch {res.case.batch_size}"
        if res.status != "ok":  # out of the except block, so that the step's tensors can go
            step.optimizer.zero_grad(set_to_none=True)
            self._free()
            return
        if cuda:
            peak = torch.cuda.max_memory_allocated(self.device) - others
            res.peak_bytes = max(res.peak_bytes or 0, peak)
            res.peak_kind = "cuda_max_allocated"

    def _free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------- ratios
    def ratio(self, title: str, a: Result, b: Result) -> None:
        """Median over repeats of a's samples/s over b's, repeat by repeat."""
        n = min(len(a.per_repeat_sps), len(b.per_repeat_sps))
        if not n:
            return
        per = [a.per_repeat_sps[i] / b.per_repeat_sps[i] for i in range(n)]
        self.ratios.append({
            "kind": "ratio", "what": f"{a.case.variant}/{b.case.variant}", "group": title,
            "arch": a.case.arch, "preset": a.case.preset, "device": self.device.type,
            "batch_size": a.case.batch_size, "median": statistics.median(per), "min": min(per), "max": max(per),
            "per_repeat": per,
        })

    # ------------------------------------------------------------------------ CPU memory
    def cpu_memory(self) -> None:
        """Peak RSS of each CPU case, each in a fresh process (after the timings: no interference)."""
        todo = [r for r in self.results if r.status == "ok" and r.case.variant != "compiled"]
        if not todo:
            return
        self.say("[bold]CPU peak memory[/bold] (a fresh process per run, 2 steps each)")
        specs = [{"arch": r.case.arch, "model": r.case.cfg, "batch_sizes": [r.case.batch_size],
                  "variant": r.case.variant, "steps": 2} for r in todo]
        for r, spec in zip(todo, specs):
            if r.case.variant == "monai":
                spec["monai_kwargs"] = r.case.monai_kwargs
        try:
            peaks = measure_cpu_peaks(specs, threads=self.args.threads)
        except RuntimeError as exc:
            self.notes.append(f"CPU memory probe failed: {exc}")
            return
        for r, p in zip(todo, peaks):
            r.peak_bytes = p[r.case.batch_size]
            r.peak_kind = "cpu_peak_rss"


class Stopped(Exception):
    """SIGTERM (e.g. from ``timeout``): stop measuring, report what was measured."""


def _stop(signum: int, _frame: Any) -> None:
    raise Stopped(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    console = Console(width=None if sys.stdout.isatty() else 200, stderr=False)
    bench = Bench(args, device, console)
    started = time.monotonic()
    name = device_name(device)
    peak = bf16_peak(name) if device.type == "cuda" else None
    stamp = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "device_name": name,
             "python": platform.python_version(), "threads": torch.get_num_threads()}
    bench.say(f"volclf training-step benchmark on {name}, torch {torch.__version__}; bf16 peak: "
              f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'n/a'}")

    stopped = None
    try:
        # 1. Each (arch, preset): the variants side by side.
        for preset in args.presets:
            for arch in args.archs:
                preset_batch = preset_config(arch, preset)[1]
                variants = [v for v in args.variants if not (v == "channels-last" and arch != "cnn")]
                if device.type == "cuda" and "bf16" in variants and "volclf" in variants:
                    variants.remove("bf16")  # on CUDA volclf already is bf16
                for batch in bench.batches_for(arch, preset, preset_batch):
                    cases = [Case(arch, preset, v, batch) for v in variants]
                    res = bench.run_group(f"{arch} {preset}, batch {batch}", cases, args.repeats)
                    by = {r.case.variant: r for r in res}
                    for other in variants:
                        if other == "volclf" or "volclf" not in by:
                            continue
                        if other in FAST_PATHS:  # how much faster the fast path is than volclf as shipped
                            bench.ratio(f"{arch} {preset} b{batch}", by[other], by["volclf"])
                        else:  # how much faster volclf is than the baseline
                            bench.ratio(f"{arch} {preset} b{batch}", by["volclf"], by[other])

        # 2. The transformer against MONAI's at the equal configuration.
        if not args.no_peer:
            why = monai_available()
            if why:
                bench.notes.append(f"peer comparison skipped: MONAI is not importable ({why})")
                bench.say(f"[yellow]peer comparison skipped[/yellow]: {why}")
            else:
                vcfg, mkw = peer_configs(tiny=args.tiny)
                ours = count_on_meta(lambda: build_model(vcfg, NUM_CLASSES))
                theirs = count_on_meta(lambda: Case("vit", "peer", "monai", 1, cfg=vcfg, monai_kwargs=mkw).build("meta"))
                rel = (ours - theirs) / theirs
                params = {"kind": "peer_params", "volclf": ours, "monai": theirs, "relative_difference": rel,
                          "volclf_config": {"stem_multipliers": list(vcfg.stem_multipliers), "pool": vcfg.pool,
                                            "skip_layers": list(vcfg.skip_layers), "decoder_dim": vcfg.decoder_dim},
                          "monai_config": {k: list(v) if isinstance(v, tuple) else v for k, v in mkw.items()}, **stamp}
                bench.say(f"equal configuration: volclf {ours:,} parameters, MONAI {theirs:,}: "
                          f"relative difference {rel:+.4%} (limit ±{PARAM_TOLERANCE:.0%})")
                if abs(rel) > PARAM_TOLERANCE:
                    raise SystemExit(f"the peer configurations differ by {rel:.2%} in parameters (> {PARAM_TOLERANCE:.0%})")
                bench.ratios.append(params)
                default_peer_batch = 8 if device.type == "cuda" and not args.tiny else 2
                batch = args.batch.get("peer", [default_peer_batch])[0]
                cases = [Case("vit", "peer", v, batch, cfg=vcfg, monai_kwargs=mkw) for v in ("volclf", "fp32-eager", "monai")]
                res = bench.run_group(f"vit vs MONAI ViT (equal configuration), batch {batch}", cases, args.peer_repeats)
                by = {r.case.variant: r for r in res}
                bench.ratio("peer", by["volclf"], by["fp32-eager"])
                bench.ratio("peer", by["volclf"], by["monai"])
                bench.ratio("peer", by["fp32-eager"], by["monai"])

        # 3. CPU peak memory, in fresh processes.
        if device.type == "cpu" and not args.no_memory:
            bench.cpu_memory()

    except Stopped as exc:
        stopped = str(exc)
        bench.notes.append(f"{stopped}: the results below are those measured until then")
    records = [r.record(peak, stamp) for r in bench.results]
    ratios = [dict(r, **stamp) if r["kind"] == "ratio" else r for r in bench.ratios]
    elapsed = time.monotonic() - started
    if not args.json_only:
        print_tables(console, records, ratios, peak, bench.notes, elapsed)
    for rec in records + ratios:
        print(json.dumps(rec), flush=True)
    print(json.dumps({"kind": "summary", "elapsed_s": round(elapsed, 1), "notes": bench.notes, **stamp}), flush=True)
    return 3 if stopped else 0


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_tables(console: Console, records: list[dict], ratios: list[dict], peak: float | None,
                 notes: list[str], elapsed: float) -> None:
    table = Table(title="training step (median of repeats; IQR over all timed steps)")
    for col in ("arch", "preset", "variant", "batch", "samples/s", "step ms", "IQR ms", "GFLOP/sample",
                "TFLOP/s", "MFU", "peak memory", "estimate", "status"):
        table.add_column(col, justify="left" if col in ("arch", "preset", "variant", "status") else "right")
    for r in records:
        ms = lambda v: fmt(v * 1e3 if v is not None else None, ".0f")  # noqa: E731
        table.add_row(
            r["arch"], r["preset"], r["variant"], str(r["batch_size"]), fmt(r["samples_per_s"], ".2f"),
            ms(r["step_time_s_median"]),
            f"{ms(r['step_time_s_q1'])}–{ms(r['step_time_s_q3'])}" if r["step_time_s_q1"] is not None else "n/a",
            fmt(r["flops_per_sample"] / 1e9 if r["flops_per_sample"] else None, ".3g"),
            fmt(r["achieved_tflop_s"], ".3g"), fmt(r["mfu"], ".1%") if peak else "n/a",
            gib(r["peak_memory_bytes"]), gib(r["estimated_memory_bytes"]), r["status"],
        )
    console.print(table)
    if ratios:
        t = Table(title="ratios of samples/s (median over repeats, each repeat compared with itself)")
        for col in ("group", "ratio", "median", "min", "max"):
            t.add_column(col, justify="right" if col in ("median", "min", "max") else "left")
        for r in ratios:
            if r["kind"] == "ratio":
                t.add_row(r["group"], r["what"], f"{r['median']:.2f}×", f"{r['min']:.2f}×", f"{r['max']:.2f}×")
        console.print(t)
    for n in notes:
        console.print(f"[yellow]note[/yellow]: {n}")
    console.print(f"done in {elapsed:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
