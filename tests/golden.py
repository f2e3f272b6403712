"""Golden files: printed text compared, exactly, with its expected copy under ``tests/golden/``.

When a change to a table is intended, regenerate the copies and review them::

    MEMFIT_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py
    git diff tests/golden

A regenerating run fails every test whose file it rewrote, so that it can never pass in place of a
comparison, and it refuses to run at all where ``CI`` is set (``.ci/run`` also unsets the variable).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).parent / "golden"
REGEN_ENV = "MEMFIT_REGEN_GOLDEN"
HOW = (
    f"if the change is intended: {REGEN_ENV}=1 python -m pytest tests/test_golden.py, "
    "then review `git diff tests/golden`"
)


def regenerating() -> bool:
    """Whether this run rewrites the golden files; never in CI."""
    if os.environ.get(REGEN_ENV, "") in ("", "0"):
        return False
    if os.environ.get("CI"):
        pytest.fail(f"{REGEN_ENV} is set in CI, where golden files are only compared", pytrace=False)
    return True


def assert_golden(name: str, text: str) -> None:
    """``text`` (plus a final newline) is exactly ``tests/golden/<name>.txt``."""
    path = GOLDEN_DIR / f"{name}.txt"
    expected = path.read_text() if path.exists() else None
    if regenerating():
        if expected != text + "\n":
            path.write_text(text + "\n")
            pytest.fail(f"rewrote tests/golden/{path.name}: review it with `git diff tests/golden`", pytrace=False)
        return
    if expected is None:
        pytest.fail(f"tests/golden/{path.name} does not exist; {HOW}", pytrace=False)
    if expected != text + "\n":
        diff = difflib.unified_diff(
            expected.splitlines(keepends=True),
            (text + "\n").splitlines(keepends=True),
            fromfile=f"tests/golden/{path.name} (expected)",
            tofile="printed now",
        )
        pytest.fail(f"the printed text differs from tests/golden/{path.name}:\n{''.join(diff)}\n{HOW}", pytrace=False)
