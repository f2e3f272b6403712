"""Properties of memfit over random networks (tests/networks.py) and random budgets.

CI runs a fixed, derandomized handful (``MEMFIT_FUZZ_N``, default 5 per property); ``make fuzz
N=2000`` runs the long one (``SEED=...`` draws other networks than the fixed sequence). The
properties:

- the dry run counts exactly the bytes a real step holds (tensor level, no workspaces);
- a plan's measured peak is within its budget, for budgets from the stated minimum to the unplanned
  peak, and that minimum is itself a budget that plans;
- the planned module trains exactly like the model (loss, gradients, buffers, with dropout);
- memfit leaves the user's model as it was (values, flags, mode).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as fixed_seed
from hypothesis import strategies as st

import memfit
from memfit.capture.inputs import as_inputs
from memfit.capture.trainstep import default_loss

from .networks import Case, networks

N = int(os.environ.get("MEMFIT_FUZZ_N") or 5)
SEED = os.environ.get("MEMFIT_FUZZ_SEED") or None
STRATEGIES = ("auto", "chen", "dp", "selective")

fuzz = settings(
    max_examples=N,
    deadline=None,
    derandomize=SEED is None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def seeded(test: Callable[..., None]) -> Callable[..., None]:
    """The drawn sequence is the fixed one unless MEMFIT_FUZZ_SEED picks another."""
    return fixed_seed(int(SEED))(test) if SEED is not None else test


def snapshot(model: torch.nn.Module) -> dict:
    """Everything of the user's model that memfit must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "flags": [(n, p.requires_grad, p.grad is None) for n, p in model.named_parameters()],
        "training": [m.training for m in model.modules()],
    }


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["flags"] == before["flags"] and after["training"] == before["training"]
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"memfit changed {key} of the user's model"


@seeded
@fuzz
@given(networks())
def test_the_dry_run_counts_the_bytes_a_real_step_holds(case: Case) -> None:
    before = snapshot(case.model)
    kw = {"optimizer": case.optimizer, "loss_fn": case.loss_fn}
    predicted = memfit.estimate(case.model, case.inputs, calibrate=False, **kw)
    measured = memfit.measure(case.model, case.inputs, **kw)
    fields = ("tensor_peak_bytes", "activations_bytes", "gradients_bytes", "optimizer_bytes")
    got, want = ({f: getattr(r, f) for f in fields} for r in (predicted, measured))
    assert got == want, f"predicted {got}, measured {want}"
    assert_untouched(case.model, before)


def _step(model: torch.nn.Module, case: Case) -> torch.Tensor:
    torch.manual_seed(0)  # the same dropout masks in both steps
    model.train()
    loss = (case.loss_fn or default_loss)(as_inputs(case.inputs).call(model))
    loss.backward()
    return loss.detach()


def assert_same_step(work: torch.nn.Module, planned: torch.nn.Module, reference: torch.nn.Module, case: Case) -> None:
    """``planned`` (sharing ``work``'s parameters) takes the step ``reference`` takes: the same
    loss, the same gradients (none where the reference has none: a branch the loss does not
    read), the same buffers (BatchNorm's running statistics)."""
    torch.testing.assert_close(_step(planned, case), _step(reference, case), atol=1e-5, rtol=1e-5)
    expected = dict(reference.named_parameters(remove_duplicate=False))
    for name, p in work.named_parameters(remove_duplicate=False):
        want = expected[name].grad
        assert (p.grad is None) == (want is None), f"gradient of {name}: {p.grad} where the model has {want}"
        if want is not None:
            torch.testing.assert_close(p.grad, want, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")
    buffers = dict(reference.named_buffers())
    for name, b in work.named_buffers():
        torch.testing.assert_close(b, buffers[name], atol=1e-5, rtol=1e-5, msg=f"buffer {name}")


def _minimum_mb(case: Case, strategy: str) -> float:
    with pytest.raises(memfit.MemfitBudgetError) as err:
        memfit.optimize(
            case.model, "1B", case.inputs, optimizer=case.optimizer, loss_fn=case.loss_fn, strategy=strategy
        )
    return err.value.minimum_mb


def check_plan(case: Case, budget_mb: float, strategy: str) -> None:
    """A plan for ``budget_mb`` is measured within it and trains exactly like the model."""
    work, reference = copy.deepcopy(case.model), copy.deepcopy(case.model)
    before = snapshot(work)
    kw = {"optimizer": case.optimizer, "loss_fn": case.loss_fn}
    planned = memfit.optimize(work, budget_mb, case.inputs, strategy=strategy, **kw)
    assert_untouched(work, before)
    measured = memfit.measure(planned, case.inputs, **kw)
    over = measured.peak_bytes - int(budget_mb * 2**20)
    assert over <= 0, (
        f"measured {measured.peak_bytes} B in {measured.peak_phase}: {over} B over the budget, "
        f"{budget_mb * 2**20:.0f} B"
    )
    assert_same_step(work, planned, reference, case)


@seeded
@fuzz
@given(networks(), st.floats(0, 1), st.sampled_from(STRATEGIES))
def test_plans_fit_their_budget_and_train_exactly(case: Case, fraction: float, strategy: str) -> None:
    unplanned = memfit.estimate(case.model, case.inputs, optimizer=case.optimizer, loss_fn=case.loss_fn).peak_mb
    minimum = _minimum_mb(case, strategy)
    check_plan(case, max(minimum, minimum + fraction * (unplanned - minimum)), strategy)


@seeded
@fuzz
@given(networks(), st.sampled_from(STRATEGIES))
def test_the_stated_minimum_is_a_feasible_budget(case: Case, strategy: str) -> None:
    check_plan(case, _minimum_mb(case, strategy), strategy)
