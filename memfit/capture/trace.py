"""Tracing: the model as an fx graph, by torch.fx or, where fx cannot, by torch.export.

Tracing runs the forward's Python, so it never runs on the user's model: torch.fx traces a
structural copy (modules copied, tensors shared) and reads buffers as graph values, and
torch.export (:mod:`memfit.capture.export`) exports a copy whose tensors are fake. Either way the
resulting GraphModule refers to the user's own modules, parameters and buffers.
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar, cast

import torch
from torch import fx

from ..errors import MemfitInputError, MemfitTraceError
from .attrs import lookup
from .export import export_graph
from .inputs import as_inputs

__all__ = ["LeafSpec", "as_input_tuple", "check_model", "graph_of", "serialized", "trace"]

log = logging.getLogger(__name__)

# torch.fx patches nn.Module.__call__ and __getattr__ for the whole process while it traces, export
# and the dry run install dispatch modes, and measurement starts the process's one profiler: one
# memfit call at a time, whichever thread makes it.
_LOCK = threading.RLock()
_P = ParamSpec("_P")
_R = TypeVar("_R")


def serialized(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` holding memfit's process-wide lock (the public entry points are wrapped)."""

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with _LOCK:
            return fn(*args, **kwargs)

    return run


LeafSpec = Iterable["type[torch.nn.Module] | str"]


def check_model(model: object) -> torch.nn.Module:
    """The module to capture: a ``torch.compile``d model's original; refused, with the fix, what
    cannot be trained or traced (not a Module, TorchScript, no trainable parameter)."""
    if isinstance(model, torch.nn.Module) and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod  # torch.compile's wrapper: memfit plans the module it compiles
    if isinstance(model, torch.jit.ScriptModule):
        raise MemfitInputError(
            f"model is a TorchScript module ({type(model).__name__}), which neither torch.fx nor torch.export "
            "can capture; pass the nn.Module it was scripted from"
        )
    if not isinstance(model, torch.nn.Module):
        raise MemfitInputError(
            f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object itself "
            "(for a zoo model: memfit.models.create('resnet18'))"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise MemfitInputError(
            f"{type(model).__name__} has no trainable parameters, so a training step has nothing to "
            "update; give a model with parameters that require grad"
        )
    return model


def as_input_tuple(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Normalise example inputs to a tuple of tensors (the model's positional arguments)."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(inputs, (tuple, list)) or not inputs:
        raise MemfitInputError(
            "example_inputs must be a tensor or a non-empty tuple of tensors (the model's "
            f"positional arguments), got {type(example_inputs).__name__}"
        )
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise MemfitInputError(
                f"example_inputs[{i}] is {type(x).__name__}, not a tensor; bind non-tensor "
                "arguments with functools.partial or a wrapper module"
            )
    return tuple(inputs)


class _Tracer(fx.Tracer):
    """An fx tracer that knows which submodule it is inside, to name it when tracing fails."""

    def __init__(self, leaf_modules: LeafSpec = ()) -> None:
        super().__init__()
        leaves = list(leaf_modules)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_paths = {x for x in leaves if isinstance(x, str)}
        self.stack: list[tuple[str, str]] = []
        self.failed_at: tuple[str, str] | None = None
        self.mode_changed_at: str | None = None  # a node made inside no_grad/autocast in forward
        self.opaque: dict[str, str] = {}  # user-declared leaves met while tracing: path -> class

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        # fx runs ``with torch.no_grad():`` and ``with torch.autocast(...):`` while tracing and keeps
        # nothing of them: the graph would train what the forward froze. Such a model is exported.
        if self.mode_changed_at is None and (not torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
            self.mode_changed_at = node.name
        return node

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaf_types) or qualname in self._leaf_paths:
            self.opaque.setdefault(qualname, type(m).__name__)
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(
        self, m: torch.nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self.stack.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def check_leaves(leaf_modules: object, model: torch.nn.Module) -> list[type[torch.nn.Module] | str]:
    """``leaf_modules`` as a list of module types and qualified names of ``model``; a bare name or
    type is one leaf (not a string's characters), and a name the model lacks is an error."""
    items = [leaf_modules] if isinstance(leaf_modules, (str, type)) else leaf_modules
    try:
        leaves = list(cast(Iterable[object], items))  # what is not iterable raises TypeError: caught below
    except TypeError:
        raise MemfitInputError(
            f"leaf_modules={leaf_modules!r}: give module types or qualified names, e.g. leaf_modules=['blocks.0']"
        ) from None
    names = {name for name, _ in model.named_modules()}
    checked: list[type[torch.nn.Module] | str] = []
    for leaf in leaves:
        if isinstance(leaf, type) and issubclass(leaf, torch.nn.Module):
            checked.append(leaf)
            continue
        if not isinstance(leaf, str):
            raise MemfitInputError(f"leaf_modules: {leaf!r} is neither an nn.Module type nor a qualified module name")
        if leaf not in names:
            close = difflib.get_close_matches(leaf, sorted(names - {""}), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else " (see model.named_modules())"
            raise MemfitInputError(f"leaf_modules: {type(model).__name__} has no submodule {leaf!r}{hint}")
        checked.append(leaf)
    return checked


def trace(model: torch.nn.Module, leaf_modules: LeafSpec = (), given: int | None = None) -> fx.GraphModule:
    """Trace a model with torch.fx; a failure names the submodule and the fix.

    Args:
        model: The module to trace (not modified).
        leaf_modules: Module types or qualified names to keep as opaque calls.
        given: How many positional inputs the caller passes: the parameters after them that have
            defaults (``mask=None``, ``is_causal=False``) are traced at those values, not as inputs.

    Returns:
        A GraphModule sharing the model's submodules, parameters and buffers.

    Tracing runs the forward's Python, so it runs on a structural copy (modules copied, tensors
    shared) and reads buffers as graph values: code such as ``self.num_batches_tracked.add_(1)`` in
    a module fx traces through becomes a node of the graph instead of a write into the model.
    """
    tracer = _Tracer(check_leaves(leaf_modules, model))
    tracer.proxy_buffer_attributes = True
    if threading.active_count() > 1:
        log.debug(
            "torch.fx traces %s with other threads alive: modules they call meanwhile see fx's patch",
            type(model).__name__,
        )
    twin = _structural_copy(model)
    try:
        with torch.enable_grad(), torch.autocast("cpu", enabled=False):
            graph = tracer.trace(twin, _defaults_after(model, given))
    except Exception as e:
        path, kind = tracer.failed_at or ("", type(model).__name__)
        if not path:  # a leaf at the top would leave nothing to plan
            raise MemfitTraceError(f"torch.fx cannot trace the forward of {kind}: {type(e).__name__}: {e}") from e
        raise MemfitTraceError(
            f"torch.fx cannot trace submodule '{path}' ({kind}): {type(e).__name__}: {e}\n"
            "Data-dependent Python control flow (if/for on tensor values) cannot be captured. Fix: "
            f"declare it a leaf, e.g. leaf_modules=[{kind}] or leaf_modules=['{path}'], or rewrite the "
            "branch with torch.where."
        ) from e
    if tracer.mode_changed_at is not None:
        raise MemfitTraceError(
            f"torch.fx cannot keep the grad-mode or autocast region of {type(model).__name__}'s forward (from node "
            f"'{tracer.mode_changed_at}'): a graph without it would differ from the model"
        )
    gm = fx.GraphModule(_attributes_of(graph, model, twin), graph, type(model).__name__)
    gm.meta["memfit_opaque"] = dict(tracer.opaque)
    if not any(n.op == "output" for n in gm.graph.nodes) or len(gm.graph.nodes) <= 1:
        raise MemfitInputError(f"{type(model).__name__} traced to an empty graph; nothing to train")
    return gm


def _defaults_after(model: torch.nn.Module, given: int | None) -> dict[str, Any] | None:
    """``forward``'s parameters past the first ``given`` that have defaults, at their defaults."""
    if given is None:
        return None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    fixed = {
        p.name: p.default
        for p in params[given:]
        if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return fixed or None


def _structural_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model's modules copied with its parameters and buffers shared (not copied)."""
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _attributes_of(graph: fx.Graph, model: torch.nn.Module, twin: torch.nn.Module) -> dict[str, Any]:
    """What the graph's modules and attributes refer to: the user's own objects, and the twin's
    for the tensor constants tracing created (``_tensor_constant0``), which only it has."""
    found: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            target = str(n.target)
            own = lookup(model, target)
            found[target] = own if own is not None else lookup(twin, target)
    return found


def graph_of(model: torch.nn.Module, leaf_modules: LeafSpec = (), inputs: Any = None) -> fx.GraphModule:
    """The graph memfit plans on: a GraphModule's own (a planned or compressed model keeps the
    structure it was given), otherwise the model's capture. Capture, calibration and the rewrite
    must all see the same nodes.

    torch.fx first; keyword inputs, or a model fx cannot trace (``**kwargs`` forwards, Python
    branches on shapes: most Hugging Face models), go to torch.export's training IR
    (:mod:`memfit.capture.export`). The graph's ``meta["memfit_capture"]`` says which ran and why.
    """
    if isinstance(model, fx.GraphModule):
        return model
    batch = as_inputs(inputs) if inputs is not None else None
    if batch is None or not batch.kwargs:
        try:
            gm = trace(model, leaf_modules, len(batch.args) if batch is not None else None)
            gm.meta["memfit_capture"] = "torch.fx"
            return gm
        except MemfitTraceError as fx_error:
            if batch is None:
                raise
            failure = str(fx_error)
    else:
        failure = "keyword inputs"
    try:
        gm, _ = export_graph(model, batch.args, batch.kwargs)
    except MemfitTraceError as export_error:
        raise MemfitTraceError(f"{export_error}\ntorch.export was the fallback of: {failure}") from export_error
    gm.meta["memfit_capture"] = f"torch.export (non-strict training IR): {failure.splitlines()[0]}"
    return gm
