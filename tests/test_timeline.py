"""memfit.cost.timeline.replay: the peak of a step's event log, the phase peaks, the kernel workspace
added while a node runs and the bytes per category at the peak, on hand-written logs, and against
the allocator-free replay of a real captured step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memfit.capture.dryrun import capture
from memfit.capture.graph import CATEGORIES
from memfit.capture.tracker import Event, LimitExceeded
from memfit.capture.trainstep import StepConfig
from memfit.cost.timeline import replay

BASELINE = [(100, "parameter"), (20, "input")]
KINDS = {1: "activation", 2: "temporary", 3: "gradient"}
# 120 at the start; levels after each event: 170, 200, 170, 210, 160
EVENTS = [
    Event(1, 50, "forward", "fc"),
    Event(2, 30, "forward", "relu"),
    Event(2, -30, "forward", "relu"),
    Event(3, 40, "backward", "relu"),
    Event(1, -50, "backward", "fc"),
]


def at(**nonzero: int) -> dict[str, int]:
    """Bytes per category, every category present."""
    return {c: nonzero.get(c, 0) for c in CATEGORIES}


def test_the_peak_is_the_highest_level_and_says_where_it_falls() -> None:
    t = replay(BASELINE, EVENTS, KINDS.__getitem__)
    assert (t.peak_bytes, t.tensor_peak_bytes, t.peak_phase, t.peak_node) == (210, 210, "backward", "relu")
    assert t.peak_workspace_bytes == 0
    assert t.at_peak == at(parameter=100, input=20, activation=50, gradient=40)
    assert t.phase_peaks == {"forward": 200, "backward": 210}
    assert t.levels == [
        ("forward", "fc", 170),
        ("forward", "relu", 200),
        ("forward", "relu", 170),
        ("backward", "relu", 210),
        ("backward", "fc", 160),
    ]


def test_workspace_counts_while_its_node_runs_and_can_move_the_peak() -> None:
    def workspace(phase: str, node: str) -> int:
        return 25 if (phase, node) == ("forward", "relu") else 0

    t = replay(BASELINE, EVENTS, KINDS.__getitem__, workspace)
    # the forward relu's two events reach 200 + 25 and 170 + 25: above the backward's 210
    assert (t.peak_bytes, t.peak_phase, t.peak_node, t.peak_workspace_bytes) == (225, "forward", "relu", 25)
    assert t.tensor_peak_bytes == 210  # workspace is not tensor storage
    assert t.phase_peaks == {"forward": 225, "backward": 210}
    # the categories are the tensors alive at that moment; the workspace is reported on its own
    assert t.at_peak == at(parameter=100, input=20, activation=50, temporary=30)
    assert [level for _, _, level in t.levels] == [170, 200, 170, 210, 160]


def test_the_first_of_equal_peaks_is_the_one_reported() -> None:
    events = [Event(1, 50, "forward", "a"), Event(1, -50, "backward", "a"), Event(2, 50, "backward", "b")]
    t = replay(BASELINE, events, KINDS.__getitem__)
    assert (t.peak_bytes, t.peak_phase, t.peak_node) == (170, "forward", "a")


def test_a_step_that_only_frees_peaks_at_its_start() -> None:
    kinds = {7: "optimizer"}
    t = replay([*BASELINE, (64, "optimizer")], [Event(7, -64, "optimizer", "step")], kinds.__getitem__)
    assert (t.peak_bytes, t.peak_phase, t.peak_node) == (184, "forward", "")  # reported as the start of the step
    assert t.at_peak == at(parameter=100, input=20, optimizer=64)
    assert t.phase_peaks == {"optimizer": 120}
    assert replay(BASELINE, [], KINDS.__getitem__).peak_bytes == 120


def test_a_real_steps_peak_is_the_highest_level_of_its_live_storages() -> None:
    """The replay against a direct count: the largest total of storages alive after any event of a
    real captured step, from the storage sizes alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    graph = capture(model, torch.randn(16, 32), StepConfig(optimizer="adam"))
    t = replay(graph.baseline.values(), graph.events, graph.category_of)
    alive = {sid: nbytes for sid, (nbytes, _) in graph.baseline.items()}
    highest = sum(alive.values())
    for e in graph.events:
        if e.delta > 0:
            alive[e.sid] = graph.nbytes(e.sid)
        else:
            del alive[e.sid]
        highest = max(highest, sum(alive.values()))
    assert t.peak_bytes == t.tensor_peak_bytes == highest
    assert sum(t.at_peak.values()) == t.peak_bytes
    assert set(t.phase_peaks) == {"forward", "backward", "optimizer"}
    assert max(t.phase_peaks.values()) == t.peak_bytes


@pytest.mark.parametrize("where", ["baseline", "forward", "backward"])
def test_a_limited_dry_run_stops_exactly_above_its_tensor_peak(where: str) -> None:
    """capture(limit=) stops the step once its live tensors pass the limit, wherever that falls:
    not at the tensor peak the replay of the whole step finds, but one byte below it. (Raising
    inside the operator that passed it aborted the process where that was a ``prim.device`` query,
    as with a limit under the parameters and inputs themselves.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Tanh(), nn.Flatten())
    x = torch.randn(4, 3, 16, 16)
    graph = capture(model, x, StepConfig())
    timeline = replay(graph.baseline.values(), graph.events, graph.category_of)
    forward_peak = max(level for p, _, level in timeline.levels if p == "forward")
    assert timeline.tensor_peak_bytes > forward_peak, "the step should peak after its forward"
    limit = {"baseline": 0, "forward": forward_peak - 1, "backward": timeline.tensor_peak_bytes - 1}[where]
    with pytest.raises(LimitExceeded):
        capture(model, x, StepConfig(), limit=limit)
    limited = capture(model, x, StepConfig(), limit=timeline.tensor_peak_bytes)
    assert limited.events == graph.events
