"""What one training step is: optimizer, loss and precision, shared by prediction and measurement.

Prediction (a dry run under FakeTensorMode) and measurement (a real run) execute the very same
step function, so the two differ only in the tensors they are given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import DataDependentOutputException

from ..errors import MemfitInputError

__all__ = [
    "OPTIMIZERS",
    "OptimizerSpec",
    "StepConfig",
    "default_loss",
    "init_optimizer_state",
    "make_optimizer",
    "run_step",
    "unique_trainable",
]

OptimizerFactory = Callable[[Sequence[torch.nn.Parameter]], torch.optim.Optimizer]
OptimizerSpec = str | OptimizerFactory | None

# The optimizers by name. Learning rates are irrelevant to memory; the state they keep is not.
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.01),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
}

AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _factory(spec: OptimizerSpec) -> OptimizerFactory | None:
    """The factory a spec stands for; a clear error for anything else."""
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            return OPTIMIZERS[spec.lower()]
        except KeyError:
            raise MemfitInputError(
                f"unknown optimizer {spec!r}; use one of {sorted(OPTIMIZERS)} or pass a factory "
                "`lambda params: torch.optim.X(params, ...)`"
            ) from None
    if callable(spec):
        return spec
    raise MemfitInputError(f"optimizer must be a name, a factory or None, not {type(spec).__name__}")


def make_optimizer(spec: OptimizerSpec, params: Sequence[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
    """Build the optimizer a spec names: a name from ``OPTIMIZERS``, a factory, or None."""
    factory = _factory(spec)
    if factory is None:
        return None
    try:
        optimizer = factory(params)
    except TypeError as e:
        # the usual slip: a factory of another signature, or an optimizer instance called
        raise MemfitInputError(
            f"optimizer={_named(spec)} could not be called as factory(params): {e}; pass "
            "`lambda params: torch.optim.X(params, ...)`"
        ) from e
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise MemfitInputError(
            f"optimizer={_named(spec)} returned {type(optimizer).__name__}, not a torch.optim.Optimizer; the factory "
            "must build one over the parameters it is given: `lambda params: torch.optim.X(params, ...)`"
        )
    return optimizer


def _named(factory: object) -> str:
    return getattr(factory, "__qualname__", None) or repr(factory)


def default_loss(output: object) -> torch.Tensor:
    """The output's own ``loss`` (a Hugging Face ``ModelOutput`` given ``labels``, or a dict);
    otherwise cross-entropy against class 0 for logits ``[..., C]``, the mean for anything else.

    The targets are made inside the step so that prediction and measurement agree on them.
    """
    own = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if isinstance(own, torch.Tensor) and own.dim() == 0:
        return own
    if isinstance(output, dict) and "logits" in output:
        output = output["logits"]
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise MemfitInputError(
            f"the model returned {type(output).__name__}; pass loss_fn=... that turns it into a scalar"
        )
    if output.is_floating_point() and output.dim() >= 2:
        logits = output.reshape(-1, output.shape[-1])
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=output.device)
        return F.cross_entropy(logits, target)
    return output.float().mean()


@dataclass(frozen=True)
class StepConfig:
    """How a training step runs.

    Attributes:
        optimizer: ``"sgd"``, ``"momentum"``, ``"adam"``, ``"adamw"``, a factory
            ``params -> Optimizer``, or None for forward and backward only.
        amp: None for full precision, ``"bf16"`` or ``"fp16"`` for ``torch.autocast``.
        loss_fn: Maps the model's output to a scalar loss; :func:`default_loss` if None.
        accumulate: Gradient accumulation: the step is a micro-batch after the first, so every
            gradient exists before it starts and backward adds into it.
    """

    optimizer: OptimizerSpec = "sgd"
    amp: str | None = None
    loss_fn: Callable[[object], torch.Tensor] | None = None
    accumulate: bool = False

    def __post_init__(self) -> None:
        _factory(self.optimizer)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise MemfitInputError(
                f"loss_fn={self.loss_fn!r} is not callable ({type(self.loss_fn).__name__}); pass "
                "`lambda output: ...` returning a scalar tensor, or None for cross-entropy on the last dimension"
            )
        if not isinstance(self.accumulate, bool):
            raise MemfitInputError(f"accumulate must be True or False, not {self.accumulate!r}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise MemfitInputError(f"amp must be None or one of {sorted(AMP_DTYPES)}, not {self.amp!r}")

    def describe(self) -> str:
        """The optimizer and precision, as reports print them."""
        opt = self.optimizer if isinstance(self.optimizer, str) or self.optimizer is None else "custom"
        accumulated = ", gradients accumulated" if self.accumulate else ""
        return f"optimizer={opt}, precision={self.amp or 'fp32'}{accumulated}"

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The autocast context of the forward pass (a no-op in full precision)."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=AMP_DTYPES[self.amp])

    def loss(self, output: object) -> torch.Tensor:
        """The scalar loss of a model output."""
        try:
            loss = (self.loss_fn or default_loss)(output)
        except DataDependentOutputException:
            # only a dry run raises it: its tensors have shapes but no values to read
            raise MemfitInputError(
                "loss_fn reads a value of the output (.item(), float(...), an `if` on a tensor), which memfit's "
                "dry run does not have; return the loss as a scalar tensor computed with tensor operations"
            ) from None
        return _checked_loss(loss, self.loss_fn is not None)


def _checked_loss(loss: object, custom: bool) -> torch.Tensor:
    """``loss`` if backward can start from it; otherwise an error that says why, before torch's
    own (``grad can be implicitly created only for scalar outputs`` names neither side)."""
    given = "loss_fn" if custom else "the default loss (pass loss_fn=...)"
    if not isinstance(loss, torch.Tensor):
        raise MemfitInputError(
            f"{given} returned {type(loss).__name__} {loss!r}, not a tensor: backward needs the scalar tensor "
            "itself (drop .item() or float(...))"
        )
    if loss.dim() != 0:
        raise MemfitInputError(
            f"{given} returned a tensor of shape {list(loss.shape)}, not a scalar: reduce it (.mean() or .sum())"
        )
    if not loss.requires_grad:
        raise MemfitInputError(
            f"{given} returned a tensor that does not require grad: compute it from the model's output "
            "without .detach(), torch.no_grad() or a new tensor (and check that the model has trainable "
            "parameters the output depends on)"
        )
    return loss


def unique_trainable(params: Iterator[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Parameters that require grad, each once (tied weights appear once)."""
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def init_optimizer_state(optimizer: torch.optim.Optimizer | None, params: Sequence[torch.Tensor]) -> None:
    """Create the optimizer's state as a first step would, without a forward or backward pass.

    A step with zero gradients leaves SGD, momentum and Adam parameters unchanged and allocates
    exactly the state a steady-state step starts with.
    """
    if optimizer is None:
        return
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def init_gradients(config: StepConfig, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients alive before the step: under accumulation, those of the earlier micro-batches."""
    if not config.accumulate:
        return []
    for p in params:
        p.grad = torch.zeros_like(p)
    return [p.grad for p in params if p.grad is not None]


def run_step(
    forward: Callable[[], Any],
    config: StepConfig,
    device_type: str,
    optimizer: torch.optim.Optimizer | None,
    on_phase: Callable[[str, str], None],
) -> Any:
    """One training step as a user writes it: forward and loss under autocast, backward, step.

    The output stays referenced until the step ends, as in a usual training loop.
    ``on_phase(phase, node)`` is called as the step enters the loss, backward and optimizer.
    """
    on_phase("forward", "")
    with config.autocast(device_type):
        output = forward()
        on_phase("forward", "loss")
        loss = config.loss(output)
    on_phase("backward", "loss")
    loss.backward()
    on_phase("optimizer", "optimizer")
    if optimizer is not None:
        optimizer.step()
    on_phase("optimizer", "optimizer")
    return output
