"""Shared helpers for the tests. SLURM tests need the project's test cluster (see tests/test_slurm.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A fresh results folder."""
    path = tmp_path / "results"
    path.mkdir()
    return path


def launch_cmd(*args: str) -> list[str]:
    return [PYTHON, str(ROOT / "launch.py"), *args]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("COLUMNS", "200")  # rich tables: keep rows on one line for the assertions
    return env
