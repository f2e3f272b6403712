"""The fine-tuning recipe after ``memfit.compress``: what the methods' papers add to a plain loop.

A plain loop (Adam at 1e-3, cross-entropy, a cosine schedule) after ``memfit.compress`` already
keeps the dense model's accuracy on digits (docs/compressors.md). :class:`Recipe` adds, in one
object, the extras the methods' papers train with:

- distillation from the dense model the compressed one was projected from
  (:func:`~memfit.compressors.generated.distillation_loss`);
- MLG's orthonormality term (:func:`~memfit.compressors.generated.orthonormality_loss`), only
  where the model has MLG layers;
- EC2T's phase 2 (:func:`~memfit.compressors.ternary.freeze_assignment_`) for the last epochs, only
  where the model has ternary layers;
- BatchNorm recalibration at the end: running statistics re-estimated as a plain average over
  training batches, since generated weights moved far from those the exponential averages saw.

The projection from the dense weights is ``memfit.compress`` itself. Use :meth:`Recipe.finetune`
for the whole loop, or :meth:`Recipe.loss`, :meth:`Recipe.start_epoch` and
:meth:`Recipe.recalibrate_bn` inside a loop of your own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .generated import distillation_loss, orthonormality_loss
from .ternary import freeze_assignment_, ternary_generators

__all__ = ["Recipe"]


@dataclass
class Recipe:
    """Fine-tuning of a compressed model: distillation, orthonormality, EC2T's freeze, BatchNorm
    recalibration (see the module docstring). Every knob's default is the documented recipe's.

    Attributes:
        teacher: The dense model the compressed one came from, or ``None`` for plain
            cross-entropy. It is run in eval mode, without gradients, and never modified.
        lr: Adam's peak learning rate in :meth:`finetune` (cosine-annealed to 0).
        temperature: Distillation temperature.
        alpha: Weight of the distillation term (the rest is cross-entropy).
        orthonormality: Weight of MLG's orthonormality term.
        freeze_epochs: Final epochs of EC2T's phase 2 (ternary codes fixed, scales train).
        recalibrate_batches: Training batches the final BatchNorm recalibration averages over
            (0: none).

    Example:
        >>> import torch, memfit
        >>> from memfit.compressors import Recipe
        >>> dense = memfit.models.create("resnet18", stem="cifar", num_classes=10, width=8)
        >>> small = memfit.compress(dense, "generated")      # projected from dense's weights
        >>> x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
        >>> small = Recipe(teacher=dense).finetune(small, x, y, epochs=1, batch_size=16)
        >>> small(x[:2]).shape
        torch.Size([2, 10])
    """

    teacher: nn.Module | None = None
    lr: float = 1e-3
    temperature: float = 4.0
    alpha: float = 0.9
    orthonormality: float = 1e-4
    freeze_epochs: int = 1
    recalibrate_batches: int = 16

    def __post_init__(self) -> None:
        for name in ("lr", "temperature"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not (math.isfinite(self.orthonormality) and self.orthonormality >= 0):
            raise ValueError(f"orthonormality must be a finite number >= 0, got {self.orthonormality!r}")
        for name in ("freeze_epochs", "recalibrate_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    def loss(self, model: nn.Module, inputs: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch: distillation from the teacher (cross-entropy without
        one) plus ``orthonormality`` times MLG's term when ``model`` has MLG layers.

        Args:
            model: The compressed model being trained.
            inputs: The batch ``model`` produced ``logits`` from (the teacher sees it too).
            logits: ``model(inputs)``.
            labels: Class indices.
        """
        if self.teacher is None:
            loss = F.cross_entropy(logits, labels)
        else:
            was_training = self.teacher.training
            self.teacher.eval()
            with torch.no_grad():
                soft = self.teacher(inputs)
            self.teacher.train(was_training)
            loss = distillation_loss(logits, soft, labels, temperature=self.temperature, alpha=self.alpha)
        if self.orthonormality:  # zero without MLG layers
            loss = loss + self.orthonormality * orthonormality_loss(model)
        return loss

    def start_epoch(self, model: nn.Module, epoch: int, epochs: int) -> bool:
        """Call before each epoch (0-based): enters EC2T's phase 2 at the first of the last
        ``freeze_epochs`` epochs when ``model`` has ternary layers. Returns whether it froze."""
        if self.freeze_epochs and epoch == max(0, epochs - self.freeze_epochs) and ternary_generators(model):
            freeze_assignment_(model)
            return True
        return False

    @torch.no_grad()
    def recalibrate_bn(self, model: nn.Module, inputs: torch.Tensor, batch_size: int) -> int:
        """Re-estimate every BatchNorm's running statistics as the plain average over the first
        ``recalibrate_batches`` batches of ``inputs``; model mode and momenta are restored.

        Returns:
            The number of batches used.
        """
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms or not self.recalibrate_batches:
            return 0
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average
        was_training = model.training
        model.train()
        chunks = [c for c in inputs[: self.recalibrate_batches * batch_size].split(batch_size) if len(c) > 1]
        for chunk in chunks:
            model(chunk)
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
        return len(chunks)

    def finetune(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        epochs: int,
        *,
        batch_size: int = 64,
        seed: int = 0,
    ) -> nn.Module:
        """The whole recipe: Adam at ``lr``, cosine-annealed per step to 0 over ``epochs`` epochs of
        shuffled batches (seeded by ``seed``), :meth:`loss`, :meth:`start_epoch`, and
        :meth:`recalibrate_bn` at the end. Trains ``model`` in place and returns it, in eval mode.
        ``inputs`` and ``labels`` are the whole training set, on the model's device.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
        order = torch.Generator().manual_seed(seed)
        steps = epochs * math.ceil(len(labels) / batch_size)
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        model.train()
        for epoch in range(epochs):
            self.start_epoch(model, epoch, epochs)
            for idx in torch.randperm(len(labels), generator=order).split(batch_size):
                x = inputs[idx]
                loss = self.loss(model, x, model(x), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
        self.recalibrate_bn(model, inputs, batch_size)
        return model.eval()
