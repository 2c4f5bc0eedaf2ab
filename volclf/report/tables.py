"""Records and statistics -> tables: pandas frames for CSV, text tables for Markdown, LaTeX, rich.

Frames keep full values (CSV cells are empty where a value is undefined); text tables hold
formatted strings, ``n/a`` where undefined, and render the same way in every format.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich import box
from rich.table import Table as RichTable

from volclf import runs
from volclf.report import stats
from volclf.report.collect import COMPLETED, UNFINISHED, Campaign
from volclf.report.reported import REPORTED

# The final metrics summarized per architecture: name -> (higher is better, decimals).
METRICS: dict[str, tuple[bool, int]] = {
    "best_epoch": (True, 1), "train_loss": (False, 4), "train_acc": (True, 4), "val_loss": (False, 4),
    "val_acc": (True, 4), "balanced_acc": (True, 4), "macro_f1": (True, 4),
}
RUN_COLUMNS = (
    "campaign", "arch", "run", "seed", "status", "best_epoch", "epochs", "train_loss", "train_acc", "val_loss",
    "val_acc", "balanced_acc", "macro_f1", "wall_time_s", "gpu_hours", "queue_wait_s", "slurm_job_id", "host",
    "attempts", "note", "path",
)
DOC_RUN_COLUMNS = tuple(c for c in RUN_COLUMNS if c not in ("campaign", "host", "attempts", "path"))
TERMINAL_RUN_COLUMNS = ("arch", "run", "seed", "status", "best_epoch", "train_loss", "train_acc", "val_loss", "val_acc",
                        "balanced_acc", "macro_f1", "gpu_hours", "slurm_job_id")
INT_COLUMNS = ("run", "seed", "best_epoch", "epochs", "attempts")
STAT_COLUMNS = ("n", "mean", "std", "ci95_low", "ci95_high", "median", "min", "max")
DECIMALS = {"wall_time_s": 0, "queue_wait_s": 0, "gpu_hours": 3, "diff": 4, "ci_low": 4, "ci_high": 4, "df": 2,
            "t": 3, "u": 1, "prob_a_better": 3, "hedges_g": 2, **{m: d for m, (_, d) in METRICS.items()}}
NA = "n/a"


# ------------------------------------------------------------------------------------ frames
def runs_frame(campaign: Campaign, results_dir: Path) -> pd.DataFrame:
    """One row per run in every state; metrics only where a final record has them."""
    rows = []
    for r in campaign.runs:
        final = r.final or {}
        row: dict[str, Any] = {c: final.get(c) for c in RUN_COLUMNS if c in final}
        row.update(campaign=campaign.name, arch=r.arch, run=r.run, seed=r.seed, status=r.status,
                   queue_wait_s=r.queue_wait_s, slurm_job_id=r.slurm_job_id, path=_relative(r.path, results_dir))
        if final.get("confusion_matrix"):
            row["balanced_acc"], row["macro_f1"] = stats.confusion_scores(final["confusion_matrix"])
        if r.status == UNFINISHED:
            row["epochs"] = r.curve[-1].get("epoch") if r.curve else 0
            row["note"] = last_epoch_text(r.curve)
        else:
            row["note"] = r.reason
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    for column in INT_COLUMNS:
        frame[column] = pd.array([_int_or_none(v) for v in frame[column]], dtype="Int64")
    for column in ("slurm_job_id", "host", "note"):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame


def last_epoch_text(curve: list[dict[str, Any]]) -> str:
    """What an unfinished run's metrics.jsonl says so far."""
    if not curve:
        return "no epoch finished yet"
    last = curve[-1]
    parts = [f"{k} {fmt(last.get(k), k)}" for k in ("val_acc", "val_loss") if k in last]
    return f"last epoch {last.get('epoch', '?')}: " + ", ".join(parts)


def summaries(frame: pd.DataFrame, archs: list[str]) -> dict[str, dict[str, stats.Summary]]:
    """arch -> metric -> summary over the completed runs."""
    done = frame[frame["status"] == COMPLETED]
    return {a: {m: stats.describe(_values(done, a, m)) for m in METRICS} for a in archs}


def completed_values(frame: pd.DataFrame, arch: str, metric: str) -> list[float]:
    return _values(frame[frame["status"] == COMPLETED], arch, metric)


def summary_frame(campaign: str, table: dict[str, dict[str, stats.Summary]]) -> pd.DataFrame:
    """Long format: one row per (arch, source, metric); reported rows carry only ``value``."""
    rows = []
    for arch, per_metric in table.items():
        for metric, s in per_metric.items():
            rows.append({"campaign": campaign, "arch": arch, "source": "measured", "metric": metric, "n": s.n,
                         "mean": s.mean, "std": s.std, "ci95_low": s.ci_low, "ci95_high": s.ci_high,
                         "median": s.median, "min": s.min, "max": s.max, "value": None})
        for metric, value in REPORTED.get(arch, {}).items():
            rows.append({"campaign": campaign, "arch": arch, "source": "reported", "metric": metric, "n": None,
                         "value": value})
    frame = pd.DataFrame(rows, columns=["campaign", "arch", "source", "metric", *STAT_COLUMNS, "value"])
    frame["n"] = pd.array(frame["n"].tolist(), dtype="Int64")
    return frame


def comparison_frame(campaign: str, comparisons: list[stats.Comparison]) -> pd.DataFrame:
    rows = [{"campaign": campaign, **{k: v for k, v in vars(c).items() if k != "notes"},
             "notes": "; ".join(c.notes) or None} for c in comparisons]
    return pd.DataFrame(rows)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Atomically; undefined values are empty cells, floats keep 10 significant digits."""
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.10g", na_rep="")
    runs.atomic_write(path, lambda fh: fh.write(buffer.getvalue()))


# ------------------------------------------------------------------------------ text tables
@dataclass
class Table:
    """Formatted cells; ``groups`` are row indices before which a rule is drawn."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)  # right-aligned (numeric) columns
    groups: list[int] = field(default_factory=list)


def fmt(value: Any, kind: str = "") -> str:
    """A cell: ``n/a`` for missing or non-finite values, fixed decimals for known metrics."""
    if value is None or value is pd.NA or (isinstance(value, float) and not math.isfinite(value)):
        return NA
    if isinstance(value, float) and kind in DECIMALS:
        return f"{value:.{DECIMALS[kind]}f}"
    if kind.startswith("p_") and isinstance(value, float):
        return "<0.0001" if value < 1e-4 else f"{value:.4f}"
    return str(value)


def runs_table(frame: pd.DataFrame, columns: tuple[str, ...] = DOC_RUN_COLUMNS) -> Table:
    columns = list(columns)
    rows = [["" if c == "note" and _cell(v) is None else fmt(_cell(v), c) for c, v in zip(columns, rec)]
            for rec in frame[columns].itertuples(index=False)]
    return Table("Runs", columns, rows, right={i for i, c in enumerate(columns) if c in DECIMALS or c in INT_COLUMNS})


def summary_table(table: dict[str, dict[str, stats.Summary]]) -> Table:
    """Per architecture: mean ± std of every metric, then the group's reported figures."""
    headers = ["arch", "source", "n", *METRICS]
    rows, groups = [], []
    for arch, per_metric in table.items():
        groups.append(len(rows))
        n = next(iter(per_metric.values())).n
        rows.append([arch, "measured", str(n)] + [_mean_std(s, m) for m, s in per_metric.items()])
        if arch in REPORTED:
            rows.append([arch, "reported", ""] + [fmt(REPORTED[arch].get(m), m) if m in REPORTED[arch] else ""
                                                  for m in METRICS])
    return Table("Summary of completed runs (mean ± sample std)", headers, rows,
                 right=set(range(2, len(headers))), groups=groups[1:])


def detail_table(table: dict[str, dict[str, stats.Summary]]) -> Table:
    headers = ["arch", "metric", "n", "mean", "std", "95% CI of mean", "median", "min", "max"]
    rows, groups = [], []
    for arch, per_metric in table.items():
        groups.append(len(rows))
        for m, s in per_metric.items():
            ci = f"[{fmt(s.ci_low, m)}, {fmt(s.ci_high, m)}]" if s.ci_low is not None else NA
            rows.append([arch, m, str(s.n), fmt(s.mean, m), fmt(s.std, m), ci, fmt(s.median, m), fmt(s.min, m),
                         fmt(s.max, m)])
    return Table("Statistics per architecture (completed runs)", headers, rows,
                 right=set(range(2, len(headers))), groups=groups[1:])


def comparison_table(c: stats.Comparison) -> Table:
    m = c.metric
    ci = f"[{fmt(c.ci_low, m)}, {fmt(c.ci_high, m)}]" if c.ci_low is not None else NA
    better = "higher" if c.higher_is_better else "lower"
    rows = [
        [f"n ({c.a}, {c.b})", f"{c.n_a}, {c.n_b}"],
        [f"mean {m} ({c.a}, {c.b})", f"{fmt(c.mean_a, m)}, {fmt(c.mean_b, m)}"],
        [f"difference of means ({c.a} − {c.b})", fmt(c.diff, m)],
        ["95% Welch interval of the difference", ci],
        ["Welch t (df)", f"{fmt(c.t, 't')} ({fmt(c.df, 'df')})" if c.t is not None else NA],
        ["Welch t-test p (two-sided)", fmt(c.p_welch, "p_welch")],
        [f"Mann–Whitney U ({c.a} {better})", fmt(c.u, "u")],
        ["exact Mann–Whitney p (two-sided)", fmt(c.p_mann_whitney, "p_mw")],
        [f"P(a {c.a} run beats a {c.b} run) = U/(n_a·n_b)", fmt(c.prob_a_better, "prob_a_better")],
        ["Hedges' g", fmt(c.hedges_g, "hedges_g")],
    ]
    return Table(f"Head-to-head on {m}: {c.a} vs {c.b} ({better} is better)", ["statistic", "value"], rows, right={1})


# ---------------------------------------------------------------------------------- renderers
def markdown(table: Table) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    align = ["---:" if i in table.right else "---" for i in range(len(table.headers))]
    return "\n".join([line(table.headers), "|" + "|".join(align) + "|", *(line(r) for r in table.rows)]) + "\n"


def latex(table: Table, caption: str, label: str) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``)."""
    spec = "".join("r" if i in table.right else "l" for i in range(len(table.headers)))
    out = ["\\begin{table}[ht]", "\\centering", f"\\caption{{{_tex(caption)}}}", f"\\label{{{label}}}",
           f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
           " & ".join(_tex(h) for h in table.headers) + " \\\\", "\\midrule"]
    for i, row in enumerate(table.rows):
        if i in table.groups:
            out.append("\\midrule")
        out.append(" & ".join(_tex(c) for c in row) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


def rich_table(table: Table, max_rows: int | None = None) -> RichTable:
    shown = table.rows if max_rows is None else table.rows[:max_rows]
    title = table.title
    if len(shown) < len(table.rows):
        title += f" (first {len(shown)} of {len(table.rows)}; all in runs.csv and report.md)"
    out = RichTable(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for i, h in enumerate(table.headers):
        # Cells are short and must stay whole: never wrapped into pieces, never cut.
        widest = max([len(h), *(len(row[i]) for row in shown)])
        out.add_column(h, justify="right" if i in table.right else "left", no_wrap=True, min_width=widest)
    for i, row in enumerate(shown):
        out.add_row(*row, end_section=i + 1 in table.groups)
    return out


# ---------------------------------------------------------------------------------- helpers
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "−": r"$-$"}


def _tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def _mean_std(s: stats.Summary, metric: str) -> str:
    if s.mean is None:
        return NA
    return f"{fmt(s.mean, metric)} ± {fmt(s.std, metric)}"


def _values(frame: pd.DataFrame, arch: str, metric: str) -> list[float]:
    return [float(v) for v in frame.loc[frame["arch"] == arch, metric] if _cell(v) is not None]


def _cell(value: Any) -> Any:
    """pandas' missing markers -> None; numpy scalars -> Python numbers."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _int_or_none(value: Any) -> int | None:
    value = _cell(value)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)

