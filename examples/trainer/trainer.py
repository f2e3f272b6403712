"""One run: data, prepared module, optimizer and schedule, the training loop and its checkpoints."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import memfit

from . import checkpoints, steps
from .data import epoch_batches, load_data
from .distributed import Context, all_sum, gather, sync_buffers
from .planning import create_model, optimizer_factory, prepare
from .progress import Bar, Progress, StopRequest

__all__ = ["MEMORY_PNG", "Trainer"]

MEMORY_PNG = "memory.png"


class Trainer:
    """One run: the data, the prepared module, its optimizer and schedule, and the progress."""

    def __init__(self, args: argparse.Namespace, ctx: Context) -> None:
        self.args, self.ctx = args, ctx
        self.started = time.perf_counter()
        self.out = Path(args.out)
        if args.resume and not any(
            (self.out / name).exists() for name in (checkpoints.CHECKPOINT, checkpoints.TRAIN_STATE)
        ):
            raise memfit.MemfitInputError(
                f"--resume: no {checkpoints.CHECKPOINT} or {checkpoints.TRAIN_STATE} in "
                f"{self.out} (a run writes one after its first epoch, at --max-steps or "
                "when interrupted)"
            )
        if ctx.main:
            checkpoints.output_folder(self.out)
        self.data = data = load_data(args)
        self.n_train = len(data.y_train)
        if self.n_train // ctx.world < args.batch_size:
            raise memfit.MemfitInputError(
                f"--batch-size {args.batch_size} is larger than a process's share of the {self.n_train} training images"
            )
        model = create_model(args, data.num_classes)
        if args.init:
            checkpoints.load_init(model, args.init)
        self.n_params = sum(p.numel() for p in model.parameters())
        # what memfit plans and measures: one micro-batch (the whole batch without accumulation)
        self.x_example = data.x_train[: args.batch_size // args.accumulate].to(ctx.device)
        ctx.log(
            f"model {args.model} ({self.n_params / 1e6:.3f} M parameters), data {args.data}: {self.n_train} "
            f"train / {len(data.y_test)} test images {list(data.x_train.shape[1:])}, {data.num_classes} classes"
        )
        ctx.log(
            f"device {ctx.device}, {ctx.world} process{'es' if ctx.distributed else ''}, batch {args.batch_size} "
            f"per process ({args.batch_size * ctx.world} in all), {args.optimizer} lr {args.lr:g}, "
            f"precision {args.amp or 'fp32'}"
        )

        self.prep = prepare(args, model, self.x_example, ctx)
        self.module = self.prep.module
        self._print_plan()

        self.factory = optimizer_factory(args)
        self.optimizer = self.factory([p for p in self.module.parameters() if p.requires_grad])
        self.batches_per_epoch = math.ceil(self.n_train / ctx.world) // args.batch_size
        total = self.batches_per_epoch * args.epochs

        def lr_at(step: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(step, total) / total)) if args.schedule == "cosine" else 1.0

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_at)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp == "fp16")
        self.progress = Progress()
        self.stopped: str | None = None  # "interrupted" or "max_steps"
        self.train_s = 0.0

    def _print_plan(self) -> None:
        ctx, prep, args = self.ctx, self.prep, self.args
        ctx.log("")
        ctx.log(prep.plan)
        if prep.planned and memfit.Budget.parse(args.budget_mb).fraction is not None:
            ctx.log(f"Budget {args.budget_mb} of the unplanned predicted peak: {prep.budget_mb:.2f} MiB")
        if ctx.distributed:
            ctx.log(
                f"DDP, {ctx.world} processes: figures are per process; gradients are views into DDP's buckets "
                f"(gradient_as_bucket_view=True), which the predicted peak holds for the whole step"
            )
        if ctx.main:
            memfit.plot_plan(prep.plan, self.out / MEMORY_PNG)

    # ---- checkpoints

    def restore(self) -> None:
        """Continue from the checkpoint in ``--out`` (``--resume``)."""
        args, ctx = self.args, self.ctx
        payload = checkpoints.load(self.out, checkpoints.compressed(self.module), ctx.device)
        saved_args = payload.get("args", {})
        for key in checkpoints.RESUME_KEYS:
            now = getattr(args, key)
            now = list(now) if isinstance(now, tuple) else now
            if key in saved_args and saved_args[key] != now:
                ctx.log(
                    f"warning: --{key.replace('_', '-')} is {now!r}, the checkpoint's run had "
                    f"{saved_args[key]!r}: the result will differ from an uninterrupted run"
                )
        if payload.get("world_size") != ctx.world:
            ctx.log(
                f"warning: the checkpoint was written by {payload.get('world_size')} processes, this run has "
                f"{ctx.world}: the data order differs from an uninterrupted run"
            )
        try:
            self.module.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise memfit.MemfitInputError(f"--resume: the checkpoint does not fit this model and optimizer: {e}") from e
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        self.progress = Progress(**payload["progress"])
        rng = payload.get("rng") or []
        if ctx.rank < len(rng):
            checkpoints.set_rng_state(rng[ctx.rank], ctx)
        ctx.log(
            f"resumed from {self.out}: epoch {self.progress.epoch + 1}, step {self.progress.step} "
            f"({self.progress.step_in_epoch} of the epoch's batches done)"
        )

    def checkpoint(self, rng: list[dict[str, Any]] | None = None) -> None:
        """Save (rank 0), with every process's RNG state unless ``rng`` is given."""
        states = rng if rng is not None else gather(self.ctx, checkpoints.rng_state(self.ctx))
        if self.ctx.main:
            checkpoints.save(
                self.out,
                self.module,
                self.optimizer,
                self.scheduler,
                self.scaler,
                self.progress,
                self.args,
                self.ctx,
                states,
            )

    # ---- training

    def train(self) -> None:
        """Train to ``--epochs`` (or ``--max-steps``, or an interruption), saving after every epoch."""
        args, ctx, module = self.args, self.ctx, self.module
        if args.resume:
            self.restore()
        else:
            torch.manual_seed(args.seed + 1)  # the training's own RNG (dropout): planning cannot shift it
        progress = self.progress
        net: nn.Module = module
        if ctx.distributed:
            net = memfit.distributed.wrap(
                module, self.prep.parallel, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)

        def reached_max() -> bool:
            return args.max_steps is not None and progress.step >= args.max_steps

        saved_step = -1
        in_update = False
        started = time.perf_counter()
        with StopRequest(ctx) as stop:
            try:
                while progress.epoch < args.epochs and not self.stopped:
                    if reached_max():
                        self.stopped = "max_steps"
                        break
                    epoch = progress.epoch
                    if progress.step_in_epoch == 0:
                        progress.loss_sum = progress.correct = progress.seen = progress.epoch_seconds = 0.0
                        self._maybe_freeze(epoch)
                    batches = epoch_batches(self.n_train, args.batch_size, epoch, args.seed, ctx.rank, ctx.world)
                    bar = Bar(args.progress, ctx, epoch, args.epochs, len(batches), progress.step_in_epoch)
                    epoch_started = time.perf_counter()
                    samples = 0
                    for k in range(progress.step_in_epoch, len(batches)):
                        if reached_max():
                            self.stopped = "max_steps"
                            break
                        xb = self.data.x_train[batches[k]].to(ctx.device, non_blocking=True)
                        yb = self.data.y_train[batches[k]].to(ctx.device, non_blocking=True)
                        loss, correct = steps.train_step(
                            net, self.optimizer, self.scaler, xb, yb, args.amp, ctx.device, args.accumulate
                        )
                        in_update = True  # an interruption from here to the counters would tear the step
                        steps.apply_update(self.optimizer, self.scaler, self.scheduler)
                        progress.step_in_epoch, progress.step = k + 1, progress.step + 1
                        in_update = False
                        progress.loss_sum += loss * len(yb)
                        progress.correct += correct
                        progress.seen += len(yb)
                        progress.step_losses.append(loss)
                        samples += len(yb) * ctx.world
                        rate = samples / max(1e-9, time.perf_counter() - epoch_started)
                        bar.update(k + 1, progress.loss_sum / progress.seen, progress.correct / progress.seen, rate)
                        if stop.agreed():
                            self.stopped = "interrupted"
                            break
                    bar.close()
                    progress.epoch_seconds += time.perf_counter() - epoch_started
                    if not self.stopped:
                        self._end_epoch(epoch)
                        self.checkpoint()
                        saved_step = progress.step
                sync_buffers(module, ctx)
                if self.stopped and saved_step != progress.step:
                    self.checkpoint()
            except KeyboardInterrupt:  # a second Ctrl-C, or no handler (not the main thread)
                self.stopped = "interrupted"
                if in_update:
                    print("\ninterrupted during the optimizer update: the last checkpoint stands", file=sys.stderr)
                else:  # the model and optimizer are as after the last finished step
                    print("\ninterrupted: saving a checkpoint", file=sys.stderr)
                    self.checkpoint([checkpoints.rng_state(ctx)])
                raise
        self.train_s = time.perf_counter() - started

    def _maybe_freeze(self, epoch: int) -> None:
        """EC2T phase 2 for the last ``--freeze-epochs`` epochs of a ternary model."""
        args = self.args
        if args.compress == "ternary" and args.freeze_epochs and epoch == max(0, args.epochs - args.freeze_epochs):
            frozen = memfit.compressors.ternary.freeze_assignment_(self.module)
            self.ctx.log(
                f"EC2T phase 2: froze the ternary codes of {frozen} layers for the last {args.freeze_epochs} epoch(s)"
            )

    def _end_epoch(self, epoch: int) -> None:
        """Sum the epoch's training figures over the processes, evaluate, record."""
        ctx, progress, args = self.ctx, self.progress, self.args
        loss_sum, correct, seen = all_sum(ctx, [progress.loss_sum, progress.correct, progress.seen])
        sync_buffers(self.module, ctx)
        steps.recalibrate_bn(self.module, self.data.x_train, args.recalibrate_bn, args.batch_size, ctx, args.amp)
        test_loss, test_acc = steps.evaluate(self.module, self.data.x_test, self.data.y_test, ctx, args.amp)
        record = {
            "epoch": epoch + 1,
            "step": progress.step,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "seconds": progress.epoch_seconds,
            "samples_per_s": seen / max(1e-9, progress.epoch_seconds),
            "lr": self.scheduler.get_last_lr()[0],
        }
        progress.history.append(record)
        progress.epoch, progress.step_in_epoch = epoch + 1, 0
        ctx.log(
            f"epoch {epoch + 1}/{args.epochs}: train loss {record['train_loss']:.4f} acc "
            f"{100 * record['train_accuracy']:.2f}%, test loss {test_loss:.4f} acc {100 * test_acc:.2f}%, "
            f"{record['samples_per_s']:.0f} samples/s, {progress.epoch_seconds:.1f} s"
        )
