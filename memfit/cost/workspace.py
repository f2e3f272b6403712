"""Kernel workspace: allocator bytes that kernels take internally, beyond what the dispatcher sees.

Convolution on CPU (oneDNN) reorders weights and writes through a scratch output; many backward
kernels make their incoming gradient contiguous; these buffers never appear as tensors, yet they
count towards the real peak. memfit measures them per distinct layer: the layer runs forward and
backward on small real inputs under both the storage tracker and the allocator's profiler, and
the difference of the two peaks is its workspace. Layers are deduplicated by signature, inputs are
at most ``CALIBRATION_BATCH`` deep, and larger batches are extrapolated linearly from two small
ones (buffers scale with the batch or not at all). Each input has the strides, dtype and
requires_grad it has in the step: kernels make hidden contiguous copies of channels-last or
permuted inputs (ConvNeXt's LayerNorm between permutes), and a layer priced on contiguous inputs
misses them. A layer that cannot be run alone is logged and named in its node's
``workspace_error``; its workspace stays 0, unmeasured. Random numbers come from a private generator
and the global RNG state is restored, so calibration leaves no trace but a cache: results are kept
in a JSON file per machine and torch build (``$MEMFIT_CACHE_DIR``, default ``~/.cache/memfit``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import torch
import torch.fx as fx

from ..capture.attrs import lookup
from ..capture.graph import MemGraph
from ..capture.trace import LeafSpec, graph_of
from ..capture.tracker import StorageTracker, tensors_in
from ..capture.trainstep import StepConfig
from .measurement import memory_profile

__all__ = ["calibrate", "uncalibrated", "CALIBRATION_BATCH", "CACHE_ENV"]

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8
# Where measured workspaces are kept between runs (default ~/.cache/memfit; "off" disables).
CACHE_ENV = "MEMFIT_CACHE_DIR"
_cache: dict[str, tuple[int, int]] = {}
_loaded: set[Path] = set()


def calibrate(
    graph: MemGraph,
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    config: StepConfig,
    *,
    leaf_modules: LeafSpec = (),
) -> None:
    """Fill ``workspace_fwd`` and ``workspace_bwd`` of every node of ``graph``; a node whose layer
    fails to run alone keeps 0 and gets ``workspace_error`` (see :func:`uncalibrated`).

    Args:
        graph: The MemGraph captured from ``model``.
        model: The real model, or its GraphModule (only copies of single layers are run).
        inputs: The example inputs the graph was captured with.
        config: The step configuration (autocast matters).
        leaf_modules: As given to capture, so node names agree.
    """
    gm = graph_of(model, leaf_modules)
    batch = graph.batch_size
    allocating = {e.node for e in graph.events if e.delta > 0}
    noise = _Noise()
    path = _cache_file()
    if path is not None and path not in _loaded:
        _cache.update(_read(path))
        _loaded.add(path)
    known = len(_cache)
    # The model's inputs need grad only if the caller's do; a conv whose input needs none runs a
    # cheaper backward (no input gradient) with a smaller workspace.
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    input_grad = {name: bool(x.requires_grad) for name, x in zip(placeholders, inputs)}
    with torch.random.fork_rng(devices=[]):
        for node in gm.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method") or node.name not in graph.dag:
                continue
            info = graph.info(node.name)
            if not info.output_shapes or node.name not in allocating:
                continue
            spec = _layer_spec(gm, node, graph, batch, input_grad)
            if spec is None:
                continue
            try:
                fwd, bwd = _workspace_for(spec, batch, config, graph.device, noise)
            except Exception as e:  # one layer's failure must not stop the others, nor pass for 0
                info.workspace_error = f"{type(e).__name__}: {e}".splitlines()[0]
                log.warning("kernel workspace of %s not calibrated, counted as 0: %s", node.name, info.workspace_error)
                continue
            info.workspace_fwd, info.workspace_bwd = fwd, bwd
    if path is not None and len(_cache) > known:
        _write(path)


def uncalibrated(graph: MemGraph) -> dict[str, str]:
    """Nodes whose workspace calibration failed: name -> error (their workspace is counted as 0)."""
    return {i.name: i.workspace_error for i in graph.nodes if i.workspace_error is not None}


def _cache_file() -> Path | None:
    """The file of this machine and torch build (kernels and thread count decide workspaces)."""
    root = os.environ.get(CACHE_ENV, str(Path.home() / ".cache" / "memfit"))
    if root.lower() in ("", "0", "off", "none"):
        return None
    tag = "|".join(
        (torch.__version__, platform.machine(), _cpu_model(), str(torch.get_num_threads()), str(torch.backends.mkldnn.is_available()))
    )
    return Path(root) / f"workspace-{hashlib.sha1(tag.encode()).hexdigest()[:16]}.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _read(path: Path) -> dict[str, tuple[int, int]]:
    """Entries of a cache file; a missing or unreadable one is an empty cache (it is only a cache)."""
    try:
        data = json.loads(path.read_text())
        return {k: (int(v[0]), int(v[1])) for k, v in data.items()}
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return {}


def _write(path: Path) -> None:
    """Merge this process's entries into the file, atomically (parallel runs may share it)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a repr with an address (a lambda argument, say) would never match again: not worth keeping
        merged = {**_read(path), **{k: v for k, v in _cache.items() if " at 0x" not in k}}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs the next run its calibration


class _Meta(NamedTuple):
    """One tensor input of a layer, as the step has it."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool
    scales: bool  # its first dimension is the batch


class _Spec:
    """One layer to calibrate: a callable, its tensor inputs, and whether it writes into them."""

    def __init__(self, fn: Any, args: Any, kwargs: Any, metas: list[_Meta], key: tuple, inplace: bool) -> None:
        self.fn, self.args, self.kwargs, self.metas, self.key = fn, args, kwargs, metas, key
        self.inplace = inplace


def _layer_spec(
    gm: fx.GraphModule, node: fx.Node, graph: MemGraph, batch: int, input_grad: dict[str, bool]
) -> _Spec | None:
    """How to run ``node`` alone, or None when its arguments are not all plain tensors.
    ``input_grad``: whether each of the model's inputs (placeholders) requires grad."""
    metas: list[_Meta] = []
    index: dict[str, int] = {}

    def slot(a: fx.Node) -> Any:
        if a.op == "get_attr":
            value = lookup(gm, str(a.target))
            if not isinstance(value, torch.Tensor):
                raise _Skip
            meta = _Meta(tuple(value.shape), tuple(value.stride()), value.dtype, value.requires_grad, False)
        else:
            info = graph.info(a.name) if a.name in graph.dag else None
            if info is None or len(info.output_shapes) != 1:
                raise _Skip
            shape = tuple(info.output_shapes[0])
            # graphs from before strides were recorded: contiguous, as the layer most likely saw
            strides = tuple(info.output_strides[0]) if info.output_strides else _contiguous(shape)
            dtype = getattr(torch, info.output_dtypes[0])
            if info.output_requires_grad:
                requires_grad = info.output_requires_grad[0]
            else:  # not recorded: the caller's inputs say, and any other float is an activation
                requires_grad = input_grad.get(a.name, dtype.is_floating_point)
            meta = _Meta(shape, strides, dtype, requires_grad, len(shape) > 0 and shape[0] == batch)
        if a.name not in index:
            index[a.name] = len(metas)
            metas.append(meta)
        return _Slot(index[a.name])

    try:
        args = fx.node.map_arg(node.args, slot)
        kwargs = fx.node.map_arg(node.kwargs, slot)
    except _Skip:
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        fn: Any = mod
        kind = f"{type(mod).__module__}.{type(mod).__qualname__}"
        what: tuple = (kind, repr(mod), tuple((n, tuple(p.shape), p.dtype) for n, p in mod.named_parameters()))
    elif node.op == "call_method":
        fn, what = str(node.target), (str(node.target),)
    else:
        fn, what = node.target, (getattr(node.target, "__qualname__", str(node.target)),)
    key = (what, repr(args), repr(kwargs), tuple(metas))  # strides included: layout is part of a layer
    return _Spec(fn, args, kwargs, metas, key, graph.info(node.name).inplace)




class _Skip(Exception):
    pass


class _Slot:
    def __init__(self, i: int) -> None:
        self.i = i

    def __repr__(self) -> str:
        return f"<input {self.i}>"


class _Noise:
    """Random values for calibration inputs and output gradients, drawn once and then sliced:
    workspaces do not depend on the values, and drawing fresh ones cost a third of the time.

    A tensor nothing may write into is a view of the pool, not a copy (the copies took up to a
    tenth of calibration): a leaf that requires grad (autograd refuses in-place writes to it) or a
    gradient handed to backward (backward formulas do not write into their incoming gradients).
    Should a layer write into one all the same (under ``no_grad``, say), the pool's version counter
    shows it and the same values are drawn again, so later layers see what copies would have shown.
    """

    def __init__(self) -> None:
        self._gen = torch.Generator(device="cpu").manual_seed(0)
        self._state = self._gen.get_state()
        self._pool = torch.empty(0)

    def like(
        self, shape: Sequence[int], strides: Sequence[int], dtype: torch.dtype, device: str, *, writable: bool
    ) -> torch.Tensor:
        """Values of ``shape`` laid out with ``strides``; ``writable``: a copy the caller may write
        into, else possibly a view."""
        numel = _extent(shape, strides)
        if self._pool._version:
            self._gen.set_state(self._state)
            self._draw(self._pool.numel())
        if numel > self._pool.numel():
            self._draw(numel)
        flat = self._pool[:numel].to(device=device, dtype=dtype, copy=writable)
        return flat.as_strided(tuple(shape), tuple(strides))

    def _draw(self, numel: int) -> None:
        self._state = self._gen.get_state()
        self._pool = torch.randn(numel, generator=self._gen)


def _workspace_for(spec: _Spec, batch: int, config: StepConfig, device: str, noise: _Noise) -> tuple[int, int]:
    scaled = any(m.scales for m in spec.metas)
    if not scaled or batch <= CALIBRATION_BATCH:
        return _measured(spec, batch, config, device, noise)
    # Batches 2 and 4 fix the line as well as 4 and 8 at half the cost; batch 1 does not (some
    # kernels have a special single-sample path).
    lo, hi = CALIBRATION_BATCH // 4, CALIBRATION_BATCH // 2
    f_lo, b_lo = _measured(spec, lo, config, device, noise)
    f_hi, b_hi = _measured(spec, hi, config, device, noise)

    def extrapolate(a: int, b: int) -> int:
        return max(0, round(b + (b - a) / (hi - lo) * (batch - hi)))

    return extrapolate(f_lo, f_hi), extrapolate(b_lo, b_hi)


def _measured(spec: _Spec, batch: int, config: StepConfig, device: str, noise: _Noise) -> tuple[int, int]:
    key = repr((spec.key, batch, config.amp, device))
    if key not in _cache:
        _cache[key] = _run_layer(spec, batch, config, device, noise)
    return _cache[key]


def _materialize(spec: _Spec, batch: int, device: str, noise: _Noise) -> list[torch.Tensor]:
    out = []
    for m in spec.metas:
        shape, strides = m.shape, m.strides
        if m.scales:
            shape = (batch, *shape[1:])
            strides = _restride(m.shape, m.strides, shape)
        if m.dtype.is_floating_point or m.dtype.is_complex:
            t = noise.like(shape, strides, m.dtype, device, writable=not m.requires_grad)
        else:  # indices: zero is valid for every embedding and gather
            t = torch.zeros(_extent(shape, strides), dtype=m.dtype, device=device).as_strided(shape, strides)
        out.append(t.requires_grad_(m.requires_grad))
    return out


def _contiguous(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _extent(shape: Sequence[int], strides: Sequence[int]) -> int:
    """Elements of the storage a tensor of ``shape`` and ``strides`` spans."""
    if any(n == 0 for n in shape):
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(shape, strides))


def _restride(shape: Sequence[int], strides: Sequence[int], new_shape: Sequence[int]) -> tuple[int, ...]:
    """``strides`` of a tensor of ``shape`` carried over to ``new_shape`` (another batch): the same
    order of dimensions in memory and the same gap after each, so a channels-last or permuted
    input stays one, and a broadcast dimension (stride 0) stays broadcast."""
    out = list(strides)
    span_old = span_new = 1  # elements spanned by the dimensions inside the current one
    for d in sorted(range(len(shape)), key=lambda d: (strides[d], shape[d])):  # innermost first
        if strides[d] == 0:
            continue
        out[d] = max(1, span_new + strides[d] - span_old)
        span_old, span_new = strides[d] * shape[d], out[d] * new_shape[d]
    return tuple(out)


def _run_layer(spec: _Spec, batch: int, config: StepConfig, device: str, noise: _Noise) -> tuple[int, int]:
    """(forward, backward) workspace bytes of one layer at one batch size; raises what the layer
    raises."""
    if device != "cpu":
        return 0, 0  # the CUDA caching allocator is measured whole; see measurement.py
    fn = copy.deepcopy(spec.fn).train() if isinstance(spec.fn, torch.nn.Module) else spec.fn
    leaves = _materialize(spec, batch, device, noise)
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    buffers = list(fn.buffers()) if isinstance(fn, torch.nn.Module) else []

    def arguments() -> list[torch.Tensor]:
        # autograd refuses in-place writes into a leaf that requires grad, and in the step such a
        # layer's input is an activation, not a leaf: give it a copy (strides kept), made per call
        # and before the profiler starts
        if not spec.inplace:
            return leaves
        return [t.clone() if t.requires_grad else t for t in leaves]

    def call(values: list[torch.Tensor]) -> Any:
        args = fx.node.map_aggregate(spec.args, lambda a: values[a.i] if isinstance(a, _Slot) else a)
        kwargs = fx.node.map_aggregate(spec.kwargs, lambda a: values[a.i] if isinstance(a, _Slot) else a)
        with config.autocast(device):
            if isinstance(fn, str):
                return getattr(args[0], fn)(*args[1:], **kwargs)
            return fn(*args, **kwargs)

    out = call(arguments())  # warm-up: lazy initialisation and primitive caches are not workspace
    outs = [t for t in tensors_in(out) if t.requires_grad]
    # incoming gradients laid out as the outputs are (empty_like's rule), as a following layer's
    # backward returns them: a channels-last output gets a channels-last gradient
    layouts = [torch.empty_like(t, device="meta") for t in outs]
    grad_tensors = [noise.like(g.shape, g.stride(), g.dtype, device, writable=False) for g in layouts]
    if outs:
        torch.autograd.backward(outs, grad_tensors)
    del out, outs
    for t in leaves + params:
        t.grad = None
    values = arguments()
    tracker = StorageTracker()
    tracker.register(values + params + buffers + grad_tensors, "input")
    with memory_profile() as prof:
        with tracker:
            out = call(values)
            with torch.profiler.record_function("memfit::backward"):
                pass
            tracker.phase = "backward"
            outs = [t for t in tensors_in(out) if t.requires_grad]
            if outs:
                torch.autograd.backward(outs, grad_tensors[: len(outs)])
            tracker.stop()
    del out, outs
    raw = prof.profiler.kineto_results.events()
    split = min((e.start_ns() for e in raw if e.name() == "memfit::backward"), default=None)
    mem = sorted((e for e in raw if e.name() == "[memory]"), key=lambda e: e.start_ns())
    alloc_fwd = [e.nbytes() for e in mem if split is None or e.start_ns() < split]
    alloc_bwd = [e.nbytes() for e in mem if split is not None and e.start_ns() >= split]
    disp_fwd = [e.delta for e in tracker.events if e.phase == "forward"]
    disp_bwd = [e.delta for e in tracker.events if e.phase == "backward"]
    return (
        max(0, _rise(alloc_fwd) - _rise(disp_fwd)),
        max(0, _rise(alloc_bwd) - _rise(disp_bwd)),
    )


def _rise(deltas: Iterable[int]) -> int:
    """The most a running sum of deltas rises above its start."""
    current = peak = 0
    for d in deltas:
        current += d
        peak = max(peak, current)
    return peak
