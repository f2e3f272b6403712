"""The whole forward that sets the time model's pace (memfit.cost.pace): it runs as a training
forward does, leaves no trace on the model or the RNG, holds no activation, and every price of a
plan moves by its one factor."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from torch import nn

import memfit
from memfit.capture.dryrun import capture
from memfit.capture.graph import Pace
from memfit.capture.trainstep import StepConfig
from memfit.cost import pace, timing
from memfit.cost.layers import CACHE_ENV, DiskCache
from memfit.cost.measurement import event_bytes, memory_events, memory_profile
from memfit.planner import Chain, Plan


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(timing.TIMING_ENV, "on")
    monkeypatch.setattr(timing, "_cache", DiskCache(timing._cache.kind, timing._cache.decode))


def test_the_timed_forward_trains_yet_leaves_the_model_and_rng_as_they_were(small_cnn):
    model, x = small_cnn.train(), torch.randn(8, 3, 16, 16)
    bn, dropout = model[1], model[8]
    seen: list[tuple[int, bool]] = []
    bn.register_forward_hook(lambda m, i, o: seen.append((int(m.num_batches_tracked), m.training)))
    dropout.register_forward_hook(lambda m, i, o: seen.append((int((o == 0).sum()), m.training)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seconds = pace.forward_seconds(model, (x,), StepConfig(), "cpu", time.thread_time)
    assert seconds > 0
    counts, drops = seen[0::2], seen[1::2]
    assert len(counts) >= 1 + pace.MIN_REPEATS and all(training for _, training in seen)
    assert [n for n, _ in counts] == list(range(1, len(counts) + 1)), "BatchNorm ran in training mode"
    assert any(n > 0 for n, _ in drops), "dropout drew from the RNG"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "counters and statistics set back"
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_the_timed_forward_holds_no_activation():
    width, depth = 256, 8
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])
    x = torch.randn(width, width)
    activation = width * width * 4

    def peak(run) -> int:
        with memory_profile() as prof:
            out = run()
        del out
        level = high = 0
        for e in memory_events(prof):
            level += event_bytes(e)
            high = max(high, level)
        return high

    training = peak(lambda: model(x))
    timed = peak(lambda: pace.forward_seconds(model, (x,), StepConfig(), "cpu", time.thread_time))
    assert training >= depth * activation, "a training forward keeps each block's activations"
    assert timed <= 4 * activation, "the timed forward frees each activation once used"


def test_every_figure_of_a_plan_moves_by_the_pace(small_cnn, fresh_cache):
    x = torch.randn(4, 3, 16, 16)
    graph = capture(small_cnn, x, StepConfig())
    timing.calibrate_times(graph, small_cnn, (x,), StepConfig())
    calibrated = sum(timing.node_times([i for i in graph.nodes if i.op not in ("placeholder", "get_attr")]).forward)
    assert graph.pace is not None and graph.pace.calibrated == pytest.approx(calibrated, rel=1e-12)

    def priced(p: Pace | None) -> tuple[float, float]:
        graph.pace = p
        chain = Chain(graph)
        spans = [(0, chain.m, "recompute")]
        plan = Plan(segments=chain.to_segments(spans), strategy="test", step_seconds=chain.step_seconds)
        return plan.extra_seconds, chain.step_seconds

    (extra, step), (extra3, step3) = priced(None), priced(Pace(3.0, 1.0))
    assert extra > 0
    assert extra3 == pytest.approx(3 * extra, rel=1e-6) and step3 == pytest.approx(3 * step, rel=1e-12)


def test_where_the_forward_cannot_run_the_layers_times_stand(small_cnn, fresh_cache, monkeypatch, caplog):
    x = torch.randn(4, 3, 16, 16)
    graph = capture(small_cnn, x, StepConfig())

    def fails(*args, **kwargs):
        raise RuntimeError("needs the rest of the program")

    monkeypatch.setattr(pace, "forward_seconds", fails)
    with caplog.at_level(logging.WARNING, logger=timing.__name__):
        timing.calibrate_times(graph, small_cnn, (x,), StepConfig())
    assert graph.pace is None and any(i.fwd_seconds for i in graph.nodes)
    assert "needs the rest of the program" in caplog.text


def test_on_the_meta_device_nothing_is_timed(small_cnn):
    model = small_cnn.to("meta")
    with pytest.raises(ValueError, match="meta device"):
        pace.forward_seconds(model, (torch.randn(2, 3, 8, 8, device="meta"),), StepConfig(), "meta", time.thread_time)
    planned = memfit.optimize(model, 1000, torch.randn(2, 3, 8, 8, device="meta"))
    assert not any("whole forward" in n for n in planned.plan.notes)


def test_a_plan_says_its_pace(small_cnn, fresh_cache):
    planned = memfit.optimize(small_cnn, 1000, torch.randn(4, 3, 16, 16))
    (note,) = [n for n in planned.plan.notes if n.startswith("Times:")]
    assert "(meas)" in note and "summed over its layers" in note
