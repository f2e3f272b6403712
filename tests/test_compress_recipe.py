"""memfit.compressors.Recipe: the fine-tuning recipe after memfit.compress."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit.compressors import GeneratedConfig, Recipe, recipe
from memfit.compressors.generated import distillation_loss, orthonormality_loss
from memfit.compressors.ternary import ternary_generators


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )


X = torch.randn(12, 3, 4, 4, generator=torch.Generator().manual_seed(0))
Y = torch.arange(12) % 5


@pytest.mark.parametrize(
    ("knob", "value"),
    [
        ("lr", 0.0),
        ("temperature", -1.0),
        ("alpha", 1.5),
        ("orthonormality", float("nan")),
        ("freeze_epochs", -1),
        ("recalibrate_batches", 2.0),
        ("freeze_epochs", True),
    ],
)
def test_rejects_bad_knobs_naming_them(knob: str, value: object) -> None:
    with pytest.raises(ValueError, match=knob):
        Recipe(**{knob: value})  # type: ignore[arg-type]


def test_loss_without_a_teacher_is_cross_entropy_and_adds_the_orthonormality_term_for_mlg() -> None:
    dense = _cnn()
    logits = dense(X)
    assert torch.equal(Recipe().loss(dense, X, logits, Y), F.cross_entropy(logits, Y))
    small = memfit.compress(dense, "generated", GeneratedConfig(base_out=4), X)
    logits = small(X)
    expected = F.cross_entropy(logits, Y) + 1e-3 * orthonormality_loss(small)
    assert torch.allclose(Recipe(orthonormality=1e-3).loss(small, X, logits, Y), expected)


def test_the_teacher_distills_in_eval_mode_and_is_left_as_found() -> None:
    teacher = _cnn().train()
    stats = [b.clone() for b in teacher.buffers()]
    student = _cnn(seed=1)
    logits = student(X)
    loss = Recipe(teacher=teacher, orthonormality=0.0).loss(student, X, logits, Y)
    assert teacher.training
    assert all(torch.equal(a, b) for a, b in zip(stats, teacher.buffers(), strict=True))
    with torch.no_grad():
        soft = teacher.eval()(X)
    assert torch.allclose(loss, distillation_loss(logits, soft, Y))


def test_start_epoch_freezes_ternary_codes_for_the_last_epochs_only() -> None:
    small = memfit.compress(_cnn(), "ternary", example_inputs=X)
    plan = Recipe(freeze_epochs=2)
    assert [plan.start_epoch(small, e, 5) for e in range(3)] == [False, False, False]
    assert not any(bool(g.frozen) for g in ternary_generators(small))
    assert plan.start_epoch(small, 3, 5)
    assert all(bool(g.frozen) for g in ternary_generators(small))
    assert not Recipe().start_epoch(_cnn(), 4, 5)  # nothing ternary: nothing to freeze


def test_recalibrate_bn_averages_the_first_batches_and_restores_mode_and_momentum() -> None:
    model = _cnn().eval()
    used = Recipe(recalibrate_batches=2).recalibrate_bn(model, X, batch_size=4)
    assert used == 2 and not model.training
    bn = model[1]
    assert bn.momentum == 0.1
    with torch.no_grad():
        means = [model[0](chunk).mean(dim=(0, 2, 3)) for chunk in X[:8].split(4)]
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-6)
    assert Recipe(recalibrate_batches=0).recalibrate_bn(model, X, batch_size=4) == 0


def test_finetune_trains_every_parameter_and_returns_the_model_in_eval_mode() -> None:
    dense = _cnn()
    small = memfit.compress(dense, "generated", GeneratedConfig(base_out=4), X)
    before = [p.detach().clone() for p in small.parameters()]
    out = Recipe(teacher=dense, recalibrate_batches=1).finetune(small, X, Y, epochs=2, batch_size=4)
    assert out is small and not small.training
    assert all(not torch.equal(a, b) for a, b in zip(before, small.parameters(), strict=True))
    with pytest.raises(ValueError, match="epochs"):
        Recipe().finetune(small, X, Y, epochs=0)


def test_docstring_example_runs() -> None:
    result = doctest.testmod(recipe, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
