"""The end of a run: the measured peak beside the predicted one, metrics.json, curves.png."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import torch

import memfit

from . import checkpoints
from .distributed import gather, state_digest
from .planning import summary
from .progress import plot_curves
from .trainer import MEMORY_PNG, Trainer

__all__ = ["CURVES_PNG", "METRICS", "finish"]

MiB = 2**20
METRICS = "metrics.json"
CURVES_PNG = "curves.png"


def measured_peak(trainer: Trainer) -> tuple[float | None, str]:
    """The peak of a real training step (MiB) and how it was measured; None on ranks that do not."""
    args, ctx = trainer.args, trainer.ctx
    if ctx.device.type == "cuda":
        return (
            torch.cuda.max_memory_allocated(ctx.device) / MiB,
            "torch.cuda.max_memory_allocated over the training steps",
        )
    # measuring trains a copy: the run's own random numbers must not move
    with torch.random.fork_rng(devices=[]):
        if ctx.distributed:  # every process measures a wrapped copy: DDP's construction is collective
            replica = memfit.distributed.wrap(copy.deepcopy(trainer.module), trainer.prep.parallel)
            peak, _ = memfit.distributed.measure(
                replica, trainer.x_example, optimizer=trainer.factory, amp=args.amp, accumulate=args.accumulate > 1
            )
            return (
                max(gather(ctx, peak / MiB)),
                "one real step of a DDP-wrapped copy on every process, allocator level (profiler), the largest",
            )
        if not ctx.main:
            return None, ""
        report = memfit.measure(
            trainer.module, trainer.x_example, optimizer=trainer.factory, amp=args.amp, accumulate=args.accumulate > 1
        )
        return report.peak_mb, "memfit.measure: one real step on a copy of the module, allocator level"


def finish(trainer: Trainer) -> None:
    """Measured peak beside the predicted one, metrics.json, curves.png, and where files went."""
    args, ctx, prep, progress, out = trainer.args, trainer.ctx, trainer.prep, trainer.progress, trainer.out
    predicted = prep.plan.peak_after_bytes / MiB
    measured, how = measured_peak(trainer)
    digests = gather(ctx, state_digest(trainer.module)) if ctx.distributed else None
    if not ctx.main:
        return
    files = {
        p.name: p.stat().st_size
        for p in (out / name for name in (checkpoints.CHECKPOINT, checkpoints.PACKED, checkpoints.TRAIN_STATE))
        if p.exists()
    }
    plot_curves(progress, max(1, trainer.batches_per_epoch), out / CURVES_PNG)
    last = progress.history[-1] if progress.history else {}
    data = trainer.data
    metrics: dict[str, Any] = {
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "device": str(ctx.device),
        "world_size": ctx.world,
        "model": {
            "name": args.model,
            "parameters": trainer.n_params,
            "compressed": checkpoints.compressed(trainer.module),
        },
        "data": {
            "name": args.data,
            "train": trainer.n_train,
            "test": len(data.y_test),
            "shape": list(data.x_train.shape[1:]),
            "num_classes": data.num_classes,
        },
        "plan": summary(prep),
        "memory": {
            "predicted_peak_mb": predicted,
            "predicted_how": (
                "memfit dry run of one step (the planned step when planned)"
                + (", per DDP process, buckets included" if ctx.distributed else "")
            ),
            "measured_peak_mb": measured,
            "measured_how": how,
        },
        "epochs": progress.history,
        "step_losses": progress.step_losses,
        "final": {
            "epoch": progress.epoch,
            "step": progress.step,
            "completed": progress.epoch >= args.epochs,
            "stopped": trainer.stopped,
            "test_accuracy": last.get("test_accuracy"),
            "test_loss": last.get("test_loss"),
        },
        "throughput_samples_per_s": (
            sum(h["samples_per_s"] for h in progress.history) / len(progress.history) if progress.history else None
        ),
        "files": files,
        "seconds": {
            "planning": prep.planning_s,
            "training": trainer.train_s,
            "total": time.perf_counter() - trainer.started,
        },
    }
    if digests is not None:
        metrics["replicas"] = {"param_digests": digests, "equal": len(set(digests)) == 1}
    with open(out / METRICS, "w") as f:
        json.dump(metrics, f, indent=2)

    print()
    print(
        f"Peak of a training step (MiB, predicted): {predicted:.2f}"
        + (" (per DDP process, buckets included)" if ctx.distributed else "")
    )
    if measured is not None:
        print(f"Peak of a training step (MiB, measured):  {measured:.2f}  [{how}]")
    if last:
        print(
            f"Test accuracy after epoch {last['epoch']}: {100 * last['test_accuracy']:.2f}% "
            f"(loss {last['test_loss']:.4f})"
        )
    if digests is not None:
        print(f"Replicas' parameters: {'equal' if len(set(digests)) == 1 else 'DIFFERENT'} over {ctx.world} processes")
    if trainer.stopped == "interrupted":
        print(f"Interrupted at step {progress.step}: continue with --resume --out {out}")
    elif trainer.stopped == "max_steps":
        print(f"Stopped at --max-steps {args.max_steps} (step {progress.step}): continue with --resume --out {out}")
    print(
        f"Files in {out}/: "
        + ", ".join(f"{name} ({size / 1024:.1f} KiB)" for name, size in files.items())
        + f", {METRICS}, {MEMORY_PNG}, {CURVES_PNG}"
    )
    print(
        f"Time (s, measured): planning {prep.planning_s:.1f}, training {trainer.train_s:.1f}, "
        f"total {time.perf_counter() - trainer.started:.1f}"
    )
