"""Models that do more than compute: in-place ops under selective checkpointing, buffers written in
``forward``, and the user's model left exactly as it was by every memfit call."""

from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit.capture.dryrun import capture
from memfit.capture.trace import trace
from memfit.planner import Chain, Plan
from memfit.rewrite.checkpoint import rewrite

from .test_planner import assert_trains_like

FRACTIONS = (0.25, 0.5, 0.75)


def _conv(k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(16, 16, k, padding=k // 2)


class _SkipNet(nn.Module):
    """The real-models issue's repro: in-place ReLUs after convs, skips, dropout, BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)

        def drop() -> nn.Sequential:
            return nn.Sequential(_conv(1), nn.Dropout(0.2))

        self.body = nn.ModuleList(
            [
                _conv(),
                nn.Sequential(_conv(), nn.GELU()),
                drop(),
                drop(),
                nn.Sequential(_conv(), nn.ReLU(inplace=True)),
                drop(),
                nn.Sequential(_conv(), nn.ReLU(inplace=True)),
                nn.Sequential(_conv(), nn.GELU()),
                nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
                nn.Sequential(_conv(), nn.GELU()),
            ]
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = [self.stem(x)]
        for i, f in enumerate(self.body):
            skip = {4: 2, 9: 8}.get(i)
            h.append(f(h[-1] + h[skip] if skip is not None else h[-1]))
        return self.head(h[-1].mean((2, 3)))


def _silu_chain() -> nn.Module:
    return nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(64, 64), nn.SiLU(inplace=True))], nn.Linear(64, 10))


class _BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: the counter is bumped in Python, where fx traces through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return F.relu(y)


def _bn_act_net() -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(5):
        layers += [nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1, bias=False), _BatchNormAct(16)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class _RunningMean(nn.Module):
    """A buffer written in ``forward`` and read by the output: recomputation must see the value
    the forward saw, and the buffer must move once per step."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return torch.tanh(x - self.mean)


def _running_mean_net() -> nn.Module:
    return nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(64, 64), _RunningMean(64))], nn.Linear(64, 10))


def _spectral_norm_net() -> nn.Module:
    sn = nn.utils.parametrizations.spectral_norm
    return nn.Sequential(*[m for _ in range(6) for m in (sn(nn.Linear(64, 64)), nn.ReLU())], nn.Linear(64, 10))


CASES = {
    "skip-net": (_SkipNet, (8, 3, 32, 32)),
    "silu-inplace": (_silu_chain, (64, 64)),
    "batchnorm-act": (_bn_act_net, (8, 3, 16, 16)),
    "running-mean": (_running_mean_net, (512, 64)),
    "spectral-norm": (_spectral_norm_net, (64, 64)),
}


def _case(name: str) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = CASES[name]
    torch.manual_seed(0)
    return factory(), torch.randn(*shape)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for k, v in after.items():
        assert torch.equal(v.detach(), before[k]), f"{k} changed"


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("strategy", ["selective", "dp"])
def test_plans_fit_and_train_exactly(name: str, strategy: str) -> None:
    model, x = _case(name)
    unplanned = memfit.estimate(model, x).peak_mb
    lowest = memfit.minimum(model, x, strategy=strategy)
    assert lowest < unplanned, f"{name}: nothing to plan at this shape"
    for fraction in FRACTIONS:
        budget = lowest + fraction * (unplanned - lowest)
        reference, work = copy.deepcopy(model), copy.deepcopy(model)
        planned = memfit.optimize(work, budget, x, strategy=strategy)
        assert planned.plan.strategy == strategy
        measured = memfit.measure(planned, x).peak_mb
        assert measured <= budget, f"{name}/{strategy} at {fraction:.0%}: {measured:.3f} > {budget:.3f} MiB"
        assert_trains_like(work, planned, reference, x)
        # a second step: buffers written in forward moved once per step, not once per recomputation
        assert_trains_like(work, planned, reference, x)


def test_in_place_outputs_are_recomputed_not_kept_by_selective() -> None:
    model, x = _case("silu-inplace")
    reference = copy.deepcopy(model)
    chain = Chain(capture(model, x))
    plan = Plan(segments=chain.to_segments([(0, chain.m, "selective")]), strategy="selective")
    # fx names the Sequential's children _0 (Linear), _1 (SiLU in place), ...; _16 is the head
    assert plan.segments[0].unsaved == tuple(f"_{i}" for i in range(0, 16, 2))
    assert_trains_like(model, rewrite(model, trace(model), plan), reference, x)


@pytest.mark.parametrize("name", ["batchnorm-act", "running-mean", "spectral-norm"])
def test_no_memfit_call_changes_the_users_model(name: str) -> None:
    model, x = _case(name)
    model.train()
    before = _state(model)
    memfit.estimate(model, x)
    memfit.measure(model, x)
    lowest = memfit.minimum(model, x, strategy="dp")
    memfit.optimize(model, lowest * 1.01, x, strategy="dp")
    memfit.optimize(model, lowest * 1.01, x, strategy="selective")
    with contextlib.suppress(memfit.MemfitBudgetError):  # below the minimum: compression is tried
        memfit.optimize(model, lowest * 0.8, x, strategy="dp", compress="ternary")
    with contextlib.suppress(memfit.MemfitInputError):  # spectral-norm weights are not compressible
        memfit.compress(model, "generated")
    _assert_same_state(model, before)
    assert model.training and all(m.training for m in model.modules())


def test_a_plan_that_cannot_run_is_discarded_and_auto_moves_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from memfit.rewrite import checkpoint as rewrite_module

    def refuse(*args, **kwargs):
        raise RuntimeError("this torch refuses selective checkpointing")

    monkeypatch.setattr(rewrite_module, "create_selective_checkpoint_contexts", refuse)
    # priced by FLOPs, selective plans (free BatchNorm and ReLU) come first: the refusal is met
    monkeypatch.setenv("MEMFIT_TIMING", "off")
    model, x = _case("skip-net")
    unplanned = memfit.estimate(model, x).peak_mb
    lowest = memfit.minimum(model, x, strategy="dp")
    budget = lowest + 0.5 * (unplanned - lowest)
    with caplog.at_level(logging.WARNING, logger="memfit.search"):
        planned = memfit.optimize(model, budget, x)
    assert all(s.kind != "selective" for s in planned.plan.segments)
    assert memfit.measure(planned, x).peak_mb <= budget
    assert "selective plan failed its dry run" in caplog.text and "this torch refuses" in caplog.text
