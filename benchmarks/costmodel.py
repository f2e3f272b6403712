"""Cost model vs allocator: predicted and measured peak of one training step for zoo models.

Prints one row per (model, optimizer, precision): predicted and measured peak (MiB), their
difference, predicted and measured activations, and the wall time of each.

    .venv/bin/python benchmarks/costmodel.py                       # default set, batch 32
    .venv/bin/python benchmarks/costmodel.py --models resnet50 gpt --batch 16 --amp bf16
"""

from __future__ import annotations

import argparse
import time

import torch
from common import images

import memfit

DEFAULT_MODELS = ["resnet18", "resnet50", "densenet121", "mobilenet_v2", "vgg16_bn", "gpt"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input", default=None, help="per-sample shape; default 3x64x64 (GPT: 256 tokens)")
    p.add_argument("--optimizers", nargs="+", default=["sgd", "adam"])
    p.add_argument("--amp", nargs="+", default=["fp32"], help="fp32 and/or bf16")
    args = p.parse_args()
    header = (
        f"{'model':<14}{'optim':<7}{'prec':<6}{'pred MiB':>10}{'meas MiB':>10}{'err %':>8}"
        f"{'pred act':>10}{'meas act':>10}{'t pred s':>9}{'t meas s':>9}"
    )
    print(header)
    print("-" * len(header))
    for name in args.models:
        torch.manual_seed(0)
        model = memfit.models.create(name)
        is_lm = any(isinstance(m, torch.nn.Embedding) for m in model.modules())
        shape = args.input or ("256" if is_lm else "3x64x64")
        x = torch.randint(0, model.config.vocab_size, (args.batch, int(shape))) if is_lm else images(args.batch, shape)
        for optimizer in args.optimizers:
            for prec in args.amp:
                amp = None if prec == "fp32" else prec
                t0 = time.perf_counter()
                pred = memfit.estimate(model, x, optimizer=optimizer, amp=amp)
                t1 = time.perf_counter()
                meas = memfit.measure(model, x, optimizer=optimizer, amp=amp)
                t2 = time.perf_counter()
                err = 100 * (pred.peak_bytes / meas.peak_bytes - 1)
                print(
                    f"{name:<14}{optimizer:<7}{prec:<6}{pred.peak_mb:>10.1f}{meas.peak_mb:>10.1f}{err:>+8.2f}"
                    f"{pred.activations_mb:>10.1f}{meas.activations_mb:>10.1f}{t1 - t0:>9.1f}{t2 - t1:>9.1f}",
                    flush=True,
                )
    print("\npred = predicted by memfit.estimate (nothing allocated); meas = measured by memfit.measure")
    print("(allocator peak from the profiler's memory events on CPU). Peaks are of one steady-state step.")


if __name__ == "__main__":
    main()
