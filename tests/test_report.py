"""The report: golden output, statistics checked against their formulas, figures, nothing dropped.

The fixture (tests/fixtures/report/results/demo, see its README) has two architectures with
five runs each, one of them failed, an unreadable run folder, a run still in progress and a
launched run that never started. Tests work on tmp_path copies, never in the repository.

Regenerate the golden files after an intended change of output, then review the diff:

    VOLCLF_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_report.py -k golden
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import shutil
import statistics
import struct
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from scipy import stats as st
from sklearn.metrics import balanced_accuracy_score, f1_score

from volclf.report import ReportError, build_report
from volclf.report.__main__ import main
from volclf.report.stats import compare

FIXTURE = Path(__file__).parent / "fixtures" / "report"
GOLDEN = FIXTURE / "golden"
GOLDEN_SECTIONS = ("Summary", "Head-to-head", "Runs", "Runs not in the statistics")
PNG_SIZES = {"confusion_vit.png": (1100, 500), "confusion_cnn.png": (1100, 500),
             "learning_curves.png": (1200, 800), "strip_val_acc.png": (600, 500)}


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def copy_fixture(tmp: Path) -> Path:
    results = tmp / "results"
    shutil.copytree(FIXTURE / "results", results)
    return results


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, list[Path], str]:
    """The fixture reported once in every format (figures are the slow part)."""
    results = copy_fixture(tmp_path_factory.mktemp("full"))
    console = quiet()
    written = build_report(results, console=console)
    return results / "demo" / "report", written, console.file.getvalue()


def sections(markdown: str) -> dict[str, str]:
    """Level-2 sections of a Markdown text by title (subsections stay inside)."""
    parts = re.split(r"^## (.+)$", markdown, flags=re.M)
    return {title.strip(): body.strip() for title, body in zip(parts[1::2], parts[2::2])}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def completed_finals(arch: str) -> list[dict]:
    """The final records of the completed runs, read straight from the fixture files."""
    out = []
    for path in sorted((FIXTURE / "results" / "demo" / arch).glob("run-*/final.json")):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue
        if record["status"] == "completed":
            out.append(record)
    return out


# ------------------------------------------------------------------------------------- golden
def test_golden_summary_runs_and_report_sections(full):
    report_dir, _, _ = full
    if os.environ.get("VOLCLF_REGEN_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        for name in ("summary.csv", "runs.csv", "report.md"):
            shutil.copyfile(report_dir / name, GOLDEN / name)
        pytest.skip("golden files rewritten; review them with git diff")
    assert (report_dir / "summary.csv").read_text() == (GOLDEN / "summary.csv").read_text()
    assert (report_dir / "runs.csv").read_text() == (GOLDEN / "runs.csv").read_text()
    got, want = sections((report_dir / "report.md").read_text()), sections((GOLDEN / "report.md").read_text())
    for title in GOLDEN_SECTIONS:
        assert got[title] == want[title], f"section '{title}' of report.md differs from the golden file"


def test_all_outputs_written_atomically_and_linked(full):
    report_dir, written, terminal = full
    names = {p.name for p in written}
    assert {"report.md", "runs.csv", "summary.csv", "summary.tex", "comparison.csv", *PNG_SIZES} <= names
    assert not [p.name for p in report_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"
    markdown = (report_dir / "report.md").read_text()
    for name in PNG_SIZES:
        assert f"]({name})" in markdown  # relative link from report.md
    tex = (report_dir / "summary.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "reported" in tex
    for text in (markdown, tex, terminal, *(p.read_text() for p in report_dir.glob("*.csv"))):
        text = text.replace("training loss became nan", "")  # the failed run's own error message
        assert not re.search(r"\bnan\b", text, flags=re.I), "NaN leaked into an output"
    assert "Runs not in the statistics" in terminal and "Head-to-head on val_acc" in terminal


def test_reported_figures_are_separate_labelled_rows(full):
    report_dir, _, _ = full
    rows = read_csv(report_dir / "summary.csv")
    reported = {(r["arch"], r["metric"]): float(r["value"]) for r in rows if r["source"] == "reported"}
    assert reported == {("vit", "train_loss"): 0.2616, ("vit", "train_acc"): 0.8916, ("vit", "val_loss"): 0.5043,
                        ("vit", "val_acc"): 0.7979, ("cnn", "best_epoch"): 99, ("cnn", "train_loss"): 1.1192,
                        ("cnn", "val_loss"): 1.3018, ("cnn", "train_acc"): 0.7839, ("cnn", "val_acc"): 0.5971}
    assert all(r["n"] == "" and r["mean"] == "" for r in rows if r["source"] == "reported")
    summary = sections((report_dir / "report.md").read_text())["Summary"]
    assert "| vit | reported |" in summary and "| cnn | reported |" in summary
    assert "the group's data, not this campaign's" in summary


# --------------------------------------------------------------------------------- statistics
def test_summary_statistics_match_the_formulas(full):
    report_dir, _, _ = full
    rows = {(r["arch"], r["metric"]): r for r in read_csv(report_dir / "summary.csv") if r["source"] == "measured"}
    for arch in ("vit", "cnn"):
        finals = completed_finals(arch)
        assert len(finals) == 4  # the failed, unfinished and unreadable runs stay out
        for metric in ("val_acc", "train_loss", "best_epoch"):
            x = [f[metric] for f in finals]
            n = len(x)
            mean = sum(x) / n
            sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
            half = st.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
            row = rows[(arch, metric)]
            assert int(row["n"]) == n
            for key, want in (("mean", mean), ("std", sd), ("ci95_low", mean - half), ("ci95_high", mean + half),
                              ("median", statistics.median(x)),
                              ("min", min(x)), ("max", max(x))):
                assert float(row[key]) == pytest.approx(want, rel=1e-8, abs=1e-12), (arch, metric, key)


def test_confusion_matrix_scores_match_scikit_learn(full):
    report_dir, _, _ = full
    runs = {(r["arch"], r["run"]): r for r in read_csv(report_dir / "runs.csv")}
    for arch in ("vit", "cnn"):
        for final in completed_finals(arch):
            cm = np.array(final["confusion_matrix"])
            pairs = [(i, j) for (i, j), c in np.ndenumerate(cm) for _ in range(c)]
            y_true, y_pred = zip(*pairs)
            row = runs[(arch, str(final["run"]))]
            assert float(row["balanced_acc"]) == pytest.approx(balanced_accuracy_score(y_true, y_pred), rel=1e-9)
            assert float(row["macro_f1"]) == pytest.approx(f1_score(y_true, y_pred, average="macro"), rel=1e-9)


def test_head_to_head_matches_the_formulas(full):
    report_dir, _, _ = full
    (row,) = read_csv(report_dir / "comparison.csv")
    assert (row["a"], row["b"], row["metric"]) == ("vit", "cnn", "val_acc")
    a = [f["val_acc"] for f in completed_finals("vit")]
    b = [f["val_acc"] for f in completed_finals("cnn")]
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    se = math.sqrt(va / na + vb / nb)
    df = se**4 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))  # Welch–Satterthwaite
    t = (ma - mb) / se
    half = st.t.ppf(0.975, df) * se
    assert float(row["diff"]) == pytest.approx(ma - mb, rel=1e-9)
    assert float(row["df"]) == pytest.approx(df, rel=1e-9)
    assert float(row["t"]) == pytest.approx(t, rel=1e-9)
    assert float(row["p_welch"]) == pytest.approx(2 * st.t.sf(abs(t), df), rel=1e-6)
    assert float(row["ci_low"]) == pytest.approx(ma - mb - half, rel=1e-9)
    assert float(row["ci_high"]) == pytest.approx(ma - mb + half, rel=1e-9)
    # U and P(A beats B) by counting pairs, ties half.
    u = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b)
    assert float(row["u"]) == u
    assert float(row["prob_a_better"]) == pytest.approx(u / (na * nb))
    # Exact two-sided Mann–Whitney p by enumerating every split of the pooled values.
    pooled = a + b
    us = [sum(1.0 if pooled[i] > y else 0.5 if pooled[i] == y else 0.0 for i in idx
              for y in (pooled[j] for j in range(na + nb) if j not in idx))
          for idx in itertools.combinations(range(na + nb), na)]
    p = min(1.0, 2 * min(sum(v >= u for v in us), sum(v <= u for v in us)) / len(us))
    assert float(row["p_mann_whitney"]) == pytest.approx(p, rel=1e-9)
    # Hedges' g with the exact small-sample correction (close to 1 - 3/(4(na+nb)-9)).
    dfp = na + nb - 2
    pooled_sd = math.sqrt(((na - 1) * va + (nb - 1) * vb) / dfp)
    j = math.gamma(dfp / 2) / (math.sqrt(dfp / 2) * math.gamma((dfp - 1) / 2))
    assert j == pytest.approx(1 - 3 / (4 * (na + nb) - 9), abs=2e-3)
    assert float(row["hedges_g"]) == pytest.approx(j * (ma - mb) / pooled_sd, rel=1e-9)


def test_honest_paragraph_states_the_limits_of_few_runs(full):
    report_dir, _, _ = full
    text = sections((report_dir / "report.md").read_text())["Head-to-head"]
    assert "2/C(8,4) = 2/70" in text  # 4 vs 4 completed runs in the fixture
    assert "can never reach p < 0.05" in text  # Wilcoxon with 4 pairs
    assert "95% interval of the difference" in text


def test_loss_metric_counts_lower_as_better(tmp_path):
    results = copy_fixture(tmp_path)
    build_report(results, formats="csv", metric="val_loss", console=quiet())
    (row,) = read_csv(results / "demo" / "report" / "comparison.csv")
    assert row["metric"] == "val_loss" and row["higher_is_better"] == "False"
    assert float(row["prob_a_better"]) == 1.0  # every vit run has a lower val_loss than every cnn run
    assert float(row["diff"]) < 0


def test_compare_handles_tiny_and_constant_groups():
    one = compare("vit", "cnn", [0.8], [0.6, 0.7], "val_acc")
    assert one.ci_low is None and one.p_welch is None and one.hedges_g is None
    assert one.prob_a_better == 1.0 and "at least 2 completed runs" in one.notes[0]
    flat = compare("vit", "cnn", [0.7, 0.7], [0.6, 0.6], "val_acc")
    assert flat.diff == pytest.approx(0.1) and flat.t is None and "zero variance" in flat.notes[-1]
    empty = compare("vit", "cnn", [], [0.6], "val_acc")
    assert empty.diff is None and empty.notes


def test_small_and_constant_campaign_reports_na_not_nan(tmp_path):
    results = tmp_path / "results"
    for arch, values in (("vit", [0.7]), ("cnn", [0.6, 0.6])):
        for k, v in enumerate(values):
            record = json.loads((FIXTURE / "results/demo" / arch / "run-0" / "final.json").read_text())
            record.update(run=k, seed=k, val_acc=v)
            (results / "c" / arch / f"run-{k}").mkdir(parents=True)
            (results / "c" / arch / f"run-{k}" / "final.json").write_text(json.dumps(record))
    console = quiet()
    build_report(results, formats="md,csv,tex,png", console=console)
    out = results / "c" / "report"
    for path in [*out.glob("*.md"), *out.glob("*.csv"), *out.glob("*.tex")]:
        assert not re.search(r"\bnan\b", path.read_text(), flags=re.I), path.name
    markdown = (out / "report.md").read_text()
    assert "n/a" in markdown and "at least 2 completed runs" in markdown
    assert all((out / name).stat().st_size > 0 for name in ("confusion_vit.png", "strip_val_acc.png"))


# ------------------------------------------------------------------------------------ figures
def test_figures_are_pngs_of_the_expected_size(full):
    report_dir, _, _ = full
    for name, size in PNG_SIZES.items():
        data = (report_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", name
        assert struct.unpack(">II", data[16:24]) == size, name
        assert len(data) > 10_000, f"{name} is suspiciously small"


# ---------------------------------------------------------------------------- nothing dropped
def test_runs_outside_the_statistics_are_counted_and_named(full):
    report_dir, _, terminal = full
    left = sections((report_dir / "report.md").read_text())["Runs not in the statistics"]
    assert left.startswith("5 run(s): 2 failed, 1 unfinished, 1 never started, 1 unreadable.")
    assert "vit run 3 (seed 3, `demo/vit/run-3`): NonFiniteLoss: training loss became nan in epoch 3" in left
    assert "cnn run 5 (seed 5, `demo/cnn/run-5`): last epoch 2:" in left
    assert "cnn run 6 (`demo/cnn/run-6`): launched 2024-05-01T10:01:00" in left
    assert "`demo/vit/run-5`: final.json: not valid JSON" in left
    states = {(r["arch"], r["run"]): r["status"] for r in read_csv(report_dir / "runs.csv")}
    assert states[("cnn", "6")] == "never_started" and states[("vit", "5")] == "unreadable"
    assert states[("cnn", "5")] == "unfinished" and list(states.values()).count("completed") == 8
    assert "demo/vit/run-5" in terminal and "never started" in terminal.lower()


def test_bad_files_are_reported_by_path_and_do_not_stop_the_report(tmp_path):
    results = copy_fixture(tmp_path)
    demo = results / "demo"
    (demo / "vit" / "run-4" / "final.json").write_text('{"status": "completed"}')  # keys missing
    (demo / "cnn" / "run-3" / "final.json").write_text("")  # half-written
    (demo / "vit" / "run-0" / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    (demo / "vit" / "run-1" / "job.json").write_text("{")
    (demo / "cnn" / "run-0" / "config.json").write_text("[1,")
    with open(demo / "launches.jsonl", "a") as fh:
        fh.write("garbage\n")
    written = build_report(results, formats="md,csv", console=quiet())
    assert written
    left = sections((demo / "report" / "report.md").read_text())["Runs not in the statistics"]
    assert "`demo/vit/run-4`: final.json: missing key(s) campaign, arch, run" in left
    assert "`demo/cnn/run-3`: final.json: empty file" in left
    assert "`demo/vit/run-0/metrics.jsonl`: line 2 is not valid JSON; learning curve left out" in left
    assert "`demo/vit/run-1/job.json`" in left and "`demo/cnn/run-0/config.json`" in left
    assert "`demo/launches.jsonl`: line 3 unusable" in left
    rows = {(r["arch"], r["metric"]): r for r in read_csv(demo / "report" / "summary.csv") if r["source"] == "measured"}
    assert rows[("vit", "val_acc")]["n"] == "3" and rows[("cnn", "val_acc")]["n"] == "3"


def test_job_ids_from_the_launch_log_name_waiting_runs(tmp_path):
    results = copy_fixture(tmp_path)
    with open(results / "demo" / "launches.jsonl", "a") as fh:  # a later resubmission of cnn 5 and 6
        fh.write(json.dumps({"time": "2024-05-02T09:00:00", "arch": "cnn", "runs": [5, 6], "backend": "slurm",
                             "job_ids": {"5": "2000_5", "6": "2000_6"}}) + "\n")
    build_report(results, formats="md", console=quiet())
    left = sections((results / "demo" / "report" / "report.md").read_text())["Runs not in the statistics"]
    assert "cnn run 5 (seed 5, `demo/cnn/run-5`): last epoch 2: val_acc 0.5000, val_loss 1.6000; job 2000_5" in left
    assert "cnn run 6 (`demo/cnn/run-6`): launched 2024-05-02T09:00:00 (slurm job 2000_6)" in left


def test_unfinished_runs_never_enter_the_statistics(tmp_path):
    results = copy_fixture(tmp_path)
    build_report(results, formats="csv", console=quiet())
    before = (results / "demo" / "report" / "summary.csv").read_text()
    # An unfinished run that looks excellent so far must not move any number.
    with open(results / "demo" / "cnn" / "run-5" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 3, "train_loss": 0.01, "train_acc": 1.0, "val_loss": 0.01, "val_acc": 1.0}) + "\n")
    build_report(results, formats="csv", console=quiet())
    assert (results / "demo" / "report" / "summary.csv").read_text() == before


# -------------------------------------------------------------------------------- command line
def test_cli_missing_dir_is_an_error_and_empty_dir_a_message(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 0
    assert "No runs under" in capsys.readouterr().out
    results = copy_fixture(tmp_path)
    assert main([str(results), "--campaign", "other"]) == 2
    assert "campaigns found: demo" in capsys.readouterr().err
    assert main([str(results), "--format", "md,pdf"]) == 2
    assert main([str(results), "--metric", "accuracy"]) == 2
    assert main([str(results), "--campaign", "demo", "--format", "csv"]) == 0
    assert {p.name for p in (results / "demo" / "report").iterdir()} == {"runs.csv", "summary.csv", "comparison.csv"}


def test_build_report_rejects_unknown_format(tmp_path):
    with pytest.raises(ReportError, match="choose a comma-separated list"):
        build_report(copy_fixture(tmp_path), formats=["xlsx"], console=quiet())
