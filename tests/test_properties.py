"""Properties over generated networks: the dry run sees exactly what a real step does."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import memfit

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


@st.composite
def networks(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor, str]:
    widths = draw(st.lists(st.integers(1, 48), min_size=1, max_size=4))
    batch = draw(st.integers(1, 6))
    layers: list[nn.Module] = []
    last = draw(st.integers(1, 32))
    for w in widths:
        layers.append(nn.Linear(last, w, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.LayerNorm(w) if draw(st.booleans()) else nn.BatchNorm1d(w))
        layers.append(ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]())
        if draw(st.booleans()):
            layers.append(nn.Dropout(0.2))
        last = w
    layers.append(nn.Linear(last, draw(st.integers(2, 10))))
    x = torch.randn(max(batch, 2), layers[0].in_features)
    return nn.Sequential(*layers), x, draw(st.sampled_from(["sgd", "momentum", "adam", "adamw"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_tensor_level_prediction_is_exact(case: tuple[nn.Module, torch.Tensor, str]) -> None:
    model, x, optimizer = case
    predicted = memfit.estimate(model, x, optimizer=optimizer, calibrate=False)
    measured = memfit.measure(model, x, optimizer=optimizer)
    assert predicted.tensor_peak_bytes == measured.tensor_peak_bytes
    assert predicted.activations_bytes == measured.activations_bytes
    assert predicted.gradients_bytes == measured.gradients_bytes
    assert predicted.optimizer_bytes == measured.optimizer_bytes
