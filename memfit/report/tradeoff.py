"""The memory/recomputation tradeoff curve of one model's step: its types and its table."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tradeoff", "TradeoffPoint"]


@dataclass(frozen=True)
class TradeoffPoint:
    """The plan :func:`memfit.optimize` returns for one budget (every figure predicted).

    Attributes:
        budget_mb: The budget (MiB).
        peak_mb: The plan's verified peak (MiB, predicted by the dry run).
        extra_flops_percent: Recomputation as a percentage of the unplanned step's FLOPs.
        extra_seconds: Predicted time recomputation adds to a step on this machine (None when
            the time cost model is off: ``MEMFIT_TIMING=off``).
        extra_time_percent: The same as a percentage of the unplanned step's predicted time.
        strategy: The planner whose plan it is (``"none"``: nothing is recomputed).
        checkpointed: How many segments run under checkpoint.
    """

    budget_mb: float
    peak_mb: float
    extra_flops_percent: float
    extra_seconds: float | None
    extra_time_percent: float | None
    strategy: str
    checkpointed: int


@dataclass(frozen=True)
class Tradeoff:
    """Budgets from the feasible minimum to the unplanned peak and what each one costs."""

    model: str
    minimum_mb: float
    unplanned_mb: float
    points: list[TradeoffPoint]

    def __str__(self) -> str:
        headers = (
            "Budget MiB",
            "Peak MiB (pred)",
            "Extra time ms (pred)",
            "% of step",
            "Extra FLOPs %",
            "Strategy",
            "Checkpointed",
        )
        rows = [
            (
                f"{p.budget_mb:.2f}",
                f"{p.peak_mb:.2f}",
                "--" if p.extra_seconds is None else f"{1e3 * p.extra_seconds:.1f}",
                "--" if p.extra_time_percent is None else f"{p.extra_time_percent:.1f}",
                f"{p.extra_flops_percent:.1f}",
                p.strategy,
                str(p.checkpointed),
            )
            for p in self.points
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

        def line(r: tuple[str, ...]) -> str:
            return "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))

        return "\n".join(
            [
                (
                    f"memfit tradeoff: {self.model}, feasible minimum {self.minimum_mb:.2f} MiB, unplanned peak "
                    f"{self.unplanned_mb:.2f} MiB (predicted)"
                ),
                line(headers),
                "-" * (sum(widths) + 2 * (len(widths) - 1)),
                *(line(r) for r in rows),
            ]
        )
