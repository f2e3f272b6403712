"""Shared test set-up: small example inputs for every zoo model."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch

import memfit
from memfit.cost import checkpointing, pace, timing
from memfit.cost.layers import CACHE_ENV, DiskCache

from .torchvision_shim import install_torchvision_shim

# PyPI's torchvision (the `models` extra) cannot import beside the CPU torch without it; it must run
# before anything imports torchvision, timm or a transformers model class (see tests/torchvision_shim.py).
install_torchvision_shim()

# pytest runs two workers on two cores: a second intra-op thread per worker only oversubscribes them,
# and the suite's many small kernels then wait on scheduler ticks. Predictions and measurements in a
# test share this setting (workspace calibration is keyed by the thread count).
torch.set_num_threads(1)

# Calibrated workspaces and times are cached on disk between runs; a test run starts from an empty
# cache of its own, which its pytest-xdist workers share (the controller, importing this first, makes
# it; each worker inherits its environment), as parallel runs of memfit share the user's: a layer
# one worker calibrated, the other reads from the file instead of calibrating it again.
_RUN_CACHE = "MEMFIT_TEST_RUN_CACHE"
if "PYTEST_XDIST_WORKER" not in os.environ or _RUN_CACHE not in os.environ:
    os.environ[_RUN_CACHE] = tempfile.mkdtemp(prefix="memfit-test-cache-")
os.environ[CACHE_ENV] = os.environ[_RUN_CACHE]

# Small shapes keep the suite in budget; deep ImageNet-stem models at 32x32 still run every layer.
IMAGE_BATCH = 8
GPT_SEQ = 128
GPT2_SEQ = 32  # the 124M preset: its 50257-way head dominates, and bf16 matmuls are slow on CPU


def zoo_matrix() -> bool:
    """Whether this run is the whole zoo matrix (``make test-zoo``, MEMFIT_ZOO=1), not CI's subset."""
    return os.environ.get("MEMFIT_ZOO") == "1"


def models_matrix() -> bool:
    """Whether this run is the whole foreign-model matrix (``make test-models``, MEMFIT_MODELS=all)."""
    return os.environ.get("MEMFIT_MODELS") == "all"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Zoo-matrix cases beyond CI's 15 minutes run only when asked for (``make test-zoo``), and so
    do the foreign models beyond CI's subset (``make test-models``)."""
    skips = []
    if not zoo_matrix():
        skips.append(
            ("zoo", pytest.mark.skip(reason="zoo matrix beyond CI's budget: run `make test-zoo` (MEMFIT_ZOO=1)"))
        )
    if not models_matrix():
        reason = "foreign model beyond CI's subset: run `make test-models` (MEMFIT_MODELS=all)"
        skips.append(("models", pytest.mark.skip(reason=reason)))
    for item in items:
        for marker, skip in skips:
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


def free_port() -> int:
    """A free TCP port on localhost, for a torchrun job's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zoo_case(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A zoo model and a small training batch for it, deterministic."""
    torch.manual_seed(0)
    if name.startswith("gpt"):
        model = memfit.models.create(name)
        batch, seq = (2, GPT_SEQ) if name == "gpt" else (1, GPT2_SEQ)
        return model, torch.randint(0, model.wte.num_embeddings, (batch, seq))
    # 32x32 through an ImageNet stem leaves 8x8 maps, where weights and not activations set the peak
    kwargs = {"stem": "cifar"} if name.startswith(("vgg", "resnet")) else {}
    if name != "densenet_bc_100":
        kwargs["num_classes"] = 10
    model = memfit.models.create(name, **kwargs)
    return model, torch.randn(IMAGE_BATCH, 3, 32, 32)


@pytest.fixture
def small_cnn() -> torch.nn.Module:
    """A tiny CNN with BatchNorm and dropout, fast enough for many tests."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(16, 10),
    )


@pytest.fixture
def fresh_timing_cache(tmp_path, monkeypatch):
    """An empty cache directory and no time calibration in memory, as in a new process; timing on."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(timing.TIMING_ENV, "on")
    monkeypatch.setattr(timing, "_cache", DiskCache(timing._cache.kind, timing._cache.decode))
    monkeypatch.setattr(pace, "_context", DiskCache(pace._context.kind, pace._context.decode))
    monkeypatch.setattr(pace, "_this_process", {})
    monkeypatch.setattr(checkpointing, "_fixed", DiskCache(checkpointing._fixed.kind, checkpointing._fixed.decode))
    monkeypatch.setattr(checkpointing, "_chains", DiskCache(checkpointing._chains.kind, checkpointing._chains.decode))
    return tmp_path
