"""Running a nested fx subgraph (a checkpointed segment) so that a dry run can see inside it.

A planned model runs its checkpointed segments through :func:`run`. Normally that simply calls the
segment's GraphModule; while :mod:`memfit.capture.dryrun` dry-runs a step it installs a runner that
interprets the segment node by node, so memory events, FLOPs and backward work (recomputation
included) are attributed to the original nodes rather than to the segment as a whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import fx

__all__ = ["note_rng_state", "observed", "run"]

Runner = Callable[[fx.GraphModule, tuple[Any, ...]], Any]
_runner: Runner | None = None
_on_rng_state: Callable[[], None] | None = None


def run(gm: fx.GraphModule, *args: Any) -> Any:
    """Run a segment's GraphModule, through the installed runner if a dry run installed one."""
    return gm(*args) if _runner is None else _runner(gm, args)


def note_rng_state() -> None:
    """A checkpoint is about to save the RNG state: a tensor created outside the dispatcher, which
    a dry run would otherwise never count (5 KB on CPU, held until the segment's backward)."""
    if _on_rng_state is not None:
        _on_rng_state()


@contextlib.contextmanager
def observed(runner: Runner, on_rng_state: Callable[[], None] | None = None) -> Iterator[None]:
    """Install ``runner`` for segments run in this block (the block of one dry run), and
    ``on_rng_state`` for the RNG states their checkpoints save."""
    global _runner, _on_rng_state
    previous = _runner, _on_rng_state
    _runner, _on_rng_state = runner, on_rng_state
    try:
        yield
    finally:
        _runner, _on_rng_state = previous
