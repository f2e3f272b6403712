"""The ``memfit`` command line."""

from __future__ import annotations

import pytest

from memfit.cli import main


def test_report_of_a_zoo_model_with_measurement(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["report", "resnet18", "--stem", "cifar", "--batch", "2", "--input", "3x32x32",
                 "--optimizer", "adam", "--measure", "--num-classes", "10"])
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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["report", "resnet1"], "unknown model"),
        (["report", "no.such.module:f"], "cannot load 'no.such.module:f'"),
        (["report", "tests.factories:tiny_mlp", "--input", "axb"], "--input must look like"),
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
