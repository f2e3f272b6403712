"""The trainer behind ``examples/train.py``, one concern a module, on memfit's public API only.

``arguments`` (the command line), ``data`` (data sets, batches), ``planning`` (model, optimizer,
compression and plan), ``steps`` (one step, evaluation, BatchNorm re-estimation), ``trainer``
(the loop), ``checkpoints`` (files and resuming), ``distributed`` (ranks and collectives),
``progress`` (where the run is, how it shows and stops), ``results`` (metrics at the end).
docs/train.md explains what it does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

import memfit

from .arguments import build_parser, resolve
from .distributed import Context, setup
from .results import finish
from .trainer import Trainer

__all__ = ["build_parser", "main"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def run(args: argparse.Namespace, ctx: Context) -> int:
    """Everything after argument parsing and process-group setup; returns the exit status."""
    trainer = Trainer(args, ctx)
    try:
        trainer.train()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finish(trainer)
    return EXIT_INTERRUPTED if trainer.stopped == "interrupted" else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, train, and return the exit status (0, 2 for an error, 130 when interrupted)."""
    args = build_parser().parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)
    ctx: Context | None = None
    threads = torch.get_num_threads()
    try:
        args = resolve(args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        ctx = setup(args.device)
        return run(args, ctx)
    except memfit.MemfitError as e:
        where = "" if ctx is None or not ctx.distributed else f"[rank {ctx.rank}] "
        print(f"{where}error: {e}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    finally:
        torch.set_num_threads(threads)
        if ctx is not None and ctx.started and dist.is_initialized():
            dist.destroy_process_group()
