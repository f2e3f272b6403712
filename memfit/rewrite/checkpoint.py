"""Enact a plan: checkpointed segments become submodules run under ``torch.utils.checkpoint``.

The rewritten module is an fx GraphModule that owns the user's submodules (the same objects, so
parameters are shared and the user's ``state_dict`` loads into it unchanged). Each checkpointed
segment is a :class:`Checkpointed` module whose body is an fx GraphModule over the segment's
nodes; plain segments stay inline. Recomputation is made invisible:

* dropout draws the same masks (checkpoint's ``preserve_rng_state``, for the segments that draw
  random numbers: the saved RNG state is a tensor the dispatcher never sees, 5 KB a segment);
* every buffer a segment writes in place (BatchNorm's running statistics, a counter, a running
  average, spectral norm's power-iteration vectors) is set back for the recomputation to the value
  the forward started from and afterwards to the value the forward left: buffers move once per
  step and the recomputation sees what the forward saw;
* selective segments keep the outputs of FLOP-heavy ops through torch's selective checkpoint
  contexts and recompute only the rest, and never keep an output that an in-place op changes
  later (torch would refuse the changed tensor in backward);
* a nested segment's body is itself rewritten, its parts checkpointed inside it (non-reentrant
  checkpoints nest);
* in eval mode, or without grad, the body runs directly.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import operator
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from torch.utils.flop_counter import flop_registry

from ..capture import subgraph
from ..capture.attrs import lookup
from ..planner.plan import Plan

if TYPE_CHECKING:  # the report is built by memfit.search, above this package
    from ..report.memory import Comparison

__all__ = ["SEGMENT_PREFIX", "Checkpointed", "PlannedModule", "rewrite", "segment_of"]

SEGMENT_PREFIX = "memfit_segment_"


# Nodes whose outputs an in-place op changes later run between these two markers, which the
# selective policy reads: the markers are nodes of the segment's body, so they run again, in the
# same places, when the segment is recomputed.
_unsaved = threading.local()


def _unsaved_begin() -> None:
    if not torch.compiler.is_compiling():  # compiled, in-place writes are functionalized: nothing to guard
        _unsaved.depth = getattr(_unsaved, "depth", 0) + 1


def _unsaved_end() -> None:
    if not torch.compiler.is_compiling():
        _unsaved.depth -= 1


_MARKERS = (_unsaved_begin, _unsaved_end)


def _keep_expensive(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective policy: keep what the FLOP counter counts (conv, matmul, attention), unless a
    later in-place op will change it."""
    if op._overloadpacket in flop_registry and not getattr(_unsaved, "depth", 0):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# A buffer as its module and attribute name: looked up when used, so that ``.to(device)``, which
# replaces buffer tensors in their modules, is followed.
BufferRef = tuple[torch.nn.Module, str]


@contextlib.contextmanager
def _buffers_replayed(buffers: list[BufferRef], before: list[torch.Tensor]) -> Iterator[None]:
    """The recomputation starts from the buffers' values before the forward (a spectral norm's
    vectors, a running average the forward reads); afterwards they are again what the forward
    left (running statistics move once per step)."""
    with torch.no_grad():
        after = [getattr(m, a).clone() for m, a in buffers]
        for (m, a), value in zip(buffers, before, strict=True):
            getattr(m, a).copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for (m, a), value in zip(buffers, after, strict=True):
                getattr(m, a).copy_(value)


@contextlib.contextmanager
def _recomputing(
    inner: contextlib.AbstractContextManager, buffers: list[BufferRef], before: list[torch.Tensor]
) -> Iterator[None]:
    """The context of a recomputation: the selective one if any, buffers replayed."""
    with _buffers_replayed(buffers, before), inner:  # the snapshots are not ops of the segment
        yield


class Checkpointed(torch.nn.Module):
    """A segment of the network whose activations are recomputed in backward.

    Args:
        body: GraphModule over the segment's nodes; it shares the model's submodules.
        selective: Keep the outputs of FLOP-heavy ops instead of recomputing them.
        random: The segment draws random numbers: its recomputation replays the forward's RNG state.
        buffers: The buffers its forward writes in place, replayed around the recomputation.
    """

    body: fx.GraphModule  # set with object.__setattr__, so nn.Module does not register it

    def __init__(
        self, body: fx.GraphModule, selective: bool = False, random: bool = True, buffers: list[BufferRef] | None = None
    ) -> None:
        super().__init__()
        # Not a child module: the parameters belong to the enclosing model, under their own names.
        object.__setattr__(self, "body", body)
        self.selective = selective
        self.random = random
        self.written: list[BufferRef] = list(buffers or [])  # not "buffers": nn.Module has that method

    def _contexts(
        self, before: list[torch.Tensor]
    ) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        if self.selective:
            forward, recompute = create_selective_checkpoint_contexts(_keep_expensive)
        else:
            forward, recompute = contextlib.nullcontext(), contextlib.nullcontext()
        return forward, _recomputing(recompute, self.written, before)

    def _run(self, *args: Any) -> Any:
        return subgraph.run(self.body, *args)

    def train(self, mode: bool = True) -> Checkpointed:
        super().train(mode)
        self.body.train(mode)  # not a child, yet the parts of a nested body must follow the mode
        return self

    def forward(self, *args: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self._run(*args)
        if torch.compiler.is_compiling():
            # torch.compile functionalizes the step: buffer writes are applied once and in-place
            # writes become new tensors, so neither replay nor markers are needed; dynamo takes a
            # context_fn only as a function or a functools.partial.
            # a partial made here, or none: one held in an attribute or a global reaches dynamo unresolved
            if self.selective:
                context = functools.partial(create_selective_checkpoint_contexts, _keep_expensive)
                return checkpoint(
                    self._run, *args, use_reentrant=False, context_fn=context, preserve_rng_state=self.random
                )
            return checkpoint(self._run, *args, use_reentrant=False, preserve_rng_state=self.random)
        with torch.no_grad():
            before = [getattr(m, a).clone() for m, a in self.written]
        if self.random:
            subgraph.note_rng_state()
        return checkpoint(
            self._run,
            *args,
            use_reentrant=False,
            context_fn=lambda: self._contexts(before),
            preserve_rng_state=self.random,
        )

    def extra_repr(self) -> str:
        nodes = [
            n.name
            for n in self.body.graph.nodes
            if n.op not in ("placeholder", "output", "get_attr") and n.target not in _MARKERS
        ]
        kind = ", selective" if self.selective else ", nested" if isinstance(self.body, PlannedModule) else ""
        return f"{nodes[0]} .. {nodes[-1]} ({len(nodes)} nodes){kind}"


def segment_of(fn: Callable[[torch.Tensor], torch.Tensor]) -> Checkpointed:
    """``fn`` of one tensor as the rewrite runs a plain checkpointed segment of it (calibration
    prices what this module adds to torch's checkpoint)."""

    def body(t: torch.Tensor) -> torch.Tensor:
        return fn(t)

    return Checkpointed(fx.symbolic_trace(body), random=False)


class PlannedModule(fx.GraphModule):
    """The rewritten model: an fx GraphModule that owns every submodule of the user's model.

    A plain GraphModule keeps only the attributes its own graph reads; the submodules that only
    segments read would be lost on ``copy.deepcopy`` and from the ``state_dict``.

    Attributes:
        plan: What it recomputes and the predicted figures (print it for the table).
        report: Predicted memory of the step before and after the plan (:func:`memfit.optimize`
            fills both; a module rewritten directly has them unset).
    """

    plan: Plan
    report: Comparison

    def __deepcopy__(self, memo: dict[int, Any]) -> PlannedModule:
        # GraphModule.__deepcopy__ builds a type(self), though torch annotates it as GraphModule
        res = cast(PlannedModule, super().__deepcopy__(memo))
        _adopt(res, self, lambda x: copy.deepcopy(x, memo))
        for key in ("plan", "report"):
            if key in self.__dict__:
                res.__dict__[key] = self.__dict__[key]
        return res


def rewrite(model: torch.nn.Module, gm: fx.GraphModule, plan: Plan, prefix: str = SEGMENT_PREFIX) -> PlannedModule:
    """The module that runs ``plan``.

    Args:
        model: The user's model (read only; its submodules are shared, not copied).
        gm: The fx trace of ``model`` whose node names the plan uses.
        plan: Segments covering every compute node of ``gm`` in order.
        prefix: Name of the segment modules, before their index.

    Returns:
        A GraphModule with the user's submodules under their own names, plus one
        ``memfit_segment_<i>`` module per checkpointed segment (``memfit_segment_<i>_<j>`` for
        the parts of a nested one, inside it).
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    wrappers: dict[str, Checkpointed] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            env[n] = graph.node_copy(n, lambda x: env[x])
    for i, seg in enumerate(plan.segments):
        members = [nodes[name] for name in seg.nodes]
        if not seg.checkpointed:
            for n in members:
                env[n] = graph.node_copy(n, lambda x: env[x])
            continue
        body, inputs, outputs = _extract(gm, members, i)
        name = f"{prefix}{i}"
        if seg.kind == "nested":
            body = rewrite(body, body, Plan(segments=list(seg.inner), strategy=plan.strategy), prefix=f"{name}_")
        if seg.kind == "selective" and seg.unsaved:
            _mark_unsaved(body, set(seg.unsaved))
        buffers = [_buffer_ref(model, b) for b in seg.buffers]
        wrappers[name] = Checkpointed(body, selective=seg.kind == "selective", random=seg.random, buffers=buffers)
        call = graph.call_module(name, tuple(env[x] for x in inputs))
        for k, output in enumerate(outputs):
            env[output] = graph.call_function(operator.getitem, (call, k))
    for n in gm.graph.nodes:
        if n.op == "output":
            graph.node_copy(n, lambda x: env[x])
    for n in list(graph.nodes):
        if n.op == "get_attr" and not n.users:  # now read inside a segment only
            graph.erase_node(n)
    root = torch.nn.Module()
    _adopt(root, model)
    for name, w in wrappers.items():
        root.add_module(name, w)
    _copy_trace_attributes(gm, root, graph)
    out = PlannedModule(root, graph, type(model).__name__)
    _adopt(out, root)  # also the submodules only segments read
    out.meta.update(gm.meta)
    if str(gm.meta.get("memfit_capture", "torch.fx")).startswith("torch.export"):
        out.register_forward_pre_hook(_training_only)
    out.train(model.training)
    return out


def _training_only(module: torch.nn.Module, args: Any) -> None:
    """An exported graph has the training mode baked into its ops (dropout, BatchNorm): in eval
    mode it would still drop and update statistics, so it refuses to run."""
    if not module.training:
        raise RuntimeError(
            f"this planned {type(module).__name__} was captured with torch.export, which fixes dropout and "
            "BatchNorm in training mode; evaluate with the original model (it shares the parameters)"
        )


def _mark_unsaved(body: fx.GraphModule, names: set[str]) -> None:
    """Run the named nodes of a selective body between the markers the policy reads."""
    for n in list(body.graph.nodes):
        if n.name in names and n.op in ("call_module", "call_function", "call_method"):
            with body.graph.inserting_before(n):
                body.graph.call_function(_unsaved_begin)
            with body.graph.inserting_after(n):
                body.graph.call_function(_unsaved_end)
    body.graph.lint()
    body.recompile()


def _buffer_ref(model: torch.nn.Module, name: str) -> BufferRef:
    """A buffer of ``model`` by qualified name, as (owning module, attribute)."""
    path, _, attr = name.rpartition(".")
    owner = model.get_submodule(path) if path else model
    if not isinstance(getattr(owner, attr, None), torch.Tensor):
        raise AttributeError(f"{type(model).__name__} has no buffer {name!r} for a planned segment to restore")
    return owner, attr


def _adopt(dst: torch.nn.Module, src: torch.nn.Module, convert: Callable[[Any], Any] = lambda x: x) -> None:
    """Give ``dst`` the direct children, parameters and buffers of ``src`` under the same names.

    They replace what fx put there: fx builds bare intermediate modules holding only the
    submodules its graph reads, where the user's model has the real ones.
    """
    for name, child in src.named_children():
        dst._modules[name] = convert(child)
    for name, p in src.named_parameters(recurse=False):
        dst._parameters[name] = convert(p)
    for name, b in src.named_buffers(recurse=False):
        dst._buffers[name] = convert(b)
        if name in src._non_persistent_buffers_set:
            dst._non_persistent_buffers_set.add(name)


def _extract(
    gm: fx.GraphModule, members: list[fx.Node], index: int
) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]:
    """The body GraphModule of one segment, the outer nodes it reads and the nodes it returns."""
    inside = set(members)
    inputs: list[fx.Node] = []
    for n in members:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr" and a not in inputs:
                inputs.append(a)
    outputs = [n for n in members if any(u not in inside for u in n.users)]
    body = fx.Graph()
    benv: dict[fx.Node, fx.Node] = {x: body.placeholder(x.name) for x in inputs}

    def arg(x: fx.Node) -> fx.Node:
        if x not in benv:  # a parameter or constant read inside: fetched inside
            benv[x] = body.node_copy(x)
        return benv[x]

    for n in members:
        benv[n] = body.node_copy(n, arg)
    body.output(tuple(benv[o] for o in outputs))
    return fx.GraphModule(gm, body, f"Segment{index}"), inputs, outputs


def _copy_trace_attributes(gm: fx.GraphModule, root: torch.nn.Module, graph: fx.Graph) -> None:
    """Tensor constants the trace created (``_tensor_constant0``) are attributes of ``gm`` only."""
    for n in graph.nodes:
        if n.op == "get_attr" and lookup(root, str(n.target)) is None:
            setattr(root, str(n.target), getattr(gm, str(n.target)))
