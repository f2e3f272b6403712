"""memfit.planner.chain: the chain model's segment costs, plan peaks and costs, candidate
boundaries and plan segments, on a hand-built four-node step whose every figure is derived by hand
below, and on a real captured model against the dry run of its rewrite."""

from __future__ import annotations

import dataclasses
from typing import Any

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

from memfit.capture.dryrun import capture
from memfit.capture.graph import CheckpointCost, MemGraph, NodeInfo
from memfit.capture.trace import trace
from memfit.capture.tracker import Event
from memfit.planner import Chain, Plan, Segment
from memfit.planner.plan import SegmentKind
from memfit.rewrite.checkpoint import rewrite

# The step x -> a -> b -> c -> d -> loss, sizes in bytes:
#   a  conv-like: 1000 FLOPs, parameter a.weight (10), output 400, saved by b
#   b  BatchNorm-like: saves a's output, writes the buffer bn.running_mean (16), output 200 saved by c
#   c  linear-like: 500 FLOPs, parameter c.weight (5), saves b's output, output 300 nobody saves
#   d  dropout-like: draws random numbers, output 8 (the model's), 1000 of backward kernel workspace
# Baseline: input 8 + parameters 15 + buffer 16 = 39.
#
# Hand-derived facts the tests use (positions a=0 .. d=3):
#   activations by producer       [400, 200, 0, 0]
#   bytes crossing boundary 0..4  [0, 400, 200, 300, 8]
#   temporaries at each backward  [404, 604, 504, 312], d's workspace added: [404, 604, 504, 1312]
#   gradients allocated           a 10, c 5: from position 0: 15, 1: 5, 2: 5, 3: 0
#   FLOP proxy (flops + 4*out)    [2600, 800, 1700, 32]
#   optimizer-phase peak          39 + 15 gradients + 15 scratch = 69
BASELINE = {0: (8, "input"), 1: (10, "parameter"), 2: (5, "parameter"), 3: (16, "buffer")}
NODES = [
    NodeInfo("x", "placeholder", "x", out_sids=(0,)),
    NodeInfo(
        "a",
        "call_module",
        "conv",
        module_path="conv",
        out_bytes=400,
        out_sids=(10,),
        params=("a.weight",),
        fwd_flops=1000,
    ),
    NodeInfo("b", "call_module", "bn", module_path="bn", out_bytes=200, out_sids=(11,), saved_sids=(10,), writes=(3,)),
    NodeInfo(
        "c",
        "call_module",
        "fc",
        module_path="fc",
        out_bytes=300,
        out_sids=(12,),
        saved_sids=(11,),
        params=("c.weight",),
        fwd_flops=500,
    ),
    NodeInfo("d", "call_function", "dropout", out_bytes=8, out_sids=(13,), random=True, workspace_bwd=1000),
]
SIZES = {
    10: 400,
    11: 200,
    12: 300,
    13: 8,
    14: 4,
    15: 8,
    16: 300,
    17: 5,
    18: 200,
    19: 400,
    20: 10,
    21: 15,
    22: 5000,
}  # 22: a forward scratch, in one test's events only
CATEGORIES = {10: "activation", 11: "activation", 17: "gradient", 20: "gradient"}  # the rest: temporary
EVENTS = [
    Event(10, 400, "forward", "a"),
    Event(11, 200, "forward", "b"),
    Event(12, 300, "forward", "c"),
    Event(13, 8, "forward", "d"),
    Event(12, -300, "forward", "d"),
    Event(14, 4, "forward", "loss"),
    Event(15, 8, "backward", "loss"),  # the output's gradient
    Event(13, -8, "backward", "loss"),
    Event(16, 300, "backward", "d"),  # c's output's gradient
    Event(15, -8, "backward", "d"),
    Event(17, 5, "backward", "c"),  # c.weight.grad
    Event(18, 200, "backward", "c"),
    Event(16, -300, "backward", "c"),
    Event(11, -200, "backward", "c"),
    Event(19, 400, "backward", "b"),
    Event(18, -200, "backward", "b"),
    Event(10, -400, "backward", "b"),
    Event(20, 10, "backward", "a"),  # a.weight.grad
    Event(19, -400, "backward", "a"),
    Event(14, -4, "backward", "a"),
    Event(21, 15, "optimizer", "optimizer"),
    Event(21, -15, "optimizer", "optimizer"),
]


def step(changes: dict[str, dict[str, Any]] | None = None, events: list[Event] = EVENTS, **graph: Any) -> MemGraph:
    """The hand-built step, with some NodeInfo fields (by node) or MemGraph fields changed."""
    dag = nx.DiGraph()
    for info in NODES:
        dag.add_node(info.name, info=dataclasses.replace(info, **(changes or {}).get(info.name, {})))
    dag.add_edges_from([("x", "a"), ("a", "b"), ("b", "c"), ("c", "d")])
    sizes = {sid: nbytes for sid, (nbytes, _) in BASELINE.items()} | SIZES
    built = MemGraph(
        dag=dag,
        order=[i.name for i in NODES],
        baseline=dict(BASELINE),
        categories={sid: CATEGORIES.get(sid, "temporary") for sid in SIZES},
        storage_bytes=sizes,
        events=events,
        batch_size=1,
        device="cpu",
        description="hand-built",
        buffer_names={3: "bn.running_mean"},
    )
    return dataclasses.replace(built, **graph)


def figures(chain: Chain, a: int, b: int, kind: SegmentKind, after_plain: bool = True) -> tuple[int, ...]:
    """(hold, local, cost, flops, recomputed) of candidate interval [a, b)."""
    s = chain.segment(a, b, kind, after_plain)
    return s.hold, s.local, s.cost, s.flops, s.recomputed


def test_the_chain_reads_the_graph_facts() -> None:
    chain = Chain(step())
    assert chain.names == ["a", "b", "c", "d"]
    assert chain.baseline == 39 and chain.total_act == 600 and chain.forward_flops == 1500
    assert chain.cut.tolist() == [0, 400, 200, 300, 8]
    assert chain._trans.tolist() == [404, 604, 504, 1312]  # d's backward workspace on top of its temporaries
    assert [chain.grads_from(k) for k in range(5)] == [15, 5, 5, 0, 0]
    assert chain.optimizer_peak == 69
    assert not chain.timed and chain.step_seconds == 0.0


def test_segment_costs_under_each_treatment() -> None:
    chain = Chain(step())
    assert chain.cands == [0, 1, 2, 3, 4]
    # [a, b) plain keeps both activations; checkpointed it keeps only b's output, which c reads.
    # While its backward runs: both activations and the largest transient, b's 604.
    assert figures(chain, 0, 2, "plain") == (600, 1204, 0, 0, 0)
    assert figures(chain, 0, 2, "recompute") == (200, 1204, 2600 + 800, 1000, 600)
    # selective keeps a's conv output (counted FLOPs) and recomputes b alone
    assert figures(chain, 0, 2, "selective") == (200 + 400, 1204, 800, 0, 200)
    # nested: twice the recomputation; at b's backward a's part holds its 400 output: 400 + 200 + 604
    assert figures(chain, 0, 2, "nested") == (200, 1204, 2 * 3400, 2000, 1200)
    assert figures(chain, 0, 4, "nested")[1] == 900 + 1312  # at d's: a's, b's and c's outputs held
    assert figures(chain, 2, 4, "nested")[1] == 300 + 1312  # what parts before c hold is not its own


def test_a_forward_temporary_crosses_the_cut_not_the_backward() -> None:
    scratch = [Event(22, 5000, "forward", "b"), Event(22, -5000, "forward", "b")]
    chain = Chain(step(events=[*EVENTS[:2], *scratch, *EVENTS[2:]]))
    assert chain.cut.tolist() == [0, 400, 5200, 300, 8]
    assert chain.segment(1, 2, "plain").local == 200 + 604


def test_a_selective_segment_keeps_a_cached_output_it_passes_on_once() -> None:
    # c's output is the matmul result the segment caches and what d reads after it: one storage
    assert figures(Chain(step()), 2, 3, "selective") == (300, 504, 0, 0, 0)


def test_a_checkpoint_after_a_plain_segment_holds_its_inputs() -> None:
    chain = Chain(step())
    # d reads c's unsaved output: checkpointing d keeps it as its input, unless the segment before
    # is checkpointed too and already counts it among what it passes on
    assert chain.segment(3, 4, "recompute", after_plain=True).hold == 8 + 300
    assert chain.segment(3, 4, "recompute", after_plain=False).hold == 8
    assert [s.hold for s in chain.costs([(0, 3, "plain"), (3, 4, "recompute")])] == [600, 308]
    assert [s.hold for s in chain.costs([(0, 3, "recompute"), (3, 4, "recompute")])] == [300, 8]


@pytest.mark.parametrize(
    ("spans", "peak"),
    [
        ([(0, 4, "plain")], 39 + 600 + 1312 + 15),
        # the peak at d's backward: [a, c) holds its 600, d's workspace and c's gradient on top
        ([(0, 2, "plain"), (2, 4, "plain")], 39 + 600 + 1312 + 5),
        # recomputing [a, b) holds only b's output until then
        ([(0, 2, "recompute"), (2, 4, "plain")], 39 + 200 + 1312 + 5),
        ([(0, 2, "selective"), (2, 4, "plain")], 39 + 600 + 1312 + 5),
        # one plain segment a node: at d's backward, before any gradient
        ([(0, 1, "plain"), (1, 2, "plain"), (2, 3, "plain"), (3, 4, "plain")], 39 + 600 + 1312),
    ],
)
def test_the_peak_of_a_plan(spans: list, peak: int) -> None:
    assert Chain(step()).peak(spans) == peak


def test_the_optimizer_phase_can_hold_the_peak() -> None:
    events = [*EVENTS[:-2], Event(21, 5000, "optimizer", "optimizer"), Event(21, -5000, "optimizer", "optimizer")]
    chain = Chain(step(events=events))
    assert chain.optimizer_peak == 39 + 15 + 5000
    assert chain.peak([(0, 4, "plain")]) == 5054


def test_the_cost_of_a_plan_sums_its_segments() -> None:
    chain = Chain(step())
    assert chain.cost([(0, 4, "plain")]) == 0
    assert chain.cost([(0, 2, "recompute"), (2, 4, "selective")]) == 3400 + 32  # c's matmul is kept
    assert chain.cost([(0, 1, "recompute"), (1, 4, "recompute")]) == 2600 + 800 + 1700 + 32


def test_candidates_are_cut_minima_topped_up_by_the_smallest_cuts() -> None:
    # cut [0, 400, 200, 300, 8]: boundary 2 is the local minimum, then 3 (300) before 1 (400)
    assert Chain(step(), max_candidates=3).cands == [0, 2, 4]
    assert Chain(step(), max_candidates=4).cands == [0, 2, 3, 4]


def tanh_mlp(blocks: bool) -> nn.Module:
    """Six Linear-Tanh pairs and a head; ``blocks``: each pair its own Sequential."""
    torch.manual_seed(0)
    pairs = [[nn.Linear(64, 64), nn.Tanh()] for _ in range(6)]
    layers = [nn.Sequential(*p) for p in pairs] if blocks else [m for p in pairs for m in p]
    return nn.Sequential(*layers, nn.Linear(64, 1))


def test_too_many_cut_minima_are_thinned_evenly_by_activation_memory() -> None:
    chain = Chain(capture(tanh_mlp(blocks=False), torch.randn(128, 64)), max_candidates=5)
    # The cut is flat (32 KiB) from boundary 1 to 12, then the head's 512 B: boundaries 2 .. 11 are
    # minima, weighed by the Tanh outputs (the saved activations) before them: 1, 1, 2, 2, .. 5.
    # Room for three: the marks at 1, 3 and 5 outputs take the first boundary at each.
    assert chain.cands == [0, 2, 6, 10, 13]


def test_block_boundaries_come_first_and_are_thinned_evenly() -> None:
    chain = Chain(capture(tanh_mlp(blocks=True), torch.randn(128, 64)), max_candidates=5)
    assert chain.blocks == [[(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)]]
    # room for three of the boundaries 2, 4, .. 12: the first, the middle one and the last
    assert chain.cands == [0, 2, 6, 12, 13]


def test_no_boundary_separates_an_in_place_write_from_what_it_mutates() -> None:
    chain = Chain(step({"d": {"inplace": True, "writes": (12,)}}))
    assert chain.cands == [0, 1, 2, 4]  # not between c and d: d writes into c's output
    # a selective segment must not keep c's output: d changes it after the forward
    assert chain.segment(2, 3, "selective").flops == 500
    assert Chain(step()).segment(2, 4, "selective").flops == 0
    [segment] = chain.to_segments([(2, 3, "selective")])
    assert segment.unsaved == ("c",)


def test_plan_segments_name_their_nodes_layers_buffers_and_randomness() -> None:
    first, second = Chain(step()).to_segments([(0, 2, "recompute"), (2, 4, "plain")])
    assert first == Segment(
        ("a", "b"),
        "recompute",
        kept_bytes=200,
        recomputed_bytes=600,
        recomputed_flops=1000,
        buffers=("bn.running_mean",),
        layers=("conv", "bn"),
    )
    assert second == Segment(("c", "d"), "plain", random=True, layers=("fc", "d"))


def test_a_nested_segment_is_cut_into_recomputed_parts() -> None:
    [nested, _] = Chain(step()).to_segments([(0, 2, "nested"), (2, 4, "plain")])
    assert nested.kind == "nested" and nested.recomputed_flops == 2000
    assert [(p.nodes, p.kind, p.kept_bytes) for p in nested.inner] == [
        (("a",), "recompute", 400),
        (("b",), "recompute", 200),
    ]


TIMES = {
    "a": {"fwd_seconds": 2e-6, "cheap_seconds": 1e-7, "operators": 2, "saved_tensors": 2},
    "b": {"fwd_seconds": 1e-6, "operators": 1, "saved_tensors": 1},
    "c": {"fwd_seconds": 3e-6, "cheap_seconds": 2e-7, "operators": 3, "saved_tensors": 3},
    "d": {"fwd_seconds": 5e-7, "operators": 1, "saved_tensors": 1},
}


EXTRA = CheckpointCost(segment=1e-5, per_saved_tensor=1e-7, selective_per_operator=2e-7)


def test_a_timed_chain_prices_recomputation_in_nanoseconds_until_the_last_saved_tensor() -> None:
    chain = Chain(step(TIMES, checkpoint_cost=EXTRA))
    assert chain.timed
    assert chain.step_seconds == pytest.approx(3 * 6.5e-6)  # unmeasured backwards take twice the forward
    # the nodes recomputed, the segment's fixed cost (10 us) once, and what checkpointing adds per
    # node it packs: with no node timed checkpointed, 100 ns per tensor the node saves. The
    # recomputation of [a, b) stops once b has packed its input (a's output): b is not run
    # again, but packs.
    assert chain.recomputed_nodes(0, 2) == ["a"]
    assert figures(chain, 0, 2, "recompute")[2] == 2000 + 10_000 + 200 + 100
    assert chain.segment(0, 2, "recompute").seconds == pytest.approx(12.3e-6)
    # c packs b's output before its matmul: a whole-chain recomputation runs a and b; c, where it
    # stops, packs its three
    assert chain.recomputed_nodes(0, 4) == ["a", "b"]
    assert figures(chain, 0, 4, "recompute")[2] == 2000 + 1000 + 10_000 + 200 + 100 + 300
    assert chain.recomputed_nodes(2, 4) == [] and figures(chain, 2, 4, "recompute")[2] == 10_300
    # d saves nothing, and [3, 4) packs nothing: the segment's fixed cost alone
    assert figures(chain, 3, 4, "recompute")[2] == 10_000
    # selective: a's cheap part alone and 200 ns an operator
    assert figures(chain, 0, 2, "selective")[2] == 100 + 400 + 10_000 + 200 + 100
    assert chain.cost([(0, 2, "plain"), (2, 4, "plain")]) == 0


def test_a_node_timed_checkpointed_alone_prices_its_segments() -> None:
    # a, alone a segment, took 13 us more, none of it a rerun of its own (it saves only its
    # input): a segment that packs it pays those 13 us less the fixed cost it pays once anyway
    # (10 us). b took less than the fixed cost more (noise): it adds nothing. c, unmeasured:
    # 3 x 100 ns. The rewrite's own module adds 2 us per segment.
    measured = {"a": TIMES["a"] | {"checkpointed_seconds": 1.3e-5}, "b": TIMES["b"] | {"checkpointed_seconds": 5e-6}}
    extra = dataclasses.replace(EXTRA, wrapper=2e-6)
    chain = Chain(step(TIMES | measured, checkpoint_cost=extra))
    assert figures(chain, 0, 2, "recompute")[2] == 2000 + 12_000 + 3_000
    assert figures(chain, 0, 4, "recompute")[2] == 2000 + 1000 + 12_000 + 3_000 + 300
    assert figures(chain, 1, 2, "recompute")[2] == 12_000
    assert figures(chain, 1, 4, "recompute")[2] == 1000 + 12_000 + 300


def kept_into_backward(graph: MemGraph) -> int:
    """Bytes the step's forward leaves alive for its backward."""
    return sum(e.delta for e in graph.events if e.phase == "forward")


@pytest.mark.parametrize(
    "plan",
    [
        [(0, 6, "recompute"), (6, 13, "plain")],
        [(0, 4, "recompute"), (4, 10, "recompute"), (10, 13, "plain")],
        [(0, 4, "plain"), (4, 12, "selective"), (12, 13, "plain")],
        [(0, 4, "nested"), (4, 13, "plain")],
        [(0, 3, "selective"), (3, 13, "plain")],  # passes on a Linear's output, which it caches
    ],
)
def test_what_a_real_plan_keeps_is_what_its_rewritten_step_keeps(plan: list) -> None:
    """The chain's ``hold`` against the dry run of the rewritten module. Every boundary here
    follows a Tanh, whose output the next Linear saves, or a Linear in a selective segment, which
    caches its output: nothing crossing it dies in forward."""
    model, x = tanh_mlp(blocks=True), torch.randn(128, 64)
    graph = capture(model, x)
    chain = Chain(graph)
    assert chain.cands == list(range(14)) and len(chain.names) == len(graph.order) - 1  # no placeholder
    segments = chain.to_segments(plan)
    assert [n for s in segments for n in s.nodes] == chain.names
    planned = capture(rewrite(model, trace(model), Plan(segments=segments, strategy="test")), x)
    saved = kept_into_backward(graph) - kept_into_backward(planned)
    assert saved == chain.total_act - sum(s.hold for s in chain.costs(plan))


def test_the_search_shifts_targets_by_the_chains_error_on_the_unplanned_step() -> None:
    """Gradients about as large as the activations: backward allocates the gradients as it frees
    the activations, so the step never holds all of both. The search's shift (the chain's error on
    the unplanned step, added to every target) once came from one plain segment over the whole
    chain, which holds both: 0.75 MiB too high here, and every plan was aimed that much too low
    (EfficientNet-B0: 17 MiB, so that most plans failed their dry runs)."""
    from memfit.capture.inputs import as_inputs
    from memfit.capture.trainstep import StepConfig
    from memfit.planner import STRATEGIES
    from memfit.search import PlanSearch

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(256, 256), nn.Tanh())])
    search = PlanSearch(model, as_inputs(torch.randn(256, 256)), StepConfig(optimizer=None), [], None)
    chain, unplanned = search.chain, search.unplanned.peak_bytes
    assert chain.peak(chain.unplanned()) == unplanned + search.shift
    low = chain.peak(STRATEGIES["dp"].lowest_peak(chain))
    for target in np.linspace(low, chain.peak(chain.unplanned()), 5).astype(int):
        spans = STRATEGIES["dp"].cheapest(chain, int(target))
        verified = search.verify(spans, "dp")
        assert verified is not None
        assert abs(chain.peak(spans) - search.shift - verified.peak_bytes) <= 0.02 * unplanned, target
