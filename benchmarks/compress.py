"""Compressor benchmark: accuracy over seeds, storage, file size and training memory on real data.

Per seed, a zoo CNN is trained uncompressed (Adam 1e-3, cross-entropy, cosine) on a real dataset
(scikit-learn's bundled digits, no download; CIFAR-10 when --cifar10 DIR holds the python archive).
From those weights every method is compressed (``memfit.compress`` projects them) and fine-tuned
twice: with the documented recipe (``memfit.compressors.Recipe``: distillation from the dense
model, MLG's orthonormality term, EC2T's freeze phase, BatchNorm recalibration) and with a plain
loop as a user writes it (the same Adam, cross-entropy and cosine schedule as the dense training).
The reference is the uncompressed model trained as many more epochs with that same schedule.
Accuracy is reported per method and loop as mean, standard deviation and worst seed; every figure
is labelled: meas (measured), comp (computed exactly from the stored form) or pred (predicted by
memfit's cost model, nothing allocated).

    .venv/bin/python benchmarks/compress.py                       # digits, 5 seeds (docs/compressors.md)
    .venv/bin/python benchmarks/compress.py --seeds 1 --epochs 2 --finetune 1 --methods ternary generated
    .venv/bin/python benchmarks/compress.py --cifar10 ~/data --size 32 --width 64
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import memfit

VARIANTS: dict[str, tuple[str, memfit.compressors.CompressConfig]] = {
    "ternary": ("ternary", memfit.compressors.TernaryConfig()),
    "ternary-ttq": ("ternary", memfit.compressors.TernaryConfig(rule="ttq")),
    "generated": ("generated", memfit.compressors.GeneratedConfig()),
    "shared": ("shared", memfit.compressors.SharedConfig()),
}
LOOPS = ("recipe", "plain")
# The bar: every method's worst seed within this many points of the reference's mean.
TARGET_POINTS = 2.0


@dataclass
class Storage:
    weight_ratio: float
    covered_ratio: float
    file_bytes: int
    sparsity: float
    train_peak_mb: float
    train_params_mb: float


def evaluate(model: nn.Module, data: memfit.datasets.Split) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(-1) for x in data.x_test.split(256)])
    return 100.0 * (pred == data.y_test).float().mean().item()


def plain_train(
    model: nn.Module, data: memfit.datasets.Split, epochs: int, *, seed: int, lr: float = 1e-3, batch: int = 64
) -> None:
    """The loop a user writes: Adam, cross-entropy, cosine annealing per step, shuffled batches."""
    order = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(data.y_train) / batch))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(data.y_train), generator=order).split(batch):
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()


def storage(model: nn.Module, batch: torch.Tensor) -> Storage:
    table = memfit.compressors.storage_table(model)
    with tempfile.TemporaryDirectory() as tmp:
        file_bytes = memfit.save(model, os.path.join(tmp, "model.memfit"))
    predicted = memfit.estimate(model, batch, optimizer="adam")
    return Storage(
        table.parameter_ratio,
        table.covered_ratio,
        file_bytes,
        table.sparsity,
        predicted.peak_mb,
        predicted.parameters_mb,
    )


def run_seed(
    args: argparse.Namespace,
    data: memfit.datasets.Split,
    seed: int,
    accuracy: dict[str, list[float]],
    stored: dict[str, Storage],
) -> None:
    """One seed: dense training, the reference, and every method under both loops; accuracies are
    appended to ``accuracy`` under ``"reference"`` and ``"method/loop"``."""
    torch.manual_seed(seed)
    base = memfit.models.create("resnet18", stem="cifar", num_classes=data.num_classes, width=args.width)
    plain_train(base, data, args.epochs, seed=seed)
    reference = copy.deepcopy(base)
    plain_train(reference, data, args.finetune, seed=seed + 1)
    accuracy.setdefault("reference", []).append(evaluate(reference, data))
    batch = data.x_train[: args.batch]
    for name in args.methods:
        method, config = VARIANTS[name]
        for loop in LOOPS:
            torch.manual_seed(seed)
            model = memfit.compress(base, method, config, example_inputs=batch)
            if loop == "recipe":
                memfit.compressors.Recipe(teacher=base).finetune(
                    model, data.x_train, data.y_train, args.finetune, seed=seed + 1
                )
            else:
                plain_train(model, data, args.finetune, seed=seed + 1)
            accuracy.setdefault(f"{name}/{loop}", []).append(evaluate(model, data))
            if loop == "recipe" and name not in stored:
                stored[name] = storage(model, batch)


def _torch_save_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def accuracy_table(accuracy: dict[str, list[float]], methods: list[str]) -> list[str]:
    """Markdown rows: mean, standard deviation (n-1), worst seed, and the worst seed's gap below the
    reference's mean against the target."""
    ref_mean = statistics.fmean(accuracy["reference"])
    lines = [
        "| method | loop | mean % (meas) | std (meas) | worst % (meas) | worst seed | worst vs reference mean |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = ["reference"] + [f"{m}/{loop}" for m in methods for loop in LOOPS]
    for key in keys:
        values = accuracy[key]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        worst = min(values)
        method, _, loop = key.partition("/")
        gap = worst - ref_mean
        verdict = "" if key == "reference" else (" ok" if gap >= -TARGET_POINTS else f" MISSES {TARGET_POINTS:g}")
        lines.append(
            f"| {method} | {loop or 'plain'} | {statistics.fmean(values):.2f} | {std:.2f} | {worst:.2f} | "
            f"{values.index(worst)} | {gap:+.2f}{verdict} |"
        )
    return lines


def storage_lines(stored: dict[str, Storage], torch_save_bytes: int) -> list[str]:
    lines = [
        (
            "| method | weights x (comp) | layers x (comp) | file KiB (meas) | torch.save KiB (meas) | "
            "zeros (comp) | train peak MiB (pred) | params MiB (pred) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in stored.items():
        lines.append(
            f"| {name} | {s.weight_ratio:.1f}x | {s.covered_ratio:.1f}x | {s.file_bytes / 1024:.1f} | "
            f"{torch_save_bytes / 1024:.1f} | {s.sparsity:.1%} | {s.train_peak_mb:.1f} | "
            f"{s.train_params_mb:.2f} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    p.add_argument("--epochs", type=int, default=6, help="uncompressed training before compression")
    p.add_argument(
        "--finetune", type=int, default=8, help="epochs after compression (the reference trains as many more)"
    )
    p.add_argument("--width", type=int, default=16, help="resnet18 width (64 is the published network)")
    p.add_argument("--size", type=int, default=16, help="digits image size (upsampled from 8x8)")
    p.add_argument("--batch", type=int, default=64, help="batch of the training-memory prediction")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the figures do not depend on cores)")
    p.add_argument("--cifar10", metavar="DIR", help="use CIFAR-10 from DIR/cifar-10-python.tar.gz instead of digits")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = memfit.datasets.cifar("cifar10", args.cifar10) if args.cifar10 else memfit.datasets.digits(args.size)
    dataset = "CIFAR-10" if args.cifar10 else f"digits {args.size}x{args.size}"
    print(
        f"resnet18 (cifar stem, width {args.width}) on {dataset}, seeds 0-{args.seeds - 1}: {args.epochs} epochs "
        f"dense, then {args.finetune} epochs compressed (reference: {args.finetune} more dense); Adam 1e-3, "
        f"cosine, batch 64",
        flush=True,
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    accuracy: dict[str, list[float]] = {}
    stored: dict[str, Storage] = {}
    for seed in range(args.seeds):
        run_seed(args, data, seed, accuracy, stored)
        print(f"  seed {seed} done at {time.perf_counter() - started:.0f} s", flush=True)
    dense = memfit.models.create("resnet18", stem="cifar", num_classes=data.num_classes, width=args.width)
    predicted = memfit.estimate(dense, data.x_train[: args.batch], optimizer="adam")
    print(
        f"\nAccuracy on the {len(data.y_test)} test images; recipe: memfit.compressors.Recipe(teacher=dense), "
        f"plain: the dense model's own loop after memfit.compress.\n"
    )
    print("\n".join(accuracy_table(accuracy, args.methods)))
    print(
        f"\nStorage and training memory (seed 0, recipe); uncompressed training step {predicted.peak_mb:.1f} MiB, "
        f"parameters {predicted.parameters_mb:.2f} MiB at batch {args.batch} with Adam (pred).\n"
    )
    print("\n".join(storage_lines(stored, _torch_save_bytes(dense))))
    print(
        "\nweights x: fp32 weights over stored weights, whole model (uncompressed layers at fp32); layers x: over "
        "the compressed layers only."
    )
    print(
        f"\ntook {(time.perf_counter() - started) / 60:.1f} min wall, {(time.process_time() - cpu_started) / 60:.1f} "
        f"min CPU (meas, {args.threads} thread; wall grows when other processes share the cores)"
    )


if __name__ == "__main__":
    main()
