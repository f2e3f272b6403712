"""Capture with torch.export (non-strict, training IR) for models torch.fx cannot trace.

``torch.fx.symbolic_trace`` fails on most Hugging Face models (``**kwargs`` forwards, keyword
tensor inputs, Python branches on shapes). ``torch.export`` in non-strict mode runs the real
Python forward on fake tensors, so all of that works; its training IR keeps ATen ops at the
pre-dispatch level (``aten.linear``, ``aten.dropout``, ``aten.batch_norm`` with its in-place
running-statistics update), which autograd differentiates exactly like eager.

:func:`export_graph` turns the exported program into the kind of GraphModule the rest of memfit
gets from ``symbolic_trace``:

* placeholders are the flat tensor inputs, parameters and buffers are ``get_attr`` nodes named by
  the model's own qualified names and bound to the model's own tensors;
* the output node returns the model's own output structure (a ``ModelOutput``, a dict, ...),
  rebuilt by an ordinary ``tree_unflatten`` node, so ``gm(...)`` and ``fx.Interpreter(gm).run``
  agree without pytree codegen;
* buffer mutations are in-place ops on those ``get_attr`` buffers, once per call;
* grad-mode and autocast regions are plain calls of :func:`run_with_grad_mode` /
  :func:`run_with_autocast` on a sub-GraphModule;
* every compute node says in ``meta["memfit_module"]`` which user module it came from.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ..errors import MemfitInputError, MemfitTraceError
from .attrs import lookup

__all__ = ["OUTPUT_SPEC_ATTR", "bind", "export_graph", "rebuild_output", "run_with_autocast", "run_with_grad_mode"]

OUTPUT_SPEC_ATTR = "_memfit_out_spec"
"""The attribute holding the output's TreeSpec when pytree cannot write it as text."""

_TORCH_DIR = os.path.dirname(torch.__file__)


def run_with_grad_mode(enabled: bool, body: fx.GraphModule, *args: Any) -> Any:
    """Run ``body`` with grad mode ``enabled`` (a ``with torch.no_grad():`` block of the forward).

    Replaces the ``wrap_with_set_grad_enabled`` higher-order op: a plain function runs under any
    dispatch mode (memfit's dry run installs its own), and restores the mode on an exception.
    """
    with torch.set_grad_enabled(enabled):
        return body(*args)


def run_with_autocast(
    device_type: str,
    dtype: torch.dtype | None,
    enabled: bool,
    cache_enabled: bool | None,
    body: fx.GraphModule,
    *args: Any,
) -> Any:
    """Run ``body`` under ``torch.autocast`` (an autocast block of the forward); replaces
    ``wrap_with_autocast`` for the same reasons as :func:`run_with_grad_mode`."""
    with torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled):
        return body(*args)


@functools.lru_cache(maxsize=64)
def _spec_from_text(text: str) -> pytree.TreeSpec:
    return pytree.treespec_loads(text)


def rebuild_output(leaves: list[Any], spec: pytree.TreeSpec | str) -> Any:
    """The model's output structure from the graph's flat outputs (``spec`` as a TreeSpec or its
    ``treespec_dumps`` text). An ordinary node, so every way of running the graph returns it."""
    return pytree.tree_unflatten(leaves, _spec_from_text(spec) if isinstance(spec, str) else spec)


def _hop_replacements() -> dict[Any, Callable[..., Any]]:
    ops = torch.ops.higher_order
    table: dict[Any, Callable[..., Any]] = {}
    if hasattr(ops, "wrap_with_set_grad_enabled"):
        table[ops.wrap_with_set_grad_enabled] = run_with_grad_mode
    if hasattr(ops, "wrap_with_autocast"):
        table[ops.wrap_with_autocast] = run_with_autocast
    return table


def export_graph(
    model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, training: bool = True
) -> tuple[fx.GraphModule, list[str]]:
    """Capture ``model(*args, **kwargs)`` as an fx GraphModule over the model's own parameters.

    The model is never run: a structural copy whose parameters and buffers are fake is exported,
    so neither values nor Python attributes of the user's model can change.

    A Hugging Face model whose output would hold its KV cache (a type export cannot return) is
    captured with ``use_cache=False`` when the caller did not choose: ``past_key_values`` is then
    None in the graph's output.

    Args:
        model: The network. Its parameters and buffers become the graph's ``get_attr`` targets.
        args: Positional arguments of ``forward`` (nested containers allowed).
        kwargs: Keyword arguments of ``forward``. Non-tensor values (flags, ``None``) are baked
            into the graph, like every Python value export sees.
        training: Mode of the capture. Export bakes it into the ops (``dropout(train=...)``,
            ``batch_norm(training=...)``): the GraphModule's ``.train()``/``.eval()`` cannot
            change it afterwards. memfit plans training, hence the default.

    Returns:
        ``(gm, input_names)``. The placeholders of ``gm`` are the tensor leaves of
        ``(args, kwargs)`` in ``torch.utils._pytree`` order: positional arguments first, then the
        keyword arguments in the order the dict lists them; ``input_names`` names them after the
        ``forward`` signature (``input_ids``, ``attention_mask``, ``x_0`` for ``x[0]``).
        ``gm(*flat_tensors)`` returns what ``model(*args, **kwargs)`` returns.
    """
    kwargs = dict(kwargs or {})
    if not isinstance(model, torch.nn.Module):
        raise MemfitInputError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    name = type(model).__name__
    clone = _fake_structural_copy(model, training)
    ex_args, ex_kwargs = _distinct_inputs(args, kwargs)
    try:
        ep = torch.export.export(clone, ex_args, ex_kwargs, strict=False)
    except Exception as e:
        if not _cache_is_the_problem(clone, kwargs, e):
            raise _trace_error(name, e) from e
        # A Hugging Face model returns its KV cache (a type pytree does not know) unless told not
        # to; a training step never reads it, so capture without it.
        ex_kwargs["use_cache"] = kwargs["use_cache"] = False
        try:
            ep = torch.export.export(clone, ex_args, ex_kwargs, strict=False)
        except Exception as e2:
            raise _trace_error(name, e2) from e2
    unlifted = ep.module(check_guards=False)
    graph, attrs, input_names = _rebuild(unlifted, ep.call_spec.in_spec, ep.call_spec.out_spec, args, kwargs, name)
    root = _root_for(model, unlifted, attrs)
    gm = fx.GraphModule(root, graph, name)
    gm.train(training)
    return gm, input_names


def _cache_is_the_problem(model: torch.nn.Module, kwargs: dict, e: Exception) -> bool:
    """Whether export failed on a returned KV cache that ``use_cache=False`` would drop."""
    if "use_cache" in kwargs or "which is not a known type" not in str(e) or "Cache" not in str(e):
        return False
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def bind(
    gm: fx.GraphModule, model: torch.nn.Module, convert: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> fx.GraphModule:
    """``gm``'s graph over another model of the same structure (e.g. memfit's fake copy).

    Parameters and buffers are looked up on ``model``; what only the export created (grad-mode
    bodies, the output spec, tensor constants) is taken from ``gm``, tensors through ``convert``
    (``FakeTensorMode.from_tensor`` to run the graph under that mode).
    """
    root: dict[str, Any] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            target = str(n.target)
            found = lookup(model, target)
            if not isinstance(found, torch.Tensor):
                found = lookup(gm, target)
                if isinstance(found, torch.Tensor) and convert is not None:
                    found = convert(found)
            root[target] = found
    out = fx.GraphModule(root, gm.graph, type(model).__name__)
    out.train(gm.training)
    return out


def _fake_structural_copy(model: torch.nn.Module, training: bool) -> torch.nn.Module:
    """A deep copy whose parameters and buffers are fake (nothing can be read or written) and
    whose modules and Python attributes are fresh (forward-time ``self.x = ...`` stays private)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    memo: dict[int, Any] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in memo:
            fake = p if isinstance(p, FakeTensor) else mode.from_tensor(p.detach(), static_shapes=True)
            memo[id(p)] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
    for _, b in model.named_buffers(remove_duplicate=False):
        if id(b) not in memo:
            memo[id(b)] = b if isinstance(b, FakeTensor) else mode.from_tensor(b, static_shapes=True)
    clone = copy.deepcopy(model, memo)
    clone.train(training)
    return clone


def _distinct_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The inputs with no two tensor leaves sharing storage.

    Export keys its input placeholders by tensor identity: ``labels=input_ids`` (the usual
    language-model call) would become ONE placeholder, and the graph would read ``labels`` where
    the model reads ``input_ids``. Export never reads input values (non-strict mode fakes them),
    so a clone of the duplicates is as good as the original.
    """
    seen: set[Any] = set()

    def fresh(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        key = (x.untyped_storage().data_ptr(), x.device) if not isinstance(x, FakeTensor) else id(x.untyped_storage())
        if key in seen or id(x) in seen:
            x = x.clone()
        seen.add(key)
        seen.add(id(x))
        return x

    out_args, out_kwargs = pytree.tree_map(fresh, (args, kwargs))
    return out_args, out_kwargs


def _rebuild(
    unlifted: fx.GraphModule,
    in_spec: pytree.TreeSpec,
    out_spec: pytree.TreeSpec | None,
    args: tuple,
    kwargs: dict,
    model_name: str,
) -> tuple[fx.Graph, dict[str, Any], list[str]]:
    """The memfit graph: flat tensor placeholders first, then every ``get_attr``, then the ops;
    non-tensor inputs replaced by their values; the output rebuilt by a ``tree_unflatten`` node."""
    old = unlifted.graph
    placeholders = [n for n in old.nodes if n.op == "placeholder"]
    if len(placeholders) != in_spec.num_leaves:
        raise MemfitTraceError(
            f"torch.export returned {len(placeholders)} inputs for {model_name} where "
            f"{in_spec.num_leaves} were expected; memfit cannot map them to the example inputs"
        )
    # Export's leaf order may differ from the caller's (kwargs in signature order): match by key path.
    index_tree = pytree.tree_unflatten(list(range(in_spec.num_leaves)), in_spec)
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    input_names: list[str] = []
    for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]:
        src = placeholders[pytree.key_get(index_tree, path)]
        if isinstance(leaf, torch.Tensor):
            env[src] = graph.placeholder(src.name)
            env[src].meta.update(src.meta)
            input_names.append(env[src].name)
        else:
            env[src] = leaf  # baked: export specialised on this value already
    hops = _hop_replacements()
    attrs: dict[str, Any] = {}
    root_path = ("", model_name)
    for n in old.nodes:
        if n.op == "get_attr":
            env[n] = graph.node_copy(n, lambda x: env[x])
            attrs[str(n.target)] = lookup(unlifted, str(n.target))
    for n in old.nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        if n.op == "call_module":  # only export's own helpers (_guards_fn): not user compute
            if not n.users:
                continue
            raise MemfitTraceError(f"unexpected call_module node {n.target!r} in the export of {model_name}")
        new = graph.node_copy(n, lambda x: env[x])
        if new.target in hops:
            new.target = hops[new.target]
        new.meta["memfit_module"] = _module_of(n, root_path, unlifted)
        mutated = _mutated_attrs(new)
        if mutated:
            new.meta["memfit_mutates"] = mutated
        env[n] = new
    leaves = [env[x] if isinstance(x, fx.Node) else x for x in pytree.tree_leaves(old.output_node().args[0])]
    if out_spec is None or out_spec.is_leaf():
        result: Any = leaves[0] if leaves else None
    else:
        try:  # as text the spec is a literal of the graph: no attribute to carry to other roots
            spec: Any = pytree.treespec_dumps(out_spec)
            pytree.treespec_loads(spec)
        except (NotImplementedError, TypeError, ValueError, KeyError):  # a type pytree cannot write: keep the object
            spec = graph.get_attr(OUTPUT_SPEC_ATTR)
            attrs[OUTPUT_SPEC_ATTR] = out_spec
        result = graph.call_function(rebuild_output, (leaves, spec))
        result.name = "memfit_output"
        result.meta["memfit_module"] = root_path
    graph.output(result)
    _replace_hops_in_bodies(attrs, hops)
    graph.lint()
    return graph, attrs, input_names


def _module_of(n: fx.Node, root: tuple[str, str], owner: fx.GraphModule) -> tuple[str, str]:
    """(path, class name) of the innermost module a node came from; the model itself if none.

    A grad-mode or autocast region is recorded at the module that opened it, though it may lie
    wholly inside one submodule: it is then attributed to the deepest module enclosing its body.
    """
    stack = [(str(path), kind) for path, kind in (n.meta.get("nn_module_stack") or {}).values()]
    for arg in n.args:
        body = lookup(owner, str(arg.target)) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None
        if isinstance(body, fx.GraphModule):
            inner = _common_stack(body)
            if len(inner) > len(stack):
                stack = inner
    if not stack:
        return root
    path, kind = stack[-1]
    kind_name = kind.__name__ if isinstance(kind, type) else str(kind).rsplit(".", 1)[-1]
    return (path, kind_name)


def _common_stack(body: fx.GraphModule) -> list[tuple[str, Any]]:
    """The module stack shared by every op of a region's body (the longest common prefix)."""
    common: list[tuple[str, Any]] | None = None
    for n in body.graph.nodes:
        if n.op != "call_function":
            continue
        stack = [(str(p), k) for p, k in (n.meta.get("nn_module_stack") or {}).values()]
        if common is None:
            common = stack
        else:
            k = 0
            while k < min(len(common), len(stack)) and common[k][0] == stack[k][0]:
                k += 1
            common = common[:k]
    return common or []


def _composite_writes() -> dict[Any, tuple[int, tuple[int, ...]]]:
    """Composite ops whose schema hides a write: op -> (index of the flag that enables it, written args)."""
    aten = torch.ops.aten
    return {aten.batch_norm.default: (5, (3, 4)), aten.instance_norm.default: (5, (3, 4))}


def _mutated_attrs(n: fx.Node) -> tuple[str, ...]:
    """Targets of the ``get_attr`` buffers an in-place op writes (through views of them too):
    a checkpoint that recomputes such a node would update the buffer twice."""
    schema = getattr(n.target, "_schema", None)
    if n.op != "call_function" or schema is None:
        return ()
    composite = _composite_writes().get(n.target)
    if composite is not None:
        flag, indices = composite
        written = [n.args[i] for i in indices if len(n.args) > flag and n.args[flag] is True]
    elif schema.is_mutable:
        written = [
            value
            for arg_schema, value in zip(schema.arguments, n.args, strict=False)  # n.args omits defaulted arguments
            if arg_schema.alias_info is not None and arg_schema.alias_info.is_write
        ]
    else:
        return ()
    out: list[str] = []
    for value in written:
        if not isinstance(value, fx.Node):
            continue
        base = value
        while base.op == "call_function" and base.args and isinstance(base.args[0], fx.Node) and _is_view(base):
            base = base.args[0]
        if base.op == "get_attr":
            out.append(str(base.target))
    return tuple(out)


def _is_view(n: fx.Node) -> bool:
    schema = getattr(n.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None and not schema.is_mutable)


def _replace_hops_in_bodies(attrs: dict[str, Any], hops: dict[Any, Callable[..., Any]]) -> None:
    """Grad-mode and autocast bodies may nest further regions: replace those too."""
    pending = [v for v in attrs.values() if isinstance(v, fx.GraphModule)]
    while pending:
        body = pending.pop()
        changed = False
        for n in body.graph.nodes:
            if n.op == "call_function" and n.target in hops:
                n.target, changed = hops[n.target], True
            elif n.op == "get_attr":
                sub = lookup(body, str(n.target))
                if isinstance(sub, fx.GraphModule):
                    pending.append(sub)
        if changed:
            body.recompile()


def _root_for(model: torch.nn.Module, unlifted: fx.GraphModule, attrs: dict[str, Any]) -> dict[str, Any]:
    """What each ``get_attr`` target resolves to: the user's own tensor where the model has one
    (parameters, buffers, tensor attributes), otherwise what the export created."""
    root: dict[str, Any] = {}
    for target, exported in attrs.items():
        own = lookup(model, target)
        own = own if isinstance(own, torch.Tensor) else None  # export's own names never mean the model's objects
        if own is None and isinstance(exported, FakeTensor):
            raise MemfitTraceError(
                f"the export of {type(model).__name__} made '{target}' a constant computed from the model's "
                "parameters or buffers, which memfit cannot rebind; compute it inside forward or register it as a "
                "buffer"
            )
        root[target] = own if own is not None else exported
    return root


_VALUE_FIX = "make it value-independent (torch.where, masks of fixed shape)"
_CONSTRUCTS = (  # (markers in the error, the construct, the fix)
    (
        ("GuardOnDataDependentSymNode", "data-dependent", "DataDependentOutputException", "item()"),
        "Python control flow or an output shape that depends on tensor values",
        _VALUE_FIX,
    ),
    (("DynamicOutputShapeException", "nonzero"), "an op whose output shape depends on tensor values", _VALUE_FIX),
    (
        ("which is not a known type",),
        "an input or output of a type pytree does not know",
        "register it with torch.utils._pytree.register_pytree_node, or pass/return plain tensors",
    ),
    (
        ("Unsupported", "not supported", "NotImplementedError"),
        "an operation torch.export does not support",
        "avoid the operation on the captured path, or pass inputs that do not reach it",
    ),
)


def _trace_error(model_name: str, e: Exception) -> MemfitTraceError:
    """A MemfitTraceError naming the model class, the construct and the user's line that failed."""
    # torch appends whole graphs: its first line says what failed
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    construct, fix = next(
        ((what, fix) for keys, what, fix in _CONSTRUCTS if any(k in text for k in keys)),
        ("its forward", "check that the example inputs are what forward expects"),
    )
    where = ""
    # the user's line: the innermost frame outside torch and its generated code
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith((_TORCH_DIR, "<"))]
    if frames:
        f = frames[-1]
        where = f" at {f.filename}:{f.lineno} ({f.line.strip() if f.line else f.name})"
    return MemfitTraceError(f"torch.export cannot capture {model_name}: {construct}{where}.\n{text}\nFix: {fix}.")
