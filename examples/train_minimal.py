"""The smallest memfit training script: plan a model for a memory budget, train the planned
model like any other, and put the measured peak of its training step beside the predicted one.

    .venv/bin/python examples/train_minimal.py                  # ResNet-18 (width 16) on digits, 85%
    .venv/bin/python examples/train_minimal.py --budget 26 --epochs 1

examples/train.py is the full trainer: checkpoints, resuming, compression, DDP, plots.
"""

import argparse

import torch
import torch.nn.functional as F

import memfit


def main() -> None:
    """Plan, train, evaluate, measure."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="85%", help="MiB, a size such as 1.5GiB, or a percentage of the unplanned peak")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()

    torch.manual_seed(0)
    data = memfit.datasets.digits(size=16)  # scikit-learn's bundled digits: nothing to download
    model = memfit.models.create("resnet18", stem="cifar", width=16, num_classes=data.num_classes)
    batch = data.x_train[: args.batch_size]

    def make_optimizer(params) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=1e-3)

    # memfit plans with the optimizer that trains: its state is part of the step's memory
    planned = memfit.optimize(model, args.budget, batch, optimizer=make_optimizer)
    print(planned.plan)

    optimizer = make_optimizer(planned.parameters())  # the model's own parameters
    n = len(data.y_train) // args.batch_size * args.batch_size  # every step has the planned shape
    for epoch in range(args.epochs):
        for index in torch.randperm(len(data.y_train))[:n].split(args.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(planned(data.x_train[index]), data.y_train[index])
            loss.backward()
            optimizer.step()
        with torch.no_grad():  # eval mode runs the plain graph: nothing is recomputed
            accuracy = (planned.eval()(data.x_test).argmax(1) == data.y_test).float().mean()
        planned.train()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {100 * accuracy:.2f}%")

    measured = memfit.measure(planned, batch, optimizer=make_optimizer)
    print(
        f"Peak of a training step: {planned.plan.peak_after_bytes / 2**20:.2f} MiB predicted, "
        f"{measured.peak_mb:.2f} MiB measured (budget {args.budget})"
    )


if __name__ == "__main__":
    main()
