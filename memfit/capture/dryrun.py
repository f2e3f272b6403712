"""Capture: the model's graph (:mod:`memfit.capture.trace`) dry-run for one training step under
FakeTensorMode.

The dry run executes the real step (forward under the step's autocast, loss, backward, optimizer
step) on fake tensors, so it allocates nothing and yet records, per fx node, every storage that is
allocated and freed, what autograd saves, and the FLOPs, exactly as a real step would.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import networkx as nx
import torch
import torch._dynamo  # FakeTensorMode imports it on first use (seconds); pay that at import time
from torch import fx
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from torch.utils.flop_counter import flop_registry

from ..errors import MemfitInputError, MemfitTraceError
from . import subgraph
from .attrs import lookup
from .fake import fake_copy, on_fake
from .graph import MemGraph, NodeInfo
from .inputs import Inputs, as_inputs
from .trace import LeafSpec, check_model, graph_of
from .tracker import StorageTracker, tensors_in
from .trainstep import StepConfig, init_gradients, init_optimizer_state, make_optimizer, run_step, unique_trainable

__all__ = ["capture"]

log = logging.getLogger(__name__)

_RNG_STATE_BYTES = torch.get_rng_state().numel()


class _CountingTracker(StorageTracker):
    """The storage tracker that also totals FLOPs by torch.utils.flop_counter's formulas (one
    dispatch mode instead of two: the dry run's cost is per-op Python overhead)."""

    def __init__(self, limit: int | None = None) -> None:
        super().__init__(limit)
        self.flops = 0
        self.random_nodes: set[str] = set()  # nodes whose forward ran an op that draws random numbers
        self.writes: dict[str, set[int]] = {}  # node -> storages its forward wrote in place

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.phase == "forward":
            if torch.Tag.nondeterministic_seeded in func.tags:
                self.random_nodes.add(self.node)
            for t in _written(func, args, kwargs):
                sid = self.sid_of(t)
                if sid is not None:
                    self.writes.setdefault(self.node, set()).add(sid)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


# Ops that update running statistics without saying so in their schema: (running_mean,
# running_var, training) argument positions.
_UNDECLARED_WRITES = {name: (3, 4, 5) for name in ("native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm")}


def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an ATen op writes in place, from its schema (``Tensor(a!)`` arguments): this
    sees every write, including those inside leaf modules and hooks (BatchNorm's statistics)."""
    schema = func._schema
    out: list[torch.Tensor] = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            out += tensors_in(args[i] if i < len(args) else kwargs.get(a.name))
    hidden = _UNDECLARED_WRITES.get(schema.name.split("::")[-1])
    if hidden is not None:
        names = [a.name for a in schema.arguments]

        def value(i: int) -> Any:
            return args[i] if i < len(args) else kwargs.get(names[i])

        if value(hidden[2]):
            out += tensors_in([value(hidden[0]), value(hidden[1])])
    return out


def _describe_target(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", None) or str(t)


# autograd Node.metadata key: the fx node whose forward made the autograd node
_OWNER = "memfit_owner"


class _Recorder(fx.Interpreter):
    """Runs the traced graph node by node and attributes every event, saved tensor and FLOP."""

    def __init__(self, gm: fx.GraphModule, tracker: _CountingTracker) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.tracker = tracker
        self.infos: dict[str, NodeInfo] = {}
        self.saved: dict[str, set[int]] = {}
        self.packed: dict[str, int] = {}  # tensors saved for backward, per node
        self.fwd_flops: dict[str, int] = {}
        self.bwd_flops: dict[str, int] = {}
        self._flops_seen = 0
        self.param_names = {id(p): n for n, p in gm.named_parameters(remove_duplicate=False)}

    def _account_flops(self) -> None:
        total = self.tracker.flops
        delta, self._flops_seen = total - self._flops_seen, total
        table = self.fwd_flops if self.tracker.phase == "forward" else self.bwd_flops
        table[self.tracker.node] = table.get(self.tracker.node, 0) + delta

    def switch(self, name: str) -> None:
        """Attribute what ran so far to the current node, then make ``name`` current; past the limit, stop."""
        self.tracker.check()
        self._account_flops()
        self.tracker.node = name

    def enter(self, phase: str, node: str) -> None:
        """Step-level transition (loss, backward, optimizer) from :func:`run_step`."""
        self.tracker.check()
        self._account_flops()
        self.tracker.phase, self.tracker.node = phase, node

    def run_node(self, n: fx.Node) -> Any:
        self.switch(n.name)
        events_before = len(self.tracker.events)
        try:
            out = super().run_node(n)
        except Exception as e:
            raise _NodeFailure(n, self.fetch_args_kwargs_from_env(n), e) from e
        self._account_flops()
        self._describe(n, out, events_before)
        for t in tensors_in(out):
            self._claim(t.grad_fn, n.name)
        return _unless_dead(n, out)

    def run_segment(self, gm: fx.GraphModule, args: tuple[Any, ...]) -> Any:
        """Run a nested segment node by node (see :mod:`memfit.capture.subgraph`), attributing its
        forward, its recomputation and its backward to its own nodes."""
        return _SegmentRecorder(gm, self).run(*args)

    def _claim(self, fn: Any, owner: str) -> None:
        """Mark the autograd nodes this fx node created, so its backward is attributed to it.

        The mark is kept on the node itself: a reference from here would keep alive the graph
        of an output nothing reads, with the tensors it saved, which the model's step frees."""
        stack = [fn]
        while stack:
            f = stack.pop()
            if f is None or _OWNER in f.metadata or type(f).__name__ == "AccumulateGrad":
                continue
            f.metadata[_OWNER] = owner
            f.register_prehook(lambda grads, _o=owner: self.switch(_o))
            stack.extend(nf for nf, _ in f.next_functions)

    def _describe(self, n: fx.Node, out: Any, events_before: int) -> None:
        tensors = tensors_in(out)
        new_sids = {e.sid for e in self.tracker.events[events_before:] if e.delta > 0}
        sids = {s for s in map(self.tracker.sid_of, tensors) if s is not None}
        out_sids = sids & new_sids
        info = NodeInfo(
            name=n.name,
            op=n.op,
            target=_describe_target(n),
            output_shapes=[tuple(t.shape) for t in tensors],
            output_dtypes=[str(t.dtype).replace("torch.", "") for t in tensors],
            output_strides=[tuple(t.stride()) for t in tensors],
            output_requires_grad=[t.requires_grad for t in tensors],
            out_bytes=sum(self.tracker.nbytes[s] for s in out_sids),
            out_sids=tuple(sorted(sids)),
        )
        params: list[torch.Tensor] = []
        info.inplace = _mutates_input(n)
        info.module_stack = tuple((str(path), str(kind)) for path, kind in n.meta.get("nn_module_stack", {}).values())
        if n.op == "call_module":
            mod = self.module.get_submodule(str(n.target))
            info.module_path, info.module_type = str(n.target), type(mod).__name__
            info.inplace = bool(getattr(mod, "inplace", False))
            params = list(mod.parameters())
        elif "memfit_module" in n.meta:  # an op of an exported graph: the user's layer it came from
            info.module_path, info.module_type = n.meta["memfit_module"]
            reads = [
                self.module.get_parameter(str(a.target)) for a in n.all_input_nodes if _is_parameter(self.module, a)
            ]
            params = list({id(p): p for p in reads}.values())
        elif n.op == "get_attr" and isinstance(out, torch.nn.Parameter | torch.Tensor):
            if id(out) in self.param_names:
                params = [out]
            else:  # a tensor constant of the trace: alive before the step like a buffer
                self.tracker.register([out], "buffer")
        info.params = tuple(self.param_names.get(id(p), "?") for p in params)
        info.param_numel = sum(p.numel() for p in params)
        info.param_bytes = sum(p.numel() * p.element_size() for p in params)
        self.infos[n.name] = info
        for k, t in enumerate(tensors):
            if t.grad_fn is not None:
                t.grad_fn.register_prehook(functools.partial(_note_grad_layout, info, k, t.output_nr))


def _note_grad_layout(info: NodeInfo, k: int, nr: int, grads: tuple[torch.Tensor | None, ...]) -> None:
    """Record the layout of the gradient output ``k`` of ``info``'s node receives, if not its own."""
    grad = grads[nr] if nr < len(grads) else None
    if grad is not None and k < len(info.output_strides) and tuple(grad.stride()) != info.output_strides[k]:
        info.grad_strides[k] = tuple(grad.stride())


def _is_parameter(gm: torch.nn.Module, n: fx.Node) -> bool:
    return n.op == "get_attr" and isinstance(lookup(gm, str(n.target)), torch.nn.Parameter)


_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor"}


def _mutates_input(n: fx.Node) -> bool:
    """Whether a function or method node writes into its first argument."""
    if n.kwargs.get("inplace") is True:
        return True
    if isinstance(n.target, torch._ops.OpOverload):  # an exported graph's op: its schema says
        first = n.target._schema.arguments[:1]
        return bool(first) and first[0].alias_info is not None and first[0].alias_info.is_write
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    if n.op == "call_method":
        return name.endswith("_") and not name.endswith("__")
    return n.op == "call_function" and (name in _INPLACE_OPERATORS or (name.endswith("_") and not name.endswith("__")))


class _SegmentRecorder(fx.Interpreter):
    """Interprets a nested segment for a :class:`_Recorder`: events go to the inner nodes."""

    def __init__(self, gm: fx.GraphModule, parent: _Recorder) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.parent = parent

    def run_node(self, n: fx.Node) -> Any:
        self.parent.switch(n.name)
        out = super().run_node(n)
        self.parent._account_flops()
        if self.parent.tracker.phase == "forward":  # a recomputation's graph is never walked back
            for t in tensors_in(out):
                self.parent._claim(t.grad_fn, n.name)
        return _unless_dead(n, out)


def _unless_dead(n: fx.Node, out: Any) -> Any:
    """A value no node reads is freed as soon as it is made, as the code fx generates for a planned
    module does (``x = None`` right after); fx.Interpreter would hold it through the whole step."""
    return out if n.users or n.op in ("output", "placeholder") else None


class _NodeFailure(Exception):
    def __init__(self, node: fx.Node, args_kwargs: Any, error: Exception) -> None:
        super().__init__(str(error))
        self.node, self.args_kwargs, self.error = node, args_kwargs, error


def _explain(f: _NodeFailure, gm: fx.GraphModule, inputs: Inputs) -> Exception:
    """The user-facing error for a node that failed in the dry run."""
    where = f"node '{f.node.name}'"
    if f.node.op == "call_module":
        where += f" ({type(gm.get_submodule(str(f.node.target))).__name__} '{f.node.target}')"
    if isinstance(f.error, (DataDependentOutputException, DynamicOutputShapeException)):
        return MemfitTraceError(
            f"{where} depends on tensor values ({f.error}); memfit's dry run knows shapes, not values. "
            "Fix: make the branch or the output shape value-independent (torch.where, masks of fixed "
            "shape), or declare a leaf only code that branches on shapes or Python state."
        )
    return MemfitInputError(
        f"the forward pass failed at {where} with input shapes {_shapes(f.args_kwargs)}: {f.error}\n"
        f"The example inputs have shapes {_shapes(inputs.tensors)}; check they match what the model expects "
        "(batch first)."
    )


def _shapes(obj: Any) -> str:
    return ", ".join(str(list(t.shape)) for t in tensors_in(obj)) or "no tensors"


def capture(
    model: torch.nn.Module,
    example_inputs: Any,
    config: StepConfig | None = None,
    *,
    leaf_modules: LeafSpec = (),
    gm: fx.GraphModule | None = None,
    limit: int | None = None,
) -> MemGraph:
    """Trace ``model`` and dry-run one steady-state training step on fake tensors.

    Args:
        model: The network (left untouched).
        example_inputs: A tensor, a tuple of tensors or a dict of keyword arguments with the
            training batch's shapes. Only shapes, dtypes and devices are read.
        config: Optimizer, precision and loss of the step.
        leaf_modules: Module types or qualified names to keep opaque (for untraceable code).
        gm: The model's graph when the caller has it (:func:`memfit.capture.trace.graph_of`):
            one trace then serves capture, calibration and the rewrite.
        limit: Raise ``LimitExceeded`` once the step's live storage bytes (baseline included)
            pass it: a prediction adds workspaces to these, so the step's peak is then above it.

    Returns:
        The MemGraph of the step.

    Example:
        >>> import torch, memfit
        >>> from memfit.capture.dryrun import capture
        >>> g = capture(memfit.models.create("resnet18", stem="cifar"), torch.randn(8, 3, 32, 32))
        >>> g.batch_size
        8
    """
    config = config or StepConfig()
    model = check_model(model)
    inputs = as_inputs(example_inputs)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fmodel = fake_copy(model, mode)
    if isinstance(fmodel, fx.GraphModule):  # a planned model already is its graph: no new names
        gm = fmodel
    else:
        gm = on_fake(gm if gm is not None else graph_of(model, leaf_modules, inputs), fmodel, mode)
    fake_inputs = [mode.from_tensor(x, static_shapes=True) for x in inputs.tensors]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # the others have defaults
    if not len(required) <= len(fake_inputs) <= len(placeholders):
        raise MemfitInputError(
            f"{type(model).__name__}.forward takes {len(placeholders)} tensor argument(s) "
            f"({', '.join(n.name for n in placeholders)}) but {len(fake_inputs)} example input(s) were given"
        )
    # the model's tensors, not only the graph's: a layer the forward never calls holds its weights
    # all the same; and the model's order, which an optimizer over model.parameters() walks (one
    # parameter's update temporaries outlive it, so the order moves the peak)
    every_param = [*fmodel.parameters(), *gm.parameters()]
    params = unique_trainable(iter(every_param))
    device = params[0].device.type
    tracker = _CountingTracker(limit)
    with mode:
        optimizer = make_optimizer(config.optimizer, params)
        init_optimizer_state(optimizer, params)  # steady state: the state exists before the step
        tracker.register(every_param, "parameter")
        tracker.register(init_gradients(config, params), "gradient")
        tracker.register([*fmodel.buffers(), *gm.buffers()], "buffer")
        tracker.register(fake_inputs, "input")
        if optimizer is not None:
            tracker.register([t for s in optimizer.state.values() for t in tensors_in(s)], "optimizer")
        rec = _Recorder(gm, tracker)

        def pack(t: torch.Tensor) -> torch.Tensor:
            rec.packed[tracker.node] = rec.packed.get(tracker.node, 0) + 1
            sid = tracker.sid_of(t)
            if sid is not None:
                rec.saved.setdefault(tracker.node, set()).add(sid)
            # an output saved by its own grad_fn would form a reference cycle and outlive its free
            return t if t.grad_fn is None else t.detach()

        # a stand-in of each RNG state a checkpoint saves, alive to the end of the step (an upper
        # bound: the real one goes with the segment's backward)
        rng_states: list[torch.Tensor] = []

        def keep_rng_state() -> None:
            rng_states.append(torch.empty(_RNG_STATE_BYTES, dtype=torch.uint8))

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with tracker, hooks, subgraph.observed(rec.run_segment, keep_rng_state):
            try:
                output = run_step(lambda: rec.run(*fake_inputs), config, device, optimizer, rec.enter)
            except _NodeFailure as f:
                if not tracker.exceeded:
                    raise _explain(f, gm, inputs) from f.error
            except Exception:
                if not tracker.exceeded:
                    raise
            tracker.check()  # its error arrives as raised, wrapped, or (caught by the model) not at all
            grads = {tracker.sid_of(p.grad) for p in params if p.grad is not None}
            owners = _owners(gm, rec.param_names, optimizer, tracker)
            buffer_sids = {name: tracker.sid_of(b) for name, b in gm.named_buffers(remove_duplicate=False)}
            buffer_names = {sid: name for name, sid in buffer_sids.items() if sid is not None}
            tracker.stop()
        del output
        rng_states.clear()
    graph = _assemble(gm, rec, tracker, grads, inputs, config, device)
    graph.capture = str(gm.meta.get("memfit_capture", "torch.fx"))
    graph.opaque = dict(gm.meta.get("memfit_opaque", {}))
    graph.owners = owners
    graph.buffer_names = buffer_names
    graph.param_shapes = {rec.param_names[id(p)]: (tuple(p.shape), p.element_size()) for p in gm.parameters()}
    return graph


def _owners(
    gm: fx.GraphModule, names: dict[int, str], optimizer: torch.optim.Optimizer | None, tracker: _CountingTracker
) -> dict[int, str]:
    """The parameter each parameter, gradient and per-element optimizer-state storage belongs to.

    Data parallelism shards exactly these (FSDP), or moves gradients into buckets (DDP); state
    that is not shaped like its parameter (Adam's step count) stays whole. Names are the ones
    the nodes' ``params`` use (``names``: a tied parameter has one).
    """
    owners: dict[int, str] = {}
    for p in gm.parameters():
        name = names[id(p)]
        related = [p] + ([p.grad] if p.grad is not None else [])
        if optimizer is not None:
            related += [t for t in tensors_in(optimizer.state.get(p, {})) if t.shape == p.shape]
        for t in related:
            sid = tracker.sid_of(t)
            if sid is not None:
                owners[sid] = name
    return owners


def _assemble(
    gm: fx.GraphModule,
    rec: _Recorder,
    tracker: _CountingTracker,
    grads: set[int | None],
    inputs: Inputs,
    config: StepConfig,
    device: str,
) -> MemGraph:
    categories: dict[int, str] = {}
    saved_all = set().union(*rec.saved.values()) if rec.saved else set()
    for e in tracker.events:
        if e.delta > 0 and e.sid not in categories:
            if e.sid in grads:
                categories[e.sid] = "gradient"
            elif e.phase == "optimizer":
                categories[e.sid] = "temporary"
            elif e.sid in saved_all:
                categories[e.sid] = "activation"
            else:
                categories[e.sid] = "temporary"
    dag = nx.DiGraph()
    order = []
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        info = rec.infos[n.name]
        own = sorted(s for s in rec.saved.get(n.name, ()) if categories.get(s) == "activation")
        info.saved_sids = tuple(own)
        info.saved_bytes = sum(tracker.nbytes[s] for s in own)
        info.saved_tensors = rec.packed.get(n.name, 0)
        info.random = n.name in tracker.random_nodes
        info.writes = tuple(sorted(tracker.writes.get(n.name, ())))
        info.fwd_flops = rec.fwd_flops.get(n.name, 0)
        info.bwd_flops = rec.bwd_flops.get(n.name, 0)
        dag.add_node(n.name, info=info)
        order.append(n.name)
        for a in n.all_input_nodes:
            dag.add_edge(a.name, n.name)
    return MemGraph(
        dag=dag,
        order=order,
        baseline=dict(tracker.baseline),
        categories=categories,
        storage_bytes=dict(tracker.nbytes),
        events=list(tracker.events),
        batch_size=inputs.batch_size,
        device=device,
        description=config.describe(),
    )
