"""MemGraph: the captured network with the memory facts of every node and the step's event log."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import networkx as nx

from .tracker import Event

__all__ = ["CATEGORIES", "CheckpointCost", "MemGraph", "NodeInfo", "Pace"]

# MemTracker's words. "activation" is storage saved for backward that is not a parameter;
# "temporary" is everything else a step allocates: unsaved outputs, activation gradients, scratch.
CATEGORIES = ("parameter", "buffer", "input", "gradient", "optimizer", "activation", "temporary")


@dataclass
class NodeInfo:
    """Memory facts of one fx node, from the dry run.

    Attributes:
        name: fx node name.
        op: fx opcode (``call_module``, ``call_function`` ...).
        target: What the node calls, as text.
        module_path: Qualified name of the called submodule, if any.
        module_type: Class name of the called submodule, if any.
        module_stack: The user's modules whose forward the node runs in, outermost first, as
            (qualified name, class): what hand-written policies call blocks.
        output_shapes: Shapes of the tensors the node returns.
        output_dtypes: Their dtypes, as text.
        output_strides: Their strides (channels-last and permuted layouts change what kernels
            allocate internally).
        output_requires_grad: Whether each requires grad (a layer whose input needs no gradient
            runs a cheaper backward).
        grad_strides: Per output, the strides of the gradient its backward received, where they
            differ from the output's own (a slice of a concatenation's gradient): kernels copy a
            non-contiguous gradient below the dispatcher.
        out_bytes: Bytes of new storages the node returns (views cost nothing).
        out_sids: Every storage its outputs refer to, views of earlier storages included.
        saved_bytes: Bytes of non-parameter storages its autograd nodes save for backward.
        saved_sids: The storage ids behind ``saved_bytes``.
        saved_tensors: How many tensors its autograd nodes save, parameters and buffers included
            (what checkpointing handles one by one).
        inplace: Whether it mutates one of its inputs (``ReLU(inplace=True)``, ``x.add_(y)``).
        random: Whether its forward draws random numbers (dropout): a recomputation must replay them.
        writes: Storages its forward writes in place (seen at the dispatcher, so also inside leaf
            modules): activations an in-place op changes, or buffers (running statistics).
        params: Qualified names of the parameters it uses directly.
        param_numel: Their number of elements.
        param_bytes: Their bytes.
        fwd_flops: FLOPs of its forward (``torch.utils.flop_counter``).
        bwd_flops: FLOPs of its backward.
        workspace_fwd: Allocator bytes its forward kernels use beyond what the dispatcher sees.
        workspace_bwd: The same for its backward.
        workspace_error: Why its workspace could not be calibrated (then both are 0, unmeasured).
        fwd_seconds: Time of its forward on this machine, measured alone (None: not measured).
        bwd_seconds: Time of its backward, measured alone (None: not measured).
        cheap_seconds: The part of ``fwd_seconds`` spent in operators the FLOP counter does not
            count: what a selective segment recomputes of it (None: not measured).
        operators: Operators its forward dispatches (checkpointing costs a little per operator).
        checkpointed_seconds: What its forward and backward take more when it alone is a
            checkpointed segment (None: not measured).
        time_error: Why its time was not measured (then it is priced by FLOPs).
        context_seconds: Its forward timed inside whole forwards of the model, where the inputs it
            reads were just written (None: not measured; see :mod:`memfit.cost.pace`).
    """

    name: str
    op: str
    target: str
    module_path: str | None = None
    module_type: str | None = None
    module_stack: tuple[tuple[str, str], ...] = ()
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_dtypes: list[str] = field(default_factory=list)
    output_strides: list[tuple[int, ...]] = field(default_factory=list)
    output_requires_grad: list[bool] = field(default_factory=list)
    grad_strides: dict[int, tuple[int, ...]] = field(default_factory=dict)
    out_bytes: int = 0
    out_sids: tuple[int, ...] = ()
    saved_bytes: int = 0
    saved_sids: tuple[int, ...] = ()
    saved_tensors: int = 0
    inplace: bool = False
    random: bool = False
    writes: tuple[int, ...] = ()
    params: tuple[str, ...] = ()
    param_numel: int = 0
    param_bytes: int = 0
    fwd_flops: int = 0
    bwd_flops: int = 0
    workspace_fwd: int = 0
    workspace_bwd: int = 0
    workspace_error: str | None = None
    fwd_seconds: float | None = None
    bwd_seconds: float | None = None
    cheap_seconds: float | None = None
    operators: int = 0
    checkpointed_seconds: float | None = None
    time_error: str | None = None
    context_seconds: float | None = None


@dataclass(frozen=True)
class CheckpointCost:
    """What ``torch.utils.checkpoint`` adds to a step beyond the recomputation itself, in seconds
    on this machine.

    Attributes:
        segment: Per checkpointed segment (the call, RNG state, the recomputation's set-up).
        per_saved_tensor: Per tensor a recomputed node saves for backward, for nodes not timed
            checkpointed alone (the others' own figure replaces it): non-reentrant checkpointing
            packs each in the forward and stores it again in the recomputation.
        selective_per_operator: More per operator of a selective segment (its dispatch mode runs
            in the forward and again in the recomputation).
        per_buffer: Per buffer a segment writes in place (BatchNorm's running statistics): the
            rewrite snapshots it in the forward and sets it back around the recomputation, four
            small copies whatever the recomputation runs of the segment.
        wrapper: More per segment for the rewrite's own module around torch's checkpoint (its fx
            body runs twice, its contexts are entered around the recomputation).
        in_step: Per segment as a step pays it: the rewrite's segment (or torch's checkpoint) of a
            tiny op against the op, its forward and its backward each run with the caches full
            of other data, as the layers between them in a step leave them; the segment's fixed
            cost where it is larger than ``segment + wrapper``, the hot-loop figures the layers'
            own checkpointed times include. 0.0 where not measured.
    """

    segment: float
    per_saved_tensor: float
    selective_per_operator: float
    per_buffer: float = 0.0
    wrapper: float = 0.0
    in_step: float = 0.0

    def scaled(self, factor: float) -> CheckpointCost:
        """Every figure multiplied by ``factor`` (see :class:`Pace`)."""
        return CheckpointCost(*(factor * getattr(self, f.name) for f in fields(self)))


@dataclass(frozen=True)
class Pace:
    """How fast the model's forward ran where it was planned, against what its prices were made at.

    Calibrated times come from layers run alone, perhaps in another process (they are cached), at
    whatever speed the machine had then; plans are priced at ``factor`` times them (see
    :mod:`memfit.cost.pace`).

    Attributes:
        measured: Seconds of one forward of the whole model, measured where it is planned.
        reference: The same forward when the nodes' in-context times were measured, or, where
            they were not, the nodes' calibrated forwards summed.
        alone: Over the nodes timed in context, their in-context forwards over their calibrated
            ones, summed: what the kernels' figures only measured alone (backward, a forward not
            timed in context) are multiplied by to stand beside the in-context ones (1.0 where
            none was); checkpointing's own figures are not (it is dispatch and bookkeeping).
        batch: The batch both forwards ran at where it is smaller than the step's (a long forward
            is sampled on its first samples), else None.
    """

    measured: float
    reference: float
    alone: float = 1.0
    batch: int | None = None

    @property
    def factor(self) -> float:
        """What every price is multiplied by: this process's speed over the prices' own."""
        return self.measured / self.reference


@dataclass
class MemGraph:
    """A captured network: nodes with memory facts, and the exact event log of one dry-run step.

    Attributes:
        dag: networkx DiGraph over node names; each node's ``info`` attribute is a NodeInfo.
        order: Node names in execution (topological) order.
        baseline: Storages alive before the step: sid -> (bytes, category).
        categories: Category of every storage the step allocates: sid -> category.
        storage_bytes: Size of every storage of the step: sid -> bytes.
        events: Allocation and free events of the step, in order.
        batch_size: Leading dimension of the first example input.
        device: Device type of the parameters.
        description: The step configuration, as text (optimizer, precision).
        owners: Parameter name of every parameter, gradient and parameter-shaped optimizer-state
            storage: sid -> qualified name.
        param_shapes: Shape and element size of every parameter, by qualified name.
        buffer_names: Qualified name of every buffer storage: sid -> name.
        capture: How the graph was captured (``torch.fx``, or torch.export and why).
        opaque: Submodules kept whole as ``leaf_modules`` asked: path -> class name (their
            insides are one node each: costed, never cut).
        checkpoint_cost: What checkpointing adds on this machine beyond recomputation (None: not
            calibrated; see :mod:`memfit.cost.timing`).
        pace: The whole forward measured against the calibrated times (None: not measured, and
            the calibrated times are used as they are).
    """

    dag: nx.DiGraph
    order: list[str]
    baseline: dict[int, tuple[int, str]]
    categories: dict[int, str]
    storage_bytes: dict[int, int]
    events: list[Event]
    batch_size: int
    device: str
    description: str
    owners: dict[int, str] = field(default_factory=dict)
    param_shapes: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)
    buffer_names: dict[int, str] = field(default_factory=dict)
    capture: str = "torch.fx"
    opaque: dict[str, str] = field(default_factory=dict)
    checkpoint_cost: CheckpointCost | None = None
    pace: Pace | None = None

    def info(self, name: str) -> NodeInfo:
        """The NodeInfo of a node."""
        return self.dag.nodes[name]["info"]

    @property
    def nodes(self) -> list[NodeInfo]:
        """NodeInfos in execution order."""
        return [self.info(n) for n in self.order]

    def baseline_bytes(self, category: str) -> int:
        """Bytes of one category alive before the step."""
        return sum(b for b, c in self.baseline.values() if c == category)

    def category_of(self, sid: int) -> str:
        """Category of any storage of the step."""
        if sid in self.baseline:
            return self.baseline[sid][1]
        return self.categories.get(sid, "temporary")

    def nbytes(self, sid: int) -> int:
        """Size of a storage of the step."""
        return self.storage_bytes[sid]

    def sids_of(self, category: str) -> set[int]:
        """Storages of one category that the step allocates."""
        return {s for s, c in self.categories.items() if c == category}

    def allocated_bytes(self, category: str) -> int:
        """Bytes of one category that the step allocates (each storage once)."""
        return sum(self.storage_bytes[s] for s in self.sids_of(category))
