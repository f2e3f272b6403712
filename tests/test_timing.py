"""The time cost model: what calibration records and caches, how the chain prices plans from it,
and the FLOP fallback. Only what is deterministic is held exactly; the one comparison of measured
times is between operations thousands of times apart."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import memfit
from memfit.capture.dryrun import capture
from memfit.capture.graph import CheckpointCost, MemGraph, NodeInfo, Pace
from memfit.capture.trainstep import StepConfig
from memfit.cost import checkpointing, timing
from memfit.planner import Chain, Plan, selective
from memfit.planner.chain import BYTE_WEIGHT

from .factories import Fragile

_COMPUTE = ("placeholder", "get_attr")


def _timed(model: nn.Module, *inputs: torch.Tensor, **kwargs) -> MemGraph:
    graph = capture(model, inputs if len(inputs) > 1 else inputs[0], StepConfig(), **kwargs)
    timing.calibrate_times(graph, model, inputs, StepConfig(), **kwargs)
    return graph


def _ns(seconds: float) -> int:
    return int(np.round(seconds * 1e9))


def test_cache_round_trip(small_cnn, fresh_timing_cache, monkeypatch):
    x = torch.randn(4, 3, 16, 16)
    graph = _timed(small_cnn, x)
    times = [(i.fwd_seconds, i.bwd_seconds, i.cheap_seconds, i.operators, i.checkpointed_seconds) for i in graph.nodes]
    (path,) = fresh_timing_cache.glob("timing-*.json")
    assert json.loads(path.read_text())

    def no_runs(*args, **kwargs):
        raise AssertionError("a cached layer was measured again")

    timing._cache.clear()
    checkpointing._fixed.clear()
    monkeypatch.setattr(timing, "_run_layer", no_runs)
    for measure in ("_segment", "_chain_overheads", "_in_step", "_wrapper_overhead", "_buffer_replay"):
        monkeypatch.setattr(checkpointing, measure, no_runs)
    again = _timed(small_cnn, x)
    assert [
        (i.fwd_seconds, i.bwd_seconds, i.cheap_seconds, i.operators, i.checkpointed_seconds) for i in again.nodes
    ] == times
    assert again.checkpoint_cost == graph.checkpoint_cost


def test_checkpointings_fixed_figures_are_measured_once_for_every_tensor_size(fresh_timing_cache, monkeypatch):
    small = checkpointing.cost(64)
    runs = {"_segment": 0, "_in_step": 0, "_chain_overheads": 0}

    def counted(name: str, measure):
        def run(*args, **kwargs):
            runs[name] += 1
            return measure(*args, **kwargs)

        return run

    for name in runs:
        monkeypatch.setattr(checkpointing, name, counted(name, getattr(checkpointing, name)))
    large = checkpointing.cost(2**12)
    assert runs == {"_segment": 0, "_in_step": 0, "_chain_overheads": 1}
    assert (large.segment, large.per_buffer, large.in_step) == (small.segment, small.per_buffer, small.in_step)


def test_a_checkpoint_entry_of_the_wrong_arity_is_measured_again(fresh_timing_cache):
    first = checkpointing.cost(64)
    (path,) = fresh_timing_cache.glob("checkpoint-3-*.json")
    entries = json.loads(path.read_text())
    path.write_text(json.dumps({k: v[:2] for k, v in entries.items()}))  # a chain's arity under the fixed key
    checkpointing._fixed.clear()
    again = checkpointing.cost(64)
    assert again.per_saved_tensor == first.per_saved_tensor  # the chain's file is another one
    assert len(json.loads(path.read_text())[repr(("segment", False))]) == 4


def test_unreadable_cache_is_remeasured(small_cnn, fresh_timing_cache):
    x = torch.randn(4, 3, 16, 16)
    _timed(small_cnn, x)
    (path,) = fresh_timing_cache.glob("timing-*.json")
    path.write_text('{"k": [1, 2]}')  # an entry of the wrong arity: the file is not trusted
    timing._cache.clear()
    graph = _timed(small_cnn, x)
    assert not timing.unmeasured(graph) or all("no tensor" in why for why in timing.unmeasured(graph).values())
    assert "k" not in json.loads(path.read_text())


def test_every_compute_node_is_timed_or_reported(fresh_timing_cache):
    torch.manual_seed(0)
    model = memfit.models.create("gpt", n_layer=1, n_embd=32, n_head=2, vocab_size=64, block_size=16)
    graph = _timed(model, torch.randint(0, 64, (2, 16)))
    missing = timing.unmeasured(graph)
    assert missing, "the position arange takes a size, not a tensor: it cannot be run alone"
    for info in graph.nodes:
        if info.op in _COMPUTE:
            continue
        if info.name in missing:
            assert info.fwd_seconds is None and info.time_error == missing[info.name]
        else:
            assert info.fwd_seconds is not None and info.fwd_seconds >= 0
            assert info.bwd_seconds is not None and 0 <= info.cheap_seconds <= info.fwd_seconds + 1e-12
            assert info.operators >= 0
            assert info.checkpointed_seconds is not None and math.isfinite(info.checkpointed_seconds)
    assert graph.checkpoint_cost is not None and graph.checkpoint_cost.per_buffer > 0
    assert graph.checkpoint_cost.segment > 0, "a checkpointed segment does more than a plain call"


def test_a_layer_that_cannot_run_checkpointed_alone_is_priced_per_saved_tensor(fresh_timing_cache):
    # an in-place ReLU alone under checkpoint writes the input its recomputation reads: torch refuses
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 8))
    graph = _timed(model, torch.randn(4, 8))
    relu = next(i for i in graph.nodes if i.inplace)
    assert relu.fwd_seconds is not None and relu.checkpointed_seconds is None
    assert all(i.checkpointed_seconds is not None for i in graph.nodes if "_0" in i.name or "_2" in i.name)
    assert np.isnan(timing.node_times([relu]).checkpointed).all()


def test_failed_layer_is_reported_and_priced_by_flops(fresh_timing_cache, monkeypatch):
    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Fragile()), torch.randn(4, 8)
    graph = capture(model, x, StepConfig(), leaf_modules=[Fragile])
    monkeypatch.setattr(Fragile, "broken", True)
    timing.calibrate_times(graph, model, (x,), StepConfig(), leaf_modules=[Fragile])
    (name,) = [i.name for i in graph.nodes if i.module_type == "Fragile"]
    assert timing.unmeasured(graph) == {name: "RuntimeError: needs the rest of the model"}
    assert graph.info(name).fwd_seconds is None


def test_unmeasured_nodes_are_priced_by_the_fitted_rate(small_cnn, fresh_timing_cache):
    graph = _timed(small_cnn, torch.randn(4, 3, 16, 16))
    infos = [i for i in graph.nodes if i.op not in _COMPUTE]
    conv = next(i for i in infos if i.module_type == "Conv2d")
    measured = [i for i in infos if i is not conv and i.fwd_seconds is not None]
    conv.fwd_seconds = conv.bwd_seconds = conv.cheap_seconds = None
    times = timing.node_times(infos)

    def proxy(i: NodeInfo) -> float:
        return i.fwd_flops + BYTE_WEIGHT * i.out_bytes

    rate = sum(i.fwd_seconds for i in measured) / sum(proxy(i) for i in measured)
    k = infos.index(conv)
    assert times.forward[k] == pytest.approx(rate * proxy(conv), rel=1e-12)
    assert times.backward[k] == pytest.approx(2 * rate * proxy(conv), rel=1e-12)
    assert times.cheap[k] == 0.0, "a FLOP-counted node's output is kept by a selective segment"
    assert times.operators[k] == 1


def test_without_timing_the_chain_prices_flops(small_cnn, fresh_timing_cache, monkeypatch):
    monkeypatch.setenv(timing.TIMING_ENV, "off")
    graph = _timed(small_cnn, torch.randn(4, 3, 16, 16))
    assert all(i.fwd_seconds is None for i in graph.nodes) and graph.checkpoint_cost is None
    chain = Chain(graph)
    assert not chain.timed and chain.step_seconds == 0.0
    spans = [(0, chain.m, "recompute")]
    infos = [graph.info(n) for n in chain.names]
    assert chain.cost(spans) == sum(i.fwd_flops + BYTE_WEIGHT * i.out_bytes for i in infos)
    plan = Plan(segments=chain.to_segments(spans), strategy="test")
    assert plan.extra_seconds == 0.0 and plan.extra_time_percent is None
    assert "Extra time" not in str(plan)


def _resnet_graph() -> MemGraph:
    torch.manual_seed(0)
    model = memfit.models.create("resnet18", stem="cifar", num_classes=10)
    return _timed(model, torch.randn(4, 3, 16, 16))


@pytest.mark.parametrize(
    ("extra", "pace"),
    [
        (CheckpointCost(0.0, 0.0, 0.0), None),
        (CheckpointCost(1e-4, 2e-6, 3e-5, 5e-6, 7e-5), Pace(3.0, 2.0)),
        (CheckpointCost(1e-4, 2e-6, 3e-5, 5e-6, 7e-5, 4e-4), Pace(1.5, 1.0)),
    ],
)
def test_plan_cost_is_the_sum_of_its_recomputed_nodes(fresh_timing_cache, extra, pace):
    graph = _resnet_graph()
    assert graph.pace is not None and graph.pace.measured > 0, "the whole forward was timed"
    graph.checkpoint_cost, graph.pace = extra, pace
    f = 1.0 if pace is None else pace.factor  # every figure at the process's pace
    for info in graph.nodes:  # priced per saved tensor (a measured figure: tests/test_chain.py)
        info.checkpointed_seconds = None
    chain = Chain(graph)
    times = timing.node_times([graph.info(n) for n in chain.names])
    assert chain.timed and chain.step_seconds == pytest.approx(f * float(times.forward.sum() + times.backward.sum()))
    unplanned = chain.peak([(i, i + 1, "plain") for i in range(chain.m)])
    low = chain.peak(selective.lowest_peak(chain))
    expensive = {n for n in chain.names if graph.info(n).fwd_flops > 0}
    for fraction in (0.2, 0.6):
        spans = selective.cheapest(chain, int(low + fraction * (unplanned - low)))
        assert {kind for _, _, kind in spans} - {"plain"}, "the budget needs recomputation"
        expected = 0
        for a, b, kind in spans:
            if kind == "plain":
                continue
            per_op = extra.selective_per_operator if kind == "selective" else 0.0
            segment = 0
            for name in chain.names[chain.cands[a] : chain.cands[b]]:  # replayed however early it stops
                writes = graph.info(name).writes
                segment += _ns(f * extra.per_buffer * sum(w in graph.buffer_names for w in writes))
            rerun = [graph.info(name) for name in chain.recomputed_nodes(a, b)]
            for info in rerun:
                kept = kind == "selective" and info.name in expensive
                segment += _ns(f * ((info.cheap_seconds if kept else info.fwd_seconds) + per_op * info.operators))
            # the fixed cost (torch's and the rewrite's module, cold where that was measured) once,
            # and per packed node that saves (the node where it stops packs without running) per
            # tensor it saves
            stop = chain.cands[a] + len(rerun)
            packed = rerun + ([graph.info(chain.names[stop])] if stop < chain.cands[b] else [])
            segment += _ns(f * max(extra.in_step, extra.segment + extra.wrapper))
            saving = [i for i in packed if i.saved_sids or i.params]
            segment += sum(_ns(f * extra.per_saved_tensor * i.saved_tensors) for i in saving)
            expected += 2 * segment if kind == "nested" else segment  # nested: recomputed twice
        assert chain.cost(spans) == expected
        plan = Plan(segments=chain.to_segments(spans), strategy="dp", step_seconds=chain.step_seconds)
        assert plan.extra_seconds == pytest.approx(expected / 1e9, rel=1e-9)
        if plan.checkpointed:
            assert f"Extra time (predicted): {1e3 * plan.extra_seconds:.1f} ms" in str(plan)


class _Ops(TorchDispatchMode):
    """The compute operators that run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("addmm", "relu", "mm"):
            self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def test_recomputation_stops_where_torch_stops(fresh_timing_cache):
    # torch's non-reentrant checkpoint stops once the last saved tensor is packed again: the last
    # Linear packs its input before its matmul, so its matmul is never rerun
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    x = torch.randn(4, 8)
    graph = _timed(model, x)
    chain = Chain(graph)
    assert chain.recomputed_nodes(0, chain.m) == ["_0", "_1"]
    y = checkpoint(model, x.requires_grad_(), use_reentrant=False)
    with _Ops() as seen:
        y.sum().backward()
    recomputed = [op for op in seen.ops if op in ("addmm", "relu")][:2]
    assert recomputed == ["addmm", "relu"] and seen.ops.count("addmm") == 1


class _MatmulAndRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(512, 512))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight).sum() + torch.relu(y).sum()


def test_a_matmul_costs_more_than_a_small_relu(fresh_timing_cache):
    graph = _timed(_MatmulAndRelu(), torch.randn(512, 512), torch.randn(4, 4))
    matmul = next(i for i in graph.nodes if "matmul" in i.target)
    relu = next(i for i in graph.nodes if "relu" in i.target)
    assert matmul.fwd_seconds > relu.fwd_seconds
    assert matmul.cheap_seconds < matmul.fwd_seconds / 2, "the matmul itself is kept by a selective segment"


def test_calibration_leaves_rng_and_model_alone(small_cnn, fresh_timing_cache):
    x = torch.randn(4, 3, 16, 16)
    graph = capture(small_cnn, x, StepConfig())
    state = {k: v.clone() for k, v in small_cnn.state_dict().items()}
    rng = torch.get_rng_state()
    timing.calibrate_times(graph, small_cnn, (x,), StepConfig())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(state[k], v) for k, v in small_cnn.state_dict().items())


def test_cpu_layers_are_timed_on_one_thread_by_its_cpu_clock(small_cnn, fresh_timing_cache, monkeypatch):
    """Wall time with the step's threads measured the neighbours' load (cached for good); layers
    are timed on one intra-op thread by that thread's CPU time, and the caller's count is back."""
    seen = []
    run_layer = timing._run_layer

    def spy(*args, **kwargs):
        seen.append((torch.get_num_threads(), timing._clock()))
        return run_layer(*args, **kwargs)

    monkeypatch.setattr(timing, "_run_layer", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _timed(small_cnn, torch.randn(4, 3, 16, 16))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {(1, time.thread_time)}


def test_checkpointed_figures_take_more_pairs_on_faster_layers(small_cnn, fresh_timing_cache, monkeypatch):
    """A checkpointed figure is a difference of two noisy times: a layer gets about PAIR_SECONDS
    of paired steps, within [MIN_PAIRS, MAX_PAIRS] (a fast layer at 9 pairs moved 0.49 to 0.77 ms
    between calibrations)."""
    pairs = []
    checkpointed = timing._checkpointed

    def spy(run, grads, count, *args):
        pairs.append(count)
        return checkpointed(run, grads, count, *args)

    monkeypatch.setattr(timing, "_checkpointed", spy)
    monkeypatch.setattr(timing, "PAIR_SECONDS", 1e9)  # every layer as fast as can be
    _timed(small_cnn, torch.randn(4, 3, 16, 16))
    assert pairs and set(pairs) == {timing.MAX_PAIRS}
    pairs.clear()
    for path in fresh_timing_cache.glob("timing-*.json"):  # measured again, not read back
        path.unlink()
    timing._cache.clear()
    monkeypatch.setattr(timing, "PAIR_SECONDS", 1e-9)  # every layer as slow as can be
    _timed(small_cnn, torch.randn(4, 3, 16, 16))
    assert pairs and set(pairs) == {timing.MIN_PAIRS}


def test_the_dry_run_counts_the_tensors_each_node_saves(fresh_timing_cache):
    """Checkpointing pays per saved tensor (it packs each, and stores each again when it
    recomputes), so the dry run counts what a real step's saved-tensor hooks see, per node."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)), torch.randn(4, 6)
    graph = capture(model, x, StepConfig())
    real: dict[int, int] = {}
    current = [0]

    def pack(t):
        real[current[0]] = real.get(current[0], 0) + 1
        return t

    def count(module, args):
        current[0] = list(model).index(module)

    hooks = [m.register_forward_pre_hook(count) for m in model]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    for h in hooks:
        h.remove()
    counted = [i.saved_tensors for i in graph.nodes if i.op == "call_module"]
    assert counted == [real.get(k, 0) for k in range(len(model))] and counted[1] > counted[2] > 0


def _spin(seconds: float = 2e-3) -> None:
    """Busy-waits ``seconds`` of this thread's CPU time (the clock calibration reads)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass  # the wait itself is the work


def _slow_segment(fn):
    """A segment maker that spins 2 ms of this thread's CPU time per segment, then checkpoints."""

    def run(t):
        _spin()
        return checkpoint(fn, t, use_reentrant=False)

    return run


def test_the_rewrites_own_segment_module_is_priced_beyond_torchs_checkpoint(fresh_timing_cache):
    """What the rewrite's segment module adds to torch's checkpoint is the ``wrapper`` figure:
    a maker that spins 2 ms of this thread's CPU time more per segment is priced about that
    (the clock is the thread's CPU time, which a spin fills exactly)."""
    assert 1.8e-3 < checkpointing.cost(64, _slow_segment).wrapper < 3e-3
    assert checkpointing.cost(64).wrapper == 0.0


def test_a_segments_cold_fixed_cost_is_the_makers_whole_segment(fresh_timing_cache):
    """The ``in_step`` figure times the rewrite's whole segment against the bare op, caches flushed
    before each run: a maker that spins 2 ms more per segment is priced that and more, torch's
    checkpoint alone (no maker) well under it; the chain prices a segment at it where it is more
    than the hot figures (the exact test above, third case)."""
    assert checkpointing.cost(64, _slow_segment).in_step > 2e-3
    assert 0.0 < checkpointing.cost(64).in_step < 1.5e-3


def test_the_cold_pair_flushes_between_forward_and_backward_untimed():
    """A step's segment runs its backward long after its forward, so the cold fixed cost runs
    ``before`` between them as well (the backward ran hot before), and leaves it out of the time:
    a ``before`` that spins 2 ms of this thread's CPU time adds nothing to either side."""
    order: list[str] = []

    def spin() -> None:
        order.append("between")
        _spin()

    x = torch.randn(64, requires_grad=True)
    x.register_hook(lambda g: order.append("backward"))

    def forward() -> torch.Tensor:
        order.append("forward")
        return torch.relu(x)

    assert checkpointing._timed(forward, between=spin) < 1.5e-3
    assert order == ["forward", "between", "backward"]
    order.clear()
    took = checkpointing._paired(forward, forward, spin, cold=True, runs=3)
    assert abs(took) < 1e-3
    assert order == ["between", "forward", "between", "backward"] * 2 * 4


def test_the_rewrites_segment_of_a_function_is_a_checkpointed_segment():
    """What calibration times as the rewrite's segment is one: the function's values and
    gradients, and its ReLU runs again in backward."""
    from memfit.rewrite.checkpoint import Checkpointed, segment_of

    x = torch.randn(16, requires_grad=True)
    segment = segment_of(lambda t: torch.relu(t) * 2)
    assert isinstance(segment, Checkpointed)
    with _Ops() as seen:
        y = segment(x)
        assert seen.ops == ["relu"]
        y.sum().backward()
    assert seen.ops == ["relu", "relu"]
    expected = torch.autograd.grad((torch.relu(x) * 2).sum(), x)[0]
    assert torch.equal(y, torch.relu(x) * 2) and torch.equal(x.grad, expected)
