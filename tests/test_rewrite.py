"""memfit.rewrite.checkpoint: a plan's checkpointed segments become submodules over exactly their
nodes, and the rewritten module trains like the original: the same outputs and gradients, dropout
masks replayed in the recomputation, buffers written in place moved once a step, selective segments
that keep the matmuls and never a tensor an in-place op changes."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode

from memfit.capture.trace import trace
from memfit.planner import Plan, Segment
from memfit.planner.plan import SegmentKind
from memfit.rewrite.checkpoint import Checkpointed, PlannedModule, rewrite


class Net(nn.Module):
    """Linear-BatchNorm-ReLU-Dropout, then a residual around Linear-Tanh scaled by a bare parameter:
    buffers written in place, random numbers, a parameter read by ``get_attr``, and a value read
    inside a later segment and after it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 32)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 32))
        self.fc3 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.fc1(x))))
        return self.fc3(torch.tanh(self.fc2(h)) * self.scale + h)


BN = ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")
FIRST = ("fc1", "bn", "relu")
SECOND = ("drop", "fc2", "tanh", "mul")  # two results: the dropout's and the product


def plan(kind: SegmentKind, random: bool = True, buffers: tuple[str, ...] = BN) -> Plan:
    """Net's two parts under ``kind`` (nested: each in two parts), its head plain."""
    first = Segment(FIRST, kind, buffers=buffers)
    second = Segment(SECOND, kind, random=random)
    if kind == "nested":
        first = dataclasses.replace(
            first, inner=(Segment(FIRST[:2], "recompute", buffers=buffers), Segment(FIRST[2:], "recompute"))
        )
        second = dataclasses.replace(
            second, inner=(Segment(SECOND[:2], "recompute", random=random), Segment(SECOND[2:], "recompute"))
        )
    return Plan([first, second, Segment(("add", "fc3"), "plain")], strategy="test")


def models(**options: Any) -> tuple[Net, Net, PlannedModule]:
    """The original, a copy to train with the plan, and the rewritten module over that copy."""
    torch.manual_seed(0)
    reference = Net()
    work = copy.deepcopy(reference)
    return reference, work, rewrite(work, trace(work), plan(**options))


def train_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)  # the same dropout masks for every model
    model.train()
    out = model(x)
    out.square().mean().backward()
    return out.detach()


def differences(reference: nn.Module, work: nn.Module) -> list[str]:
    """What of a training step's effects differs: gradients and buffers, by name."""

    def close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        return a is not None and b is not None and torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    grads = {n: p.grad for n, p in reference.named_parameters()}
    buffers = dict(reference.named_buffers())
    found = [n for n, p in work.named_parameters() if not close(p.grad, grads[n])]
    return found + [n for n, b in work.named_buffers() if not close(b, buffers[n])]


def segment(module: nn.Module, name: str) -> Checkpointed:
    found = module.get_submodule(name)
    assert isinstance(found, Checkpointed)
    return found


def body(module: Checkpointed) -> fx.GraphModule:
    found = module.body  # set around nn.Module's bookkeeping: typed by its __getattr__
    assert isinstance(found, fx.GraphModule)
    return found


def body_nodes(module: Checkpointed) -> list[str]:
    return [n.name for n in body(module).graph.nodes if n.op not in ("placeholder", "output")]


def test_checkpointed_segments_become_submodules_over_exactly_their_nodes() -> None:
    _, work, planned = models(kind="recompute")
    first, second = segment(planned, "memfit_segment_0"), segment(planned, "memfit_segment_1")
    assert body_nodes(first) == list(FIRST)
    assert body_nodes(second) == ["drop", "fc2", "tanh", "scale", "mul"]  # the parameter is fetched inside
    assert [n.name for n in body(second).graph.nodes if n.op == "placeholder"] == ["relu"]
    # the second segment returns the dropout's output and the product, both read by ``add``
    outer = [(n.op, str(n.target), [str(a) for a in n.args]) for n in planned.graph.nodes]
    assert outer == [
        ("placeholder", "x", []),
        ("call_module", "memfit_segment_0", ["x"]),
        ("call_function", "<built-in function getitem>", ["memfit_segment_0", "0"]),
        ("call_module", "memfit_segment_1", ["getitem"]),
        ("call_function", "<built-in function getitem>", ["memfit_segment_1", "0"]),
        ("call_function", "<built-in function getitem>", ["memfit_segment_1", "1"]),
        ("call_function", "<built-in function add>", ["getitem_2", "getitem_1"]),
        ("call_module", "fc3", ["add"]),
        ("output", "output", ["fc3"]),
    ]
    assert first.extra_repr() == "fc1 .. relu (3 nodes)"
    # the segments' submodules and the bare parameter are still the user's, under their own names
    assert planned.fc1 is work.fc1 and planned.scale is work.scale
    assert set(planned.state_dict()) == set(work.state_dict())


def test_a_nested_segment_checkpoints_its_parts_inside_it() -> None:
    _, _, planned = models(kind="nested")
    nested = segment(planned, "memfit_segment_0")
    inner = body(nested)
    assert isinstance(inner, PlannedModule)
    parts = [segment(inner, "memfit_segment_0_0"), segment(inner, "memfit_segment_0_1")]
    assert [body_nodes(p) for p in parts] == [["fc1", "bn"], ["relu"]]
    assert nested.extra_repr().endswith(", nested")


@pytest.mark.parametrize("kind", ["recompute", "selective", "nested"])
def test_the_rewritten_module_trains_like_the_original(kind: SegmentKind) -> None:
    reference, work, planned = models(kind=kind)
    x = torch.randn(8, 16)
    torch.testing.assert_close(train_step(planned, x), train_step(reference, x), rtol=0, atol=0)
    assert differences(reference, work) == []
    assert work.bn.num_batches_tracked == 1


def test_recomputation_replays_the_forwards_dropout_masks() -> None:
    x = torch.randn(8, 16)
    reference, work, planned = models(kind="recompute")
    train_step(reference, x)
    train_step(planned, x)
    assert differences(reference, work) == []
    # The contrast: a segment that says it draws no random numbers recomputes with fresh masks,
    # and the weights before the dropout get the wrong gradients (fc1's bias has none: BatchNorm
    # takes the mean out).
    reference, work, planned = models(kind="recompute", random=False)
    train_step(reference, x)
    train_step(planned, x)
    assert {"fc1.weight", "bn.weight", "bn.bias"} <= set(differences(reference, work))


def test_buffers_a_segment_writes_move_once_a_step() -> None:
    x = torch.randn(8, 16)
    reference, work, planned = models(kind="recompute")
    for _ in range(2):
        train_step(reference, x)
        train_step(planned, x)
    assert work.bn.num_batches_tracked == 2 and differences(reference, work) == []
    # The contrast: unrestored, the recomputation's BatchNorm moves the statistics a second time.
    reference, work, planned = models(kind="recompute", buffers=())
    train_step(reference, x)
    train_step(planned, x)
    assert work.bn.num_batches_tracked == 2
    assert {"bn.running_mean", "bn.running_var"} <= set(differences(reference, work))


class Calls(nn.Module):
    """Counts its calls in a buffer; ``scale``: multiplies by the count, so its forward reads the
    buffer it writes (as a spectral norm or a running average does), else passes a copy on."""

    calls: torch.Tensor

    def __init__(self, scale: bool) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return x * self.calls.clone() if self.scale else x.clone()


def test_a_recomputation_sees_the_buffers_the_forward_saw_and_leaves_what_it_left() -> None:
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(8, 8), Calls(True), nn.Tanh(), nn.Linear(8, 8), Calls(False), nn.Linear(8, 1))
    work = copy.deepcopy(reference)
    # The first segment's recomputation reruns the counter, which must count from 0 again for
    # Tanh to save what it saved; the second's stops once its Linear has packed its input, before
    # the counter runs again, so the count must be set back to what the forward left.
    segments = [
        Segment(("_0", "_1", "_2"), "recompute", buffers=("1.calls",)),
        Segment(("_3", "_4"), "recompute", buffers=("4.calls",)),
        Segment(("_5",), "plain"),
    ]
    planned = rewrite(work, trace(work, [Calls]), Plan(segments, strategy="test"))
    x = torch.randn(4, 8)
    torch.testing.assert_close(train_step(planned, x), train_step(reference, x), rtol=0, atol=0)
    assert differences(reference, work) == []
    assert [float(m.calls) for m in work if isinstance(m, Calls)] == [1.0, 1.0]


class _Ops(TorchDispatchMode):
    """The names of the ATen operators that run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("kind", "matmuls"), [("plain", 0), ("recompute", 2), ("selective", 0)])
def test_selective_segments_recompute_all_but_the_matmuls(kind: SegmentKind, matmuls: int) -> None:
    _, _, planned = models(kind=kind)
    loss = planned(torch.randn(8, 16)).square().mean()
    with _Ops() as ops:
        loss.backward()
    # a Linear's forward is addmm, its backward mm: addmm in backward is a recomputed forward
    assert ops.names.count("addmm") == matmuls
    assert ("relu" in ops.names) == (kind != "plain")


def test_in_eval_mode_segments_run_directly_and_nothing_is_recomputed() -> None:
    reference, _, planned = models(kind="recompute")
    reference.eval()
    planned.eval()
    x = torch.randn(8, 16)
    torch.testing.assert_close(planned(x), reference(x), rtol=0, atol=0)
    loss = planned(x).square().mean()  # a backward in eval mode: input gradients, frozen statistics
    with _Ops() as ops:
        loss.backward()
    assert "addmm" not in ops.names


def test_a_selective_segment_does_not_keep_what_an_in_place_op_changes() -> None:
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(16, 32), nn.ReLU(inplace=True), nn.Linear(32, 4))
    x = torch.randn(8, 16)
    train_step(reference, x)
    for unsaved, error in (((), "mutated"), (("_0",), None)):
        work = copy.deepcopy(reference)
        work.zero_grad()
        segments = [Segment(("_0", "_1"), "selective", unsaved=unsaved), Segment(("_2",), "plain")]
        planned = rewrite(work, trace(work), Plan(segments, strategy="test"))
        if error is None:
            train_step(planned, x)
            assert differences(reference, work) == []  # the Linear's output is recomputed, not kept
        else:
            with pytest.raises(RuntimeError, match=error):  # what torch says when it was kept
                train_step(planned, x)


def test_a_segment_naming_a_missing_buffer_is_refused() -> None:
    torch.manual_seed(0)
    work = Net()
    with pytest.raises(AttributeError, match=r"Net has no buffer 'bn\.running_median'"):
        rewrite(work, trace(work), plan(kind="recompute", buffers=("bn.running_median",)))
