"""The foreign-model conformance table: every case of tests/foreign.py, as the test suite checks it.

Runs ``tests/test_foreign_models.py`` over all cases (torchvision, timm, Hugging Face; random init,
small shapes, nothing downloaded) and prints a Markdown table from the figures each test records:
capture, predicted and measured peak, and the measured peak of the plans at 25/50/75% of the way
from the feasible minimum to the unplanned peak against their budgets. Every figure says whether
it is measured or predicted.

    .venv/bin/python benchmarks/models.py > docs/models.md      # ~10 min on 2 cores
    .venv/bin/python benchmarks/models.py -k "tv.resnet18 or hf.gpt2"
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRACTIONS = ("25%", "50%", "75%")


def run(select: str | None, workers: int) -> Path:
    """Run the matrix and return its junit XML (the figures are record_property entries)."""
    out = Path(tempfile.mkdtemp(prefix="memfit-models-")) / "matrix.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_foreign_models.py"]
    cmd += ["-n", str(workers)] if workers > 1 else []
    cmd += ["-k", select] if select else []
    cmd += [f"--junitxml={out}", "-o", "junit_family=xunit1"]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "MEMFIT_MODELS": "all"}, stdout=sys.stderr, check=False)
    return out


def rows(xml: Path) -> dict[str, dict[str, object]]:
    """Per case: its recorded figures and whether each of its two tests passed."""
    cases: dict[str, dict[str, object]] = {}
    for tc in ET.parse(xml).getroot().iter("testcase"):
        name = tc.get("name", "")
        case = name[name.index("[") + 1 : -1]
        entry = cases.setdefault(case, {"ok": True})
        entry.update({p.get("name"): p.get("value") for p in tc.iter("property")})
        if tc.find("failure") is not None or tc.find("error") is not None:
            entry["ok"] = False
        if tc.find("skipped") is not None:
            entry["skipped"] = True
    return cases


def table(cases: dict[str, dict[str, object]]) -> str:
    lines = [
        "| model | capture | peak MiB, predicted / measured | error | "
        + " | ".join(f"{f}: budget -> measured MiB" for f in FRACTIONS)
        + " | result |",
        "|---|---|---|---|" + "---|" * len(FRACTIONS) + "---|",
    ]
    for name in sorted(cases):
        c = cases[name]
        if c.get("skipped"):
            lines.append(f"| {name} | skipped (package missing) |" + " |" * (3 + len(FRACTIONS)))
            continue
        capture = {"refused": "refused (clear error)"}.get(str(c.get("capture")), str(c.get("capture", "")))
        peak = f"{c['estimate_mb']} / {c['measured_mb']}" if "estimate_mb" in c else ""
        error = f"{float(c['estimate_error_pct']):+.2f}%" if "estimate_error_pct" in c else ""
        cells = []
        for f in FRACTIONS:
            budget, measured = c.get(f"budget_{f}"), c.get(f"measured_{f}")
            cells.append(f"{budget} -> {measured}" if budget is not None else "")
        lines.append(
            f"| {name} | {capture} | {peak} | {error} | " + " | ".join(cells) + f" | {'pass' if c['ok'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-k", dest="select", help="pytest -k expression: a subset of the cases")
    p.add_argument("-n", dest="workers", type=int, default=2, help="pytest-xdist workers")
    args = p.parse_args()
    cases = rows(run(args.select, args.workers))
    passed = sum(bool(c["ok"]) and not c.get("skipped") for c in cases.values())
    print(f"{passed} of {len(cases)} models pass (estimate within 3% of the allocator's measured peak; every plan")
    print("measured within its budget, training exactly like the model, the model unchanged).\n")
    print(table(cases))


if __name__ == "__main__":
    main()
