"""Compressor benchmark: storage, file size, training memory and accuracy on real data.

For each method, a zoo CNN is trained uncompressed on a real dataset (scikit-learn's bundled digits,
no download; CIFAR-10 when --cifar10 DIR holds the python archive), compressed from those weights
(projection), fine-tuned, and compared with the uncompressed model trained for the same total
number of epochs (same seed). Every figure is labelled: meas (measured), comp (computed exactly
from the stored form) or pred (predicted by memfit's cost model, nothing allocated).

    .venv/bin/python benchmarks/compress.py                       # digits, about 10 CPU minutes
    .venv/bin/python benchmarks/compress.py --epochs 2 --finetune 1 --methods ternary generated
    .venv/bin/python benchmarks/compress.py --cifar10 ~/data --size 32 --width 64
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit.compressors import storage_table
from memfit.compressors.generated import GeneratedConfig, distillation_loss, orthonormality_loss
from memfit.compressors.shared import SharedConfig
from memfit.compressors.ternary import TernaryConfig, freeze_assignment_
from memfit.io.datasets import Split, cifar, digits

# name: (method, config, fine-tuning learning rate). MLG's 3-bit factors barely move at 1e-3.
VARIANTS: dict[str, tuple[str, memfit.compressors.CompressConfig, float]] = {
    "ternary": ("ternary", TernaryConfig(), 1e-3),
    "ternary-ttq": ("ternary", TernaryConfig(rule="ttq"), 1e-3),
    "generated": ("generated", GeneratedConfig(), 3e-3),
    "shared": ("shared", SharedConfig(), 1e-3),
}


@dataclass
class Row:
    name: str
    accuracy: float
    reference_accuracy: float
    weight_ratio: float
    covered_ratio: float
    file_bytes: int
    torch_save_bytes: int
    sparsity: float
    train_peak_mb: float
    train_params_mb: float
    seconds: float


def evaluate(model: nn.Module, data: Split) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(-1) for x in data.x_test.split(256)])
    model.train()
    return 100.0 * (pred == data.y_test).float().mean().item()


def train(
    model: nn.Module,
    data: Split,
    epochs: int,
    *,
    seed: int,
    lr: float = 1e-3,
    batch: int = 64,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    before_last_epoch: Callable[[nn.Module], None] | None = None,
) -> None:
    """Adam, fixed seed, shuffled batches; ``loss_fn(logits, labels, inputs)`` defaults to CE."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        if before_last_epoch is not None and epoch == epochs - 1:
            before_last_epoch(model)
        order = torch.randperm(len(data.y_train), generator=gen)
        for idx in order.split(batch):
            x, y = data.x_train[idx], data.y_train[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y) if loss_fn is None else loss_fn(logits, y, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _torch_save_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def run(args: argparse.Namespace) -> tuple[float, float, list[Row]]:
    data = cifar("cifar10", args.cifar10) if args.cifar10 else digits(args.size)
    torch.manual_seed(args.seed)
    base = memfit.models.create("resnet18", stem="cifar", num_classes=data.num_classes, width=args.width)
    train(base, data, args.epochs, seed=args.seed)
    base_accuracy = evaluate(base, data)
    reference = copy.deepcopy(base)
    train(reference, data, args.finetune, seed=args.seed + 1)
    reference_accuracy = evaluate(reference, data)
    batch = data.x_train[: args.batch]
    rows = []
    for name in args.methods:
        method, config, lr = VARIANTS[name]
        t0 = time.perf_counter()
        model = memfit.compress(base, method, config, example_inputs=batch)
        loss_fn, last = None, None
        if method == "generated":  # the seed's recipe: distillation from the dense model, orthonormal factors
            teacher = copy.deepcopy(reference).eval()

            def loss_fn(logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
                with torch.no_grad():
                    soft = teacher(x)
                return distillation_loss(logits, soft, y) + args.ortho * orthonormality_loss(model)

        if method == "ternary":  # EC2T's two phases: learn the assignment, then only the scales
            last = freeze_assignment_
        train(model, data, args.finetune, seed=args.seed + 1, lr=lr, loss_fn=loss_fn, before_last_epoch=last)
        accuracy = evaluate(model, data)
        table = storage_table(model)
        with tempfile.TemporaryDirectory() as tmp:
            file_bytes = memfit.save(model, os.path.join(tmp, "model.memfit"))
        predicted = memfit.estimate(model, batch, optimizer="adam")
        rows.append(
            Row(
                name=name,
                accuracy=accuracy,
                reference_accuracy=reference_accuracy,
                weight_ratio=table.parameter_ratio,
                covered_ratio=table.covered_ratio,
                file_bytes=file_bytes,
                torch_save_bytes=_torch_save_bytes(base),
                sparsity=table.sparsity,
                train_peak_mb=predicted.peak_mb,
                train_params_mb=predicted.parameters_mb,
                seconds=time.perf_counter() - t0,
            )
        )
        print(f"  {name}: done in {rows[-1].seconds:.0f} s", flush=True)
    return base_accuracy, reference_accuracy, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=6, help="uncompressed training before compression")
    p.add_argument("--finetune", type=int, default=8, help="epochs after compression (the reference trains as many more)")
    p.add_argument("--width", type=int, default=16, help="resnet18 width (64 is the published network)")
    p.add_argument("--size", type=int, default=16, help="digits image size (upsampled from 8x8)")
    p.add_argument("--batch", type=int, default=64, help="batch of the training-memory prediction")
    p.add_argument("--ortho", type=float, default=1e-4, help="weight of MLG's orthonormality loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cifar10", metavar="DIR", help="use CIFAR-10 from DIR/cifar-10-python.tar.gz instead of digits")
    args = p.parse_args()
    dataset = "CIFAR-10" if args.cifar10 else f"digits {args.size}x{args.size}"
    print(f"resnet18 (cifar stem, width {args.width}) on {dataset}: {args.epochs} epochs, then {args.finetune} "
          f"epochs compressed (reference: {args.finetune} more uncompressed), Adam 1e-3, seed {args.seed}")
    base_accuracy, reference_accuracy, rows = run(args)
    base = memfit.models.create("resnet18", stem="cifar", num_classes=10, width=args.width)
    dense = memfit.estimate(base, torch.randn(args.batch, 3, args.size, args.size), optimizer="adam")
    print(f"\nUncompressed: {base_accuracy:.2f}% after {args.epochs} epochs, {reference_accuracy:.2f}% after "
          f"{args.epochs + args.finetune} (meas); training step peak {dense.peak_mb:.1f} MiB, parameters "
          f"{dense.parameters_mb:.2f} MiB at batch {args.batch} with Adam (pred)\n")
    head = (f"{'method':<12} {'acc %':>6} {'drop':>6} {'weights x':>9} {'layers x':>8} {'file KiB':>9} "
            f"{'torch.save KiB':>14} {'file x':>7} {'zeros':>6} {'train peak MiB':>14} {'params MiB':>10}")
    units = (f"{'':<12} {'meas':>6} {'meas':>6} {'comp':>9} {'comp':>8} {'meas':>9} {'meas':>14} {'meas':>7} "
             f"{'comp':>6} {'pred':>14} {'pred':>10}")
    print(head)
    print(units)
    print("-" * len(head))
    for r in rows:
        print(f"{r.name:<12} {r.accuracy:>6.2f} {r.reference_accuracy - r.accuracy:>+6.2f} {r.weight_ratio:>8.1f}x "
              f"{r.covered_ratio:>7.1f}x {r.file_bytes / 1024:>9.1f} {r.torch_save_bytes / 1024:>14.1f} "
              f"{r.torch_save_bytes / r.file_bytes:>6.1f}x {r.sparsity:>6.1%} {r.train_peak_mb:>14.1f} {r.train_params_mb:>10.2f}")
    print("\ndrop: reference accuracy minus the compressed model's (points). weights x: fp32 weights over stored "
          "weights, whole model (uncompressed layers at fp32). layers x: over the compressed layers only.")
    by_name = {r.name: r for r in rows}
    if "ternary" in by_name and "ternary-ttq" in by_name:
        e, t = by_name["ternary"], by_name["ternary-ttq"]
        print(f"EC2T vs TTQ: {e.sparsity:.1%} vs {t.sparsity:.1%} zeros at {e.accuracy:.2f}% vs {t.accuracy:.2f}% accuracy")


if __name__ == "__main__":
    main()
