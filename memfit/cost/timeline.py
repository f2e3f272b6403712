"""Replay of a step's storage events into a memory timeline: the peak and what holds it up."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..capture.graph import CATEGORIES
from ..capture.tracker import Event

__all__ = ["Timeline", "replay"]


@dataclass
class Timeline:
    """The memory of one step over time.

    Attributes:
        peak_bytes: Highest bytes, workspace included.
        tensor_peak_bytes: Highest bytes of live tensor storage.
        peak_phase: Phase in which ``peak_bytes`` occurs.
        peak_node: Node running when ``peak_bytes`` occurs.
        peak_workspace_bytes: Workspace included in ``peak_bytes``.
        at_peak: Bytes per category alive at the peak.
        phase_peaks: Highest bytes per phase, workspace included.
        levels: ``(phase, node, tensor bytes)`` after every event, for plots.
    """

    peak_bytes: int
    tensor_peak_bytes: int
    peak_phase: str
    peak_node: str
    peak_workspace_bytes: int
    at_peak: dict[str, int]
    phase_peaks: dict[str, int]
    levels: list[tuple[str, str, int]] = field(default_factory=list)


def replay(
    baseline: Iterable[tuple[int, str]],
    events: Iterable[Event],
    category_of: Callable[[int], str],
    workspace: Callable[[str, str], int] = lambda phase, node: 0,
) -> Timeline:
    """Walk the events from the baseline and find the peak.

    Args:
        baseline: ``(bytes, category)`` of every storage alive before the step.
        events: The step's allocation and free events, in order.
        category_of: Category of a storage id.
        workspace: Extra bytes while ``(phase, node)`` runs (kernel workspace).
    """
    live = {c: 0 for c in CATEGORIES}
    for nbytes, cat in baseline:
        live[cat] += nbytes
    current = tensor_peak = sum(live.values())
    best = (current, "forward", "", 0, dict(live))
    phase_peaks: dict[str, int] = {}
    levels: list[tuple[str, str, int]] = []
    for e in events:
        live[category_of(e.sid)] += e.delta
        current += e.delta
        tensor_peak = max(tensor_peak, current)
        ws = workspace(e.phase, e.node)
        total = current + ws
        levels.append((e.phase, e.node, current))
        phase_peaks[e.phase] = max(phase_peaks.get(e.phase, 0), total)
        if total > best[0]:
            best = (total, e.phase, e.node, ws, dict(live))
    return Timeline(
        peak_bytes=best[0],
        tensor_peak_bytes=tensor_peak,
        peak_phase=best[1],
        peak_node=best[2],
        peak_workspace_bytes=best[3],
        at_peak=best[4],
        phase_peaks=phase_peaks,
        levels=levels,
    )
