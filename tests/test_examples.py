"""The examples and benchmarks use the public API as users do: they import only ``memfit`` and
use only the names in ``memfit.__all__``, and no file is too long to read."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import memfit

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").rglob("*.py"))
SCRIPTS = EXAMPLES + sorted((ROOT / "benchmarks").glob("*.py"))


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


@pytest.mark.parametrize("path", SCRIPTS, ids=_name)
def test_example_uses_only_the_public_api(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            assert not (node.module or "").startswith("memfit"), f"{path.name}:{node.lineno} imports {node.module}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name == "memfit" or not alias.name.startswith("memfit"), f"{path.name}:{node.lineno}"
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "memfit":
            assert node.attr in [*memfit.__all__, "__version__"], (
                f"{path.name}:{node.lineno} uses memfit.{node.attr}, not public"
            )


@pytest.mark.parametrize("path", SCRIPTS, ids=_name)
def test_example_is_at_most_500_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= 500


@pytest.mark.slow
def test_train_minimal_plans_trains_and_measures_within_the_budget() -> None:
    script = Path(__file__).resolve().parents[1] / "examples" / "train_minimal.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--epochs", "1", "--budget", "90%"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = float(re.search(r"test accuracy ([\d.]+)%", proc.stdout).group(1))
    predicted, measured = map(float, re.search(r"([\d.]+) MiB predicted, ([\d.]+) MiB measured", proc.stdout).groups())
    assert accuracy > 80, proc.stdout
    assert measured <= 1.01 * predicted, proc.stdout
