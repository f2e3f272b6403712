"""Hand-written checkpointing policies in memfit's search space: the blocks people checkpoint, the
policies over them, and auto never predicted costlier than the best of them that fits."""

from __future__ import annotations

import itertools

import pytest
import torch

import memfit
from memfit.capture.inputs import as_inputs
from memfit.capture.trainstep import StepConfig
from memfit.planner import handwritten
from memfit.search import PlanSearch


def _search(model: torch.nn.Module, x: torch.Tensor) -> PlanSearch:
    return PlanSearch(model, as_inputs(x), StepConfig(optimizer=None), [], None)


@pytest.fixture(scope="module")
def gpt() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return memfit.models.create("gpt", n_layer=4, n_embd=64), torch.randint(0, 8192, (4, 64))


def _block_names(search: PlanSearch, kind: list[tuple[int, int]]) -> list[str]:
    """The module every node of each block runs in, at the depth where they all agree."""
    names = []
    for a, b in kind:
        stacks = [search.graph.info(n).module_stack for n in search.chain.names[a:b]]
        common = [s for s in stacks[0] if all(s in other for other in stacks)]
        names.append(common[-1][0])
    return names


def test_blocks_are_the_modules_people_checkpoint(gpt: tuple[torch.nn.Module, torch.Tensor]) -> None:
    search = _search(*gpt)
    assert _block_names(search, search.chain.blocks[0]) == ["h.0", "h.1", "h.2", "h.3"]
    resnet = memfit.models.create("resnet18", stem="cifar", num_classes=10, width=8)
    search = _search(resnet, torch.randn(2, 3, 32, 32))
    assert _block_names(search, search.chain.blocks[0]) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    vgg = memfit.models.create("vgg11_bn", stem="cifar", num_classes=10)
    search = _search(vgg, torch.randn(2, 3, 32, 32))
    assert search.chain.blocks == [] and handwritten.policies(search.chain) == []
    assert handwritten.lowest_peak(search.chain) == [(0, search.chain.m, "plain")]


def test_the_policies_are_the_hand_written_ones(gpt: tuple[torch.nn.Module, torch.Tensor]) -> None:
    chain = _search(*gpt).chain
    index = {pos: k for k, pos in enumerate(chain.cands)}
    blocks = [(index[a], index[b]) for a, b in chain.blocks[0]]
    checkpointed = [[(a, b, k) for a, b, k in spans if k != "plain"] for spans in handwritten.policies(chain)]
    every_block = [(a, b, "recompute") for a, b in blocks]
    assert every_block in checkpointed
    assert [every_block[0], every_block[2]] in checkpointed  # every 2nd block
    # checkpoint_sequential(blocks, 2): the first half one checkpoint, the second plain
    assert [(blocks[0][0], blocks[1][1], "recompute")] in checkpointed
    assert [(a, b, "selective") for a, b in blocks] in checkpointed
    for spans in handwritten.policies(chain):  # each covers the chain once, in order
        assert spans[0][0] == 0 and spans[-1][1] == chain.m
        assert all(x[1] == y[0] for x, y in itertools.pairwise(spans))


def test_auto_is_never_predicted_costlier_than_a_fitting_hand_written_policy(
    gpt: tuple[torch.nn.Module, torch.Tensor],
) -> None:
    model, x = gpt
    search = _search(model, x)
    low, high = search.minimum_bytes(memfit.fit.AUTO_ORDER), search.unplanned.peak_bytes
    for fraction in (0.2, 0.5, 0.8):
        budget = int(low + fraction * (high - low))
        chosen = search.cheapest(budget, memfit.fit.AUTO_ORDER)
        fitting = [
            v.cost
            for spans in handwritten.policies(search.chain)
            if (v := search.verify(spans, "handwritten")) is not None and v.peak_bytes <= search.room(budget)
        ]
        assert fitting, f"no hand-written policy fits at {fraction:.0%}: the test checks nothing"
        assert chosen.cost <= min(fitting), (fraction, chosen.plan.strategy, chosen.cost, min(fitting))
