"""environment.yml (conda, for the cluster) and pyproject.toml (pip) name the same dependencies."""

from __future__ import annotations

import re
import tomllib

from conftest import ROOT


def names(requirements: list[str]) -> dict[str, str]:
    out = {}
    for req in requirements:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(.*)$", req)
        if m and not req.startswith("-"):
            out[m.group(1).lower()] = m.group(2).replace(" ", "")
    return out


def test_environment_yml_and_pyproject_name_the_same_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_deps = names(project["dependencies"])
    text = (ROOT / "environment.yml").read_text()
    block = text[text.index("- pip:"):]
    conda_pip = names([ln.strip()[2:] for ln in block.splitlines()[1:] if ln.strip().startswith("- ")])
    assert pip_deps == conda_pip
    assert {"torch", "submitit", "numpy", "pandas", "scikit-learn", "scipy", "rich", "matplotlib", "nibabel"} <= set(pip_deps)
