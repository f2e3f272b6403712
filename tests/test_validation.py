"""Bad inputs at the boundary: each a MemfitInputError that names the argument, raised by memfit
before torch meets the mistake (so no traceback from inside torch), and on the command line one
line on stderr with exit status 2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import memfit
from memfit.cli import main

MEMFIT = Path(memfit.__file__).parent


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _raised_by_memfit(err: pytest.ExceptionInfo[BaseException]) -> bool:
    """The error comes from memfit's own check, not from deep inside torch."""
    return Path(str(err.traceback[-1].path)).is_relative_to(MEMFIT)


ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "estimate": lambda model, x, **kw: memfit.estimate(model, x, calibrate=False, **kw),
    "measure": memfit.measure,
    "optimize": lambda model, x, **kw: memfit.optimize(model, 1000, x, **kw),
}

BAD_STEPS = [
    pytest.param(
        {"loss_fn": lambda out: out}, r"loss_fn returned a tensor of shape \[4, 4\], not a scalar", id="loss-non-scalar"
    ),
    pytest.param({"loss_fn": lambda out: 1.0}, r"loss_fn returned float 1.0, not a tensor", id="loss-float"),
    pytest.param(
        {"loss_fn": lambda out: out.sum().item()},
        r"loss_fn (returned float|reads a value of the output)",
        id="loss-item",
    ),
    pytest.param(
        {"loss_fn": lambda out: out.sum().detach()},
        r"loss_fn returned a tensor that does not require grad",
        id="loss-detached",
    ),
    pytest.param({"loss_fn": "cross_entropy"}, r"loss_fn='cross_entropy' is not callable", id="loss-string"),
    pytest.param(
        {"optimizer": lambda ps: [torch.optim.SGD(ps)]},
        r"optimizer=.*returned list, not a torch.optim.Optimizer",
        id="factory-list",
    ),
    pytest.param({"optimizer": lambda ps: None}, r"optimizer=.*returned NoneType", id="factory-none"),
    pytest.param(
        {"optimizer": lambda: torch.optim.SGD([])},
        r"optimizer=.*could not be called as factory\(params\)",
        id="factory-signature",
    ),
    pytest.param({"optimizer": "lion"}, r"unknown optimizer 'lion'", id="optimizer-name"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(("options", "message"), BAD_STEPS)
def test_a_bad_loss_or_optimizer_is_named_by_every_entry_point(entry: str, options: dict, message: str) -> None:
    with pytest.raises(memfit.MemfitInputError, match=message) as err:
        ENTRY_POINTS[entry](_net(), torch.randn(4, 8), **options)
    assert _raised_by_memfit(err)


class _Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).detach()


@pytest.mark.parametrize("entry", ["estimate", "measure"])
def test_the_default_loss_of_an_output_without_gradient_says_so(entry: str) -> None:
    with pytest.raises(
        memfit.MemfitInputError, match=r"the default loss \(pass loss_fn=\.\.\.\) returned a tensor that does not"
    ):
        ENTRY_POINTS[entry](_Detached(), torch.randn(4, 8))


def test_a_good_custom_loss_and_factory_still_run() -> None:
    report = memfit.measure(
        _net(),
        torch.randn(4, 8),
        loss_fn=lambda out: out.pow(2).mean(),
        optimizer=lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    )
    assert report.optimizer_bytes > 0  # RMSprop's square averages


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (None, r"unknown compression method None: method= takes one of \['generated'"),
        ("low-rank", r"method 'low-rank'"),
    ],
)
def test_compress_refuses_a_missing_or_unknown_method(method: Any, message: str) -> None:
    with pytest.raises(memfit.MemfitInputError, match=message) as err:
        memfit.compress(_wide(), method)
    assert _raised_by_memfit(err)


def _wide() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def test_compress_refuses_example_inputs_the_model_cannot_run_before_compressing() -> None:
    with pytest.raises(
        memfit.MemfitInputError, match=r"example_inputs of shapes \[\[2, 3\]\] do not fit Sequential \(RuntimeError"
    ) as err:
        memfit.compress(_wide(), "ternary", example_inputs=torch.randn(2, 3))
    assert _raised_by_memfit(err) and err.value.__cause__ is None
    small = memfit.compress(_wide(), "ternary", example_inputs={"input": torch.randn(2, 8)})  # by keyword too
    assert small(torch.randn(2, 8)).shape == (2, 4)


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line the command prints on stderr, after checking its exit status is 2."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


MLP = "tests.factories:tiny_mlp"


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["report", "resnet18", "--stem", "cifar", "--input", "3x32"], ["--input 3x32", "CxHxW with C=3", "3x32x32"]),
        (["report", "gpt", "--input", "16x2"], ["--input 16x2", "sequence length alone"]),
        (["report", MLP, "--input", "0x8"], ["--input '0x8'", "positive sizes joined by x"]),
        (["report", MLP, "--input=-1x8"], ["--input '-1x8'"]),
        (["report", MLP, "--batch", "-1"], ["--batch", "'-1' is not a positive whole number"]),
        (["report", MLP, "--batch", "0"], ["--batch", "'0' is not a positive"]),
        (["report", MLP, "--num-classes", "0"], ["--num-classes"]),
        (["plan", MLP, "--input", "1x8x8", "--budget-mb", "inf"], ["--budget-mb='inf'", "a percentage"]),
        (["report", "os:system"], ["model 'os:system'", "expected an nn.Module class or a function"]),
        (["report", "shutil:rmtree"], ["from the standard library"]),
        (["report", "pathlib:Path"], ["a class but not a torch.nn.Module"]),
        (["report", "memfit.cli:main"], ["returns int, not a torch.nn.Module"]),
        (["report", "tests.factories:not_a_model"], ["returned list, not a torch.nn.Module"]),
        (["report", "tests.factories:nowhere"], ["cannot load 'tests.factories:nowhere'"]),
        (["report", MLP, "--stem", "cifar"], ["cannot be called with stem="]),
    ],
)
def test_command_line_errors_name_the_option(
    argv: list[str], names: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    err = _cli_error(argv, capsys)
    for name in names:
        assert name in err


@pytest.mark.parametrize(("where", "says"), [("missing/plan.png", "does not exist"), (".", "is a directory")])
def test_a_plot_that_cannot_be_written_fails_before_planning(
    where: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("memfit.cli.optimize", lambda *a, **k: pytest.fail("planned before checking --plot"))
    err = _cli_error(["plan", MLP, "--input", "1x8x8", "--budget-mb", "1", "--plot", str(tmp_path / where)], capsys)
    assert "--plot" in err and says in err


def test_a_packed_file_that_cannot_be_written_fails_before_compressing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("memfit.cli.compress", lambda *a, **k: pytest.fail("compressed before checking --save"))
    err = _cli_error(["compress", MLP, "--method", "ternary", "--save", str(tmp_path / "no" / "m.memfit")], capsys)
    assert "--save" in err and "does not exist" in err


def test_an_unknown_compression_method_is_refused_before_planning() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(memfit.MemfitInputError, match=r"compress='foo'"):
        memfit.optimize(model, 1e-3, torch.randn(2, 4), compress="foo")


def test_a_meta_model_is_estimated_with_unmeasured_workspaces_and_refused_by_measure() -> None:
    """Nothing runs on the meta device: the estimate says its workspaces are unmeasured (they
    were silently 0), and measure refuses (it reported a peak below parameters and gradients)."""
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to("meta")
    x = torch.randn(8, 64, device="meta")
    report = memfit.estimate(net, x)
    assert any("meta device" in note for note in report.notes)
    with pytest.raises(memfit.MemfitInputError, match="meta device"):
        memfit.measure(net, x)
