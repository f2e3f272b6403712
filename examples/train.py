"""Train a model under a memory budget: planned by memfit, optionally compressed, on one process
or with DistributedDataParallel under torchrun, with progress, plots and honest memory figures.

    .venv/bin/python examples/train.py                       # ResNet-18 (CIFAR stem, width 16) on digits
    .venv/bin/python examples/train.py --budget-mb 85%       # the same, planned to 85% of its peak
    .venv/bin/python examples/train.py --budget-mb 30 --strategy dp --optimizer adam --epochs 5
    .venv/bin/python examples/train.py --compress ternary --budget-mb 90%   # ternary (better: --init, below)
    .venv/bin/python examples/train.py --data cifar10 --data-root ~/data --width 64 --epochs 30
    .venv/bin/python examples/train.py --out runs/train --resume            # continue a stopped run
    torchrun --nproc_per_node=2 examples/train.py --budget-mb 30             # DDP, gloo on CPU

On a busy CPU, ``--threads 1`` is often much faster for these small models: a second intra-op
thread that the machine cannot schedule makes every kernel wait for it.

What it does
    1. Loads the data: ``synthetic`` (class templates plus noise, made here from a fixed seed),
       ``digits`` (scikit-learn's bundled digits, upsampled to ``--image-size``) or ``cifar10`` /
       ``cifar100`` from the standard python archive in ``--data-root`` (no download:
       ``memfit.io.datasets``).
    2. Builds the model (a zoo name or ``package.module:factory``), compresses it when
       ``--compress`` names a method, and plans it with ``memfit.optimize`` so that one training
       step peaks at most ``--budget-mb`` MiB (a number, or a percentage of the unplanned step's
       predicted peak, e.g. ``85%``). The plan is printed: predicted peak before and after.
    3. Trains (cross-entropy, SGD with momentum / Adam / AdamW, cosine learning rate) with a
       progress bar (tqdm when installed and writing to a terminal, plain lines otherwise):
       loss, accuracy, samples/s. Test accuracy after every epoch.
    4. At the end prints the measured peak beside the predicted one, each labelled: on CUDA
       ``torch.cuda.max_memory_allocated`` over the training steps; on CPU ``memfit.measure``,
       one real step on a copy of the trained module at the allocator level.

Compression
    ``--compress ternary|generated|shared`` compresses every eligible layer with
    ``memfit.compress`` (default config: the first conv and the classifier stay dense) and then
    plans the compressed model for the budget. ``--compress auto`` leaves it to the planner:
    layers are compressed (``generated``) only when recomputation alone cannot reach the budget.
    Ternary training ends with EC2T's phase 2 (``freeze_assignment_``: the codes are frozen and
    only the scales and the rest of the network train) for the last ``--freeze-epochs`` epochs.
    Compressors start from the model's weights: ``--init PATH`` loads them from an earlier
    uncompressed run's ``checkpoint.pt`` (or a plain state dict) before compressing. Compressed
    weights move far from the BatchNorm statistics, so before each evaluation those are
    re-estimated over ``--recalibrate-bn`` training batches (16 by default when compressing)::

        .venv/bin/python examples/train.py --out runs/dense
        .venv/bin/python examples/train.py --init runs/dense/checkpoint.pt --compress ternary \
            --optimizer adam --lr 1e-4 --epochs 2 --out runs/ternary

Outputs in ``--out`` (rank 0 writes them)
    ``checkpoint.pt``  uncompressed runs: a torch file (``torch.load(..., weights_only=True)``)
                       with ``model`` (the state dict, loadable into the plain model), ``optimizer``,
                       ``scheduler``, ``scaler``, ``progress`` (epoch, step, history) and ``rng``.
    ``model.memfit``   compressed runs: the model packed by ``memfit.save`` (``memfit.load``
                       rebuilds it), plus ``train_state.pt`` with what resuming needs beyond the
                       packed file: optimizer, progress, RNG, and the full-precision training
                       state of the compressed layers (ternary latents are not part of the
                       packed format).
    ``metrics.json``   per-epoch loss/accuracy, throughput, predicted and measured peaks, file
                       sizes, timings, and under DDP a digest of every replica's parameters.
    ``memory.png``     memory over one training step before and after the plan (predicted).
    ``curves.png``     training curves: loss per step and per epoch, accuracy per epoch.

Resuming and interrupting
    A checkpoint is written after every epoch, at ``--max-steps`` and when the run is
    interrupted: Ctrl-C (SIGINT) or SIGTERM finishes the current step, saves, and exits with
    status 130 (a second Ctrl-C stops at once, still saving unless the optimizer update itself
    was interrupted). ``--resume`` continues from the saved step: same data order (the sampler is
    seeded by seed and epoch and the finished batches of the epoch are skipped), optimizer,
    learning-rate schedule, grad-scaler and RNG state, so a resumed run ends with the parameters
    of an uninterrupted one (bit for bit with the same number of processes and of CPU threads:
    the thread count changes the order of floating-point sums).

Distributed data parallel
    Under ``torchrun --nproc_per_node=N`` every process trains a replica wrapped in
    ``DistributedDataParallel(model, gradient_as_bucket_view=True)`` (gloo on CPU, nccl on CUDA,
    one GPU per process) on its ``DistributedSampler`` shard; ``--batch-size`` is per process.
    Gradients are views into DDP's communication buckets, allocated once and alive for the whole
    step. The budget is per process: the module is planned (before wrapping) with
    ``parallel=memfit.Parallel("ddp", world_size)``, whose cost model holds the buckets, and
    wrapped by ``memfit.rewrite.distributed.wrap``; every rank checks that it got the same plan. On CPU
    the measured peak at the end is one step of a DDP-wrapped copy on every process (the
    largest). Rank 0 alone prints and writes files.

Fully sharded data parallel (not wired into this script)
    To shard parameters, gradients and optimizer state, plan with
    ``memfit.Parallel("fsdp", world_size, units=...)`` (units: the blocks to shard one by one)
    and wrap with ``memfit.rewrite.distributed.wrap``, before creating the optimizer::

        parallel = memfit.Parallel("fsdp", dist.get_world_size(), units=("layer1.0", "layer1.1"))
        planned = memfit.optimize(net, budget_mb, x, optimizer="adam", parallel=parallel)
        planned = memfit.rewrite.distributed.wrap(planned, parallel)

    A planned module calls its layers, not its blocks, so ``fully_shard(block)`` alone would never
    run; ``wrap`` shards each unit's layers together (``benchmarks/parallel.py`` measures it).

Reproducibility
    The model is initialised from ``--seed`` and planning does not touch the global RNG, so a
    planned and an unplanned run with the same seed compute the same training (recomputation is
    exact): ``tests/test_train.py`` compares their test accuracy and final parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import memfit
from memfit.capture.trainstep import StepConfig
from memfit.cli import load_model
from memfit.compressors import generators, list_methods
from memfit.compressors.ternary import freeze_assignment_, ternary_generators
from memfit.cost.measurement import measure_wrapped_step
from memfit.errors import MemfitError, MemfitInputError
from memfit.io import datasets
from memfit.planner import STRATEGIES
from memfit.report.plot import plot_plan

__all__ = ["main", "build_parser"]

CHECKPOINT = "checkpoint.pt"
PACKED = "model.memfit"
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.json"
MEMORY_PNG = "memory.png"
CURVES_PNG = "curves.png"
# A budget nothing exceeds: memfit.optimize then returns the unplanned step with its timeline.
UNBOUNDED_MB = 1e9
# The synthetic data set is the same whatever --seed: only the training varies with it.
SYNTHETIC_SEED = 1234
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
# Arguments that change what a run computes: a resumed run that differs in one will not reproduce
# an uninterrupted run (structural ones fail outright when the state is loaded).
_RESUME_KEYS = (
    "model", "width", "stem", "data", "image_size", "synthetic_size", "num_classes", "budget_mb",
    "strategy", "compress", "recalibrate_bn", "freeze_epochs", "optimizer", "lr", "momentum", "weight_decay",
    "schedule", "epochs", "batch_size", "accumulate", "amp", "seed",
)
MiB = 2**20


# --------------------------------------------------------------------------------------- arguments


def _budget(text: str) -> str:
    """memfit's one rule: ``"300"`` MiB, ``"1.5GiB"``, or ``"85%"`` of the unplanned predicted peak
    (checked here, kept as written: it is saved with the run's arguments)."""
    try:
        memfit.Budget.parse(text, "--budget-mb")
    except MemfitInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a model under a memory budget with memfit (planned, optionally compressed, DDP-ready).",
        formatter_class=_Formatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet18", help="zoo name (`memfit models`) or package.module:factory")
    g.add_argument("--width", type=int,
                   help="zoo ResNets: channels of the first stage (default here 16; 64 is the published network)")
    g.add_argument("--stem", choices=["cifar", "imagenet"], help="zoo image models: input stem (default cifar)")
    g.add_argument("--init", metavar="PATH",
                   help="start from these weights: a checkpoint.pt of an uncompressed run or a state dict")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits", choices=["synthetic", "digits", "cifar10", "cifar100"],
                   help="digits: scikit-learn's bundled digits; cifar10/100: the python archive in --data-root")
    g.add_argument("--data-root", default="data", help="directory holding the CIFAR python archive")
    g.add_argument("--image-size", type=int, default=16, help="digits and synthetic: image side in pixels")
    g.add_argument("--synthetic-size", type=int, default=1024,
                   help="synthetic: training images (a quarter as many test images)")
    g.add_argument("--num-classes", type=int, help="synthetic: classes (default 10)")
    g = p.add_argument_group("memory")
    g.add_argument("--budget-mb", type=_budget, metavar="MIB|PCT%",
                   help="peak of one training step per process, MiB, or a percentage of the unplanned predicted peak")
    g.add_argument("--strategy", default="auto", choices=["auto", *sorted(STRATEGIES)],
                   help="memfit.optimize's planner")
    g.add_argument("--compress", choices=["auto", *list_methods()],
                   help="compress the model's layers with this method (auto: only what the budget needs)")
    g.add_argument("--recalibrate-bn", type=int, metavar="BATCHES",
                   help="before each evaluation, re-estimate BatchNorm statistics over this many training batches "
                        "(default 16 for compressed models, whose weights move far from the statistics, else 0)")
    g.add_argument("--freeze-epochs", type=int,
                   help="ternary: train the last N epochs with the codes frozen (EC2T phase 2; default 1 when "
                        "--epochs >= 2)")
    g = p.add_argument_group("training")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"], help="sgd has momentum")
    g.add_argument("--lr", type=float, help="learning rate (default 0.05 for sgd, 1e-3 for adam/adamw)")
    g.add_argument("--momentum", type=float, default=0.9, help="sgd momentum")
    g.add_argument("--weight-decay", type=float, help="default 5e-4 for sgd, 0 for adam, 0.01 for adamw")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="learning rate over the run")
    g.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--accumulate", type=int, default=1, metavar="N",
                   help="gradient accumulation: each batch runs as N micro-batches, one optimizer step; memfit plans "
                        "the micro-batch with the gradients held (accumulate=True)")
    g.add_argument("--amp", choices=["bf16", "fp16"], help="torch.autocast precision (fp16 uses a gradient scaler)")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    g.add_argument("--threads", type=int,
                   help="CPU threads for torch's kernels (default: torch's choice; 1 is often faster for small "
                        "models on a busy machine)")
    g.add_argument("--seed", type=int, default=0, help="initialisation, data order and dropout")
    g.add_argument("--max-steps", type=int, help="stop (and save) once the run has made this many optimizer steps")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/train", help="directory for the checkpoint, metrics and plots")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    g.add_argument("--progress", default="auto", choices=["auto", "bar", "lines", "none"],
                   help="auto: a tqdm bar on a terminal, plain lines otherwise")
    return p


def _resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other arguments, and check the combinations."""
    if args.lr is None:
        args.lr = 0.05 if args.optimizer == "sgd" else 1e-3
    if args.weight_decay is None:
        args.weight_decay = {"sgd": 5e-4, "adam": 0.0, "adamw": 0.01}[args.optimizer]
    zoo = ":" not in args.model
    if args.width is None and zoo and args.model.startswith("resnet"):
        args.width = 16
    if args.stem is None and zoo:
        args.stem = "cifar"
    if args.recalibrate_bn is None:
        args.recalibrate_bn = 16 if args.compress else 0
    if args.freeze_epochs is None:
        args.freeze_epochs = 1 if args.epochs >= 2 else 0
    for name in ("epochs", "batch_size", "image_size", "synthetic_size"):
        if getattr(args, name) < 1:
            raise MemfitInputError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise MemfitInputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.accumulate < 1 or args.batch_size % args.accumulate:
        raise MemfitInputError(
            f"--accumulate {args.accumulate}: give a positive number of micro-batches that divides --batch-size "
            f"{args.batch_size}"
        )
    if args.compress == "auto" and args.budget_mb is None:
        raise MemfitInputError("--compress auto compresses only what a budget needs: give --budget-mb too")
    if args.num_classes is not None and args.data != "synthetic":
        raise MemfitInputError(f"--num-classes applies to synthetic data; {args.data} has its own classes")
    return args


# ------------------------------------------------------------------------------------ distribution


@dataclasses.dataclass
class Context:
    """Where this process runs: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    started: bool = False  # whether this script initialised the process group

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def log(self, *parts: Any, **kwargs: Any) -> None:
        """Print on rank 0 only."""
        if self.main:
            print(*parts, **kwargs, flush=True)


def setup(device_arg: str) -> Context:
    """Read torchrun's environment and start the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MemfitInputError("--device cuda, but torch sees no CUDA device")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    ctx = Context(rank=rank, world=world, device=device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        ctx.started = True
    return ctx


def _all_sum(ctx: Context, values: Sequence[float]) -> list[float]:
    """Sum numbers over the processes (float64, on the device the backend needs)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def _sync_buffers(module: nn.Module, ctx: Context) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every process, as DDP sends them before each
    forward: after a step, every replica holds the statistics of its own last batch."""
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def _gather(ctx: Context, obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


# -------------------------------------------------------------------------------------------- data


def synthetic(n_train: int, num_classes: int, size: int) -> datasets.Split:
    """Random images around one random template per class (learnable), from a fixed seed."""
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    templates = torch.randn(num_classes, 3, size, size, generator=g)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        return 0.5 * templates[y] + torch.randn(n, 3, size, size, generator=g), y

    x_train, y_train = make(n_train)
    x_test, y_test = make(max(1, n_train // 4))
    return datasets.Split(x_train, y_train, x_test, y_test, num_classes)


def load_data(args: argparse.Namespace) -> datasets.Split:
    """The data set ``--data`` names (the split is the same whatever ``--seed``)."""
    if args.data == "synthetic":
        return synthetic(args.synthetic_size, args.num_classes or 10, args.image_size)
    if args.data == "digits":
        return datasets.digits(size=args.image_size, seed=0)
    return datasets.cifar(args.data, os.path.expanduser(args.data_root))


# ------------------------------------------------------------------------------------------- model


def create_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The model ``--model`` names, with ``num_classes`` outputs, initialised from ``--seed``."""
    torch.manual_seed(args.seed)
    if ":" in args.model:
        if args.width is not None:
            raise MemfitInputError("--width applies to zoo ResNets, not to package.module:factory models")
        return load_model(args.model, stem=args.stem, num_classes=num_classes)
    options: dict[str, Any] = {"num_classes": num_classes, "stem": args.stem}
    if args.width is not None:
        options["width"] = args.width
    try:
        return memfit.models.create(args.model, **options)
    except TypeError as e:
        raise MemfitInputError(f"cannot build {args.model} with {options}: {e}") from e
    except ValueError as e:
        raise MemfitInputError(str(e)) from e


def optimizer_factory(args: argparse.Namespace) -> Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer]:
    """The optimizer, as a factory: memfit plans with the very optimizer (and state) that trains."""
    lr, wd = args.lr, args.weight_decay
    if args.optimizer == "sgd":
        return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=args.momentum, weight_decay=wd)
    if args.optimizer == "adam":
        return lambda ps: torch.optim.Adam(ps, lr=lr, weight_decay=wd)
    return lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=wd)


def _load_init(model: nn.Module, path: str) -> None:
    """Weights from an earlier run's checkpoint.pt or a plain state dict."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MemfitInputError(f"--init {path}: no such file") from None
    except Exception as e:  # torch reports unreadable files in many ways
        raise MemfitInputError(f"--init {path} is not a readable torch file: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise MemfitInputError(f"--init {path} does not fit the model: {e}") from e


@dataclasses.dataclass
class Prepared:
    """The module that trains (planned and/or compressed) and what its plan predicts."""

    module: nn.Module
    plan: Any  # memfit Plan: printable, levels for the plot
    planned: bool
    budget_mb: float | None  # the budget given (resolved from a percentage)
    parallel: memfit.Parallel | None  # DDP under torchrun: the plan is per process, buckets included
    planning_s: float


def _plan_signature(module: nn.Module, plan: Any) -> str:
    """What must be equal on every rank: the segments and the parameters' names and shapes in order."""
    h = hashlib.sha256()
    for s in plan.segments:
        h.update(f"{s.kind}:{','.join(s.nodes)};".encode())
    for name, p in module.named_parameters():
        h.update(f"{name}{tuple(p.shape)};".encode())
    return h.hexdigest()


def prepare(args: argparse.Namespace, model: nn.Module, x: torch.Tensor, ctx: Context) -> Prepared:
    """Compress (``--compress METHOD``) and plan (``--budget-mb``) the model on its device."""
    started = time.perf_counter()
    model.to(ctx.device)
    net = model
    if args.compress not in (None, "auto"):
        net = memfit.compress(model, args.compress)
    parallel = memfit.Parallel("ddp", ctx.world) if ctx.distributed else None
    factory = optimizer_factory(args)

    def plan(budget_mb: float, strategy: str) -> nn.Module:
        compress = "auto" if args.compress == "auto" else None
        with torch.random.fork_rng(devices=[ctx.device.index] if ctx.device.type == "cuda" else []):
            return memfit.optimize(net, budget_mb, x, optimizer=factory, amp=args.amp, strategy=strategy,
                                   compress=compress, parallel=parallel, accumulate=args.accumulate > 1)

    if args.budget_mb is None:
        unplanned = plan(UNBOUNDED_MB, "auto")
        unplanned.plan.budget_bytes = None
        return Prepared(net, unplanned.plan, False, None, parallel, time.perf_counter() - started)
    given = memfit.Budget.parse(args.budget_mb, "--budget-mb")
    budget = given.resolve(0) / MiB if given.fraction is None else (
        given.fraction * plan(UNBOUNDED_MB, "auto").plan.peak_before_bytes / MiB
    )
    planned = plan(budget, args.strategy)
    if ctx.distributed:  # every replica must run the same plan over the same parameters
        signatures = _gather(ctx, _plan_signature(planned, planned.plan))
        if len(set(signatures)) > 1:
            strategy = _gather(ctx, planned.plan.strategy)[0]
            if not ctx.main:
                planned = plan(budget, strategy)
            if len(set(_gather(ctx, _plan_signature(planned, planned.plan)))) > 1:
                raise MemfitError("the processes planned the model differently; pass --strategy explicitly")
    return Prepared(planned, planned.plan, True, budget, parallel, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------- training


@dataclasses.dataclass
class Progress:
    """Where the run is; saved in the checkpoint so a resumed run continues exactly."""

    epoch: int = 0  # the epoch in progress (or the number of finished epochs at a boundary)
    step_in_epoch: int = 0  # batches of ``epoch`` already trained
    step: int = 0  # optimizer steps since the start of the run
    loss_sum: float = 0.0  # this process's running sums over the epoch in progress
    correct: float = 0.0
    seen: float = 0.0
    epoch_seconds: float = 0.0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # per finished epoch
    step_losses: list[float] = dataclasses.field(default_factory=list)  # rank 0's loss per step


class StopRequest:
    """Ctrl-C and SIGTERM ask the loop to stop after the current step (a second Ctrl-C: at once)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.ctx.main:
            print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                  "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def agreed(self) -> bool:
        """Whether any process was asked to stop (all stop at the same step)."""
        if not self.ctx.distributed:
            return self.requested
        return _all_sum(self.ctx, [float(self.requested)])[0] > 0


class Bar:
    """A progress bar (tqdm) or plain lines, on rank 0: loss, accuracy, samples/s."""

    def __init__(self, mode: str, ctx: Context, epoch: int, epochs: int, total: int, done: int) -> None:
        self.enabled = ctx.main and mode != "none"
        self.tqdm = None
        self.every = max(1, total // 5)
        self.epoch, self.epochs, self.total = epoch, epochs, total
        if self.enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty())):
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.tqdm = tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                                 dynamic_ncols=True, leave=True)

    def update(self, step: int, loss: float, acc: float, rate: float) -> None:
        if not self.enabled:
            return
        if self.tqdm is not None:
            self.tqdm.set_postfix(loss=f"{loss:.4f}", acc=f"{100 * acc:.1f}%", samples_s=f"{rate:.0f}", refresh=False)
            self.tqdm.update(1)
        elif step % self.every == 0 or step == self.total:
            print(f"epoch {self.epoch + 1}/{self.epochs} step {step}/{self.total}  loss {loss:.4f}  "
                  f"acc {100 * acc:.1f}%  {rate:.0f} samples/s", flush=True)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, xb: torch.Tensor,
               yb: torch.Tensor, amp: str | None, device: torch.device, micro: int = 1) -> tuple[float, int]:
    """Forward and backward of one step, as memfit's step model has it (gradients None at the
    start), in ``micro`` micro-batches whose gradients add up to the whole batch's (each loss
    weighted by its share: the mean over the batch); returns the loss and the number of correct
    predictions. :func:`apply_update` follows."""
    optimizer.zero_grad(set_to_none=True)
    total, correct = 0.0, 0
    for xm, ym in zip(xb.chunk(micro), yb.chunk(micro)):
        with _autocast(device, amp):
            out = net(xm)
            loss = F.cross_entropy(out.float(), ym) * (len(ym) / len(yb))
        scaler.scale(loss).backward()
        total += float(loss.detach())
        correct += int((out.detach().argmax(dim=1) == ym).sum())
    return total, correct


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """The optimizer step (through the gradient scaler under fp16) and the learning-rate schedule."""
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def _autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(net: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: Context, amp: str | None) -> tuple[float, float]:
    """Test loss and accuracy, each process evaluating its share (eval mode: no recomputation)."""
    was_training = net.training
    net.eval()
    index = torch.arange(ctx.rank, len(y), ctx.world)
    loss_sum = correct = 0.0
    for chunk in index.split(256):
        xb, yb = x[chunk].to(ctx.device), y[chunk].to(ctx.device)
        with _autocast(ctx.device, amp):
            out = net(xb).float()
        loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += float((out.argmax(dim=1) == yb).sum())
    net.train(was_training)
    loss_sum, correct = _all_sum(ctx, [loss_sum, correct])
    return loss_sum / len(y), correct / len(y)


@torch.no_grad()
def recalibrate_bn(net: nn.Module, x: torch.Tensor, batches: int, batch_size: int, ctx: Context,
                   amp: str | None) -> int:
    """Re-estimate every BatchNorm's running statistics as the plain average over the first
    ``batches`` training batches (the same on every process); returns the batches used.

    Compression moves the weights far from the dense model's, and a generated weight changes at
    every step, so the exponential running averages lag behind the weights that evaluation uses.
    Training is unaffected: in training mode BatchNorm normalises with the batch's statistics."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or batches <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = net.training
    net.train()
    used = 0
    for chunk in x[: batches * batch_size].split(batch_size):
        if len(chunk) < 2:
            break
        with _autocast(ctx.device, amp):
            net(chunk.to(ctx.device))
        used += 1
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    net.train(was_training)
    return used


def _epoch_batches(n: int, batch: int, epoch: int, seed: int, ctx: Context) -> list[torch.Tensor]:
    """This process's batches of an epoch: DistributedSampler's shard, seeded by seed and epoch;
    the last incomplete batch is dropped (every step has the planned shape)."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                                  seed=seed)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler))
    return list(order[: len(order) // batch * batch].split(batch))


# ------------------------------------------------------------------------------------- checkpoints


def _rng_state(ctx: Context) -> dict[str, Any]:
    mt, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


def _set_rng_state(state: dict[str, Any], ctx: Context) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], ctx.device)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _compressed(module: nn.Module) -> bool:
    return bool(generators(module))


def save_checkpoint(out: Path, module: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, progress: Progress,
                    args: argparse.Namespace, ctx: Context, rng: list[dict[str, Any]]) -> list[Path]:
    """Write the checkpoint (rank 0); returns the files written."""
    payload = {
        "format": "memfit-train",
        "version": 1,
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": dataclasses.asdict(progress),
        "rng": rng,
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "world_size": ctx.world,
    }
    if not _compressed(module):
        _atomic_torch_save(payload, out / CHECKPOINT)
        return [out / CHECKPOINT]
    tmp = out / (PACKED + ".tmp")
    memfit.save(module, tmp)
    os.replace(tmp, out / PACKED)
    _atomic_torch_save(payload, out / TRAIN_STATE)
    return [out / PACKED, out / TRAIN_STATE]


def load_checkpoint(out: Path, compressed: bool, device: torch.device) -> dict[str, Any]:
    path = out / (TRAIN_STATE if compressed else CHECKPOINT)
    if not path.exists():
        raise MemfitInputError(f"--resume: no {path.name} in {out} (a {'compressed' if compressed else 'plain'} run "
                               "writes it after its first epoch, at --max-steps or when interrupted)")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch reports truncated files in many ways
        raise MemfitInputError(f"--resume: {path} is not a readable checkpoint: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != "memfit-train":
        raise MemfitInputError(f"--resume: {path} was not written by this script")
    return payload


# ------------------------------------------------------------------------------------------ output


def _digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (replicas of a DDP job must agree)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def plot_curves(progress: Progress, steps_per_epoch: int, path: Path) -> Path:
    """Loss per step and per epoch, accuracy per epoch (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if progress.step_losses:
        xs = [(i + 1) / steps_per_epoch for i in range(len(progress.step_losses))]
        ax_loss.plot(xs, progress.step_losses, color="0.7", linewidth=0.8, label="train (per step)")
    epochs = [h["epoch"] for h in progress.history]
    if epochs:
        ax_loss.plot(epochs, [h["train_loss"] for h in progress.history], "o-", label="train (epoch mean)")
        ax_loss.plot(epochs, [h["test_loss"] for h in progress.history], "s-", label="test")
        ax_acc.plot(epochs, [100 * h["train_accuracy"] for h in progress.history], "o-", label="train")
        ax_acc.plot(epochs, [100 * h["test_accuracy"] for h in progress.history], "s-", label="test")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy (log scale)")
    ax_loss.set_yscale("log")
    ax_loss.set_title("loss")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plan_summary(prep: Prepared) -> dict[str, Any]:
    plan = prep.plan
    return {
        "planned": prep.planned,
        "strategy": plan.strategy,
        "budget_mb": prep.budget_mb,
        "predicted_peak_before_mb": plan.peak_before_bytes / MiB,
        "predicted_peak_after_mb": plan.peak_after_bytes / MiB,
        "extra_flops_percent": plan.extra_flops_percent,
        "checkpointed_segments": len(plan.checkpointed),
        "compressed_layers": list(plan.compressed),
        "planning_s": prep.planning_s,
    }


# -------------------------------------------------------------------------------------------- main


class Trainer:
    """One run: the data, the prepared module, its optimizer and schedule, and the progress."""

    def __init__(self, args: argparse.Namespace, ctx: Context) -> None:
        self.args, self.ctx = args, ctx
        self.started = time.perf_counter()
        self.out = Path(args.out)
        if args.resume and not any((self.out / name).exists() for name in (CHECKPOINT, TRAIN_STATE)):
            raise MemfitInputError(f"--resume: no {CHECKPOINT} or {TRAIN_STATE} in {self.out} (a run writes one after "
                                   "its first epoch, at --max-steps or when interrupted)")
        if ctx.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.data = data = load_data(args)
        self.n_train = len(data.y_train)
        if self.n_train // ctx.world < args.batch_size:
            raise MemfitInputError(f"--batch-size {args.batch_size} is larger than a process's share of the "
                                   f"{self.n_train} training images")
        model = create_model(args, data.num_classes)
        if args.init:
            _load_init(model, args.init)
        self.n_params = sum(p.numel() for p in model.parameters())
        # what memfit plans and measures: one micro-batch (the whole batch without accumulation)
        self.x_example = data.x_train[: args.batch_size // args.accumulate].to(ctx.device)
        ctx.log(f"model {args.model} ({self.n_params / 1e6:.3f} M parameters), data {args.data}: {self.n_train} "
                f"train / {len(data.y_test)} test images {list(data.x_train.shape[1:])}, {data.num_classes} classes")
        ctx.log(f"device {ctx.device}, {ctx.world} process{'es' if ctx.distributed else ''}, batch {args.batch_size} "
                f"per process ({args.batch_size * ctx.world} in all), {args.optimizer} lr {args.lr:g}, "
                f"precision {args.amp or 'fp32'}")

        self.prep = prepare(args, model, self.x_example, ctx)
        self.module = self.prep.module
        self._print_plan()

        self.factory = optimizer_factory(args)
        self.optimizer = self.factory([p for p in self.module.parameters() if p.requires_grad])
        self.batches_per_epoch = math.ceil(self.n_train / ctx.world) // args.batch_size
        total = self.batches_per_epoch * args.epochs
        if args.schedule == "cosine":
            lr_at = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # noqa: E731
        else:
            lr_at = lambda step: 1.0  # noqa: E731
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_at)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp == "fp16")
        self.progress = Progress()
        self.stopped: str | None = None  # "interrupted" or "max_steps"
        self.train_s = 0.0

    def _print_plan(self) -> None:
        ctx, prep, args = self.ctx, self.prep, self.args
        ctx.log("")
        ctx.log(prep.plan)
        if prep.planned and memfit.Budget.parse(args.budget_mb).fraction is not None:
            ctx.log(f"Budget {args.budget_mb} of the unplanned predicted peak: {prep.budget_mb:.2f} MiB")
        if ctx.distributed:
            ctx.log(f"DDP, {ctx.world} processes: figures are per process; gradients are views into DDP's buckets "
                    f"(gradient_as_bucket_view=True), which the predicted peak holds for the whole step")
        if ctx.main:
            plot_plan(prep.plan, self.out / MEMORY_PNG)

    # ---- checkpoints

    def restore(self) -> None:
        """Continue from the checkpoint in ``--out`` (``--resume``)."""
        args, ctx = self.args, self.ctx
        payload = load_checkpoint(self.out, _compressed(self.module), ctx.device)
        saved_args = payload.get("args", {})
        for key in _RESUME_KEYS:
            now = getattr(args, key)
            now = list(now) if isinstance(now, tuple) else now
            if key in saved_args and saved_args[key] != now:
                ctx.log(f"warning: --{key.replace('_', '-')} is {now!r}, the checkpoint's run had "
                        f"{saved_args[key]!r}: the result will differ from an uninterrupted run")
        if payload.get("world_size") != ctx.world:
            ctx.log(f"warning: the checkpoint was written by {payload.get('world_size')} processes, this run has "
                    f"{ctx.world}: the data order differs from an uninterrupted run")
        try:
            self.module.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise MemfitInputError(f"--resume: the checkpoint does not fit this model and optimizer: {e}") from e
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.progress = Progress(**payload["progress"])
        rng = payload.get("rng") or []
        if ctx.rank < len(rng):
            _set_rng_state(rng[ctx.rank], ctx)
        ctx.log(f"resumed from {self.out}: epoch {self.progress.epoch + 1}, step {self.progress.step} "
                f"({self.progress.step_in_epoch} of the epoch's batches done)")

    def checkpoint(self, rng: list[dict[str, Any]] | None = None) -> None:
        """Save (rank 0), with every process's RNG state unless ``rng`` is given."""
        states = rng if rng is not None else _gather(self.ctx, _rng_state(self.ctx))
        if self.ctx.main:
            save_checkpoint(self.out, self.module, self.optimizer, self.scheduler, self.scaler, self.progress,
                            self.args, self.ctx, states)

    # ---- training

    def train(self) -> None:
        """Train to ``--epochs`` (or ``--max-steps``, or an interruption), saving after every epoch."""
        args, ctx, progress, module = self.args, self.ctx, self.progress, self.module
        if args.resume:
            self.restore()
            progress = self.progress
        else:
            torch.manual_seed(args.seed + 1)  # the training's own RNG (dropout): planning cannot shift it
        net: nn.Module = module
        if ctx.distributed:
            net = memfit.rewrite.distributed.wrap(module, self.prep.parallel,
                                          device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        reached_max = lambda: args.max_steps is not None and progress.step >= args.max_steps  # noqa: E731
        saved_step = -1
        in_update = False
        started = time.perf_counter()
        with StopRequest(ctx) as stop:
            try:
                while progress.epoch < args.epochs and not self.stopped:
                    if reached_max():
                        self.stopped = "max_steps"
                        break
                    epoch = progress.epoch
                    if progress.step_in_epoch == 0:
                        progress.loss_sum = progress.correct = progress.seen = progress.epoch_seconds = 0.0
                        self._maybe_freeze(epoch)
                    batches = _epoch_batches(self.n_train, args.batch_size, epoch, args.seed, ctx)
                    bar = Bar(args.progress, ctx, epoch, args.epochs, len(batches), progress.step_in_epoch)
                    epoch_started = time.perf_counter()
                    samples = 0
                    for k in range(progress.step_in_epoch, len(batches)):
                        if reached_max():
                            self.stopped = "max_steps"
                            break
                        xb = self.data.x_train[batches[k]].to(ctx.device, non_blocking=True)
                        yb = self.data.y_train[batches[k]].to(ctx.device, non_blocking=True)
                        loss, correct = train_step(net, self.optimizer, self.scaler, xb, yb, args.amp, ctx.device,
                                                   args.accumulate)
                        in_update = True  # an interruption from here to the counters would tear the step
                        apply_update(self.optimizer, self.scaler, self.scheduler)
                        progress.step_in_epoch, progress.step = k + 1, progress.step + 1
                        in_update = False
                        progress.loss_sum += loss * len(yb)
                        progress.correct += correct
                        progress.seen += len(yb)
                        progress.step_losses.append(loss)
                        samples += len(yb) * ctx.world
                        rate = samples / max(1e-9, time.perf_counter() - epoch_started)
                        bar.update(k + 1, progress.loss_sum / progress.seen, progress.correct / progress.seen, rate)
                        if stop.agreed():
                            self.stopped = "interrupted"
                            break
                    bar.close()
                    progress.epoch_seconds += time.perf_counter() - epoch_started
                    if not self.stopped:
                        self._end_epoch(epoch)
                        self.checkpoint()
                        saved_step = progress.step
                _sync_buffers(module, ctx)
                if self.stopped and saved_step != progress.step:
                    self.checkpoint()
            except KeyboardInterrupt:  # a second Ctrl-C, or no handler (not the main thread)
                self.stopped = "interrupted"
                if in_update:
                    print("\ninterrupted during the optimizer update: the last checkpoint stands", file=sys.stderr)
                else:  # the model and optimizer are as after the last finished step
                    print("\ninterrupted: saving a checkpoint", file=sys.stderr)
                    self.checkpoint([_rng_state(ctx)])
                raise
        self.train_s = time.perf_counter() - started

    def _maybe_freeze(self, epoch: int) -> None:
        """EC2T phase 2 for the last ``--freeze-epochs`` epochs of a ternary model."""
        args = self.args
        if args.freeze_epochs and epoch == max(0, args.epochs - args.freeze_epochs) and ternary_generators(self.module):
            frozen = freeze_assignment_(self.module)
            self.ctx.log(f"EC2T phase 2: froze the ternary codes of {frozen} layers for the last "
                         f"{args.freeze_epochs} epoch(s)")

    def _end_epoch(self, epoch: int) -> None:
        """Sum the epoch's training figures over the processes, evaluate, record."""
        ctx, progress = self.ctx, self.progress
        loss_sum, correct, seen = _all_sum(ctx, [progress.loss_sum, progress.correct, progress.seen])
        _sync_buffers(self.module, ctx)
        args = self.args
        recalibrate_bn(self.module, self.data.x_train, args.recalibrate_bn, args.batch_size, ctx, args.amp)
        test_loss, test_acc = evaluate(self.module, self.data.x_test, self.data.y_test, ctx, args.amp)
        record = {
            "epoch": epoch + 1,
            "step": progress.step,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "seconds": progress.epoch_seconds,
            "samples_per_s": seen / max(1e-9, progress.epoch_seconds),
            "lr": self.scheduler.get_last_lr()[0],
        }
        progress.history.append(record)
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        ctx.log(f"epoch {epoch + 1}/{self.args.epochs}: train loss {record['train_loss']:.4f} acc "
                f"{100 * record['train_accuracy']:.2f}%, test loss {test_loss:.4f} acc {100 * test_acc:.2f}%, "
                f"{record['samples_per_s']:.0f} samples/s, {progress.epoch_seconds:.1f} s")

    # ---- the end

    def finish(self) -> None:
        """Measured peak beside the predicted one, metrics.json, curves.png, and where files went."""
        args, ctx, prep, progress, out = self.args, self.ctx, self.prep, self.progress, self.out
        predicted = prep.plan.peak_after_bytes / MiB
        measured: float | None = None
        how = ""
        if ctx.device.type == "cuda":
            measured = torch.cuda.max_memory_allocated(ctx.device) / MiB
            how = "torch.cuda.max_memory_allocated over the training steps"
        elif ctx.distributed:  # every process measures a wrapped copy: DDP's construction is collective
            with torch.random.fork_rng(devices=[]):
                replica = memfit.rewrite.distributed.wrap(copy.deepcopy(self.module), self.prep.parallel)
                config = StepConfig(optimizer=self.factory, amp=args.amp, accumulate=args.accumulate > 1)
                peak, _ = measure_wrapped_step(replica, (self.x_example,), config)
            measured = max(_gather(ctx, peak / MiB))
            how = "one real step of a DDP-wrapped copy on every process, allocator level (profiler), the largest"
        elif ctx.main:
            with torch.random.fork_rng(devices=[]):
                measured = memfit.measure(self.module, self.x_example, optimizer=self.factory, amp=args.amp,
                                          accumulate=args.accumulate > 1).peak_mb
            how = "memfit.measure: one real step on a copy of the module, allocator level"
        digests = _gather(ctx, _digest(self.module)) if ctx.distributed else None
        if not ctx.main:
            return
        files = {p.name: p.stat().st_size for p in (out / CHECKPOINT, out / PACKED, out / TRAIN_STATE) if p.exists()}
        plot_curves(progress, max(1, self.batches_per_epoch), out / CURVES_PNG)
        last = progress.history[-1] if progress.history else {}
        metrics = {
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
            "device": str(ctx.device),
            "world_size": ctx.world,
            "model": {"name": args.model, "parameters": self.n_params, "compressed": _compressed(self.module)},
            "data": {"name": args.data, "train": self.n_train, "test": len(self.data.y_test),
                     "shape": list(self.data.x_train.shape[1:]), "num_classes": self.data.num_classes},
            "plan": _plan_summary(prep),
            "memory": {
                "predicted_peak_mb": predicted,
                "predicted_how": ("memfit dry run of one step (the planned step when planned)"
                                  + (", per DDP process, buckets included" if ctx.distributed else "")),
                "measured_peak_mb": measured,
                "measured_how": how,
            },
            "epochs": progress.history,
            "step_losses": progress.step_losses,
            "final": {
                "epoch": progress.epoch,
                "step": progress.step,
                "completed": progress.epoch >= args.epochs,
                "stopped": self.stopped,
                "test_accuracy": last.get("test_accuracy"),
                "test_loss": last.get("test_loss"),
            },
            "throughput_samples_per_s": (sum(h["samples_per_s"] for h in progress.history) / len(progress.history)
                                         if progress.history else None),
            "files": files,
            "seconds": {"planning": prep.planning_s, "training": self.train_s,
                        "total": time.perf_counter() - self.started},
        }
        if digests is not None:
            metrics["replicas"] = {"param_digests": digests, "equal": len(set(digests)) == 1}
        with open(out / METRICS, "w") as f:
            json.dump(metrics, f, indent=2)

        print()
        print(f"Peak of a training step (MiB, predicted): {predicted:.2f}"
              + (" (per DDP process, buckets included)" if ctx.distributed else ""))
        if measured is not None:
            print(f"Peak of a training step (MiB, measured):  {measured:.2f}  [{how}]")
        if last:
            print(f"Test accuracy after epoch {last['epoch']}: {100 * last['test_accuracy']:.2f}% "
                  f"(loss {last['test_loss']:.4f})")
        if digests is not None:
            verdict = "equal" if len(set(digests)) == 1 else "DIFFERENT"
            print(f"Replicas' parameters: {verdict} over {ctx.world} processes")
        if self.stopped == "interrupted":
            print(f"Interrupted at step {progress.step}: continue with --resume --out {out}")
        elif self.stopped == "max_steps":
            print(f"Stopped at --max-steps {args.max_steps} (step {progress.step}): continue with --resume --out {out}")
        print(f"Files in {out}/: " + ", ".join(f"{name} ({size / 1024:.1f} KiB)" for name, size in files.items())
              + f", {METRICS}, {MEMORY_PNG}, {CURVES_PNG}")
        print(f"Time (s, measured): planning {prep.planning_s:.1f}, training {self.train_s:.1f}, "
              f"total {time.perf_counter() - self.started:.1f}")


def run(args: argparse.Namespace, ctx: Context) -> int:
    """Everything after argument parsing and process-group setup; returns the exit status."""
    trainer = Trainer(args, ctx)
    try:
        trainer.train()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    trainer.finish()
    return EXIT_INTERRUPTED if trainer.stopped == "interrupted" else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, train, and return the exit status (0, 2 for an error, 130 when interrupted)."""
    args = build_parser().parse_args(argv)
    args.command_line = list(sys.argv[1:] if argv is None else argv)
    ctx: Context | None = None
    threads = torch.get_num_threads()
    try:
        args = _resolve_defaults(args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        ctx = setup(args.device)
        return run(args, ctx)
    except MemfitError as e:
        where = "" if ctx is None or not ctx.distributed else f"[rank {ctx.rank}] "
        print(f"{where}error: {e}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    finally:
        torch.set_num_threads(threads)
        if ctx is not None and ctx.started and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
