"""One training step as memfit models it, evaluation, and BatchNorm re-estimation."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import Context, all_sum

__all__ = ["apply_update", "autocast", "evaluate", "recalibrate_bn", "train_step"]


def train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    xb: torch.Tensor,
    yb: torch.Tensor,
    amp: str | None,
    device: torch.device,
    micro: int = 1,
) -> tuple[float, int]:
    """Forward and backward of one step, as memfit's step model has it (gradients None at the
    start), in ``micro`` micro-batches whose gradients add up to the whole batch's (each loss
    weighted by its share: the mean over the batch); returns the loss and the number of correct
    predictions. :func:`apply_update` follows."""
    optimizer.zero_grad(set_to_none=True)
    total, correct = 0.0, 0
    for xm, ym in zip(xb.chunk(micro), yb.chunk(micro), strict=True):
        with autocast(device, amp):
            out = net(xm)
            loss = F.cross_entropy(out.float(), ym) * (len(ym) / len(yb))
        scaler.scale(loss).backward()
        total += float(loss.detach())
        correct += int((out.detach().argmax(dim=1) == ym).sum())
    return total, correct


def apply_update(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> None:
    """The optimizer step (through the gradient scaler under fp16) and the learning-rate schedule."""
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """``--amp``'s autocast on ``device``, or nothing."""
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
        with autocast(ctx.device, amp):
            out = net(xb).float()
        loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += float((out.argmax(dim=1) == yb).sum())
    net.train(was_training)
    loss_sum, correct = all_sum(ctx, [loss_sum, correct])
    return loss_sum / len(y), correct / len(y)


@torch.no_grad()
def recalibrate_bn(
    net: nn.Module, x: torch.Tensor, batches: int, batch_size: int, ctx: Context, amp: str | None
) -> int:
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
        with autocast(ctx.device, amp):
            net(chunk.to(ctx.device))
        used += 1
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    net.train(was_training)
    return used
