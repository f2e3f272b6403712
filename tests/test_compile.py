"""torch.compile on top of a plan: the compiled planned module trains like the compiled model and
keeps a budget that compilation alone does not reach."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit.capture.trainstep import StepConfig
from memfit.cost.measurement import measure_wrapped_step


def _block(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def test_compiled_plan_trains_like_the_compiled_model_within_its_budget() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        _block(3, 16),
        _block(16, 16),
        _block(16, 32),
        _block(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    x, y = torch.randn(16, 3, 24, 24), torch.randint(0, 10, (16,))
    budget = memfit.minimum(net, x)  # the tightest plan: in-place ReLU, BatchNorm and nested segments
    work, reference = copy.deepcopy(net), copy.deepcopy(net)
    planned = memfit.optimize(work, budget, x)
    assert planned.plan.checkpointed
    compiled, compiled_reference = torch.compile(planned), torch.compile(reference)

    losses = [F.cross_entropy(m(x), y) for m in (compiled, compiled_reference)]
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
    peak, _ = measure_wrapped_step(compiled, x, step)
    assert peak <= budget * 2**20 < alone, (peak, budget * 2**20, alone)
