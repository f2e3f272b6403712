"""Predict, then measure, the memory of one training step of a zoo model.

.venv/bin/python examples/report.py
"""

from __future__ import annotations

import torch

import memfit


def main() -> None:
    model = memfit.models.create("resnet18", stem="cifar", num_classes=10)
    x = torch.randn(32, 3, 32, 32)
    predicted = memfit.estimate(model, x, optimizer="adam")
    print(predicted)
    measured = memfit.measure(model, x, optimizer="adam")
    print()
    print(measured)
    print(f"\nPredicted peak {predicted.peak_mb:.1f} MiB, measured {measured.peak_mb:.1f} MiB")


if __name__ == "__main__":
    main()
