"""The command line: every option, the defaults that depend on other options, and their checks."""

from __future__ import annotations

import argparse
import re

import memfit

__all__ = ["build_parser", "resolve"]


def _budget(text: str) -> str:
    """memfit's one rule: ``"300"`` MiB, ``"1.5GiB"``, or ``"85%"`` of the unplanned predicted peak
    (checked here, kept as written: it is saved with the run's arguments)."""
    try:
        memfit.Budget.parse(text, "--budget-mb")
    except memfit.MemfitInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``examples/train.py`` (docs/train.md explains each part)."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a model under a memory budget with memfit (planned, optionally compressed, DDP-ready).",
        formatter_class=_Formatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet18", help="zoo name (`memfit models`) or package.module:factory")
    g.add_argument(
        "--width",
        type=int,
        help="zoo ResNets: channels of the first stage (default here 16; 64 is the published network)",
    )
    g.add_argument("--stem", choices=["cifar", "imagenet"], help="zoo image models: input stem (default cifar)")
    g.add_argument(
        "--init",
        metavar="PATH",
        help="start from these weights: a checkpoint.pt of an uncompressed run or a state dict",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default="digits",
        choices=["synthetic", "digits", "cifar10", "cifar100"],
        help="digits: scikit-learn's bundled digits; cifar10/100: the python archive in --data-root",
    )
    g.add_argument("--data-root", default="data", help="directory holding the CIFAR python archive")
    g.add_argument("--image-size", type=int, default=16, help="digits and synthetic: image side in pixels")
    g.add_argument(
        "--synthetic-size", type=int, default=1024, help="synthetic: training images (a quarter as many test images)"
    )
    g.add_argument("--num-classes", type=int, help="synthetic: classes (default 10)")
    g = p.add_argument_group("memory")
    g.add_argument(
        "--budget-mb",
        type=_budget,
        metavar="MIB|PCT%",
        help="peak of one training step per process, MiB, or a percentage of the unplanned predicted peak",
    )
    g.add_argument(
        "--strategy", default="auto", choices=["auto", *memfit.list_strategies()], help="memfit.optimize's planner"
    )
    g.add_argument(
        "--compress",
        choices=["auto", *memfit.compressors.list_methods()],
        help="compress the model's layers with this method (auto: only what the budget needs)",
    )
    g.add_argument(
        "--recalibrate-bn",
        type=int,
        metavar="BATCHES",
        help="before each evaluation, re-estimate BatchNorm statistics over this many training batches "
        "(default 16 for compressed models, whose weights move far from the statistics, else 0)",
    )
    g.add_argument(
        "--freeze-epochs",
        type=int,
        help="ternary: train the last N epochs with the codes frozen (EC2T phase 2; default 1 when --epochs >= 2)",
    )
    g = p.add_argument_group("training")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"], help="sgd has momentum")
    g.add_argument("--lr", type=float, help="learning rate (default 0.05 for sgd, 1e-3 for adam/adamw)")
    g.add_argument("--momentum", type=float, default=0.9, help="sgd momentum")
    g.add_argument("--weight-decay", type=float, help="default 5e-4 for sgd, 0 for adam, 0.01 for adamw")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="learning rate over the run")
    g.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument(
        "--accumulate",
        type=int,
        default=1,
        metavar="N",
        help="gradient accumulation: each batch runs as N micro-batches, one optimizer step; memfit plans "
        "the micro-batch with the gradients held (accumulate=True)",
    )
    g.add_argument("--amp", choices=["bf16", "fp16"], help="torch.autocast precision (fp16 uses a gradient scaler)")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    g.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch's kernels (default: torch's choice; 1 is often faster for small "
        "models on a busy machine)",
    )
    g.add_argument("--seed", type=int, default=0, help="initialisation, data order and dropout")
    g.add_argument("--max-steps", type=int, help="stop (and save) once the run has made this many optimizer steps")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/train", help="directory for the checkpoint, metrics and plots")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    g.add_argument(
        "--progress",
        default="auto",
        choices=["auto", "bar", "lines", "none"],
        help="auto: a tqdm bar on a terminal, plain lines otherwise",
    )
    return p


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on other arguments, and check every value and combination.

    Raises:
        memfit.MemfitInputError: Naming the option at fault.
    """
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
    for name in ("epochs", "batch_size", "image_size", "synthetic_size", "max_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise memfit.MemfitInputError(f"{_flag(name)} {value}: give a number of at least 1")
    if args.accumulate < 1 or args.batch_size % args.accumulate:
        raise memfit.MemfitInputError(
            f"--accumulate {args.accumulate}: give a positive number of micro-batches that divides --batch-size "
            f"{args.batch_size}"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        raise memfit.MemfitInputError(f"--device {args.device}: give auto, cpu, cuda or cuda:N")
    if args.compress == "auto" and args.budget_mb is None:
        raise memfit.MemfitInputError("--compress auto compresses only what a budget needs: give --budget-mb too")
    if args.num_classes is not None and args.data != "synthetic":
        raise memfit.MemfitInputError(f"--num-classes applies to synthetic data; {args.data} has its own classes")
    if args.width is not None and not zoo:
        raise memfit.MemfitInputError("--width applies to zoo ResNets, not to package.module:factory models")
    return args
