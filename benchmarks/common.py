"""What every benchmark part shares: cases, the training step, interleaved timing, tables.

Only memfit's public API is used here and in the parts, as a user would use it.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import random
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import memfit

MiB = 2**20
# Where memfit caches its calibrated workspaces and times (default ~/.cache/memfit).
CACHE_ENV = "MEMFIT_CACHE_DIR"
# A zoo CNN gets a CIFAR stem so that 32x32 inputs keep activations, not weights, dominant.
CIFAR_STEM = ("resnet", "vgg", "mobilenet")
# name -> (batch, per-sample shape, options of memfit.models.create): the plan-quality shapes
# (hand-written policies and predicted time are measured on them).
PLAN_QUALITY_MODELS: dict[str, tuple[int, str, dict[str, object]]] = {
    "gpt": (8, "128", {"n_embd": 128}),
    "resnet50": (4, "3x32x32", {}),
    "mobilenet_v2": (8, "3x32x32", {}),
}
# glibc's mallopt parameters, and the values that make it keep what a step frees.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# mallopt takes an int: 2 GiB is as far from trimming as it goes; 32 MiB is glibc's largest mmap threshold.
NEVER_TRIM, TOP_PAD, MMAP_THRESHOLD = 2**31 - 1, 2**30, 2**25


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a step frees, as CUDA's caching allocator does; True if it did.

    By default glibc hands large blocks back to the kernel and takes them again on the next
    step, and the page faults of that cost system CPU time (a quarter of an unplanned GPT step
    here, 35,556 minor faults a step) that follows the heap's history, not the step's work:
    interleaved in one process, two policies that recompute the same two blocks measured +18.8%
    and +9.7% (docs/benchmarks.md). With freed memory kept, a steady step faults no page. Peaks
    are the allocator's accounting (the profiler's events) and do not change.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):
        return False
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, NEVER_TRIM), (M_TOP_PAD, TOP_PAD))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


# Untimed steps of every module before timing: the kept heap takes three steps to stop growing.
WARMUP_STEPS = 3


@dataclass
class Case:
    """A model and the batch it trains on."""

    name: str
    model: nn.Module
    x: torch.Tensor

    @property
    def shape(self) -> str:
        """The batch's shape as ``8x3x32x32``."""
        return "x".join(str(d) for d in self.x.shape)


def build_case(name: str, batch: int, shape: str, **options: object) -> Case:
    """A zoo model with 10 classes (a CIFAR stem for CNNs) and a seeded batch of ``shape`` per sample.

    ``shape`` is ``CxHxW`` for images and the sequence length for a GPT; ``options`` go to
    ``memfit.models.create`` and override the defaults above.
    """
    torch.manual_seed(0)
    is_lm = name.startswith("gpt")
    defaults: dict[str, object] = {} if is_lm else {"num_classes": 10}
    if name.startswith(CIFAR_STEM):
        defaults["stem"] = "cifar"
    model = memfit.models.create(name, **{**defaults, **options})
    if is_lm:
        return Case(name, model, torch.randint(0, model.config.vocab_size, (batch, int(shape))))
    return Case(name, model, images(batch, shape))


def images(batch: int, shape: str) -> torch.Tensor:
    """A seeded batch of images, ``shape`` per sample as ``CxHxW``."""
    torch.manual_seed(0)
    return torch.randn(batch, *(int(d) for d in shape.split("x")))


def loss_of(output: torch.Tensor) -> torch.Tensor:
    """memfit's default loss: cross-entropy against class 0, so that timed and planned steps agree."""
    logits = output.reshape(-1, output.shape[-1])
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


class Stepper:
    """One training step of a module as memfit plans it: forward, loss, backward, SGD, grads freed."""

    def __init__(self, module: nn.Module, x: torch.Tensor) -> None:
        """Put ``module`` in train mode with an SGD optimizer over its parameters."""
        self.module, self.x = module.train(), x
        self.optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)

    def __call__(self) -> torch.Tensor:
        """Run one step; the loss."""
        loss = loss_of(self.module(self.x))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class Rounds:
    """Training steps of several modules, timed in interleaved rounds; a later call goes on where
    the last one stopped (same copies, no second warm-up, the rotation continued).

    Every round steps every module asked for once, starting one further along the list each
    round, so all see the same load from the rest of the machine and none always runs first after
    another's frees. Every module steps WARMUP_STEPS times before timing (first-call allocations,
    oneDNN caches, compilation, and the heap growing to where, kept by :func:`keep_freed_memory`,
    no step faults a page). With ``copies`` > 1 each module is that many independent copies,
    and a round steps one of them, each in turn: where a module's tensors lie moves its step by
    more than a small plan recomputes (two copies of the unplanned GPT: 0.5 ms apart, a 97%
    budget's plan 2.4 ms), and rounds of one copy do not average that out. One copy a round keeps
    each step as warm as a single module's (stepping every copy every round, their working sets
    alternating in the caches, made each step 17-21% slower). The copies are all deep copies,
    one of every module in turn, and the modules given are not stepped: the given ones are not
    alike (the model was made before planning, in an empty heap; a plan and the control share its
    parameters, so in the rounds of their first copies the second to step found weights the first
    had just updated in the caches, where the eager copy's were its own).
    """

    def __init__(self, modules: dict[str, nn.Module], x: torch.Tensor, copies: int = 1) -> None:
        """Make the copies and warm every one up."""
        self.names = list(modules)
        self.copies = copies
        self.steppers: dict[str, list[Stepper]] = {n: [] for n in self.names}
        for _ in range(copies):
            for n in self.names:
                # one copy keeps the module itself: a compiled module cannot be copied
                self.steppers[n].append(Stepper(copy.deepcopy(modules[n]) if copies > 1 else modules[n], x))
        self.done = 0  # rounds timed so far, over all calls
        with one_thread():
            for _ in range(WARMUP_STEPS):
                for n in self.names:
                    for step in self.steppers[n]:
                        step()

    def __call__(self, rounds: int, names: Sequence[str] | None = None) -> dict[str, list[float]]:
        """Each of ``names`` (default: all) stepped once in each of ``rounds`` more rounds: its
        step's CPU time (seconds) per round."""
        names = list(names or self.names)
        rounds = max(1, rounds)
        took: dict[str, list[float]] = {n: [] for n in names}
        with one_thread():
            for r in range(self.done, self.done + rounds):
                shift = r % len(names)
                # a copy for a whole cycle of orders, so that no copy always runs in one order
                which = r // len(names) % self.copies
                for n in names[shift:] + names[:shift]:
                    t0 = time.process_time()
                    self.steppers[n][which]()
                    took[n].append(time.process_time() - t0)
        self.done += rounds
        return took


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread: CPU time then counts the work of a step, not how the
    scheduler shared the cores with the neighbours' processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def step_times(modules: dict[str, nn.Module], x: torch.Tensor, rounds: int, copies: int = 1) -> dict[str, list[float]]:
    """Every module's training-step CPU time (seconds) in each of ``rounds`` interleaved rounds
    (:class:`Rounds`, called once)."""
    return Rounds(modules, x, copies)(rounds)


def median_ratio(took: Sequence[float], reference: Sequence[float]) -> float:
    """The median over rounds of a step's time over the reference's in the same round: a median
    of per-round ratios cancels slow spells that hit a whole round."""
    return statistics.median(a / b for a, b in zip(took, reference, strict=True))


def time_ratios(
    modules: dict[str, nn.Module], reference: str, x: torch.Tensor, rounds: int
) -> tuple[dict[str, float], float]:
    """Per module: :func:`median_ratio` of its step's CPU time over the reference's, timed by
    :func:`step_times`.

    Returns:
        The ratios (the reference's is 1) and the reference's median step in ms.
    """
    took = step_times(modules, x, rounds)
    ratios = {n: median_ratio(t, took[reference]) for n, t in took.items()}
    return ratios, 1000 * statistics.median(took[reference])


def extra_interval(
    took: Sequence[float], reference: Sequence[float], coverage: float = 0.9, samples: int = 1000
) -> tuple[float, float]:
    """A bootstrap interval (seconds) of the measured extra time ``(median_ratio - 1) x median
    reference step``: the rounds resampled with replacement, ``coverage`` of the resampled
    figures between its ends. How far one run's figure can be trusted: on a shared machine a
    plan's step moves by several percent from round to round."""
    rng = random.Random(0)
    pairs = list(zip(took, reference, strict=True))
    figures = []
    for _ in range(samples):
        pick = rng.choices(pairs, k=len(pairs))
        ref = [b for _, b in pick]
        figures.append((median_ratio([a for a, _ in pick], ref) - 1) * statistics.median(ref))
    figures.sort()
    tail = (1 - coverage) / 2
    return figures[int(tail * (samples - 1))], figures[int((1 - tail) * (samples - 1))]


def levels_between(low: float, high: float, levels: Sequence[float]) -> list[float]:
    """Budgets at fractions ``levels`` of the way from ``low`` to ``high``."""
    return [low + level * (high - low) for level in levels]


def plans_between(
    case: Case, strategy: str, high: float, levels: Sequence[float], **options: object
) -> tuple[float, list[tuple[float | None, float | None, nn.Module | str]]]:
    """A strategy's feasible minimum and its plans at ``levels`` of the way from it to ``high``.

    ``options`` go to ``memfit.minimum`` and ``memfit.optimize``. A plan that fails is its reason
    (``"n/a: ..."``); without a minimum there is one such row, with no level or budget.

    Returns:
        The minimum in MiB (NaN without one) and (level, budget MiB, planned module or reason) rows.
    """
    try:
        lowest = memfit.minimum(case.model, case.x, strategy=strategy, **options)
    except memfit.MemfitError as e:
        return float("nan"), [(None, None, f"n/a: {first_line(e)}")]
    rows: list[tuple[float | None, float | None, nn.Module | str]] = []
    for level, budget in zip(levels, levels_between(lowest, high, levels), strict=True):
        try:
            planned: nn.Module | str = memfit.optimize(case.model, budget, case.x, strategy=strategy, **options)
        except memfit.MemfitError as e:
            planned = f"n/a: {first_line(e)}"
        rows.append((level, budget, planned))
    return lowest, rows


def first_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    return line if len(line) <= 160 else line[:157] + "..."


def fmt(value: float | None, digits: int = 2) -> str:
    """A figure with fixed decimals, ``--`` where there is none."""
    return "--" if value is None else f"{value:.{digits}f}"


def level_cell(level: float | None) -> str:
    """A budget level as ``25%``, ``--`` where there is none."""
    return "--" if level is None else f"{level:.0%}"


def percent(ratio: float | None) -> str:
    """A time ratio as the overhead in percent, ``+12.3``."""
    return "--" if ratio is None else f"{100 * (ratio - 1):+.1f}"


def section(title: str) -> None:
    """A section heading."""
    print(f"\n== {title} ==\n", flush=True)


class Table:
    """Fixed-width rows printed as they are computed (a long run shows progress)."""

    def __init__(self, columns: list[tuple[str, str, int]], left: int = 1) -> None:
        """Print the header: column names, then what each column holds (pred, meas, given).

        Args:
            columns: (name, kind, width) per column.
            left: How many leading columns are names (left-aligned); the rest are figures.
        """
        self.widths = [w for _, _, w in columns]
        self.left = left
        names = self._fmt([c[0] for c in columns])
        print(names)
        print(self._fmt([c[1] for c in columns]))
        print("-" * len(names), flush=True)

    def _fmt(self, cells: list[str]) -> str:
        # a row with a note has fewer cells than columns
        pairs = enumerate(zip(cells, self.widths, strict=False))
        return "".join((f"{c:<{w}}" if i < self.left else f"{c:>{w}}") for i, (c, w) in pairs).rstrip()

    def row(self, *cells: object, note: str = "") -> None:
        """Print one row; a note (an n/a reason) follows the cells it replaces."""
        text = self._fmt([str(c) for c in cells])
        print(f"{text}  {note}" if note else text, flush=True)


def begin(timed: str = "") -> None:
    """Begin a run: print the versions and the step. A timing run passes ``timed`` (its threads, the
    load): glibc first keeps freed memory (:func:`keep_freed_memory`, before the run allocates),
    and the line says whether it does."""
    where = ""
    if timed:
        heap = "freed memory kept by malloc" if keep_freed_memory() else "freed memory returned to the OS"
        where = f", {timed}, {heap}"
    print(f"memfit {memfit.__version__}, torch {torch.__version__}{where}; step: SGD, fp32")


def footer(started: float) -> None:
    """What the labels mean, and the run's wall time."""
    print("\npred = predicted by memfit (nothing allocated); meas = measured on real tensors (allocator peak from")
    print("the profiler's memory events; step times in CPU time on one intra-op thread).")
    print(f"Total {time.perf_counter() - started:.0f} s (meas, wall).", flush=True)
