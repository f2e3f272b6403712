"""Activation memory at the feasible minimum against the unplanned step, as models get deeper.

For CIFAR DenseNet-BC of growing depth (k=12, as densenet_bc_100) and for deep zoo models: the
activations kept for backward, unplanned and at the feasible minimum (memfit.minimum), predicted
(the plan) and measured (memfit.measure), and how they grow with the layers per block.

    .venv/bin/python benchmarks/depth.py                                       # several minutes
    .venv/bin/python benchmarks/depth.py --depths 40 76 100 --big-models resnet152
    .venv/bin/python benchmarks/depth.py --depths --big-models resnet152 densenet264 --batch 4 --input 3x224x224
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import MiB, Table, build_case, first_line, fmt, footer, images, section
from torch import nn

import memfit

DEFAULT_DEPTHS = [40, 76, 100, 124]
BIG_MODELS = ["resnet152", "densenet264"]
# optimize() takes MiB and rounds down to bytes; a byte of slack keeps "the minimum" feasible.
EPS_MB = 1.0 / MiB


def densenet_bc(depth: int) -> nn.Module:
    """CIFAR DenseNet-BC of a given depth, k=12, built as densenet_bc_100 is.

    Depth counts the convolutions and the classifier: 3 blocks of (depth - 4) / 6 bottleneck
    layers (two convolutions each), the stem convolution, two transitions and the classifier.
    """
    n = (depth - 4) // 6
    return memfit.models.DenseNet(
        (n, n, n), growth_rate=12, num_init_features=24, bn_size=4, compression=0.5, num_classes=10, stem=None
    )


def growth(depths: list[int], values: list[float]) -> str:
    """How activation memory grows with n, the layers per block, from the smallest to the largest depth.

    A DenseNet layer's input concatenates every earlier output of its block, so keeping every
    concatenation costs ~n^2 per block while keeping only the new features costs ~n: with k times
    the layers, linear growth multiplies the memory by at most k (a fixed part such as the stem
    makes it less), quadratic growth by up to k^2. The verdict compares the growth with k. (A
    least-squares fit of a + b n + c n^2 over four depths came out with b < 0 and called a
    sublinear curve quadratic.)
    """
    n = [(d - 4) / 6 for d in depths]
    if len(depths) < 2 or min(values) <= 0:
        return "need two depths or more"
    k, grown = n[-1] / n[0], values[-1] / values[0]
    verdict = "at most linear" if grown <= k else "faster than linear"
    return (
        f"{verdict}: x{grown:.2f} from n={n[0]:g} to n={n[-1]:g}, with x{k:.2f} the layers (linear: at most "
        f"x{k:.2f}, quadratic: up to x{k * k:.1f}); effective exponent {math.log(grown) / math.log(k):.2f}"
    )


class Study:
    """The depth table: one row per model, the activations of each kept for the growth lines."""

    def __init__(self, strategy: str) -> None:
        """Print the header."""
        self.strategy = strategy
        self.table = Table(
            [
                ("model", "", 17),
                ("params M", "given", 10),
                ("act MiB", "pred", 10),
                ("act min", "pred", 10),
                ("x less", "pred", 8),
                ("act MiB", "meas", 10),
                ("act min", "meas", 10),
                ("x less", "meas", 8),
                ("peak MiB", "pred", 10),
                ("peak min", "pred", 10),
                ("peak min", "meas", 10),
                ("+FLOPs %", "pred", 10),
            ]
        )

    def row(self, label: str, model: nn.Module, x: torch.Tensor) -> tuple[float, float, float, float] | None:
        """Print one model's row; its activations (pred before, after; meas before, after) or None."""
        params = sum(p.numel() for p in model.parameters()) / 1e6
        try:
            minimum = memfit.minimum(model, x, strategy=self.strategy)
            planned = memfit.optimize(model, minimum + EPS_MB, x, strategy=self.strategy)
        except memfit.MemfitError as e:
            self.table.row(label, f"{params:.2f}", note=f"n/a: {first_line(e)}")
            return None
        plan = planned.plan
        pb, pa = plan.activations_before_bytes / MiB, plan.activations_after_bytes / MiB
        before, after = memfit.measure(model, x), memfit.measure(planned, x)
        mb, ma = before.activations_mb, after.activations_mb
        self.table.row(
            label,
            f"{params:.2f}",
            fmt(pb),
            fmt(pa),
            f"{pb / max(pa, 1e-9):.1f}",
            fmt(mb),
            fmt(ma),
            f"{mb / max(ma, 1e-9):.1f}",
            fmt(plan.peak_before_bytes / MiB),
            fmt(plan.peak_after_bytes / MiB),
            fmt(after.peak_mb),
            fmt(plan.extra_flops_percent, 1),
        )
        return pb, pa, mb, ma


def main(argv: list[str] | None = None) -> None:
    """Print the depth table and the growth lines."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--depths", nargs="*", type=int, default=DEFAULT_DEPTHS, help=f"DenseNet-BC depths (default {DEFAULT_DEPTHS})"
    )
    p.add_argument("--big-models", nargs="*", default=BIG_MODELS, help=f"default {' '.join(BIG_MODELS)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--input", default="3x32x32")
    p.add_argument("--strategy", default="auto", choices=["auto", *memfit.list_strategies()])
    args = p.parse_args(argv)
    bad = [d for d in args.depths if d < 10 or (d - 4) % 6]
    if bad:
        p.error(f"DenseNet-BC depths are 6n + 4 with n >= 1 (40, 52, 64, 76, 100, ...), not {bad}")
    started = time.perf_counter()
    section(f"Activation memory at the feasible minimum (strategy {args.strategy}), batch {args.batch} at {args.input}")
    print("act: activations kept from the forward for backward, unplanned and at the feasible minimum (min);")
    print("pred: plan.activations_before/after_bytes; meas: memfit.measure(...).activations_mb of a real step.")
    print("x less: unplanned / minimum. peak: of the whole step (pred: plan; meas: memfit.measure).\n")
    study = Study(args.strategy)
    done, kept = [], []
    for depth in args.depths:
        torch.manual_seed(0)
        model = densenet_bc(depth)
        got = study.row(f"densenet_bc_{depth}", model, images(args.batch, args.input))
        if got is not None:
            done.append(depth)
            kept.append(got)
    if done:
        print("\nGrowth with depth (n = layers per block):")
        for i, label in enumerate(
            ["unplanned, pred", "feasible minimum, pred", "unplanned, meas", "feasible minimum, meas"]
        ):
            print(f"  {label + ':':<26}{growth(done, [k[i] for k in kept])}")
    if args.big_models:
        print()
    for name in args.big_models:
        case = build_case(name, args.batch, args.input, stem="imagenet")
        got = study.row(name, case.model, case.x)
        if got is not None:
            pb, pa, mb, ma = got
            print(
                f"  {name}: {pb / max(pa, 1e-9):.1f}x less activation memory at the feasible minimum (pred), "
                f"{mb / max(ma, 1e-9):.1f}x (meas)",
                flush=True,
            )
    footer(started)


if __name__ == "__main__":
    main()
