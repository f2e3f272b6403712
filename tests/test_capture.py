"""Capture takes models as they are: optional arguments, keyword batches, ``**kwargs`` forwards and
grad-mode regions, by torch.fx where it can and torch.export where it cannot."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit.capture.trace import graph_of

FRACTIONS = (0.25, 0.5, 0.75)


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.fc(self.norm(x)))


class _OptionalMask(nn.Module):
    """``forward(x, mask=None, is_causal=False)``: one input given, the rest at their defaults."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[_Block(width) for _ in range(6)])
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if mask is not None:
            x = x * mask
        return self.head(self.blocks(x))


class _KeywordModel(nn.Module):
    """A Hugging-Face-like forward: keyword batch, ``**kwargs``, a shape check, a dict with the loss."""

    def __init__(self, vocab: int = 50, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([_Block(width) for _ in range(6)])
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> dict[str, torch.Tensor]:
        h = self.drop(self.embed(input_ids))
        if h.shape[1] > 1:  # Python on shapes: fine for export, a Proxy for fx
            for block in self.blocks:
                h = block(h)
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return out


class _FrozenEncoder(nn.Module):
    """``torch.no_grad()`` in forward: the encoder must stay untrained after planning."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*[_Block(width) for _ in range(3)])
        self.trained = nn.Sequential(*[_Block(width) for _ in range(6)])
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.encoder(x)
        return self.head(self.trained(x))


def _keyword_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 50, (16, 32))
    return {"input_ids": ids, "labels": ids}


def _step(model: nn.Module, batch: dict | torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    model.train()
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = (
        out["loss"]
        if isinstance(out, dict)
        else F.cross_entropy(out.reshape(-1, out.shape[-1]), torch.zeros(out.shape[:-1].numel(), dtype=torch.long))
    )
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize(
    ("name", "factory", "batch", "capture"),
    [
        ("optional-mask", _OptionalMask, lambda: torch.randn(64, 16, 64), "torch.fx"),
        ("keyword", _KeywordModel, _keyword_batch, "torch.export"),
        ("no-grad", _FrozenEncoder, lambda: torch.randn(64, 16, 64), "torch.export"),
    ],
)
def test_models_as_they_are_are_estimated_planned_and_train_exactly(name, factory, batch, capture) -> None:
    torch.manual_seed(0)
    model, x = factory(), batch()
    assert graph_of(model, (), x).meta["memfit_capture"].startswith(capture)
    before = copy.deepcopy(model.state_dict())
    estimated = memfit.estimate(model, x)
    measured = memfit.measure(model, x).peak_mb
    assert abs(estimated.peak_mb / measured - 1) < 0.03, (estimated.peak_mb, measured)
    assert (capture == "torch.fx") == (not any("Captured with" in n for n in estimated.notes))
    lowest = memfit.minimum(model, x, strategy="dp")
    assert lowest < estimated.peak_mb
    for fraction in FRACTIONS:
        budget = lowest + fraction * (estimated.peak_mb - lowest)
        reference, work = copy.deepcopy(model), copy.deepcopy(model)
        planned = memfit.optimize(work, budget, x)
        assert memfit.measure(planned, x).peak_mb <= budget
        call = (lambda b, planned=planned: planned(*b.values())) if isinstance(x, dict) else planned
        wrapped = _Call(call)
        torch.testing.assert_close(_step(wrapped, x), _step(reference, x), atol=1e-5, rtol=1e-5)
        got = dict(work.named_parameters())
        for n, p in reference.named_parameters():
            if p.grad is None:  # frozen by no_grad in forward: must stay so when planned
                assert got[n].grad is None, f"{name}: {n} got a gradient"
            else:
                torch.testing.assert_close(got[n].grad, p.grad, atol=1e-5, rtol=1e-4, msg=n)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


class _Call(nn.Module):
    """A planned module called the way the batch is given (keywords flattened in order)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(kwargs) if kwargs else self.fn(*args)


def test_the_plan_names_the_users_layers_when_exported() -> None:
    torch.manual_seed(0)
    model, x = _KeywordModel(), _keyword_batch()
    report = memfit.estimate(model, x)
    rows = {row.name for row in report.layers}
    assert {"blocks.0.fc", "blocks.5.norm", "head", "embed"} <= rows
    planned = memfit.optimize(model, report.peak_mb * 0.8, x)
    modules = {name for name, _ in model.named_modules()}
    named = [layer for s in planned.plan.checkpointed for layer in s.layers]
    assert named and set(named) <= modules, named
    assert all(layer in str(planned.plan) for s in planned.plan.checkpointed for layer in (s.layers[0], s.layers[-1]))


def test_an_exported_plan_refuses_eval_mode_and_names_the_fix() -> None:
    torch.manual_seed(0)
    model, x = _KeywordModel(), _keyword_batch()
    planned = memfit.optimize(model, memfit.estimate(model, x).peak_mb * 0.9, x)
    planned.eval()
    with pytest.raises(RuntimeError, match="evaluate with the original model"):
        planned(*x.values())
