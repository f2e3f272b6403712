"""Plots (matplotlib): the memory of a training step over time, before and after a plan, and the
tradeoff between budget and recomputation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MemfitInputError
from ..io.container import check_folder
from ..planner.plan import Plan
from ..units import mib
from .tradeoff import Tradeoff

__all__ = ["plot_plan", "plot_tradeoff"]


def _pyplot() -> Any:  # matplotlib.pyplot, an optional dependency
    """matplotlib's pyplot on the file-only backend, or the error that says how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MemfitInputError("plotting needs matplotlib: pip install 'memfit[plot]'") from e
    return plt


def _save(fig: Any, path: str | Path) -> Path:
    check_folder(str(path), "plot path")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    fig.clf()
    return out


def plot_plan(plan: Plan, path: str | Path) -> Path:
    """Draw live tensor memory over one step, unplanned and planned, with the budget; save to ``path``.

    The x axis is the step's progress (each curve's events spread over [0, 1], since recomputation
    adds events); phases are shaded. All curves are predicted by memfit's dry runs.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, levels, style in (
        ("before (predicted)", plan.levels_before, "-"),
        ("after (predicted)", plan.levels_after, "-"),
    ):
        if not levels:
            continue
        n = len(levels)
        xs = [i / max(1, n - 1) for i in range(n)]
        ax.plot(xs, [mib(b) for _, b in levels], style, label=label, linewidth=1.2)
    if plan.levels_after:
        n = len(plan.levels_after)
        start = next((i for i, (ph, _) in enumerate(plan.levels_after) if ph != "forward"), n) / max(1, n - 1)
        ax.axvspan(0, start, color="0.93", zorder=0)
        ax.text(start / 2, 0.02, "forward (after)", transform=ax.get_xaxis_transform(), ha="center", fontsize=8)
    if plan.budget_bytes is not None:
        ax.axhline(mib(plan.budget_bytes), color="red", linestyle="--", linewidth=1, label="budget")
    ax.set_xlabel("progress through the training step")
    ax.set_ylabel("live tensor memory (MiB)")
    peaks = f"{mib(plan.peak_before_bytes):.1f} -> {mib(plan.peak_after_bytes):.1f} MiB"
    ax.set_title(f"memfit plan ({plan.strategy}): peak {peaks} (predicted)")
    ax.legend(loc="upper right")
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_tradeoff(curve: Tradeoff, path: str | Path) -> Path:
    """Draw predicted extra time (extra FLOPs when time is not modelled) against the budget; save to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    budgets = [p.budget_mb for p in curve.points]
    timed = all(p.extra_time_percent is not None for p in curve.points)
    ys = [(p.extra_time_percent if timed else p.extra_flops_percent) for p in curve.points]
    what = "time" if timed else "FLOPs"
    ax.plot(budgets, ys, "o-", label=f"extra {what} (predicted)")
    ax.set_xlabel("budget (MiB)")
    ax.set_ylabel(f"recomputation, % of a step's {what} (predicted)")
    ax.axvline(curve.unplanned_mb, color="0.5", linestyle=":", linewidth=1, label="unplanned peak (predicted)")
    ax.set_title(f"memfit tradeoff: {curve.model}, feasible minimum {curve.minimum_mb:.1f} MiB (predicted)")
    ax.legend(loc="upper right")
    out = _save(fig, path)
    plt.close(fig)
    return out
