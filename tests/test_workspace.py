"""Workspace calibration's on-disk cache: reused across processes, never trusted blindly."""

from __future__ import annotations

import json

import pytest
import torch

from memfit.capture.dryrun import capture
from memfit.capture.trainstep import StepConfig
from memfit.cost import workspace


def _calibrated(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[int, int]]:
    graph = capture(model, x, StepConfig())
    workspace.calibrate(graph, model, (x,), StepConfig())
    return [(i.workspace_fwd, i.workspace_bwd) for i in graph.nodes]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache directory and no entries in memory, as in a new process."""
    monkeypatch.setenv(workspace.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(workspace, "_cache", {})
    monkeypatch.setattr(workspace, "_loaded", set())
    return tmp_path


def test_cache_round_trip(small_cnn, fresh_cache, monkeypatch):
    x = torch.randn(4, 3, 16, 16)
    measured = _calibrated(small_cnn, x)
    assert any(f or b for f, b in measured), "the convolutions should need workspace"
    files = list(fresh_cache.glob("workspace-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())

    def no_runs(*args, **kwargs):
        raise AssertionError("a cached layer was measured again")

    monkeypatch.setattr(workspace, "_cache", {})
    monkeypatch.setattr(workspace, "_loaded", set())
    monkeypatch.setattr(workspace, "_run_layer", no_runs)
    assert _calibrated(small_cnn, x) == measured


@pytest.mark.parametrize("content", ["{not json", '{"k": "x"}', "[1, 2]"])
def test_unreadable_cache_is_remeasured(small_cnn, fresh_cache, content):
    x = torch.randn(4, 3, 16, 16)
    expected = _calibrated(small_cnn, x)
    (path,) = fresh_cache.glob("workspace-*.json")
    path.write_text(content)
    workspace._cache.clear()
    workspace._loaded.clear()
    assert _calibrated(small_cnn, x) == expected
    assert json.loads(path.read_text())  # rewritten whole


def test_cache_can_be_disabled(small_cnn, fresh_cache, monkeypatch):
    monkeypatch.setenv(workspace.CACHE_ENV, "off")
    _calibrated(small_cnn, torch.randn(4, 3, 16, 16))
    assert not list(fresh_cache.iterdir())
