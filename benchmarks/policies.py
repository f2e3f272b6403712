"""Hand-written activation checkpointing against memfit at the same budgets.

The peers are the policies people write with torch.utils.checkpoint (non-reentrant) over a
model's blocks (GPT: its transformer blocks; ResNet: the residual blocks of its four stages;
MobileNetV2: the units of ``features``):

    every k      checkpoint(block) on every k-th block (k = 1: every block)
    seq k        checkpoint_sequential over all blocks in k segments (the last one is not
                 checkpointed, as checkpoint_sequential does)
    selective    every block under create_selective_checkpoint_contexts keeping the outputs of
                 matmuls, convolutions and attention (the rest recomputed)

Each peer's peak is measured once (memfit.measure); then memfit.optimize plans for budgets at
--levels of the way from memfit.minimum to the unplanned predicted peak, and each budget's row
sets memfit's plan beside the cheapest peer whose measured peak fits that budget. Step time:
CPU time on one intra-op thread, median over interleaved rounds of the ratio to the unplanned
step; overheads are in percent, delta = memfit's minus the peer's, in points.

    .venv/bin/python benchmarks/policies.py --quick                # GPT only, 3 rounds: ~2 minutes
    .venv/bin/python benchmarks/policies.py                        # gpt, resnet50, mobilenet_v2
    .venv/bin/python benchmarks/policies.py --models gpt --levels 50 --rounds 9
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import time
from collections.abc import Callable

import torch
from common import (
    PLAN_QUALITY_MODELS,
    Case,
    Table,
    begin,
    build_case,
    first_line,
    fmt,
    footer,
    levels_between,
    percent,
    section,
    time_ratios,
)
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential, create_selective_checkpoint_contexts

import memfit

aten = torch.ops.aten
# The block containers of each zoo family, in forward order: where a user puts checkpoint().
BLOCKS = {"GPT": ("h",), "ResNet": ("layer1", "layer2", "layer3", "layer4"), "MobileNetV2": ("features",)}
# What "keep matmul/conv/attention" saves: the expensive ops, whose outputs are the cheapest to keep
# per FLOP; everything else in the block (norms, activations, dropout, adds) is recomputed.
KEPT_OPS = [
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.convolution.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
]
LEVELS = [30, 60, 90, 97]


class Checkpointed(nn.Module):
    """A block run under torch.utils.checkpoint, optionally with a selective policy."""

    def __init__(self, block: nn.Module, context_fn: Callable | None = None) -> None:
        """Wrap ``block``; ``context_fn`` as checkpoint takes it (None: recompute everything)."""
        super().__init__()
        self.block = block
        self.context_fn = context_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output; its activations are recomputed in backward."""
        if self.context_fn is None:
            return checkpoint(self.block, x, use_reentrant=False)
        return checkpoint(self.block, x, use_reentrant=False, context_fn=self.context_fn)


class Sequential(nn.Module):
    """Blocks run in sequence through checkpoint_sequential."""

    def __init__(self, blocks: list[nn.Module], segments: int) -> None:
        """The blocks in order and the number of segments."""
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.segments = segments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output."""
        return checkpoint_sequential(self.blocks, self.segments, x, use_reentrant=False)


def block_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(container, child name) of every block, in forward order."""
    containers = [getattr(model, name) for name in BLOCKS[type(model).__name__]]
    return [(c, name) for c in containers for name, _ in c.named_children()]


def rewritten(model: nn.Module, wrap: Callable[[int, list[nn.Module]], list[nn.Module]]) -> nn.Module:
    """A copy of ``model`` whose blocks are replaced by ``wrap(blocks)`` (one module per block)."""
    out = copy.deepcopy(model)
    slots = block_slots(out)
    for (container, name), new in zip(slots, wrap(len(slots), [getattr(c, n) for c, n in slots]), strict=True):
        setattr(container, name, new)
    return out


def every(k: int) -> Callable[[nn.Module], nn.Module]:
    """The policy that checkpoints blocks 0, k, 2k, ..."""
    return lambda model: rewritten(
        model, lambda n, blocks: [Checkpointed(b) if i % k == 0 else b for i, b in enumerate(blocks)]
    )


def sequential(k: int) -> Callable[[nn.Module], nn.Module]:
    """The policy of checkpoint_sequential over all blocks in k segments (the others' slots: Identity)."""
    return lambda model: rewritten(model, lambda n, blocks: [Sequential(blocks, k)] + [nn.Identity()] * (n - 1))


def selective(model: nn.Module) -> nn.Module:
    """The policy that checkpoints every block keeping only KEPT_OPS' outputs."""
    context_fn = functools.partial(create_selective_checkpoint_contexts, KEPT_OPS)
    return rewritten(model, lambda n, blocks: [Checkpointed(b, context_fn) for b in blocks])


def peers(model: nn.Module) -> dict[str, nn.Module]:
    """Every hand-written policy, applied to copies of ``model``; by name."""
    n = len(block_slots(model))
    ks = sorted({k for k in (1, 2, 3, 4) if k < n})
    segments = sorted({k for k in (2, 4, round(math.sqrt(n))) if 1 < k <= n})
    out = {f"every {k}": every(k)(model) for k in ks}
    out.update({f"seq {k}": sequential(k)(model) for k in segments})
    out["selective"] = selective(model)
    return out


def run(case: Case, levels: list[float], rounds: int) -> list[tuple]:
    """Measure the peers and memfit's plans on one case; print the peers' table; the budget rows."""
    unplanned = memfit.estimate(case.model, case.x).peak_mb
    measured = memfit.measure(case.model, case.x).peak_mb
    minimum = memfit.minimum(case.model, case.x)
    print(
        f"{case.name} (batch {case.shape}): unplanned peak {unplanned:.2f} MiB (pred), {measured:.2f} MiB (meas); "
        f"memfit.minimum {minimum:.2f} MiB (pred)"
    )
    candidates: dict[str, nn.Module] = {"unplanned": case.model, **peers(case.model)}
    peaks = {name: memfit.measure(m, case.x).peak_mb for name, m in candidates.items()}
    plans: dict[float, nn.Module | str] = {}
    for budget in levels_between(minimum, unplanned, levels):
        try:
            plans[budget] = memfit.optimize(case.model, budget, case.x)
        except memfit.MemfitError as e:
            plans[budget] = first_line(e)
    for budget, planned in plans.items():
        if not isinstance(planned, str):
            candidates[f"memfit {budget:.2f}"] = planned
            peaks[f"memfit {budget:.2f}"] = memfit.measure(planned, case.x).peak_mb
    ratios, ms = time_ratios(candidates, "unplanned", case.x, rounds)
    table = Table([("peer", "", 14), ("peak MiB", "meas", 10), ("time %", "meas", 8)])
    for name in candidates:
        if not name.startswith("memfit"):
            table.row(name, fmt(peaks[name]), percent(ratios[name]))
    print(f"unplanned step: {ms:.0f} ms CPU (meas, median)\n")
    rows = []
    # equal budgets (a minimum at the unplanned peak) share one entry of plans
    for level, (budget, planned) in zip(levels, plans.items(), strict=False):
        fitting = [n for n in candidates if not n.startswith("memfit") and peaks[n] <= budget]
        best = min(fitting, key=lambda n: ratios[n]) if fitting else None
        key = f"memfit {budget:.2f}"
        mine = (planned.plan, peaks[key], ratios[key]) if key in candidates else planned
        rows.append((case.name, level, budget, mine, best and (best, peaks[best], ratios[best])))
    return rows


def summary(rows: list[tuple]) -> None:
    """memfit against the cheapest fitting peer at every budget."""
    section("memfit against the cheapest hand-written policy that fits the same budget")
    table = Table(
        [
            ("model", "", 14),
            ("level", "given", 7),
            ("budget", "MiB", 9),
            ("memfit", "", 13),
            ("peak MiB", "meas", 10),
            ("+FLOPs %", "pred", 10),
            ("time %", "pred", 8),
            ("time %", "meas", 8),
            ("best peer", "", 14),
            ("peak MiB", "meas", 10),
            ("time %", "meas", 8),
            ("delta", "points", 8),
        ]
    )
    for name, level, budget, mine, best in rows:
        peer = [best[0], fmt(best[1]), percent(best[2])] if best else ["none fits", "--", "--"]
        if isinstance(mine, str):
            table.row(name, f"{level:.0%}", fmt(budget), "n/a", "--", "--", "--", "--", *peer, "--", note=mine)
            continue
        plan, peak, ratio = mine
        over = "" if peak <= budget else "OVER the budget"
        delta = f"{100 * (ratio - best[2]):+.1f}" if best else "--"
        table.row(
            name,
            f"{level:.0%}",
            fmt(budget),
            plan.strategy,
            fmt(peak),
            fmt(plan.extra_flops_percent, 1),
            "--" if plan.extra_time_percent is None else f"{plan.extra_time_percent:+.1f}",
            percent(ratio),
            *peer,
            delta,
            note=over,
        )
    print("\ndelta > 0: memfit's plan costs more step time than the best hand-written policy that fits.")


def main(argv: list[str] | None = None) -> None:
    """Run the peers and memfit on each model and print the tables."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(PLAN_QUALITY_MODELS), default=None, help="default: all three")
    p.add_argument(
        "--batch", type=int, default=None, help="batch size (default per model: gpt 8, resnet50 4, mobilenet_v2 8)"
    )
    p.add_argument("--levels", nargs="+", type=float, default=LEVELS, help="budget levels in %% (default 30 60 90 97)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (default 7)")
    p.add_argument("--quick", action="store_true", help="gpt only, 3 rounds")
    args = p.parse_args(argv)
    names = args.models or (["gpt"] if args.quick else list(PLAN_QUALITY_MODELS))
    rounds = 3 if args.quick else args.rounds
    started = time.perf_counter()
    begin("1 intra-op thread")
    section("Hand-written policies (measured once) and memfit's plans at the budgets")
    rows = []
    for name in names:
        batch, shape, options = PLAN_QUALITY_MODELS[name]
        rows += run(build_case(name, args.batch or batch, shape, **options), [v / 100 for v in args.levels], rounds)
    summary(rows)
    footer(started)


if __name__ == "__main__":
    main()
