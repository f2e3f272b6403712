"""Enact a plan: checkpointed segments become submodules run under ``torch.utils.checkpoint``.

The rewritten module is an fx GraphModule that owns the user's submodules (the same objects, so
parameters are shared and the user's ``state_dict`` loads into it unchanged). Each checkpointed
segment is a :class:`Checkpointed` module whose body is an fx GraphModule over the segment's
nodes; plain segments stay inline. Recomputation is made invisible:

* dropout draws the same masks (checkpoint's ``preserve_rng_state``, for the segments that draw
  random numbers: the saved RNG state is a tensor the dispatcher never sees, 5 KB a segment);
* BatchNorm running statistics are restored after the recomputation, so they move once per step;
* selective segments keep the outputs of FLOP-heavy ops through torch's selective checkpoint
  contexts and recompute only the rest;
* a nested segment's body is itself rewritten, its parts checkpointed inside it (non-reentrant
  checkpoints nest);
* in eval mode, or without grad, the body runs directly.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from torch.utils.flop_counter import flop_registry

from ..capture import subgraph
from ..planner.plan import Plan

__all__ = ["Checkpointed", "PlannedModule", "rewrite", "SEGMENT_PREFIX"]

SEGMENT_PREFIX = "memfit_segment_"


def _keep_expensive(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective policy: keep what the FLOP counter counts (conv, matmul, attention)."""
    if op._overloadpacket in flop_registry:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _running_stats_kept(body: torch.nn.Module) -> Iterator[None]:
    """Undo what a recomputation does to BatchNorm running statistics (exactly: values restored)."""
    saved = [
        (buf, buf.clone())
        for mod in body.modules()
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.track_running_stats
        for buf in (mod.running_mean, mod.running_var, mod.num_batches_tracked)
        if buf is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


@contextlib.contextmanager
def _recomputing(inner: contextlib.AbstractContextManager, body: torch.nn.Module) -> Iterator[None]:
    """The context of a recomputation: the selective one if any, running statistics kept."""
    with _running_stats_kept(body), inner:  # the snapshot is not an op of the segment
        yield


class Checkpointed(torch.nn.Module):
    """A segment of the network whose activations are recomputed in backward.

    Args:
        body: GraphModule over the segment's nodes; it shares the model's submodules.
        selective: Keep the outputs of FLOP-heavy ops instead of recomputing them.
        random: The segment draws random numbers: its recomputation replays the forward's RNG state.
    """

    def __init__(self, body: fx.GraphModule, selective: bool = False, random: bool = True) -> None:
        super().__init__()
        # Not a child module: the parameters belong to the enclosing model, under their own names.
        object.__setattr__(self, "body", body)
        self.selective = selective
        self.random = random

    def _contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        if self.selective:
            forward, recompute = create_selective_checkpoint_contexts(_keep_expensive)
        else:
            forward, recompute = contextlib.nullcontext(), contextlib.nullcontext()
        return forward, _recomputing(recompute, self.body)

    def _run(self, *args: Any) -> Any:
        return subgraph.run(self.body, *args)

    def train(self, mode: bool = True) -> Checkpointed:
        super().train(mode)
        self.body.train(mode)  # not a child, yet the parts of a nested body must follow the mode
        return self

    def forward(self, *args: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self._run(*args)
        return checkpoint(
            self._run, *args, use_reentrant=False, context_fn=self._contexts, preserve_rng_state=self.random
        )

    def extra_repr(self) -> str:
        nodes = [n.name for n in self.body.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
        kind = ", selective" if self.selective else ", nested" if isinstance(self.body, PlannedModule) else ""
        return f"{nodes[0]} .. {nodes[-1]} ({len(nodes)} nodes){kind}"


class PlannedModule(fx.GraphModule):
    """The rewritten model: an fx GraphModule that owns every submodule of the user's model.

    A plain GraphModule keeps only the attributes its own graph reads; the submodules that only
    segments read would be lost on ``copy.deepcopy`` and from the ``state_dict``.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> PlannedModule:
        res = super().__deepcopy__(memo)
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
        wrappers[name] = Checkpointed(body, selective=seg.kind == "selective", random=seg.random)
        call = graph.call_module(name, tuple(env[x] for x in inputs))
        for k, out in enumerate(outputs):
            env[out] = graph.call_function(operator.getitem, (call, k))
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
    out.train(model.training)
    return out


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


def _extract(gm: fx.GraphModule, members: list[fx.Node], index: int) -> tuple[fx.GraphModule, list[fx.Node], list[fx.Node]]:
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
        if n.op == "get_attr" and not _has_attr(root, str(n.target)):
            setattr(root, str(n.target), getattr(gm, str(n.target)))


def _has_attr(mod: torch.nn.Module, dotted: str) -> bool:
    try:
        for part in dotted.split("."):
            mod = getattr(mod, part)
    except AttributeError:
        return False
    return True
