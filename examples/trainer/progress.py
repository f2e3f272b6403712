"""How far the run is (saved with every checkpoint), how it is shown, and how it is stopped."""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
from pathlib import Path
from typing import Any, final

from .distributed import Context, all_sum

__all__ = ["Bar", "Progress", "StopRequest", "plot_curves"]


@dataclasses.dataclass
class Progress:
    """Where the run is; saved in the checkpoint so a resumed run continues exactly."""

    epoch: int = 0  # the epoch in progress (or the number of finished epochs at a boundary)
    step_in_epoch: int = 0  # batches of ``epoch`` already trained
    step: int = 0  # optimizer steps since the start of the run
    loss_sum: float = 0.0  # this process's running sums over the epoch in progress
    correct: float = 0.0
    seen: float = 0.0
    epoch_seconds: float = 0.0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # per finished epoch
    step_losses: list[float] = dataclasses.field(default_factory=list)  # rank 0's loss per step


@final
class StopRequest:
    """Ctrl-C and SIGTERM ask the loop to stop after the current step (a second Ctrl-C: at once)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        # signal handlers can only be installed from the main thread (tests call main() from others)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        if self.ctx.main:
            print(
                f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                "(Ctrl-C again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

    def agreed(self) -> bool:
        """Whether any process was asked to stop (all stop at the same step)."""
        if not self.ctx.distributed:
            return self.requested
        return all_sum(self.ctx, [float(self.requested)])[0] > 0


class Bar:
    """A progress bar (tqdm) or plain lines, on rank 0: loss, accuracy, samples/s."""

    def __init__(self, mode: str, ctx: Context, epoch: int, epochs: int, total: int, done: int) -> None:
        self.enabled = ctx.main and mode != "none"
        self.tqdm = None
        self.every = max(1, total // 5)
        self.epoch, self.epochs, self.total = epoch, epochs, total
        if self.enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty())):
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.tqdm = tqdm(
                    total=total,
                    initial=done,
                    desc=f"epoch {epoch + 1}/{epochs}",
                    unit="step",
                    dynamic_ncols=True,
                    leave=True,
                )

    def update(self, step: int, loss: float, acc: float, rate: float) -> None:
        """Show step ``step`` of the epoch with the running loss, accuracy and samples/s."""
        if not self.enabled:
            return
        if self.tqdm is not None:
            self.tqdm.set_postfix(loss=f"{loss:.4f}", acc=f"{100 * acc:.1f}%", samples_s=f"{rate:.0f}", refresh=False)
            self.tqdm.update(1)
        elif step % self.every == 0 or step == self.total:
            print(
                f"epoch {self.epoch + 1}/{self.epochs} step {step}/{self.total}  loss {loss:.4f}  "
                f"acc {100 * acc:.1f}%  {rate:.0f} samples/s",
                flush=True,
            )

    def close(self) -> None:
        """End the bar's line."""
        if self.tqdm is not None:
            self.tqdm.close()


def plot_curves(progress: Progress, steps_per_epoch: int, path: Path) -> Path:
    """Loss per step and per epoch, accuracy per epoch (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if progress.step_losses:
        xs = [(i + 1) / steps_per_epoch for i in range(len(progress.step_losses))]
        ax_loss.plot(xs, progress.step_losses, color="0.7", linewidth=0.8, label="train (per step)")
    epochs = [h["epoch"] for h in progress.history]
    if epochs:
        ax_loss.plot(epochs, [h["train_loss"] for h in progress.history], "o-", label="train (epoch mean)")
        ax_loss.plot(epochs, [h["test_loss"] for h in progress.history], "s-", label="test")
        ax_acc.plot(epochs, [100 * h["train_accuracy"] for h in progress.history], "o-", label="train")
        ax_acc.plot(epochs, [100 * h["test_accuracy"] for h in progress.history], "s-", label="test")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy (log scale)")
    ax_loss.set_yscale("log")
    ax_loss.set_title("loss")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
