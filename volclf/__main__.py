"""``python -m volclf describe --arch vit --preset seed [--json]``: the model's structure in figures."""

from __future__ import annotations

import argparse
import json
import sys

from volclf.config import ARCHS, PRESETS, make_run_config, parse_override
from volclf.errors import VolclfError
from volclf.models import describe, human_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m volclf")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("describe", help="input shape, parameters, tokens or flatten size, memory per sample")
    d.add_argument("--arch", required=True, choices=ARCHS)
    d.add_argument("--preset", default="seed", choices=PRESETS)
    d.add_argument("--num-classes", type=int, default=None, help="default: the preset's data.num_classes")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    d.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    try:
        overrides: dict = {"model": {}, "data": {}, "train": {}, "resources": {}}
        for text in args.overrides:
            section, key, value = parse_override(text)
            overrides[section][key] = value
        cfg = make_run_config(campaign="describe", arch=args.arch, run=0, seed=0, preset=args.preset,
                              overrides=overrides)
        info = describe(cfg.model, args.num_classes or cfg.data.num_classes)
    except (VolclfError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info["preset"] = args.preset
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.arch} · preset {args.preset}", show_header=False)
    for key, value in info.items():
        if key.startswith("memory") and isinstance(value, dict) and key.endswith("bytes"):
            value = ", ".join(f"{k} {human_bytes(v)}" for k, v in value.items())
        elif key == "memory_fixed_bytes":
            value = human_bytes(value) + " (weights, gradients, AdamW moments)"
        elif key == "memory_per_sample_gib":
            continue
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
