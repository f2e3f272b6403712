"""memfit.measure_wrapped: the peak of a step of the module itself, as memfit.measure reads a copy's."""

from __future__ import annotations

import pytest
import torch

import memfit


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_agrees_with_measure_and_trains_the_module(small_cnn: torch.nn.Module, optimizer: str) -> None:
    x = torch.randn(4, 3, 32, 32)
    before = [p.detach().clone() for p in small_cnn.parameters()]
    copied = memfit.measure(small_cnn, x, optimizer=optimizer).peak_mb
    in_place = memfit.measure_wrapped(small_cnn, x, optimizer=optimizer, warmup=1)
    assert in_place == pytest.approx(copied, rel=0.01)
    assert any(not torch.equal(p, b) for p, b in zip(small_cnn.parameters(), before))
