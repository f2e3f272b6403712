"""The hand-written checkpointing policies of benchmarks/policies.py train as the model does.

The benchmark sets memfit against them; a policy that changed the loss or a gradient (a block
missed, dropout masks drawn anew in the recomputation) would be a cheaper, wrong peer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import memfit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import policies
from common import loss_of

# Tiny members of each family the benchmark covers: same block structure, milliseconds a step.
CASES = {
    "gpt": (
        lambda: memfit.models.create("gpt", n_layer=4, n_embd=32, n_head=2, block_size=16, vocab_size=64),
        lambda: torch.randint(0, 64, (2, 16)),
    ),
    "resnet50": (
        lambda: memfit.models.create("resnet50", stem="cifar", num_classes=10, width=4),
        lambda: torch.randn(2, 3, 16, 16),
    ),
    "mobilenet_v2": (
        lambda: memfit.models.create("mobilenet_v2", stem="cifar", num_classes=10, width_mult=0.25),
        lambda: torch.randn(2, 3, 16, 16),
    ),
}


def _loss_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(1)  # the same dropout masks for every policy
    loss = loss_of(model.train()(x))
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


@pytest.mark.parametrize("name", list(CASES))
def test_every_policy_trains_like_the_model(name: str) -> None:
    build, batch = CASES[name]
    torch.manual_seed(0)
    model, x = build(), batch()
    want_loss, want = _loss_and_grads(model, x)
    peers = policies.peers(model)
    assert {"every 1", "every 2", "seq 2", "selective"} <= set(peers)
    for label, peer in peers.items():
        assert sum(isinstance(m, (policies.Checkpointed, policies.Sequential)) for m in peer.modules()), label
        loss, grads = _loss_and_grads(peer, x)
        torch.testing.assert_close(loss, want_loss, msg=label)
        assert len(grads) == len(want), label
        for g, w in zip(grads, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=label)
