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
from memfit.capture.trace import graph_of
from memfit.capture.trainstep import StepConfig
from memfit.cost import pace, timing
from memfit.cost.measurement import event_bytes, memory_events, memory_profile
from memfit.planner import Chain, Plan


@pytest.mark.parametrize(("seconds", "runs"), [(2.0, 2), (0.4, 1 + pace.MIN_REPEATS), (1e-4, 1 + pace.MAX_REPEATS)])
def test_a_long_forward_is_timed_once_after_its_warm_up(seconds: float, runs: int) -> None:
    ticks, calls = iter(range(10**6)), []
    samples = pace._repeated(lambda: calls.append(1), lambda: seconds * next(ticks))
    assert len(calls) == runs and samples == pytest.approx([seconds] * (runs - 1))


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


def test_every_figure_of_a_plan_moves_by_the_pace(small_cnn, fresh_timing_cache):
    x = torch.randn(4, 3, 16, 16)
    graph = capture(small_cnn, x, StepConfig())
    timing.calibrate_times(graph, small_cnn, (x,), StepConfig())
    calibrated = sum(timing.node_times([i for i in graph.nodes if i.op not in ("placeholder", "get_attr")]).forward)
    # a model that is not a GraphModule: no node timed in context, the whole against the layers
    assert graph.pace is not None and graph.pace.reference == pytest.approx(calibrated, rel=1e-12)
    assert graph.pace.alone == 1.0 and all(i.context_seconds is None for i in graph.nodes)

    def priced(p: Pace | None) -> tuple[float, float]:
        graph.pace = p
        chain = Chain(graph)
        spans = [(0, chain.m, "recompute")]
        plan = Plan(segments=chain.to_segments(spans), strategy="test", step_seconds=chain.step_seconds)
        return plan.extra_seconds, chain.step_seconds

    (extra, step), (extra3, step3) = priced(None), priced(Pace(3.0, 1.0))
    assert extra > 0
    assert extra3 == pytest.approx(3 * extra, rel=1e-6) and step3 == pytest.approx(3 * step, rel=1e-12)


def test_a_rerun_is_priced_at_its_nodes_in_context_and_they_are_cached(small_cnn, fresh_timing_cache, monkeypatch):
    x = torch.randn(4, 3, 16, 16)
    gm = graph_of(small_cnn, (), x)
    graph = capture(small_cnn, x, StepConfig(), gm=gm)
    timing.calibrate_times(graph, gm, (x,), StepConfig())
    timed = [i for i in graph.nodes if i.fwd_seconds is not None]
    assert timed and all(i.context_seconds is not None and i.context_seconds > 0 for i in timed)
    ratio = sum(i.context_seconds for i in timed) / sum(i.fwd_seconds for i in timed)
    assert graph.pace is not None and graph.pace.alone == pytest.approx(ratio, rel=1e-9)

    graph.pace = Pace(2.0, 1.0, alone=1.5)
    chain = Chain(graph)
    infos = [graph.info(n) for n in chain.names]
    times = timing.node_times(infos)
    forward = [
        i.context_seconds if i.context_seconds is not None else 1.5 * t
        for i, t in zip(infos, times.forward, strict=True)
    ]
    assert chain.step_seconds == pytest.approx(2.0 * (sum(forward) + 1.5 * float(times.backward.sum())), rel=1e-9)
    # checkpointing's own figures are dispatch and bookkeeping: at the pace, not the kernels' ratio
    cost = graph.checkpoint_cost
    assert cost is not None
    assert chain.prices.segment == round(2.0 * max(cost.in_step, cost.segment + cost.wrapper) * 1e9)
    for info in graph.nodes:
        info.checkpointed_seconds = None  # priced per tensor it saves
    prices = Chain(graph).prices
    saved = [graph.info(n).saved_tensors for n in chain.names]
    assert any(saved) and list(prices.overhead) == [round(2.0 * cost.per_saved_tensor * t * 1e9) for t in saved]

    def fails(*args, **kwargs):
        raise AssertionError("the nodes were timed in context again")

    timing._cache.clear()
    pace._context.clear()  # as a new process: read back from the file
    pace._this_process.clear()
    monkeypatch.setattr(pace, "node_seconds", fails)
    again = capture(small_cnn, x, StepConfig(), gm=gm)
    timing.calibrate_times(again, gm, (x,), StepConfig())
    assert [i.context_seconds for i in again.nodes] == [i.context_seconds for i in graph.nodes]
    assert again.pace is not None and again.pace.measured > 0


def test_a_process_times_the_whole_forward_once_per_graph(small_cnn, fresh_timing_cache, monkeypatch):
    x = torch.randn(4, 3, 16, 16)
    gm = graph_of(small_cnn, (), x)
    first = capture(small_cnn, x, StepConfig(), gm=gm)
    timing.calibrate_times(first, gm, (x,), StepConfig())
    timing._cache.clear()
    pace._context.clear()  # a new process would read the prices back and time the forward
    calls = []
    monkeypatch.setattr(pace, "forward_seconds", lambda *a, **k: calls.append(a) or 1.0)
    again = capture(small_cnn, x, StepConfig(), gm=gm)
    timing.calibrate_times(again, gm, (x,), StepConfig())
    assert not calls and first.pace is not None and again.pace == first.pace
    pace._this_process.clear()  # this one does
    timing.calibrate_times(capture(small_cnn, x, StepConfig(), gm=gm), gm, (x,), StepConfig())
    assert len(calls) == 1


class _FixedBatch(nn.Module):
    """A model with its batch written in: it runs at no other."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(8, 48))


@pytest.mark.parametrize(("model", "batch"), [("cnn", 2), ("fixed", None)])
def test_a_long_forward_is_sampled_on_the_first_samples_of_the_batch(
    model, batch, small_cnn, fresh_timing_cache, monkeypatch
):
    net = small_cnn if model == "cnn" else _FixedBatch()
    x = torch.randn(8, 3, 4, 4)
    monkeypatch.setattr(pace, "SAMPLE_SECONDS", 1e-9)  # every forward is long
    gm = graph_of(net, (), x)
    first = capture(net, x, StepConfig(), gm=gm)
    timing.calibrate_times(first, gm, (x,), StepConfig())
    assert first.pace is not None and first.pace.batch == batch
    assert all(i.context_seconds is not None for i in first.nodes if i.fwd_seconds is not None)

    timing._cache.clear()
    pace._context.clear()
    pace._this_process.clear()  # a new process: the prices from the file, the sample timed again
    shapes = []
    timed = pace.forward_seconds
    monkeypatch.setattr(
        pace, "forward_seconds", lambda m, inputs, *a: shapes.append(inputs[0].shape[0]) or timed(m, inputs, *a)
    )
    again = capture(net, x, StepConfig(), gm=gm)
    timing.calibrate_times(again, gm, (x,), StepConfig())
    assert shapes == [batch or 8] and again.pace is not None and again.pace.reference == first.pace.reference
    (note,) = [n for n in memfit.optimize(net, 1e4, x).plan.notes if "pace" in n]
    assert ("whole forward at batch 2 took" in note) == (batch == 2), note


def test_where_the_forward_cannot_run_the_layers_times_stand(small_cnn, fresh_timing_cache, monkeypatch, caplog):
    x = torch.randn(4, 3, 16, 16)
    graph = capture(small_cnn, x, StepConfig())

    def fails(*args, **kwargs):
        raise RuntimeError("needs the rest of the program")

    monkeypatch.setattr(pace, "forward_seconds", fails)
    with caplog.at_level(logging.WARNING, logger=pace.__name__):
        timing.calibrate_times(graph, small_cnn, (x,), StepConfig())
    assert graph.pace is None and any(i.fwd_seconds for i in graph.nodes)
    assert "needs the rest of the program" in caplog.text


def test_on_the_meta_device_nothing_is_timed(small_cnn):
    model = small_cnn.to("meta")
    with pytest.raises(ValueError, match="meta device"):
        pace.forward_seconds(model, (torch.randn(2, 3, 8, 8, device="meta"),), StepConfig(), "meta", time.thread_time)
    planned = memfit.optimize(model, 1000, torch.randn(2, 3, 8, 8, device="meta"))
    assert not any("whole forward" in n for n in planned.plan.notes)


def test_a_plan_says_its_pace(small_cnn, fresh_timing_cache):
    planned = memfit.optimize(small_cnn, 1000, torch.randn(4, 3, 16, 16))
    (note,) = [n for n in planned.plan.notes if n.startswith("Times:")]
    assert "(meas)" in note and "when the prices were made" in note and "their figures alone" in note


def test_the_whole_forward_is_its_fastest_repeat(small_cnn, monkeypatch):
    """One sample of the machine's speed scales every price: a slow spell only adds time."""
    monkeypatch.setattr(pace, "_repeated", lambda run, clock: [0.3, 0.1, 0.2, 0.9])
    assert pace.forward_seconds(small_cnn, (torch.randn(2, 3, 8, 8),), StepConfig(), "cpu", time.thread_time) == 0.1
