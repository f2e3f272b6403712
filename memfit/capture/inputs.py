"""Example inputs: a training batch as the model's forward takes it, positional or by keyword.

A captured graph takes the batch's tensors flat, in one order (positional arguments first, then
the keyword arguments in the order the dict lists them); the user's model takes them as given.
:class:`Inputs` holds both views, so every caller runs the same batch the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import MemfitInputError

__all__ = ["Inputs", "as_inputs"]


@dataclass(frozen=True)
class Inputs:
    """A batch: ``forward(*args, **kwargs)``.

    Attributes:
        args: Positional arguments (tensors).
        kwargs: Keyword arguments; tensors, or plain values (flags, None) a capture bakes in.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor of the batch, in the order a captured graph takes them."""
        leaves = tree_flatten((self.args, self.kwargs))[0]
        return tuple(t for t in leaves if isinstance(t, torch.Tensor))

    @property
    def batch_size(self) -> int:
        """Leading dimension of the first tensor (1 for a scalar)."""
        first = self.tensors[0]
        return int(first.shape[0]) if first.dim() else 1

    def call(self, module: torch.nn.Module) -> Any:
        """Run ``module`` on the batch: a GraphModule (captured or planned) takes the tensors flat,
        any other module the arguments as given."""
        if isinstance(module, fx.GraphModule):
            return module(*self.tensors)
        return module(*self.args, **self.kwargs)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
        """The batch with ``fn`` applied to every tensor (to make fake copies, say)."""

        def convert(x: Any) -> Any:
            return fn(x) if isinstance(x, torch.Tensor) else x

        return Inputs(tuple(tree_map(convert, list(self.args))), tree_map(convert, dict(self.kwargs)))


def as_inputs(example_inputs: Any) -> Inputs:
    """Normalise ``example_inputs``: a tensor, a tuple or list of tensors (positional), or a dict
    of keyword arguments (``input_ids``, ``attention_mask``, ``labels``, ``pixel_values`` ...)."""
    if isinstance(example_inputs, Inputs):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        inputs = Inputs((example_inputs,))
    elif isinstance(example_inputs, dict):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise MemfitInputError(
                f"example_inputs is a dict, so its keys must be forward's argument names; got {bad[0]!r}"
            )
        inputs = Inputs((), dict(example_inputs))
    elif isinstance(example_inputs, (tuple, list)) and example_inputs:
        for i, x in enumerate(example_inputs):
            if not isinstance(x, torch.Tensor):
                raise MemfitInputError(
                    f"example_inputs[{i}] is {type(x).__name__}, not a tensor; pass keyword arguments as a dict "
                    "(example_inputs={'input_ids': ..., 'labels': ...}) or bind them with functools.partial"
                )
        inputs = Inputs(tuple(example_inputs))
    else:
        raise MemfitInputError(
            "example_inputs must be a tensor, a non-empty tuple of tensors (forward's positional arguments) or "
            f"a dict of keyword arguments, got {type(example_inputs).__name__}"
        )
    if not inputs.tensors:
        raise MemfitInputError("example_inputs holds no tensor; give at least one tensor shaped like a training batch")
    empty = [tuple(t.shape) for t in inputs.tensors if t.numel() == 0]
    if empty:
        raise MemfitInputError(
            f"example_inputs has an empty tensor of shape {list(empty[0])}: a batch of 0 trains nothing; "
            "give at least one sample"
        )
    return inputs
