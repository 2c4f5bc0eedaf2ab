"""``python -m volclf.report [RESULTS_DIR] [--campaign C] [--format md,csv,tex,png] [--metric val_acc]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from volclf.errors import VolclfError
from volclf.report import FORMATS, build_report
from volclf.report.tables import METRICS


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, build the report; 0 on success, 2 for a usage problem."""
    parser = argparse.ArgumentParser(
        prog="python -m volclf.report",
        description="Aggregate finished runs into tables, statistics and figures, per campaign, "
                    "written to RESULTS_DIR/<campaign>/report/.")
    parser.add_argument("results_dir", nargs="?", default="results", type=Path,
                        help="the results folder (default: results)")
    parser.add_argument("--campaign", help="report only this campaign (default: every campaign found)")
    parser.add_argument("--format", default=",".join(FORMATS),
                        help=f"comma-separated outputs among {', '.join(FORMATS)} (default: all)")
    parser.add_argument("--metric", default="val_acc",
                        help=f"primary metric of the head-to-head: {', '.join(METRICS)} (default: val_acc)")
    args = parser.parse_args(argv)
    console = Console()
    try:
        build_report(args.results_dir, campaign=args.campaign, formats=args.format, metric=args.metric,
                     console=console)
    except VolclfError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
