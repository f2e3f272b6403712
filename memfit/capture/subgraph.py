"""Running a nested fx subgraph (a checkpointed segment) so that a dry run can see inside it.

A planned model runs its checkpointed segments through :func:`run`. Normally that simply calls the
segment's GraphModule; while :mod:`memfit.capture.dryrun` dry-runs a step it installs a runner that
interprets the segment node by node, so memory events, FLOPs and backward work (recomputation
included) are attributed to the original nodes rather than to the segment as a whole.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch.fx as fx

__all__ = ["run", "observed"]

Runner = Callable[[fx.GraphModule, tuple[Any, ...]], Any]
_runner: Runner | None = None


def run(gm: fx.GraphModule, *args: Any) -> Any:
    """Run a segment's GraphModule, through the installed runner if a dry run installed one."""
    return gm(*args) if _runner is None else _runner(gm, args)


@contextlib.contextmanager
def observed(runner: Runner) -> Iterator[None]:
    """Install ``runner`` for segments run in this block (the block of one dry run)."""
    global _runner
    previous, _runner = _runner, runner
    try:
        yield
    finally:
        _runner = previous
