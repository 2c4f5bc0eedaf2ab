"""The report's text: ``report.md`` and the same tables and lists for the terminal (rich)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table as RichTable

from volclf.report import stats, tables
from volclf.report.collect import COMPLETED, FAILED, NEVER_STARTED, UNFINISHED, UNREADABLE, Campaign, Run
from volclf.report.reported import REPORTED, SOURCE_NOTE

TERMINAL_MAX_RUNS = 40  # longer run tables are cut on the terminal (the files have every row)
STATES = (COMPLETED, FAILED, UNFINISHED, NEVER_STARTED, UNREADABLE)


@dataclass
class CampaignReport:
    """Everything the text of one campaign's report is made of."""

    campaign: Campaign
    results_dir: Path
    metric: str
    runs: pd.DataFrame
    summaries: dict[str, dict[str, stats.Summary]]
    comparisons: list[stats.Comparison]
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, file name in the report folder)
    notes: list[str] = field(default_factory=list)  # cautions about the whole campaign


def markdown(r: CampaignReport) -> str:
    """The whole report.md."""
    c = r.campaign
    out = [f"# Report: campaign `{c.name}`", "",
           f"Built from {len(c.runs)} run(s) under `{c.name}/` (paths below are relative to the results folder). "
           "Only completed runs enter the statistics; every other run is named under "
           "[Runs not in the statistics](#runs-not-in-the-statistics).", "",
           "## Overview", "", tables.markdown(overview_table(r))]
    out += [f"- {note}" for note in r.notes] + ([""] if r.notes else [])
    out += ["## Summary", "", tables.markdown(tables.summary_table(r.summaries)), reported_note(r), "",
            "### Statistics per architecture", "", tables.markdown(tables.detail_table(r.summaries))]
    out += ["## Head-to-head", ""]
    if not r.comparisons:
        out += [f"Only one architecture ({', '.join(c.archs) or 'none'}) in this campaign: nothing to compare.", ""]
    for comp in r.comparisons:
        out += [f"### {comp.a} vs {comp.b} on {comp.metric}", "", tables.markdown(tables.comparison_table(comp))]
        out += [f"- {note}" for note in comp.notes] + ([""] if comp.notes else [])
        out += [honest_paragraph(comp, r.summaries), ""]
    out += ["## Figures", ""]
    out += [f"![{cap}]({name})\n\n*{cap}* ([{name}]({name}))\n" for cap, name in r.figures] or ["No figures written.", ""]
    out += ["## Runs", "", tables.markdown(tables.runs_table(r.runs))]
    out += ["## Runs not in the statistics", "", *not_in_statistics(r), ""]
    out += ["## Definitions", "", *DEFINITIONS]
    return "\n".join(out)


def overview_table(r: CampaignReport) -> tables.Table:
    counts = Counter((run.arch, run.status) for run in r.campaign.runs)
    rows = []
    for arch in r.campaign.archs:
        done = r.runs[(r.runs["arch"] == arch) & r.runs["status"].isin([COMPLETED, FAILED])]
        gpu_h = float(done["gpu_hours"].fillna(0).sum()) if len(done) else 0.0
        wall_h = float(done["wall_time_s"].fillna(0).sum()) / 3600 if len(done) else 0.0
        rows.append([arch, *(str(counts[(arch, s)]) for s in STATES), f"{gpu_h:.3f}", f"{wall_h:.2f}"])
    headers = ["arch", *STATES, "gpu_hours", "wall time (h)"]
    return tables.Table("Runs per state", headers, rows, right=set(range(1, len(headers))))


def reported_note(r: CampaignReport) -> str:
    shown = [a for a in r.summaries if a in REPORTED]
    if not shown:
        return ""
    which = "; ".join(f"{a}: {SOURCE_NOTE[a]}" for a in shown)
    return ("\nThe `reported` rows are the research group's published figures (SPEC §2), measured on **the group's "
            "data, not this campaign's**. They are single best runs, shown for reference beside the measured "
            f"mean and never averaged with measured runs; compare them with the `max` column ({which}).\n")


def honest_paragraph(c: stats.Comparison, summaries: dict[str, dict[str, stats.Summary]]) -> str:
    """What these few runs can and cannot show, with this comparison's numbers."""
    na, nb, m = c.n_a, c.n_b, c.metric
    if not na or not nb:
        return "With no completed runs on one side there is nothing to infer yet."
    text = [f"**What {na} vs {nb} runs can and cannot show.** The runs differ only in their seed, so the spread "
            "is seed-to-seed variation on one data split, not variation across data sets."]
    p_mw = stats.min_mann_whitney_p(na, nb)
    text.append(f"With {na} and {nb} runs the exact Mann–Whitney test cannot give a two-sided p below "
                f"2/C({na + nb},{na}) = 2/{math.comb(na + nb, na)} ≈ {p_mw:.4f}"
                + (", so it can never reach p < 0.05." if p_mw >= 0.05 else "."))
    pairs = min(na, nb)
    p_w = stats.min_wilcoxon_p(pairs)
    text.append(f"A Wilcoxon signed-rank test on {pairs} seed-matched pairs cannot go below 2/2^{pairs} = {p_w:.4f}"
                + (", so it can never reach p < 0.05" if p_w >= 0.05 else "")
                + "; it is not used (a shared seed does not pair runs of two different models).")
    d = stats.detectable_effect(na, nb)
    sa, sb = summaries[c.a][m].std, summaries[c.b][m].std
    if d is not None and sa is not None and sb is not None:
        pooled = math.sqrt(((na - 1) * sa**2 + (nb - 1) * sb**2) / (na + nb - 2))
        text.append(f"A two-sided t-test at α = 0.05 with these group sizes has 80% power only for differences of "
                    f"about {d:.1f} standard deviations (≈ {pooled * d:.4f} in {m} at the pooled std {pooled:.4f}); "
                    "smaller true differences will usually go undetected, and p > 0.05 is no evidence that the "
                    "architectures are equal.")
    if c.ci_low is not None:
        side = ("it excludes 0, so the sign of the difference is supported by these runs" if c.ci_low > 0 or c.ci_high < 0
                else "it includes 0, so even the sign of the difference is not settled")
        text.append(f"The 95% interval of the difference, [{c.ci_low:.4f}, {c.ci_high:.4f}] (width "
                    f"{c.ci_high - c.ci_low:.4f}), is the honest summary: every difference in it is consistent with "
                    f"these runs; {side}.")
    else:
        text.append("Without an interval, the runs themselves (the table and the strip plot) are all there is.")
    return " ".join(text)


def not_in_statistics(r: CampaignReport) -> list[str]:
    """The runs left out of the statistics, by state, each with why; then file warnings."""
    c = r.campaign
    left = [run for run in c.runs if run.status != COMPLETED]
    counts = Counter(run.status for run in left)
    lines = [f"{len(left)} run(s): " + ", ".join(f"{counts[s]} {s.replace('_', ' ')}" for s in STATES[1:]) + "."]
    sections = {
        FAILED: ("Failed", lambda run: f"{_who(run, r)}: {run.reason or 'no error recorded'}"),
        UNFINISHED: ("Unfinished (no final.json: running, pending a requeue, or interrupted)",
                     lambda run: f"{_who(run, r)}: {tables.last_epoch_text(run.curve)}"
                                 + (f"; job {run.slurm_job_id}" if run.slurm_job_id else "")),
        NEVER_STARTED: ("Never started (in launches.jsonl, no run folder)",
                        lambda run: f"{_who(run, r)}: {run.reason}"),
        UNREADABLE: ("Unreadable (left out; fix or delete the folder)",
                     lambda run: f"`{_rel(run.path, r)}`: {run.reason}"),
    }
    for state, (title, describe) in sections.items():
        these = [run for run in left if run.status == state]
        if these:
            lines += ["", f"### {title}: {len(these)}", "", *(f"- {describe(run)}" for run in these)]
    if c.warnings:
        lines += ["", f"### File warnings: {len(c.warnings)}", "",
                  *(f"- `{_rel(path, r)}`: {problem}" for path, problem in c.warnings)]
    return lines


def print_terminal(r: CampaignReport, console: Console, written: list[Path]) -> None:
    """The same tables and lists, for a person at a terminal."""
    console.rule(f"[bold]campaign {escape(r.campaign.name)}")
    _show(console, tables.rich_table(overview_table(r)))
    for note in r.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    _show(console, tables.rich_table(tables.runs_table(r.runs, tables.TERMINAL_RUN_COLUMNS),
                                     max_rows=TERMINAL_MAX_RUNS))
    _show(console, tables.rich_table(tables.summary_table(r.summaries)))
    if any(a in REPORTED for a in r.summaries):
        console.print("[dim]reported = the group's published figures, on the group's data, not this campaign's[/]")
    _show(console, tables.rich_table(tables.detail_table(r.summaries)))
    for comp in r.comparisons:
        _show(console, tables.rich_table(tables.comparison_table(comp)))
        for note in comp.notes:
            console.print(f"[yellow]note:[/] {escape(note)}")
        console.print(escape(honest_paragraph(comp, r.summaries).replace("**", "")))
    lines = not_in_statistics(r)
    style = "bold red" if len(lines) > 1 else "green"
    console.print(f"[{style}]Runs not in the statistics[/] (paths under {escape(str(r.results_dir))}): "
                  f"{escape(lines[0])}")
    for line in lines[1:]:
        if line:
            console.print(escape(line.removeprefix("### ").replace("`", "")))
    if written:
        console.print(f"wrote {len(written)} file(s) to {escape(str(written[0].parent))}")


def _show(console: Console, table: RichTable) -> None:
    # Wider than the terminal: let the lines run on rather than dropping or cutting columns.
    # (Console.print cannot render wider than its console, hence a wider one on the same stream.)
    needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
    if needed > console.width:
        console = Console(file=console.file, width=needed, color_system=console.color_system,
                          force_terminal=console.is_terminal, no_color=console.no_color)
    console.print(table)


def _who(run: Run, r: CampaignReport) -> str:
    seed = f"seed {run.seed}, " if run.seed is not None else ""
    return f"{run.arch} run {run.run} ({seed}`{_rel(run.path, r)}`)"


def _rel(path: Path, r: CampaignReport) -> str:
    try:
        return Path(path).relative_to(r.results_dir).as_posix()
    except ValueError:
        return str(path)


DEFINITIONS = [
    "- Every metric of a run is taken at its best epoch (highest val_acc, ties to the lower val_loss), as "
    "recorded in its `final.json`.",
    "- `balanced_acc`: the mean recall over the classes present in the validation set; `macro_f1`: the mean of "
    "F1 = 2·TP / (2·TP + FP + FN) over the classes present in the truth or the predictions. Both are computed "
    "from the run's confusion matrix (rows = true class).",
    "- `queue_wait_s`: `started_at` − `submitted_at` from the run's `job.json`, n/a where unknown.",
    "- Summary: mean ± sample standard deviation; the 95% interval of the mean is mean ± t(0.975, n−1)·s/√n.",
    "- Head-to-head: difference of means with the Welch 95% interval (Welch–Satterthwaite df), Welch's t-test, "
    "the exact two-sided Mann–Whitney test, P(a run of A beats a run of B) = U/(n_A·n_B) with ties counted half "
    "(on a loss, lower beats), and Hedges' g = J·(mean_A − mean_B)/s_pooled with the exact small-sample "
    "correction J = Γ(df/2)/(√(df/2)·Γ((df−1)/2)), df = n_A + n_B − 2.",
    "- n/a: not defined for these runs (fewer than two runs, zero variance, no completed run); CSV cells are "
    "empty instead.",
    "",
]
