"""One rule for budgets in the API, the command line and the examples."""

from __future__ import annotations

import pytest
import torch

import memfit
from memfit.cli import main


@pytest.mark.parametrize(
    ("given", "nbytes", "fraction"),
    [
        (300, 300 * 2**20, None),
        (0.5, 2**19, None),
        ("300", 300 * 2**20, None),
        ("1.5GiB", 1536 * 2**20, None),
        ("800 MiB", 800 * 2**20, None),
        ("2GB", 2 * 10**9, None),
        ("512kib", 512 * 2**10, None),
        ("85%", None, 0.85),
        ("100%", None, 1.0),
    ],
)
def test_budgets_as_users_write_them(given, nbytes, fraction) -> None:
    b = memfit.Budget.parse(given)
    assert (b.nbytes, b.fraction) == (nbytes, fraction)


@pytest.mark.parametrize(
    "given", [float("inf"), float("nan"), 0, -5, None, True, "85", "1GBB", "x", "0%", "150%", "-1MiB", "inf", [300]]
)
def test_a_bad_budget_is_a_clear_error_naming_the_argument(given) -> None:
    if given == "85":  # a plain number in a string is MiB, as on the command line
        assert memfit.Budget.parse(given).nbytes == 85 * 2**20
        return
    with pytest.raises(memfit.MemfitInputError, match=r"budget_mb=.*(budget|percentage|unit)"):
        memfit.Budget.parse(given)


def test_a_bad_budget_is_refused_before_any_capture(small_cnn) -> None:
    with pytest.raises(memfit.MemfitInputError, match=r"budget_mb=inf"):
        memfit.optimize(small_cnn, float("inf"), torch.randn(2, 3, 16, 16))


def test_a_percentage_is_of_the_unplanned_predicted_peak(small_cnn) -> None:
    x = torch.randn(16, 3, 32, 32)
    unplanned = memfit.estimate(small_cnn, x).peak_bytes
    planned = memfit.optimize(small_cnn, "97%", x)
    assert planned.plan.budget_bytes == int(0.97 * unplanned)
    assert memfit.measure(planned, x).peak_bytes <= planned.plan.budget_bytes


def test_the_command_line_takes_the_same_budgets(capsys) -> None:
    assert (
        main(["plan", "resnet18", "--stem", "cifar", "--input", "3x32x32", "--batch", "8", "--budget-mb", "90%"]) == 0
    )
    assert "Budget (MiB, given)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["plan", "tests.factories:tiny_mlp", "--input", "1x8x8", "--budget-mb", "inf"])
    assert "--budget-mb='inf'" in capsys.readouterr().err
