"""The compression pass: a new module whose chosen conv/linear weights come from generators."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from ..capture.inputs import Inputs, as_inputs
from ..capture.trace import LeafSpec, check_model, serialized, trace
from ..errors import MemfitInputError
from ..models import spec_of
from .base import CompressConfig, Method, WeightGenerator
from .layer import COMPRESSIBLE, GeneratedConv2d, GeneratedLinear, generated_layer

__all__ = ["META_KEY", "canonical", "choose_layers", "compress", "generators", "plain_state", "trace_compressed"]

log = logging.getLogger(__name__)

# GraphModule.meta key for what a saved file needs to rebuild the model (it survives deepcopy).
META_KEY = "memfit"


def canonical(name: str) -> tuple[int, str]:
    """Sort key that prefers a module's own path over the longer ones a planned model adds
    (a checkpointed segment reaches the same submodules under its own prefix)."""
    return name.count("."), name


def generators(model: nn.Module) -> dict[str, WeightGenerator]:
    """The weight generators of a (compressed, possibly planned) model, by qualified name."""
    best: dict[int, tuple[str, WeightGenerator]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, WeightGenerator) and (id(m) not in best or canonical(name) < canonical(best[id(m)][0])):
            best[id(m)] = (name, m)
    return dict(sorted(best.values(), key=lambda item: canonical(item[0])))


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of the modules outside the generators (a generator that
    reads another layer's weight does not own it), each once, under its own path."""
    inside = tuple(
        f"{name}." for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, WeightGenerator)
    )
    best: dict[int, tuple[str, torch.Tensor]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key.startswith(inside) or not isinstance(value, torch.Tensor):
            continue
        if id(value) not in best or canonical(key) < canonical(best[id(value)][0]):
            best[id(value)] = (key, value)
    return dict(sorted(best.values(), key=lambda kv: kv[0]))


def _execution_order(model: nn.Module, leaves: list) -> list[str]:
    """Names of the compressible layers in the order the forward calls them (first call counts)."""
    gm = trace(model, leaves)
    seen: dict[str, None] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), COMPRESSIBLE):
            seen.setdefault(str(n.target), None)
    return list(seen)


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module owns (tied weights)."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {pid for pid, count in owners.items() if count > 1}


def choose_layers(model: nn.Module, config: CompressConfig, leaf_modules: LeafSpec = ()) -> list[str]:
    """The layers ``config`` selects, in execution order: Conv2d and Linear, minus the first conv
    and the classifier when the config skips them, minus layers whose weight is tied to another
    module's (compressing one side would untie them)."""
    order = _execution_order(model, list(leaf_modules))
    convs = [n for n in order if isinstance(model.get_submodule(n), nn.Conv2d)]
    linears = [n for n in order if isinstance(model.get_submodule(n), nn.Linear)]
    skipped = set()
    if config.skip_first_conv and convs:
        skipped.add(convs[0])
    if config.skip_classifier and linears:
        skipped.add(linears[-1])
    tied = _shared_weights(model)
    chosen = []
    for name in order:
        if name in skipped or not config.selects(name):
            continue
        if parametrize.is_parametrized(model.get_submodule(name), "weight"):
            # its weight is computed from another parameter (spectral norm, weight norm); reading it
            # would even run the parametrization, which may update the model's buffers
            log.info("not compressing %s: its weight is parametrized", name)
            continue
        if id(model.get_submodule(name).weight) in tied:
            log.info("not compressing %s: its weight is tied to another module", name)
            continue
        chosen.append(name)
    return chosen


def trace_compressed(model: nn.Module, leaf_modules: LeafSpec = ()) -> fx.GraphModule:
    """Trace a model whose layers were swapped for generated ones, keeping those layers as
    modules of the GraphModule (so its generators can be found, counted and saved)."""
    gm = trace(model, [*leaf_modules, GeneratedConv2d, GeneratedLinear])
    spec = spec_of(model)
    gm.meta[META_KEY] = {"architecture": spec} if spec else {}
    return gm


@serialized
def compress(
    model: nn.Module,
    method: str | Method,
    config: CompressConfig | None = None,
    example_inputs: Any = None,
    *,
    leaf_modules: Iterable[type[nn.Module] | str] = (),
) -> fx.GraphModule:
    """A copy of ``model`` whose selected conv/linear weights are generated from compact,
    trainable parameters at every forward (the user's model is not modified).

    Args:
        model: The network, ideally trained: generators are initialised by projecting its weights.
        method: ``"ternary"`` (EC2T), ``"generated"`` (MLG), ``"shared"`` (MESS), or a Method.
        config: The method's config dataclass (``memfit.compressors.TernaryConfig`` ...); defaults
            skip the first conv and the classifier, as the seeds do.
        example_inputs: If given, the compressed model is run once on them to check that it
            computes outputs of the original's shapes.
        leaf_modules: Module types or qualified names torch.fx should not trace into.

    Returns:
        An fx GraphModule. Its generated layers are ``GeneratedConv2d``/``GeneratedLinear``
        modules under the original layer names; ``memfit.compressors.storage_table(model)``
        accounts for its storage and ``memfit.save`` writes it packed.

    Example:
        >>> import torch, memfit
        >>> net = memfit.models.create("resnet18", stem="cifar", num_classes=10, width=16)
        >>> small = memfit.compress(net, "ternary")
        >>> small(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 10])
    """
    from . import get_method  # the registry imports every method module, which imports this one

    model = check_model(model)
    impl = method if isinstance(method, Method) else get_method(method)
    config = impl.config_type() if config is None else config
    if not isinstance(config, impl.config_type):
        raise MemfitInputError(
            f"config for {impl.name!r} must be a {impl.config_type.__name__}, got {type(config).__name__}"
        )
    if generators(model):
        raise MemfitInputError(
            f"{type(model).__name__} is already compressed ({len(generators(model))} generated layers); "
            "compress the original model instead"
        )
    leaves = list(leaf_modules)
    expected = None if example_inputs is None else _reference_shapes(model, example_inputs)
    clone = copy.deepcopy(model)
    layers = choose_layers(clone, config, leaves)
    if not layers:
        raise MemfitInputError(
            f"no layer to compress in {type(model).__name__}: the config selects none of its Conv2d/Linear "
            "layers (check include/exclude, skip_first_conv, skip_classifier)"
        )
    built = impl.build(clone, layers, config)
    for name, why in impl.skipped.items():
        log.info("%s left %s uncompressed: %s", impl.name, name, why)
    for name, gen in built.items():
        clone.set_submodule(name, generated_layer(clone.get_submodule(name), gen))
    gm = trace_compressed(clone, leaves)
    if expected is not None:
        got = _output_shapes(gm, as_inputs(example_inputs))
        if got != expected:
            raise MemfitInputError(f"the compressed model's outputs {got} differ in shape from {expected}")
    return gm


def _output_shapes(model: nn.Module, inputs: Inputs) -> list[tuple[int, ...]]:
    """Shapes of the outputs of one forward in eval mode, on a copy (no side effects on buffers)."""
    with torch.no_grad():
        out = inputs.call(copy.deepcopy(model).eval())
    return [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else (out,))]


def _reference_shapes(model: nn.Module, example_inputs: Any) -> list[tuple[int, ...]]:
    """The original's output shapes; a batch it cannot run is the caller's error, said before compressing."""
    inputs = as_inputs(example_inputs)
    try:
        return _output_shapes(model, inputs)
    except Exception as e:  # noqa: BLE001  whatever torch raises, the batch does not fit the user's own model
        shapes = [list(t.shape) for t in inputs.tensors]
        first = str(e).splitlines()[0] if str(e) else ""
        raise MemfitInputError(
            f"example_inputs of shapes {shapes} do not fit {type(model).__name__} ({type(e).__name__}: {first}); "
            "give a batch shaped like a training batch, or leave example_inputs out"
        ) from None
