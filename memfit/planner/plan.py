"""A recomputation plan: the step's nodes cut into segments, each kept or recomputed, and its table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..units import mib

__all__ = ["Plan", "Segment", "SegmentKind", "Spans"]

# "plain": run as is, autograd keeps what it saves. "recompute": run under checkpoint, only the
# segment's inputs are kept and the rest is recomputed in backward. "selective": under checkpoint,
# but the outputs of FLOP-heavy ops (conv, matmul, attention) are kept and only the cheap ops
# around them (BatchNorm, activations, concatenation) are recomputed. "nested": under checkpoint,
# and its recomputation is itself cut into checkpointed parts (``inner``), each recomputed once
# more in its own backward: twice the recomputation for much less memory while it runs (Revolve's
# second level).
SegmentKind = Literal["plain", "recompute", "selective", "nested"]
# A plan as the strategies return it: (first, end) candidate-boundary indices and a treatment.
Spans = list[tuple[int, int, SegmentKind]]


@dataclass(frozen=True)
class Segment:
    """A run of consecutive nodes (in execution order) and how it is treated.

    Attributes:
        nodes: fx node names, in execution order.
        kind: ``"plain"``, ``"recompute"``, ``"selective"`` or ``"nested"``.
        kept_bytes: Predicted bytes the segment keeps alive from its forward to its backward.
        recomputed_bytes: Predicted bytes of saved activations its backward recomputes.
        recomputed_flops: FLOPs its recomputation costs.
        random: Whether its forward draws random numbers (dropout), so that a recomputation must
            replay the RNG state of the forward; other segments skip saving it.
        inner: For ``"nested"``: its checkpointed parts, covering ``nodes``.
        buffers: Buffers its forward writes in place (running statistics, counters): a
            recomputation starts from their values before the forward and leaves them as the
            forward did, so they move once per step.
        unsaved: Its nodes whose outputs a later in-place op changes: a selective segment must
            recompute them rather than keep them (what it kept would no longer be the forward's).
        layers: The user's modules its nodes belong to (qualified names, in order), or the node
            names of what belongs to none: how the plan names what it recomputes.
        recomputed_seconds: Predicted time of its recomputation on this machine (0.0 when the
            step's times were not calibrated).
    """

    nodes: tuple[str, ...]
    kind: SegmentKind
    kept_bytes: int = 0
    recomputed_bytes: int = 0
    recomputed_flops: int = 0
    random: bool = False
    inner: tuple[Segment, ...] = ()
    buffers: tuple[str, ...] = ()
    unsaved: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    recomputed_seconds: float = 0.0

    @property
    def checkpointed(self) -> bool:
        """Whether the segment runs under ``torch.utils.checkpoint``."""
        return self.kind != "plain"


@dataclass
class Plan:
    """What to keep and what to recompute in one training step, and what it is predicted to cost.

    Attributes:
        segments: The segments in execution order; together they cover every compute node.
        strategy: The planner that made it.
        budget_bytes: The budget it was made for (None for the unplanned step).
        peak_before_bytes: Predicted peak of the unplanned step.
        peak_after_bytes: Peak of the planned step, verified by a dry run (predicted).
        activations_before_bytes: Activations the unplanned step saves for backward (predicted).
        activations_after_bytes: Activations the planned step keeps between forward and backward.
        forward_flops: FLOPs of the unplanned forward pass.
        step_seconds: Predicted time of the unplanned step's forward and backward on this machine
            (0.0 when its times were not calibrated).
        planning_seconds: Wall time of planning, capture and verification included (measured).
        levels_before: Live tensor bytes after every event of the unplanned step (predicted).
        levels_after: The same for the planned step (predicted), for plots.
        compressed: Layers compressed to reach the budget (``optimize(..., compress=...)``).
        notes: Extra lines printed under the summary.
    """

    segments: list[Segment]
    strategy: str
    budget_bytes: int | None = None
    peak_before_bytes: int = 0
    peak_after_bytes: int = 0
    activations_before_bytes: int = 0
    activations_after_bytes: int = 0
    forward_flops: int = 0
    step_seconds: float = 0.0
    planning_seconds: float = 0.0
    levels_before: list[tuple[str, int]] = field(default_factory=list, repr=False)
    levels_after: list[tuple[str, int]] = field(default_factory=list, repr=False)
    compressed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def extra_flops(self) -> int:
        """FLOPs the plan adds to a step by recomputation."""
        return sum(s.recomputed_flops for s in self.segments)

    @property
    def extra_flops_percent(self) -> float:
        """Extra FLOPs as a percentage of the forward and backward FLOPs of the unplanned step."""
        # A backward costs about twice its forward, so a step is about three forwards.
        return 100.0 * self.extra_flops / max(1, 3 * self.forward_flops)

    @property
    def extra_seconds(self) -> float:
        """Predicted time the plan adds to a step by recomputation."""
        return sum(s.recomputed_seconds for s in self.segments)

    @property
    def extra_time_percent(self) -> float | None:
        """Extra time as a percentage of the unplanned step's forward and backward; None when
        the step's times were not calibrated."""
        return 100.0 * self.extra_seconds / self.step_seconds if self.step_seconds > 0 else None

    @property
    def checkpointed(self) -> list[Segment]:
        """The segments that run under checkpoint."""
        return [s for s in self.segments if s.checkpointed]

    def __str__(self) -> str:
        return render(self)


def render(plan: Plan) -> str:
    """The plan as a table of checkpointed segments, then the predicted summary."""
    headers = ("Segment", "Layers", "Kind", "Kept MiB", "Recomputed MiB", "Recomputed FLOPs")
    rows = []
    for i, s in enumerate(plan.segments):
        if not s.checkpointed:
            continue
        names = s.layers or s.nodes
        span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        rows.append(
            (
                str(i),
                f"{span} ({len(s.nodes)} nodes)",
                f"{s.kind} ({len(s.inner)} parts)" if s.inner else s.kind,
                f"{mib(s.kept_bytes):.2f}",
                f"{mib(s.recomputed_bytes):.2f}",
                f"{s.recomputed_flops / 1e9:.3f}G",
            )
        )
    lines = [f"memfit plan ({plan.strategy})"]
    if rows:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

        def fmt(r: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )

        lines += [fmt(headers), "-" * (sum(widths) + 2 * (len(widths) - 1))]
        lines += [fmt(r) for r in rows]
    else:
        lines.append("(no segment is recomputed: the unplanned step fits)")
    budget = "none" if plan.budget_bytes is None else f"{mib(plan.budget_bytes):.2f}"
    lines += [
        f"Budget (MiB, given): {budget}",
        f"Peak before -> after (MiB, predicted): {mib(plan.peak_before_bytes):.2f} -> {mib(plan.peak_after_bytes):.2f}",
        (
            f"Activations before -> after (MiB, predicted): {mib(plan.activations_before_bytes):.2f} -> "
            f"{mib(plan.activations_after_bytes):.2f}"
        ),
        f"Extra FLOPs (predicted): {plan.extra_flops / 1e9:.3f}G, {plan.extra_flops_percent:.1f}% of a step",
        *(
            [f"Extra time (predicted): {1e3 * plan.extra_seconds:.1f} ms, {plan.extra_time_percent:.1f}% of a step"]
            if plan.extra_time_percent is not None
            else []
        ),
        f"Segments: {len(plan.segments)}, checkpointed: {len(plan.checkpointed)}",
        f"Planning time (s, measured): {plan.planning_seconds:.2f}",
    ]
    lines.extend(plan.notes)
    return "\n".join(lines)
