"""torch.compile on top of a plan: the compiled planned module trains like the compiled model and
keeps a budget that compilation alone does not reach."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit import fit
from memfit.capture.trainstep import StepConfig
from memfit.cost.measurement import measure_wrapped_step


def _block(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        _block(3, 16),
        _block(16, 16),
        _block(16, 32),
        _block(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_compiled_plan_trains_like_the_compiled_model_within_its_budget() -> None:
    net = _net()
    x, y = torch.randn(16, 3, 24, 24), torch.randint(0, 10, (16,))
    budget = memfit.minimum(net, x)  # the tightest plan: in-place ReLU, BatchNorm and nested segments
    work, reference = copy.deepcopy(net), copy.deepcopy(net)
    before = _snapshot(work)
    torch.manual_seed(1)
    stream = torch.rand(3)
    torch.manual_seed(1)
    planned = memfit.optimize(work, budget, x, compile=True)
    assert torch.equal(torch.rand(3), stream), "measuring the compiled step moved the global RNG"
    after = _snapshot(work)  # the measured steps ran on a copy: weights, running statistics, no .grad
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.grad is None for p in work.parameters())
    assert planned.plan.checkpointed and "Compiled (torch.compile)" in str(planned.plan)
    compiled_reference = torch.compile(reference)

    losses = [F.cross_entropy(m(x), y) for m in (planned, compiled_reference)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    expected = dict(reference.named_parameters())
    for name, p in work.named_parameters():
        torch.testing.assert_close(p.grad, expected[name].grad, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    expected_buffers = dict(reference.named_buffers())
    for name, b in work.named_buffers():  # running statistics moved once, as without the plan
        torch.testing.assert_close(b, expected_buffers[name], rtol=1e-5, atol=1e-6, msg=f"buffer {name}")

    step = StepConfig(optimizer="sgd")
    alone, _ = measure_wrapped_step(compiled_reference, x, step)
    peak, _ = measure_wrapped_step(planned, x, step)
    assert peak <= budget * 2**20 < alone, (peak, budget * 2**20, alone)


def test_a_plan_whose_compiled_step_breaks_the_budget_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The search over eager targets, with compiled peaks made up: the plan for the budget itself
    compiles 1 MiB over it, a looser one too, and the first plan it finds that compiles within it
    (a tighter one) is returned, with the measured figures in its notes."""
    net, x = _net(), torch.randn(16, 3, 24, 24)
    unplanned = memfit.estimate(net, x).peak_bytes
    budget = int(0.8 * unplanned)
    made: list[int] = []

    def compiled_peak(planned, example_inputs, config, options):  # fit._compiled_peak's signature
        made.append(planned.plan.peak_after_bytes)
        return planned.plan.peak_after_bytes + (2**20 if planned.plan.peak_after_bytes > budget - 2**19 else 0)

    monkeypatch.setattr(fit, "_compiled_peak", compiled_peak)
    planned = memfit.optimize(net, budget / 2**20, x, compile=True)
    assert len(made) >= 3 and made[0] > budget - 2**19  # the budget's own plan, then others
    assert planned.plan.peak_after_bytes <= budget - 2**19 and planned.plan.budget_bytes == budget
    assert "other plans compiled to" in planned.plan.notes[-1]

    monkeypatch.setattr(fit, "_compiled_peak", lambda *args: budget + 1)
    with pytest.raises(memfit.MemfitBudgetError, match="compiled, the steps of"):
        memfit.optimize(net, budget / 2**20, x, compile=True)


@pytest.mark.parametrize("value", ["yes", 1, ["mode"]])
def test_compile_takes_a_bool_or_torch_compiles_arguments(value: object) -> None:
    with pytest.raises(memfit.MemfitInputError, match="compile="):
        memfit.optimize(_net(), 100, torch.randn(2, 3, 8, 8), compile=value)  # type: ignore[arg-type]
