"""Running one layer of a captured step alone, on real inputs shaped like the step's.

Calibration (kernel workspaces in :mod:`memfit.cost.workspace`, forward and backward times in
:mod:`memfit.cost.timing`) measures every distinct layer of a graph by itself: its module or
function, called on random inputs with the shapes, strides, dtype and requires_grad the step
gives it, at any batch size. Layers are deduplicated by a signature (what is called, its
arguments, its inputs' metadata), and what is measured per signature is kept in a JSON file per
machine and torch build (``$MEMFIT_CACHE_DIR``, default ``~/.cache/memfit``; ``off`` disables).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import fx

from ..capture.attrs import lookup
from ..capture.graph import MemGraph, NodeInfo
from ..capture.trace import LeafSpec, graph_of
from ..capture.tracker import tensors_in
from ..capture.trainstep import StepConfig

__all__ = ["CACHE_ENV", "DiskCache", "LayerRun", "LayerSpec", "Noise", "calibrate_layers", "restride"]

# Where measurements are kept between runs (default ~/.cache/memfit; "off" disables).
CACHE_ENV = "MEMFIT_CACHE_DIR"

_CALLS = ("call_module", "call_function", "call_method")


class DiskCache(dict):
    """Measurements by key, loaded from and merged into this machine's file for ``kind``.

    ``decode`` turns a JSON value back into an entry; an entry it refuses makes the file unreadable,
    which is an empty cache (it is only a cache).
    """

    def __init__(self, kind: str, decode: Callable[[Any], Any]) -> None:
        super().__init__()
        self.kind, self.decode = kind, decode
        # each file's stamp when last read: a file another process has written since is read
        # again (parallel runs, pytest's workers, a job's ranks share it)
        self._loaded: dict[Path, tuple[int, int]] = {}

    def clear(self) -> None:
        """Forget every entry and which files were read, as a new process would."""
        super().clear()
        self._loaded.clear()

    def path(self) -> Path | None:
        """The file of this machine and torch build (kernels and thread count decide what is measured)."""
        root = os.environ.get(CACHE_ENV, str(Path.home() / ".cache" / "memfit"))
        if root.lower() in ("", "0", "off", "none"):
            return None
        tag = "|".join(
            (
                torch.__version__,
                platform.machine(),
                _cpu_model(),
                str(torch.get_num_threads()),
                str(torch.backends.mkldnn.is_available()),
            )
        )
        return Path(root) / f"{self.kind}-{hashlib.sha1(tag.encode()).hexdigest()[:16]}.json"

    def layer(
        self,
        spec: LayerSpec,
        batch: int,
        config: StepConfig,
        device: str,
        measure: Callable[[], Any],
        variant: str = "",
    ) -> Any:
        """The entry of one layer at one batch size, precision and device (and ``variant`` of the
        measurement, if any); ``measure`` makes it when it is missing."""
        # the thread count too, though the file is already per count: a process that changes it
        # between calls keeps one dict (a LayerNorm's backward buffer is per thread)
        where = (spec.key, batch, config.amp, device, torch.get_num_threads())
        key = repr((*where, variant) if variant else where)
        if key not in self:
            self[key] = measure()
        return self[key]

    def session(self) -> _Session:
        """A context in which the file's entries are loaded, and new ones written back at its end."""
        return _Session(self)

    def read(self, path: Path) -> dict[str, Any]:
        """Entries of a cache file; a missing or unreadable one is empty."""
        try:
            data = json.loads(path.read_text())
            return {k: self.decode(v) for k, v in data.items()}
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            return {}

    def write(self, path: Path) -> None:
        """Merge this process's entries into the file, atomically (parallel runs may share it)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # a repr with an address (a lambda argument, say) would never match again: not worth keeping
            merged = {**self.read(path), **{k: v for k, v in self.items() if " at 0x" not in k}}
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home only costs the next run its calibration


class _Session:
    def __init__(self, cache: DiskCache) -> None:
        self.cache = cache

    def __enter__(self) -> DiskCache:
        self.path = self.cache.path()
        if self.path is not None:
            stamp = _stamp(self.path)
            if self.cache._loaded.get(self.path) != stamp:
                # only entries this process lacks: a figure it has planned with stays what it was
                read = self.cache.read(self.path)
                self.cache.update({k: v for k, v in read.items() if k not in self.cache})
                self.cache._loaded[self.path] = stamp
        self.known = len(self.cache)
        return self.cache

    def __exit__(self, *exc: object) -> None:
        if self.path is not None and len(self.cache) > self.known:
            self.cache.write(self.path)


def _stamp(path: Path) -> tuple[int, int]:
    """The file's modification time and size ((-1, -1) when it does not exist): the size tells two
    writes apart that fall in one tick of the file system's clock."""
    try:
        st = path.stat()
    except OSError:
        return -1, -1
    return st.st_mtime_ns, st.st_size


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


class Meta(NamedTuple):
    """One tensor input of a layer, as the step has it."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool
    scales: bool  # its first dimension is the batch


class LayerSpec:
    """One layer to calibrate: a callable, its tensor inputs, whether it writes into them, and its
    signature ``key`` (equal keys behave alike)."""

    def __init__(
        self,
        fn: Any,
        args: Any,
        kwargs: Any,
        metas: list[Meta],
        key: tuple,
        inplace: bool,
        grads: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        self.fn, self.args, self.kwargs, self.metas, self.key = fn, args, kwargs, metas, key
        self.inplace = inplace
        # output index -> (its shape, the strides of the gradient it receives) in the step, where
        # those are not the output's own layout
        self.grads = grads or {}

    @property
    def scaled(self) -> bool:
        """Whether an input has the batch as its first dimension."""
        return any(m.scales for m in self.metas)


class Calibrated(NamedTuple):
    """What calibrating one node gave: its spec (None when its arguments are not all plain
    tensors, and then it was not run), what was measured, or why it failed."""

    info: NodeInfo
    spec: LayerSpec | None
    result: Any = None
    error: str | None = None


def calibrate_layers(
    graph: MemGraph,
    model: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    cache: DiskCache,
    measure: Callable[[NodeInfo, LayerSpec, Noise], Any],
    *,
    leaf_modules: LeafSpec = (),
    keep: Callable[[NodeInfo], bool] = lambda i: True,
) -> Iterator[Calibrated]:
    """``measure`` every compute node of ``graph`` with outputs that ``keep`` accepts, each run
    alone; one node's failure is reported, and does not stop the others. ``cache`` is loaded
    first and saved when the iteration ends; the global RNG is restored."""
    gm = graph_of(model, leaf_modules)
    noise = Noise()
    with cache.session(), torch.random.fork_rng(devices=[]):
        for info, spec in _layers_of(gm, graph, inputs, keep):
            if spec is None:
                yield Calibrated(info, None)
                continue
            if graph.device == "meta":  # nothing runs there: what the real device would take is unknown
                yield Calibrated(info, spec, error="the model is on the meta device, where no kernel runs")
                continue
            try:
                yield Calibrated(info, spec, measure(info, spec, noise))
            except Exception as e:  # noqa: BLE001  one layer's failure must not stop the others
                yield Calibrated(info, spec, error=f"{type(e).__name__}: {e}".splitlines()[0])


def _layers_of(
    gm: fx.GraphModule, graph: MemGraph, inputs: Sequence[torch.Tensor], keep: Callable[[NodeInfo], bool]
) -> Iterator[tuple[NodeInfo, LayerSpec | None]]:
    # The model's inputs need grad only if the caller's do; a conv whose input needs none runs a
    # cheaper backward (no input gradient), with a smaller workspace.
    # (a placeholder without an input of its own falls back to its dtype in _layer_spec)
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    input_grad = {name: bool(x.requires_grad) for name, x in zip(placeholders, inputs, strict=False)}
    for node in gm.graph.nodes:
        if node.op not in _CALLS or node.name not in graph.dag:
            continue
        info = graph.info(node.name)
        if info.output_shapes and keep(info):
            yield info, _layer_spec(gm, node, graph, graph.batch_size, input_grad)


def _layer_spec(
    gm: fx.GraphModule, node: fx.Node, graph: MemGraph, batch: int, input_grad: dict[str, bool]
) -> LayerSpec | None:
    metas: list[Meta] = []
    index: dict[str, int] = {}

    def slot(a: fx.Node) -> Any:
        if a.op == "get_attr":
            value = lookup(gm, str(a.target))
            if not isinstance(value, torch.Tensor):
                raise _Skip
            meta = Meta(tuple(value.shape), tuple(value.stride()), value.dtype, value.requires_grad, False)
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
            meta = Meta(shape, strides, dtype, requires_grad, len(shape) > 0 and shape[0] == batch)
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
        # a frozen weight skips its gradient and the kernel's buffers for it (a LayerNorm's
        # per-thread dgamma/dbeta): the same layer trainable is another layer
        params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in mod.named_parameters())
        what: tuple = (kind, repr(mod), params)
    elif node.op == "call_method":
        fn, what = str(node.target), (str(node.target),)
    else:
        fn, what = node.target, (getattr(node.target, "__qualname__", str(node.target)),)
    info = graph.info(node.name)
    grads = {k: (tuple(info.output_shapes[k]), strides) for k, strides in sorted(info.grad_strides.items())}
    key: tuple = (what, repr(args), repr(kwargs), tuple(metas))  # strides included: layout is part of a layer
    if grads:  # and the layout of the gradients it receives
        key = (*key, tuple(grads.items()))
    return LayerSpec(fn, args, kwargs, metas, key, info.inplace, grads)


class _Skip(Exception):
    """An argument that is not one plain tensor: the layer cannot be rebuilt to run alone."""


class _Slot:
    def __init__(self, i: int) -> None:
        self.i = i

    def __repr__(self) -> str:
        return f"<input {self.i}>"


class Noise:
    """Random values for calibration inputs and output gradients, drawn once and then sliced:
    what is measured does not depend on the values, and drawing fresh ones cost a third of the time.

    A tensor nothing may write into is a view of the pool, not a copy (the copies took up to a
    tenth of calibration): a leaf that requires grad (autograd refuses in-place writes to it) or a
    gradient handed to backward (backward formulas do not write into their incoming gradients).
    Should a layer write into one all the same (under ``no_grad``, say), the pool's version counter
    shows it and the same values are drawn again, so later layers see what copies would have shown.
    Draws come from a private generator: the global RNG is not touched.
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


class LayerRun:
    """A layer made runnable alone at one batch size: a copy of its module in training mode (the
    model's running statistics stay untouched) and leaf inputs laid out as the step's."""

    def __init__(self, spec: LayerSpec, batch: int, config: StepConfig, device: str, noise: Noise) -> None:
        self.spec, self.config, self.device, self.noise = spec, config, device, noise
        fn = spec.fn
        self.fn = copy.deepcopy(fn).train() if isinstance(fn, torch.nn.Module) else fn
        self.leaves = _materialize(spec, batch, device, noise)
        self.params = list(self.fn.parameters()) if isinstance(self.fn, torch.nn.Module) else []
        self.buffers = list(self.fn.buffers()) if isinstance(self.fn, torch.nn.Module) else []

    def arguments(self) -> list[torch.Tensor]:
        """Input values for one call, made before any clock or profiler starts."""
        # autograd refuses in-place writes into a leaf that requires grad, and in the step such a
        # layer's input is an activation, not a leaf: give it a copy (strides kept), made per call
        if not self.spec.inplace:
            return self.leaves
        return [t.clone() if t.requires_grad else t for t in self.leaves]

    def call(self, values: list[torch.Tensor]) -> Any:
        """The layer's forward on ``values``, under the step's autocast."""
        spec, fn = self.spec, self.fn
        args = fx.node.map_aggregate(spec.args, lambda a: values[a.i] if isinstance(a, _Slot) else a)
        kwargs = fx.node.map_aggregate(spec.kwargs, lambda a: values[a.i] if isinstance(a, _Slot) else a)
        with self.config.autocast(self.device):
            if isinstance(fn, str):
                return getattr(args[0], fn)(*args[1:], **kwargs)
            return fn(*args, **kwargs)

    def gradients(self, out: Any) -> list[torch.Tensor]:
        """Incoming gradients for the outputs that require grad, laid out as in the step: as the
        outputs are (empty_like's rule: a channels-last output gets a channels-last gradient), or
        as the step's gradient was where that differed (a slice of a concatenation's gradient)."""
        grads = []
        for k, t in enumerate(tensors_in(out)):
            if not t.requires_grad:
                continue
            strides = tuple(torch.empty_like(t, device="meta").stride())
            if k in self.spec.grads:
                shape, step_strides = self.spec.grads[k]
                strides = restride(shape, step_strides, tuple(t.shape))
            grads.append(self.noise.like(tuple(t.shape), strides, t.dtype, self.device, writable=False))
        return grads

    def clear_grads(self) -> None:
        """Drop the gradients a backward left on the inputs and parameters."""
        for t in self.leaves + self.params:
            t.grad = None


def backward(out: Any, grads: list[torch.Tensor]) -> None:
    """Backward from the outputs of a layer that require grad, if any."""
    outs = [t for t in tensors_in(out) if t.requires_grad]
    if outs:
        torch.autograd.backward(outs, grads[: len(outs)])


def _materialize(spec: LayerSpec, batch: int, device: str, noise: Noise) -> list[torch.Tensor]:
    out = []
    for m in spec.metas:
        shape, strides = m.shape, m.strides
        if m.scales:
            shape = (batch, *shape[1:])
            strides = restride(m.shape, m.strides, shape)
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
    return 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))


def restride(shape: Sequence[int], strides: Sequence[int], new_shape: Sequence[int]) -> tuple[int, ...]:
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


def extrapolate(batch: int, lo: int, hi: int, at_lo: float, at_hi: float) -> float:
    """The line through (lo, at_lo) and (hi, at_hi) at ``batch``, never below 0: what is measured
    scales with the batch or not at all."""
    return max(0.0, at_hi + (at_hi - at_lo) / (hi - lo) * (batch - hi))
