"""The data sets, whole in memory, and each process's batches of an epoch."""

from __future__ import annotations

import argparse
import os

import torch

import memfit

__all__ = ["epoch_batches", "load_data", "synthetic"]

# The synthetic data set is the same whatever --seed: only the training varies with it.
SYNTHETIC_SEED = 1234


def synthetic(n_train: int, num_classes: int, size: int) -> memfit.datasets.Split:
    """Random images around one random template per class (learnable), from a fixed seed."""
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    templates = torch.randn(num_classes, 3, size, size, generator=g)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        return 0.5 * templates[y] + torch.randn(n, 3, size, size, generator=g), y

    x_train, y_train = make(n_train)
    x_test, y_test = make(max(1, n_train // 4))
    return memfit.datasets.Split(x_train, y_train, x_test, y_test, num_classes)


def load_data(args: argparse.Namespace) -> memfit.datasets.Split:
    """The data set ``--data`` names (the split is the same whatever ``--seed``)."""
    if args.data == "synthetic":
        return synthetic(args.synthetic_size, args.num_classes or 10, args.image_size)
    if args.data == "digits":
        return memfit.datasets.digits(size=args.image_size, seed=0)
    return memfit.datasets.cifar(args.data, os.path.expanduser(args.data_root))


def epoch_batches(n: int, batch: int, epoch: int, seed: int, rank: int, world: int) -> list[torch.Tensor]:
    """This process's batches of an epoch: DistributedSampler's shard, seeded by seed and epoch;
    the last incomplete batch is dropped (every step has the planned shape)."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler))
    return list(order[: len(order) // batch * batch].split(batch))
