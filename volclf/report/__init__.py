"""Run folders -> per-campaign report: tables (Markdown, CSV, LaTeX, terminal), statistics, figures.

``python -m volclf.report [RESULTS_DIR]`` writes ``RESULTS_DIR/<campaign>/report/``. The modules:
:mod:`.collect` reads run folders, :mod:`.stats` computes, :mod:`.tables` lays out tables,
:mod:`.figures` draws, :mod:`.document` writes the text; this module puts them together.
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from rich.console import Console

from volclf import runs
from volclf.errors import VolclfError
from volclf.report import document, figures, stats, tables
from volclf.report.collect import COMPLETED, Campaign, collect_campaign, find_campaigns
from volclf.report.reported import REPORTED

FORMATS = ("md", "csv", "tex", "png")
REPORT_DIR = "report"


class ReportError(VolclfError):
    """The report cannot be built as asked (missing folder, unknown campaign, format or metric)."""


def build_report(results_dir: Path, campaign: str | None = None, formats: Iterable[str] | str = FORMATS,
                 metric: str = "val_acc", console: Console | None = None) -> list[Path]:
    """Write the report of every campaign (or one) under ``results_dir``; returns the files written."""
    results_dir = Path(results_dir)
    console = console or Console()
    formats = parse_formats(formats)
    if metric not in tables.METRICS:
        raise ReportError(f"--metric {metric!r} is not a final metric; choose one of {', '.join(tables.METRICS)}")
    if not results_dir.is_dir():
        raise ReportError(f"{results_dir}: no such folder. Pass the folder the runs were written to "
                          f"(python -m volclf.report RESULTS_DIR; launch.py writes to results/ by default).")
    names = find_campaigns(results_dir)
    if campaign is not None:
        if campaign not in names:
            found = ", ".join(names) or "none"
            raise ReportError(f"{results_dir / campaign}: no runs of campaign {campaign!r} there; campaigns found: {found}")
        names = [campaign]
    if not names:
        console.print(f"No runs under {results_dir} yet (expected {results_dir}/<campaign>/<arch>/run-<k>/); "
                      "nothing to report.", soft_wrap=True)
        return []
    written: list[Path] = []
    for name in names:
        written += campaign_report(results_dir, name, formats, metric, console)
    return written


def parse_formats(formats: Iterable[str] | str) -> tuple[str, ...]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    items = [f.strip().lower() for f in items if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise ReportError(f"--format {','.join(items)!r}: choose a comma-separated list of {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(items))


def campaign_report(results_dir: Path, name: str, formats: tuple[str, ...], metric: str, console: Console) -> list[Path]:
    """Collect, compute and write one campaign's report."""
    camp = collect_campaign(results_dir, name)
    frame = tables.runs_frame(camp, results_dir)
    archs = camp.archs
    summaries = tables.summaries(frame, archs)
    higher = tables.METRICS[metric][0]
    comparisons = [stats.compare(a, b, tables.completed_values(frame, a, metric),
                                 tables.completed_values(frame, b, metric), metric, higher)
                   for a, b in combinations(archs, 2)]
    out_dir = camp.path / REPORT_DIR
    report = document.CampaignReport(camp, results_dir, metric, frame, summaries, comparisons,
                                     notes=campaign_notes(camp))
    written: list[Path] = []
    if "png" in formats:
        report.figures = draw_figures(camp, frame, summaries, metric, out_dir, report.notes)
        written += [out_dir / file for _, file in report.figures]
    if "csv" in formats:
        for file, data in (("runs.csv", frame), ("summary.csv", tables.summary_frame(name, summaries)),
                           ("comparison.csv", tables.comparison_frame(name, comparisons))):
            tables.write_csv(data, out_dir / file)
            written.append(out_dir / file)
    if "tex" in formats:
        tex = tables.latex(tables.summary_table(summaries), f"Campaign {name}: completed runs, mean ± sample std; "
                           "reported rows are the group's published figures on the group's data.",
                           f"tab:{_slug(name)}-summary")
        runs.atomic_write(out_dir / "summary.tex", lambda fh: fh.write(tex))
        written.append(out_dir / "summary.tex")
    if "md" in formats:
        text = document.markdown(report)
        runs.atomic_write(out_dir / "report.md", lambda fh: fh.write(text))
        written.append(out_dir / "report.md")
    document.print_terminal(report, console, written)
    return written


def draw_figures(camp: Campaign, frame: pd.DataFrame, summaries: dict[str, dict[str, stats.Summary]], metric: str,
                 out_dir: Path, notes: list[str]) -> list[tuple[str, str]]:
    """Confusion matrices per architecture, learning curves, the strip plot; (caption, file) pairs."""
    done = camp.with_status(COMPLETED)
    if not done:
        return []
    drawn = []
    for arch in camp.archs:
        mine = [r for r in done if r.arch == arch]
        if not mine:
            continue
        by_classes = Counter(tuple(r.final["classes"]) for r in mine)
        classes, n = by_classes.most_common(1)[0]
        if len(by_classes) > 1:
            notes.append(f"{arch}: runs have {len(by_classes)} different class lists; the confusion matrix sums the "
                         f"{n} run(s) with classes {list(classes)}")
        counts = sum(np.asarray(r.final["confusion_matrix"], dtype=np.int64) for r in mine
                     if tuple(r.final["classes"]) == classes)
        file = f"confusion_{_slug(arch)}.png"
        figures.confusion_figure(out_dir / file, arch, list(classes), counts, n)
        drawn.append((f"Confusion matrix of {arch}, summed over {n} completed run(s): counts and row-normalized", file))
    curves = {a: [r.curve for r in done if r.arch == a and r.curve] for a in camp.archs}
    figures.learning_curves_figure(out_dir / "learning_curves.png", {a: c for a, c in curves.items() if c})
    drawn.append(("Learning curves: mean over completed runs per epoch, band ±1 std", "learning_curves.png"))
    values = {a: tables.completed_values(frame, a, metric) for a in camp.archs}
    reported = {a: REPORTED[a][metric] for a in camp.archs if metric in REPORTED.get(a, {})}
    file = f"strip_{metric}.png"
    figures.strip_figure(out_dir / file, metric, values, {a: summaries[a][metric] for a in camp.archs}, reported)
    drawn.append((f"{metric} of every completed run, mean with 95% interval, and the group's reported figure "
                  "(on its own data)", file))
    return drawn


def campaign_notes(camp: Campaign) -> list[str]:
    """Setup facts that decide whether the runs are comparable: data, code, presets."""
    done = camp.with_status(COMPLETED)
    notes = []
    prints = Counter(((r.config or {}).get("data_fingerprint") or (r.final or {}).get("data_fingerprint") or "unknown")
                     for r in done)
    if len(prints) > 1:
        notes.append(f"completed runs come from {len(prints)} different data sets (fingerprints "
                     f"{', '.join(f'{p} ×{k}' for p, k in prints.most_common())}): the comparison is not like-for-like")
    elif prints:
        notes.append(f"data: fingerprint {next(iter(prints))} for all {len(done)} completed run(s)")
    versions = Counter((r.config or {}).get("code_version") or "unknown" for r in done)
    if versions:
        notes.append("code version: " + ", ".join(f"{v} ×{k}" for v, k in versions.most_common()))
    for arch in camp.archs:
        presets = Counter(((r.config or {}).get("run_config") or {}).get("preset") or "unknown"
                          for r in done if r.arch == arch)
        if presets:
            notes.append(f"{arch}: preset " + ", ".join(f"{p} ×{k}" for p, k in presets.most_common()))
    return notes


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
