"""The ``memfit`` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from memfit.cli import main


def test_report_of_a_zoo_model_with_measurement(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "report",
            "resnet18",
            "--stem",
            "cifar",
            "--batch",
            "2",
            "--input",
            "3x32x32",
            "--optimizer",
            "adam",
            "--measure",
            "--num-classes",
            "10",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "memfit memory report (predicted): ResNet, batch 2, optimizer=adam" in out
    assert "conv1 (Conv2d)" in out and "[2, 64, 32, 32]" in out
    assert "memfit memory report (measured)" in out
    assert "Predicted peak vs measured:" in out
    assert "profiler_start" not in out


def test_report_of_a_factory_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "tests.factories:tiny_mlp", "--batch", "4", "--input", "1x8x8", "--summary"]) == 0
    out = capsys.readouterr().out
    assert "Sequential, batch 4" in out and "Layer (type)" not in out


def test_report_of_a_language_model_takes_token_ids(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "gpt", "--batch", "2", "--input", "16", "--summary", "--no-calibrate"]) == 0
    assert "input [2, 16] torch.int64" in capsys.readouterr().out


def test_report_and_plan_per_data_parallel_process(capsys: pytest.CaptureFixture[str]) -> None:
    common = [
        "resnet18",
        "--stem",
        "cifar",
        "--batch",
        "2",
        "--input",
        "3x32x32",
        "--optimizer",
        "adam",
        "--parallel",
        "fsdp",
        "--world-size",
        "4",
        "--fsdp-unit",
        "layer1",
        "--fsdp-unit",
        "layer2",
    ]
    assert main(["report", *common, "--summary", "--no-calibrate"]) == 0
    out = capsys.readouterr().out
    assert "FSDP, 4 processes, per process" in out
    assert main(["plan", *common, "--budget-mb", "1000", "--strategy", "dp"]) == 0
    assert "Budget (MiB, given): 1000.00" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "resnet18", "--world-size", "2"], "describe --parallel"),
        (["report", "resnet18", "--parallel", "ddp", "--measure"], "under torchrun"),
        (["report", "resnet18", "--parallel", "ddp", "--fsdp-unit", "layer1"], "leave them out for DDP"),
        (["report", "resnet1"], "unknown model"),
        (["report", "no.such.module:f"], "cannot load 'no.such.module:f'"),
        (["report", "tests.factories:tiny_mlp", "--input", "axb"], "--input 'axb': give the per-sample shape"),
        (["report", "tests.factories:tiny_mlp", "--input", "3x8x8"], "forward pass failed"),
    ],
)
def test_errors_are_one_clear_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("memfit: error:") and message in err


def test_models_lists_the_zoo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert "resnet50" in names and "densenet_bc_100" in names and "gpt2" in names


def test_plan_prints_the_table_and_the_measured_peak_within_budget(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["plan", "resnet18", "--stem", "cifar", "--batch", "4", "--num-classes", "10", "--strategy", "dp"]
    assert main([*args, "--budget-mb", "1"]) == 2
    err = capsys.readouterr().err
    minimum = float(err.split("feasible minimum is ")[1].split(" MiB")[0])
    plot = tmp_path / "plan.png"
    assert main([*args, "--budget-mb", f"{minimum * 1.02:.2f}", "--measure", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert plot.stat().st_size > 10_000
    assert "memfit plan (dp)" in out and "recompute" in out
    assert "within the budget" in out


def test_report_of_resnet50_at_batch_256_never_allocates_the_activations() -> None:
    """The unplanned step needs tens of GB; predicting it must stay far below that."""
    # VmHWM, not getrusage's ru_maxrss: on Linux the latter carries over the high-water mark of the
    # forking parent (a pytest worker that may have just run big models) across exec.
    code = (
        "import re, sys; from memfit.cli import main; "
        "rc = main(['report', 'resnet50', '--batch', '256', '--input', '3x224x224', '--summary']); "
        "print('RSS', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    predicted_peak = float(done.stdout.split("Peak of the step (in")[1].split(":")[1].split()[0])
    rss_kib = int(done.stdout.split("RSS")[1].split()[0])
    assert predicted_peak > 20_000  # MiB: what a real step would need
    assert rss_kib < 2 * 2**20  # KiB: under 2 GiB


def test_compress_prints_the_storage_table_and_saves_the_packed_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "mlp.memfit"
    assert (
        main(["compress", "tests.factories:tiny_mlp", "--method", "ternary", "--input", "1x8x8", "--save", str(path)])
        == 0
    )
    out = capsys.readouterr().out
    assert "Bits/w" in out and "computed, not measured" in out and "(measured file size)" in out
    assert path.stat().st_size > 0
