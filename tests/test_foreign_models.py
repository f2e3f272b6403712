"""Conformance matrix over foreign models (torchvision, timm, Hugging Face transformers).

For every case of tests/foreign.py, built with random init from a small config:

* the predicted peak (``memfit.estimate``) is within 3% of the allocator's (``memfit.measure``);
* plans at 25/50/75% of the way from the feasible minimum to the unplanned peak (CI: 25% only)
  measure within their budget, and take the same training step as the model (loss, every
  gradient, every buffer);
* estimate and optimize leave the user's model as it was (state_dict values, ``training`` flags,
  no gradients).

CI (``make test``) runs the cases in ``CI_CASES``; ``make test-models`` (MEMFIT_MODELS=all)
runs all of them. Each test collects every problem of its case before failing, and records its
figures with ``record_property`` (``--junitxml`` keeps them), so one run of a case gives its whole
row of the matrix. A family whose package is missing is skipped (``pip install -e '.[models]'``).
"""

from __future__ import annotations

import copy
import traceback

import pytest
import torch
from torch import nn

import memfit

from .conftest import models_matrix
from .foreign import CASES, Case
from .test_planner import assert_trains_like

# CI's subset (make test): fast vision models spanning the root causes found so far. The rest runs
# with MEMFIT_MODELS=all (make test-models).
CI_CASES = frozenset(
    {
        "tv.resnet18",  # plain CNN: the baseline
        "tv.mobilenet_v3_small",  # in-place activation right after a kept conv/linear output
        "timm.efficientnet_b0",  # BatchNormAct2d buffers updated in Python; SE + in-place
        "timm.convnext_atto",  # LayerNorm2d on permuted tensors (hidden kernel copies)
        "tv.vit_small",  # attention, class token
    }
)
assert CI_CASES <= CASES.keys()

ESTIMATE_TOLERANCE = 0.03
FRACTIONS = (0.25, 0.5, 0.75)
# CI plans its cases at the tightest of them, where a plan recomputes the most; the matrix at all.
CI_FRACTIONS = (0.25,)


def _params() -> list:
    params = []
    for name, case in CASES.items():
        marks = [] if name in CI_CASES else [pytest.mark.models]
        params.append(pytest.param(case, id=name, marks=marks))
    return params


PARAMS = _params()

Snapshot = tuple[dict[str, torch.Tensor], dict[str, bool], dict[str, bool]]


def _make(case: Case) -> tuple[nn.Module, object]:
    pytest.importorskip(case.family)
    return case.make()


def _snapshot(model: nn.Module) -> Snapshot:
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    modes = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.grad is not None for name, p in model.named_parameters()}
    return state, modes, grads


def _changes(model: nn.Module, before: Snapshot) -> list[str]:
    """What differs from ``before``: state_dict entries, training flags, gradients."""
    state, modes, grads = _snapshot(model)
    changed = []
    if state.keys() != before[0].keys():
        changed.append(f"state_dict keys {sorted(state.keys() ^ before[0].keys())[:5]}")
    changed += [
        f"{k} ({before[0][k].flatten()[:1].tolist()} -> {v.flatten()[:1].tolist()})"
        for k, v in state.items()
        if k in before[0] and not torch.equal(v, before[0][k])
    ]
    changed += [f"{name or 'model'}.training -> {mode}" for name, mode in modes.items() if before[1].get(name) != mode]
    changed += [f"{name}.grad set" for name, has in grads.items() if has and not before[2].get(name)]
    return changed


def _summary(changes: list[str], limit: int = 4) -> str:
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return ", ".join(changes[:limit]) + more


def _error(err: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()[0][:400]


@pytest.mark.parametrize("case", PARAMS)
def test_estimate_matches_the_measured_peak(case: Case, record_property) -> None:
    model, x = _make(case)
    before = _snapshot(model)
    if case.refused:  # what cannot be captured is refused clearly, and the model is left as it was
        with pytest.raises(memfit.MemfitTraceError, match=case.refused):
            memfit.estimate(model, x, loss_fn=case.loss_fn)
        record_property("capture", "refused")
        assert not _changes(model, before)
        return
    try:
        report = memfit.estimate(model, x, loss_fn=case.loss_fn)
    except Exception as err:
        record_property("capture", _error(err))
        raise
    predicted = report.peak_mb
    record_property(
        "capture", "torch.export" if any("Captured with torch.export" in n for n in report.notes) else "torch.fx"
    )
    problems = []
    if changed := _changes(model, before):
        problems.append(f"estimate changed the model: {_summary(changed)}")
    before = _snapshot(model)
    measured = memfit.measure(model, x, loss_fn=case.loss_fn).peak_mb
    if changed := _changes(model, before):
        problems.append(f"measure changed the model: {_summary(changed)}")
    error = (predicted - measured) / measured
    record_property("estimate_mb", round(predicted, 3))
    record_property("measured_mb", round(measured, 3))
    record_property("estimate_error_pct", round(100 * error, 2))
    if abs(error) > ESTIMATE_TOLERANCE:
        problems.append(f"estimate {predicted:.3f} MiB vs measured {measured:.3f} MiB: {100 * error:+.2f}%")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", PARAMS)
def test_plans_fit_their_budget_and_train_like_the_model(case: Case, record_property) -> None:
    model, x = _make(case)
    before = _snapshot(model)
    if case.refused:
        with pytest.raises(memfit.MemfitTraceError, match=case.refused):
            memfit.optimize(model, 1e6, x, loss_fn=case.loss_fn)
        assert not _changes(model, before)
        return
    unplanned = memfit.estimate(model, x, loss_fn=case.loss_fn).peak_mb
    lowest = memfit.minimum(model, x, strategy="auto", loss_fn=case.loss_fn)
    record_property("unplanned_mb", round(unplanned, 3))
    record_property("minimum_mb", round(lowest, 3))
    problems = []
    if changed := _changes(model, before):
        problems.append(f"estimate/optimize changed the model: {_summary(changed)}")
    if lowest >= unplanned:
        pytest.fail(
            "\n".join(
                [*problems, f"nothing to plan at this shape: minimum {lowest:.3f} >= unplanned {unplanned:.3f} MiB"]
            )
        )
    for fraction in FRACTIONS if models_matrix() else CI_FRACTIONS:
        at = f"{fraction:.0%}"
        budget = lowest + fraction * (unplanned - lowest)
        record_property(f"budget_{at}", round(budget, 3))
        reference, work = copy.deepcopy(model), copy.deepcopy(model)
        before = _snapshot(work)
        try:
            planned = memfit.optimize(work, budget, x, loss_fn=case.loss_fn, strategy="auto")
        except Exception as err:  # noqa: BLE001  every fraction's outcome goes into the report
            record_property(f"measured_{at}", f"error: {_error(err)}")
            problems.append(f"{at} ({budget:.3f} MiB): optimize raised {_error(err)}")
            continue
        if changed := _changes(work, before):
            problems.append(f"{at}: optimize changed the model: {_summary(changed)}")
        if planned.plan.peak_after_bytes > budget * 2**20:
            problems.append(f"{at}: the plan predicts {planned.plan.peak_after_bytes / 2**20:.3f} > {budget:.3f} MiB")
        measured = memfit.measure(planned, x, loss_fn=case.loss_fn).peak_mb
        record_property(f"measured_{at}", round(measured, 3))
        if measured > budget:
            problems.append(
                f"{at}: measured {measured:.3f} MiB > budget {budget:.3f} MiB ({100 * (measured / budget - 1):+.1f}%)"
            )
        try:
            assert_trains_like(work, planned, reference, x, loss_fn=case.loss_fn)
        except Exception as err:  # noqa: BLE001  as above
            problems.append(f"{at}: trains differently: {_error(err)}")
    assert not problems, "\n".join(problems)
