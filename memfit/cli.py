"""The ``memfit`` command line: ``memfit report MODEL``, ``memfit plan MODEL --budget-mb N``,
``memfit compress MODEL --method M``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

import torch

from . import models
from .api import estimate, measure
from .budget import Budget
from .capture.trainstep import AMP_DTYPES, OPTIMIZERS
from .compressors import compress, list_methods
from .compressors.accounting import storage_table
from .cost.parallel import KINDS, Parallel
from .errors import MemfitError, MemfitInputError
from .fit import optimize, tradeoff
from .io.container import check_folder
from .io.serialize import save
from .planner import STRATEGIES
from .report.plot import plot_plan, plot_tradeoff

__all__ = ["example_input", "main"]


def _dims(shape: str) -> list[int]:
    """``--input`` as positive sizes; the one place that says what it looks like."""
    try:
        dims = [int(d) for d in shape.lower().split("x")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise MemfitInputError(
            f"--input {shape!r}: give the per-sample shape as positive sizes joined by x, like 3x32x32 "
            "(channels x height x width) or 128 (a sequence length)"
        )
    return dims


def _check_dims(model: torch.nn.Module, dims: list[int], shape: str) -> None:
    """The per-sample shape the model's first layer takes, where that layer says it."""
    first = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
    if isinstance(first, torch.nn.Embedding) and len(dims) != 1:
        raise MemfitInputError(
            f"--input {shape}: {type(model).__name__} starts with an embedding and takes token ids; give the "
            "sequence length alone, like --input 128"
        )
    if not isinstance(first, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return
    convs: dict[type, str] = {torch.nn.Conv1d: "CxL", torch.nn.Conv2d: "CxHxW", torch.nn.Conv3d: "CxDxHxW"}
    form = convs.get(type(first))  # these classes exactly: a subclass may take other shapes
    if form is not None and (len(dims) != form.count("x") + 1 or dims[0] != first.in_channels):
        example = "x".join([str(first.in_channels)] + ["32"] * form.count("x"))
        raise MemfitInputError(
            f"--input {shape}: {type(model).__name__} starts with {type(first).__name__}({first.in_channels}, ...) "
            f"and takes {form} with C={first.in_channels} per sample, like --input {example}"
        )


def example_input(model: torch.nn.Module, batch: int, shape: str | None) -> torch.Tensor:
    """A random batch for ``model``: token ids when it starts with an embedding, else images.

    Args:
        model: The network.
        batch: Batch size.
        shape: Per-sample shape as ``3x32x32`` (images) or ``128`` (sequence length); a default
            is picked from the model when None.
    """
    embedding = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if shape is None:
        if embedding is not None:
            dims = [min(128, getattr(model, "block_size", 128))]
        else:
            first_conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
            cifar = first_conv is not None and first_conv.kernel_size == (3, 3)
            dims = [3, 32, 32] if cifar else [3, 224, 224]
    else:
        dims = _dims(shape)
        _check_dims(model, dims, shape)
    if embedding is not None:
        return torch.randint(0, embedding.num_embeddings, (batch, *dims))
    return torch.randn(batch, *dims)


def _positive(text: str) -> int:
    """A count option (``--batch``, ``--num-classes``, ``--world-size``): a whole number from 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like memfit's own (argparse prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _step_arguments(p: argparse.ArgumentParser) -> None:
    """What every command that runs a training step needs: the model, its batch, the step."""
    p.add_argument("model", help="zoo name (see `memfit models`) or package.module:factory")
    p.add_argument("--batch", type=_positive, default=8, help="batch size (default 8)")
    p.add_argument("--input", help="per-sample input shape, e.g. 3x32x32, or sequence length for GPT")
    p.add_argument("--optimizer", default="sgd", choices=[*sorted(OPTIMIZERS), "none"])
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), help="autocast precision")
    p.add_argument("--stem", choices=["imagenet", "cifar"], help="zoo models: input stem")
    p.add_argument("--num-classes", type=_positive, help="zoo models: classifier outputs")
    p.add_argument("--measure", action="store_true", help="also run one real step and measure it")
    p.add_argument("--parallel", choices=list(KINDS), help="figures per data-parallel process (DDP or FSDP)")
    p.add_argument("--world-size", type=_positive, default=1, help="data-parallel processes (FSDP shards over them)")
    p.add_argument(
        "--fsdp-unit",
        action="append",
        metavar="MODULE",
        help="FSDP: a module sharded as one unit (repeat it); default: the model's children",
    )


def _parallel(args: argparse.Namespace) -> Parallel | None:
    """The data parallelism the options describe; measuring it needs the real processes."""
    if args.parallel is None:
        if args.fsdp_unit or args.world_size != 1:
            raise MemfitInputError("--world-size and --fsdp-unit describe --parallel ddp|fsdp; add it")
        return None
    if args.measure:
        raise MemfitInputError(
            "--measure runs one process alone; measure a data-parallel step under torchrun "
            "(benchmarks/parallel.py) or drop --parallel"
        )
    return Parallel(args.parallel, args.world_size, tuple(args.fsdp_unit) if args.fsdp_unit else None)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="memfit", description="Make PyTorch training fit a memory budget.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="predicted (and optionally measured) memory of one training step")
    _step_arguments(r)
    r.add_argument("--no-calibrate", action="store_true", help="skip kernel-workspace calibration")
    r.add_argument("--summary", action="store_true", help="totals only, no per-layer table")
    pl = sub.add_parser("plan", help="plan recomputation so that a training step fits a budget")
    _step_arguments(pl)
    what = pl.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--budget-mb",
        type=_budget,
        metavar="MIB|SIZE|PCT%",
        help="peak budget of the step: MiB (300), a size (1.5GiB) or a percentage of the unplanned peak (85%%)",
    )
    what.add_argument(
        "--curve",
        type=int,
        nargs="?",
        const=8,
        metavar="POINTS",
        help="no plan: the tradeoff from the feasible minimum to the unplanned peak at POINTS budgets (default 8)",
    )
    pl.add_argument("--strategy", default="auto", choices=["auto", *sorted(STRATEGIES)])
    pl.add_argument(
        "--plot", metavar="PNG", help="save a plot of memory over the step before and after (or of the curve)"
    )
    pl.add_argument(
        "--compress",
        choices=["auto", *list_methods()],
        help="compress the largest layers when recomputation alone cannot reach the budget",
    )
    c = sub.add_parser("compress", help="compress a model's weights and show (and save) their exact storage")
    c.add_argument("model", help="zoo name (see `memfit models`) or package.module:factory")
    c.add_argument("--method", required=True, choices=list_methods())
    c.add_argument("--stem", choices=["imagenet", "cifar"], help="zoo models: input stem")
    c.add_argument("--num-classes", type=_positive, help="zoo models: classifier outputs")
    c.add_argument("--input", help="per-sample input shape for the operation counts, e.g. 3x32x32")
    c.add_argument("--save", metavar="FILE", help="write the packed model (memfit.save)")
    sub.add_parser("models", help="list the zoo")
    return p


def _budget(text: str) -> Budget:
    try:
        return Budget.parse(text, "--budget-mb")
    except MemfitInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _plan(model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace, optimizer: str | None) -> None:
    if args.curve is not None:
        curve = tradeoff(
            model,
            x,
            points=args.curve,
            optimizer=optimizer,
            amp=args.amp,
            strategy=args.strategy,
            parallel=_parallel(args),
        )
        print(curve)
        if args.plot:
            print(f"Plot written to {plot_tradeoff(curve, args.plot)}")
        return
    planned = optimize(
        model,
        args.budget_mb,
        x,
        optimizer=optimizer,
        amp=args.amp,
        strategy=args.strategy,
        compress=args.compress,
        parallel=_parallel(args),
    )
    print(planned.plan)
    if args.plot:
        print(f"Plot written to {plot_plan(planned.plan, args.plot)}")
    if args.measure:
        measured = measure(planned, x, optimizer=optimizer, amp=args.amp)
        verdict = "within" if measured.peak_bytes <= (planned.plan.budget_bytes or 0) else "OVER"
        print(f"Peak of a real planned step (MiB, measured): {measured.peak_mb:.2f}, {verdict} the budget")


def _compress(model: torch.nn.Module, args: argparse.Namespace) -> None:
    x = example_input(model, 1, args.input)
    small = compress(model, args.method)
    print(storage_table(small, x))
    if args.save:
        size = save(small, args.save)
        print(f"Saved to {args.save}: {size / 1024:.1f} KiB (measured file size)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memfit`` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "models":
        print("\n".join(models.list_models()))
        return 0
    try:
        # a file the result goes to is checked before the minutes of work that make the result
        for option, path in (("--plot", getattr(args, "plot", None)), ("--save", getattr(args, "save", None))):
            if path is not None:
                check_folder(path, option)
        model = models.load(args.model, stem=args.stem, num_classes=args.num_classes)
        if args.command == "compress":
            _compress(model, args)
            return 0
        x = example_input(model, args.batch, args.input)
        optimizer = None if args.optimizer == "none" else args.optimizer
        if args.command == "plan":
            _plan(model, x, args, optimizer)
            return 0
        t0 = time.perf_counter()
        report = estimate(
            model, x, optimizer=optimizer, amp=args.amp, calibrate=not args.no_calibrate, parallel=_parallel(args)
        )
        elapsed = time.perf_counter() - t0
        if args.summary:
            report.layers = []
        print(report)
        print(f"Estimated in {elapsed:.1f} s (measured wall time); input {list(x.shape)} {x.dtype}")
        if args.measure:
            measured = measure(model, x, optimizer=optimizer, amp=args.amp)
            print()
            print(measured)
            err = 100 * (report.peak_bytes / measured.peak_bytes - 1)
            print(f"Predicted peak vs measured: {err:+.2f}%")
    except MemfitError as e:
        print(f"memfit: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, for scripts and logs
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
