"""Data parallelism in the cost model: DDP's buckets, FSDP's shards, and a real 2-process gloo job."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import memfit

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
GLOO_ABORT = "terminate called without an active exception"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    # rows 10, 7 and 3: none divides evenly by 4, so FSDP pads every shard
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3))


def _sharded_bytes(model: nn.Module, world: int) -> int:
    return sum(math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0]) * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fsdp_keeps_a_padded_shard_of_parameters_gradients_and_optimizer_state(world: int) -> None:
    model, x = _mlp(), torch.randn(16, 12)
    r = memfit.estimate(model, x, optimizer="adam", calibrate=False, parallel=memfit.Parallel("fsdp", world))
    shard = _sharded_bytes(model, world)
    assert r.parameters_bytes == shard
    assert r.gradients_bytes == shard
    steps = 4 * len(list(model.parameters()))  # Adam's step counts: one float32 scalar per parameter, whole
    assert r.optimizer_bytes == 2 * shard + steps
    assert "FSDP, " in r.description and "per process" in r.description


def test_ddp_holds_every_gradient_in_its_buckets_for_the_whole_step() -> None:
    model, x = _mlp(), torch.randn(16, 12)
    alone = memfit.estimate(model, x, optimizer="sgd", calibrate=False)
    ddp = memfit.estimate(model, x, optimizer="sgd", calibrate=False, parallel=memfit.Parallel("ddp", 8))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters())
    assert ddp.gradients_bytes == trainable
    assert ddp.parameters_bytes == alone.parameters_bytes
    # the buckets are there from the start; a gradient, once copied into them, is freed
    assert ddp.peak_breakdown["gradient"] >= trainable
    assert alone.peak_bytes <= ddp.peak_bytes <= alone.peak_bytes + trainable


def test_fsdp_lets_a_budget_fit_that_one_process_cannot() -> None:
    torch.manual_seed(0)
    model = memfit.models.create("resnet18", stem="cifar", num_classes=10, width=16)
    x = torch.randn(4, 3, 32, 32)
    budget = 0.9 * memfit.minimum(model, x, optimizer="adam", strategy="dp")
    with pytest.raises(memfit.MemfitBudgetError):
        memfit.optimize(model, budget, x, optimizer="adam", strategy="dp")
    blocks = tuple(f"layer{i}.{j}" for i in range(1, 5) for j in range(2))
    parallel = memfit.Parallel("fsdp", 8, units=blocks)
    planned = memfit.optimize(model, budget, x, optimizer="adam", strategy="dp", parallel=parallel)
    assert planned.plan.peak_after_bytes <= budget * 2**20
    assert planned.report.before.parameters_bytes == planned.report.after.parameters_bytes == _sharded_bytes(model, 8)


def test_bad_parallel_settings_say_what_to_do() -> None:
    with pytest.raises(memfit.MemfitInputError, match="kind must be one of"):
        memfit.Parallel("zero3", 2)
    with pytest.raises(memfit.MemfitInputError, match="positive integer"):
        memfit.Parallel("fsdp", 0)
    with pytest.raises(memfit.MemfitInputError, match="leave them out for DDP"):
        memfit.Parallel("ddp", 2, units=("0",))
    with pytest.raises(memfit.MemfitInputError, match=r"unit 'encoder' holds no parameters.*such as '0'"):
        memfit.estimate(
            _mlp(), torch.randn(4, 12), calibrate=False, parallel=memfit.Parallel("fsdp", 2, units=("encoder",))
        )


def test_wrap_needs_an_initialised_process_group() -> None:
    with pytest.raises(memfit.MemfitInputError, match="init_process_group"):
        memfit.rewrite.distributed.wrap(_mlp(), memfit.Parallel("ddp", 2))


def test_a_real_two_process_job_stays_within_the_prediction_and_the_budget(tmp_path: Path) -> None:
    """benchmarks/parallel.py under torchrun: DDP and FSDP (default units and per block), unplanned
    and planned halfway between the feasible minimum and the unplanned peak, measured by the
    profiler on every process."""
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}

    def job() -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(ROOT / "benchmarks" / "parallel.py"),
            "--fractions",
            "0.5",
            "--json",
            str(out),
        ]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)

    proc = job()
    if proc.returncode != 0 and GLOO_ABORT in proc.stderr:
        # a native thread of gloo or of the profiler aborted the process, seen twice in some
        # thirty runs on a loaded machine; the measurement itself is what this test is about
        proc = job()
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {(r["parallel"], r["fraction"]) for r in rows} == {(k, f) for k in ("ddp", "fsdp") for f in (None, 0.5)}
    for r in rows:
        where = (
            f"{r['parallel']} ({r['units']}) at {r['fraction']}: {r['measured_per_rank_mb']} vs {r['predicted_mb']:.3f}"
        )
        assert r["measured_mb"] <= r["predicted_mb"] * (1 + memfit.search.MARGIN), where
        # a bound, not a guess far above (gloo's late-release reserve makes FSDP's 10-25% high)
        assert r["measured_mb"] >= 0.65 * r["predicted_mb"], where
        if r["budget_mb"] is not None:
            assert r["predicted_mb"] <= r["budget_mb"] and r["measured_mb"] <= r["budget_mb"], where
