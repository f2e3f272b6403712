"""Random networks for the property-based tests (tests/test_fuzz.py), drawn by hypothesis.

A network is a list of operations over a growing list of values, each a batch of feature vectors
``[B, F]``: layers (shared, tied or frozen among them), activations (in-place ones right after the
op that made their input, the one place autograd allows them), dropout, BatchNorm and LayerNorm,
residual sums, gates, concatenations, chunks, reshapes and transposes, and multi-branch blocks;
several inputs (vectors, images through a conv stem, token ids through an embedding), passed by
position or by keyword, and one to three outputs returned as a tensor, a tuple or a dict.
:func:`networks` draws one, and shrinking simplifies a failing one towards a short chain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

__all__ = ["Case", "Net", "loss_of", "networks"]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}
# what may run in place on a fresh value: its backward needs neither its input nor (for these) a
# tensor another op saved
IN_PLACE = {"relu": nn.ReLU, "silu": nn.SiLU, "leaky": nn.LeakyReLU}
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


@dataclass
class Op:
    """One step of the forward: ``kind`` over the values ``args``, with layer ``layer``."""

    kind: str
    args: tuple[int, ...]
    layer: str = ""
    param: int = 0


@dataclass
class Case:
    """A drawn network, its example batch and the training step to run it with."""

    model: nn.Module
    inputs: Any  # a tensor, a tuple of tensors or a dict of keyword tensors
    optimizer: str
    loss_fn: Any = None
    description: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        return "Case(\n  " + "\n  ".join(self.description) + f"\n  optimizer={self.optimizer!r}\n{self.model}\n)"


class Net(nn.Module):
    """Runs ``ops`` over the inputs; ``outputs`` are the values returned, as ``returns`` says."""

    def __init__(self, stems: list[str], ops: list[Op], outputs: list[int], returns: str) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        self.stems, self.ops, self.outputs, self.returns = stems, ops, outputs, returns

    def run(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        # each value is dropped after its last use, as fx's generated code drops it: a Python list
        # that held them all would peak higher in forward than any graph of the same ops
        last = {i: -1 for i in range(len(self.stems) + sum(_arity(op) for op in self.ops))}
        for k, op in enumerate(self.ops):
            last.update({i: k for i in op.args})
        last.update({v: len(self.ops) for v in self.outputs})
        values: list[Any] = []
        for stem, x in zip(self.stems, inputs, strict=True):
            values.append(self.layers[stem](x) if stem else x)
            _drop(values, last, -1)
        for k, op in enumerate(self.ops):
            # the op owns its inputs: one it reads last is gone as soon as its first kernel is done
            # with it, as in fx's code (a Sequential's input would otherwise outlive its first layer)
            xs = [values[i] for i in op.args]
            _drop(values, last, k)
            values.extend(self.apply(op, xs))
            xs.clear()  # the last op's inputs would otherwise live on into the heads
        outs = [self.layers[f"head{i}"](values[v]) for i, v in enumerate(self.outputs)]
        if self.returns == "tensor":
            return outs[0]
        if self.returns == "dict":
            return {f"out{i}": o for i, o in enumerate(outs)}
        return tuple(outs)

    def apply(self, op: Op, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``op`` on ``xs``, which it empties as it goes: nothing here holds an input longer than
        the kernel that reads it last."""
        k = op.kind
        if k == "layer":
            layer, x = self.layers[op.layer], xs.pop()
            # a module call holds its arguments until it returns; fx's code calls a Sequential's
            # layers one by one, so the input of its first layer is gone by the second
            for m in layer if isinstance(layer, nn.Sequential) else (layer,):
                x = m(x)
            return [x]
        if k == "add":
            return [xs[0] + xs[1]]
        if k == "gate":
            gate = torch.sigmoid(xs.pop())
            return [xs.pop() * gate]
        if k == "cat":
            return [torch.cat(xs, dim=1)]
        if k == "chunk":
            return list(xs[0].chunk(2, dim=1))
        if k == "transpose":  # a reshape, a non-contiguous view and a copy back to [B, F]
            return [xs[0].reshape(xs[0].shape[0], op.param, -1).transpose(1, 2).flatten(1)]
        if k == "slice":
            return [xs[0][:, : op.param]]
        if k == "dropout":
            return [nn.functional.dropout(xs[0], 0.3, self.training)]
        raise AssertionError(k)


class Net1(Net):
    def forward(self, x0: torch.Tensor) -> Any:
        return self.run((x0,))


class Net2(Net):
    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> Any:
        return self.run((x0, x1))


class Net3(Net):
    def forward(self, x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> Any:
        return self.run((x0, x1, x2))


class Branches(nn.Module):
    """A multi-branch block: parallel Linear-activation branches, summed or concatenated."""

    def __init__(self, width: int, outs: list[int], act: str, combine: str) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.Linear(width, w), ACTIVATIONS[act]()) for w in outs)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.combine == "sum":  # the branches' outputs die with the list, right after the call
            return torch.stack([b(x) for b in self.branches]).sum(0)
        return torch.cat([b(x) for b in self.branches], dim=1)


def _drop(values: list[Any], last: dict[int, int], k: int) -> None:
    """Forget the values whose last use was op ``k`` (-1: none, a value nothing reads)."""
    for i, used in last.items():
        if used <= k and i < len(values):
            values[i] = None


def _arity(op: Op) -> int:
    """How many values ``op`` makes."""
    return 2 if op.kind == "chunk" else 1


def loss_of(output: Any) -> torch.Tensor:
    """A loss over every output, whatever the container."""
    outs = (
        list(output.values()) if isinstance(output, dict) else list(output) if isinstance(output, tuple) else [output]
    )
    return sum(o.pow(2).mean() for o in outs)


def _stem(draw: st.DrawFn, net_layers: nn.ModuleDict, i: int, batch: int) -> tuple[str, torch.Tensor, int, str]:
    """Input ``i``: its stem module (or none), a batch of it, the width it gives, a description."""
    kind = draw(st.sampled_from(["vector", "vector", "image", "tokens"]))
    if kind == "vector":
        width = draw(st.integers(1, 24))
        return "", torch.randn(batch, width), width, f"x{i}: vector [{batch}, {width}]"
    if kind == "image":
        c, hw, out = draw(st.integers(1, 3)), draw(st.sampled_from([4, 6, 8])), draw(st.integers(1, 8))
        layers: list[nn.Module] = [nn.Conv2d(c, out, 3, padding=1, bias=draw(st.booleans()))]
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(out))
        layers += [IN_PLACE["relu"](inplace=True) if draw(st.booleans()) else nn.ReLU(), nn.MaxPool2d(2)]
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
        net_layers[f"stem{i}"] = nn.Sequential(*layers)
        return f"stem{i}", torch.randn(batch, c, hw, hw), out * 4, f"x{i}: image [{batch}, {c}, {hw}, {hw}], conv stem"
    vocab, length, dim = draw(st.integers(2, 20)), draw(st.integers(1, 6)), draw(st.integers(1, 8))
    net_layers[f"stem{i}"] = nn.Sequential(nn.Embedding(vocab, dim), nn.Flatten())
    tokens = torch.randint(0, vocab, (batch, length))
    return f"stem{i}", tokens, length * dim, f"x{i}: tokens [{batch}, {length}] of {vocab}, embedding {dim}"


def _layer(draw: st.DrawFn, layers: nn.ModuleDict, width: int, n: int) -> tuple[str, int, str]:
    """A layer over a value of ``width`` features: a new module, or an existing Linear reused
    (shared) or a new one whose weight is another's (tied)."""
    linears = [name for name, m in layers.items() if isinstance(m, nn.Linear) and m.in_features == width]
    kind = draw(st.sampled_from(["linear", "linear", "linear", "norm", "act", "branches", "reuse", "tie"]))
    if kind in ("reuse", "tie") and linears:
        source = layers[draw(st.sampled_from(linears))]
        if kind == "reuse":
            name = next(k for k, m in layers.items() if m is source)
            return name, source.out_features, f"{name} again (shared)"
        tied = nn.Linear(width, source.out_features)
        tied.weight = source.weight
        layers[f"l{n}"] = tied
        return f"l{n}", source.out_features, f"l{n}: Linear({width}, {source.out_features}) tied to another"
    if kind == "norm":
        norm = nn.BatchNorm1d(width, affine=draw(st.booleans())) if draw(st.booleans()) else nn.LayerNorm(width)
        layers[f"l{n}"] = norm
        return f"l{n}", width, f"l{n}: {norm}"
    if kind == "act":
        act = ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]()
        layers[f"l{n}"] = act
        return f"l{n}", width, f"l{n}: {act}"
    if kind == "branches":
        outs = draw(st.lists(st.integers(1, 16), min_size=2, max_size=3))
        combine = draw(st.sampled_from(["sum", "cat"]))
        if combine == "sum":
            outs = [outs[0]] * len(outs)
        block = Branches(width, outs, draw(st.sampled_from(sorted(ACTIVATIONS))), combine)
        layers[f"l{n}"] = block
        return f"l{n}", sum(outs) if combine == "cat" else outs[0], f"l{n}: {len(outs)} branches {outs}, {combine}"
    out = draw(st.integers(1, 32))
    linear = nn.Linear(width, out, bias=draw(st.booleans()))
    frozen = draw(st.integers(0, 4)) == 0
    linear.requires_grad_(not frozen)
    after = draw(st.sampled_from([None, None, *sorted(IN_PLACE)]))
    layers[f"l{n}"] = nn.Sequential(linear, IN_PLACE[after](inplace=True)) if after else linear
    return (
        f"l{n}",
        out,
        f"l{n}: Linear({width}, {out})" + (" frozen" if frozen else "") + (f", {after} in place" if after else ""),
    )


@st.composite
def networks(draw: st.DrawFn, max_ops: int = 10) -> Case:
    """A random network, its batch (by position or by keyword), optimizer and loss."""
    batch = draw(st.integers(2, 5))  # BatchNorm trains on more than one sample
    n_inputs = draw(st.integers(1, 3))
    layers = nn.ModuleDict()
    stems, tensors, widths, description = [], [], [], []
    for i in range(n_inputs):
        stem, x, width, said = _stem(draw, layers, i, batch)
        stems.append(stem)
        tensors.append(x)
        widths.append(width)
        description.append(said)
    ops: list[Op] = []
    for n in range(draw(st.integers(1, max_ops))):
        a = draw(st.integers(0, len(widths) - 1))
        kind = draw(st.sampled_from(["layer"] * 4 + ["add", "gate", "cat", "chunk", "transpose", "slice", "dropout"]))
        same = [j for j, w in enumerate(widths) if w == widths[a]]
        if kind in ("add", "gate") and len(same) > 1:
            b = draw(st.sampled_from(same))
            ops.append(Op(kind, (a, b)))
            widths.append(widths[a])
        elif kind == "cat":
            b = draw(st.integers(0, len(widths) - 1))
            ops.append(Op(kind, (a, b)))
            widths.append(widths[a] + widths[b])
        elif kind == "chunk" and widths[a] % 2 == 0:
            ops.append(Op(kind, (a,)))
            widths += [widths[a] // 2] * 2
        elif kind == "transpose" and widths[a] % 2 == 0:
            ops.append(Op(kind, (a,), param=2))
            widths.append(widths[a])
        elif kind == "slice" and widths[a] > 1:
            ops.append(Op(kind, (a,), param=widths[a] // 2))
            widths.append(widths[a] // 2)
        elif kind == "dropout":
            ops.append(Op(kind, (a,)))
            widths.append(widths[a])
        else:
            name, width, said = _layer(draw, layers, widths[a], n)
            ops.append(Op("layer", (a,), layer=name))
            widths.append(width)
            description.append(f"v{len(widths) - 1} = {said} of v{a}")
            continue
        description.append(f"v{len(widths) - 1} = {kind} of {ops[-1].args}")
    # the last value is always an output, so most of the network feeds the loss
    later = st.integers(0, len(widths) - 1)
    outputs = sorted({len(widths) - 1, *draw(st.lists(later, max_size=2))})
    returns = "tensor" if len(outputs) == 1 and draw(st.booleans()) else draw(st.sampled_from(["tuple", "dict"]))
    net = (Net1, Net2, Net3)[n_inputs - 1](stems, ops, outputs, returns)
    net.layers.update(layers)
    for i, v in enumerate(outputs):
        net.layers[f"head{i}"] = nn.Linear(widths[v], draw(st.integers(2, 6)))
    description.append(f"outputs v{outputs} as a {returns}")
    by_keyword = draw(st.integers(0, 5)) == 0  # torch.export's path: slower, so rarer
    inputs: Any = {f"x{i}": x for i, x in enumerate(tensors)} if by_keyword else tuple(tensors)
    if not by_keyword and n_inputs == 1 and draw(st.booleans()):
        inputs = tensors[0]
    description.append("inputs by keyword" if by_keyword else "inputs by position")
    custom = returns != "tensor" or draw(st.booleans())
    return Case(net, inputs, draw(st.sampled_from(OPTIMIZERS)), loss_of if custom else None, description)
