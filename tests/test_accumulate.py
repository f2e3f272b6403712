"""Gradient accumulation: the step of a micro-batch after the first, its gradients already there."""

from __future__ import annotations

import pytest
import torch

import memfit


def _case(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "gpt":
        model = memfit.models.create("gpt", n_layer=2, n_embd=64, n_head=4, vocab_size=256, block_size=64)
        return model, torch.randint(0, 256, (4, 64))
    return memfit.models.create("resnet18", stem="cifar", num_classes=10, width=16), torch.randn(8, 3, 32, 32)


@pytest.mark.parametrize("amp", [None, "bf16"])
@pytest.mark.parametrize("name", ["gpt", "resnet18"])
def test_accumulating_steps_are_predicted_and_planned_within_budget(name: str, amp: str | None) -> None:
    model, x = _case(name)
    plain = memfit.estimate(model, x, amp=amp, optimizer="adam")
    predicted = memfit.estimate(model, x, amp=amp, optimizer="adam", accumulate=True)
    measured = memfit.measure(model, x, amp=amp, optimizer="adam", accumulate=True)
    assert predicted.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.03)
    # the gradients are there from the start: the forward's peak rises by about their size
    assert predicted.phase_peaks["forward"] - plain.phase_peaks["forward"] >= 0.9 * predicted.gradients_bytes
    # one strategy: the accumulating step is what is under test, and the planner's search over
    # strategies is the same with or without it (tests/test_tradeoff.py)
    lowest = memfit.minimum(model, x, strategy="dp", amp=amp, optimizer="adam", accumulate=True)
    budget = lowest + 0.5 * (predicted.peak_mb - lowest)
    planned = memfit.optimize(model, budget, x, strategy="dp", amp=amp, optimizer="adam", accumulate=True)
    assert memfit.measure(planned, x, amp=amp, optimizer="adam", accumulate=True).peak_mb <= budget
