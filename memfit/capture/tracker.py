"""Live tensor-storage tracking at the dispatcher: the device-independent view of a step's memory.

The tracker sees every storage an ATen operator returns and notices the moment it is freed
(storage Python objects are preserved for as long as the storage lives, so a finalizer fires at
the real free). Run under ``FakeTensorMode`` it gives an exact dry run without allocating; run on
real tensors it is the dispatch-level half of :func:`memfit.measure`. Buffers that kernels allocate
internally never reach the dispatcher: :mod:`memfit.cost.workspace` accounts for those.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["Event", "LimitExceeded", "StorageTracker", "tensors_in"]


@dataclass(frozen=True)
class Event:
    """One allocation (``delta > 0``) or free (``delta < 0``) of a storage during a step.

    Attributes:
        sid: Storage id, unique within one tracked run.
        delta: Bytes allocated (positive) or freed (negative).
        phase: ``"forward"``, ``"backward"`` or ``"optimizer"``.
        node: Name of the graph node (or ``"loss"``/``"optimizer"``) that was running.
    """

    sid: int
    delta: int
    phase: str
    node: str


class LimitExceeded(Exception):
    """A tracked run's live storages passed its ``limit``: the step's peak is above it."""


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """All tensors in a (nested) container, in pytree order."""
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


class StorageTracker(TorchDispatchMode):
    """Records allocation and free events of tensor storages, attributed to a node and phase.

    Storages that exist before the step (parameters, buffers, optimizer state, inputs) are
    registered with :meth:`register` and form the baseline; everything else is an event.
    ``phase`` and ``node`` are set by the caller as the step advances. With a ``limit``, an
    allocation that takes the live bytes (baseline included) above it sets ``exceeded`` and stops
    recording: whatever the step does next, its peak is above the limit, so a caller that only asks
    whether it fits may stop the step (:meth:`check`) at the next point where Python may raise (an
    error raised here, inside an operator, can abort the process: a ``prim.device`` query that
    C++ makes does).
    """

    def __init__(self, limit: int | None = None) -> None:
        super().__init__()
        self.limit = limit
        self.level = 0  # live bytes: the baseline and every event so far
        self.exceeded = False
        self.phase = "forward"
        self.node = ""
        self.events: list[Event] = []
        self.baseline: dict[int, tuple[int, str]] = {}  # sid -> (bytes, category)
        self.nbytes: dict[int, int] = {}  # sid -> bytes, for every storage seen
        self._live: dict[int, int] = {}  # id(storage object) -> sid
        self._next_sid = 0
        self._recording = True

    # -- storage identity -------------------------------------------------------------------
    def sid_of(self, t: torch.Tensor) -> int | None:
        """The storage id of a tensor's storage, or None when the tracker never saw it."""
        return self._live.get(id(t.untyped_storage()))

    def _add(self, storage: torch.UntypedStorage, nbytes: int | None = None) -> tuple[int, bool]:
        key = id(storage)
        sid = self._live.get(key)
        if sid is not None:
            return sid, False
        sid = self._next_sid
        self._next_sid += 1
        self._live[key] = sid
        self.nbytes[sid] = storage.nbytes() if nbytes is None else nbytes
        weakref.finalize(storage, self._on_free, key, sid)
        return sid, True

    def register(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Declare storages alive before the step; shared storages are counted once."""
        for t in tensors:
            sid, new = self._add(t.untyped_storage())
            if new:
                self.baseline[sid] = (self.nbytes[sid], category)
                self.level += self.nbytes[sid]

    def _on_free(self, key: int, sid: int) -> None:
        if self._live.get(key) == sid:
            del self._live[key]
        if self._recording:
            self.events.append(Event(sid, -self.nbytes[sid], self.phase, self.node))
            self.level -= self.nbytes[sid]

    def check(self) -> None:
        """Raise :class:`LimitExceeded` if the step has passed its limit."""
        if self.exceeded:
            raise LimitExceeded(f"the step passed its limit of {self.limit} bytes")

    def stop(self) -> None:
        """Stop recording; frees after this point (end of the step) are not events."""
        self._recording = False

    # -- dispatch ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self._recording:
            wider = _float32_statistics(func, args)
            skipped = _not_computed(func, args, kwargs or {})
            # positions in the op's result, where a real kernel's undefined outputs are None
            for i, item in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
                if i in skipped:
                    continue
                for t in tensors_in(item):
                    sid, new = self._add(t.untyped_storage(), t.numel() * 4 if i in wider else None)
                    if new:
                        self.events.append(Event(sid, self.nbytes[sid], self.phase, self.node))
                        self.level += self.nbytes[sid]
            if self.limit is not None and self.level > self.limit:
                self.exceeded = True
                self.stop()
        return out


_aten = torch.ops.aten
# CPU normalisation kernels keep their saved statistics (mean, inverse std) in float32 when the
# input is bf16 or fp16 and a weight, bias or running statistic is float32 (autocast's BatchNorm
# after a bf16 convolution); their meta kernels, and so a dry run, say the input's dtype.
_NORMS = {
    _aten.native_batch_norm,
    _aten._native_batch_norm_legit,
    _aten._native_batch_norm_legit_functional,
    _aten._batch_norm_with_update,
    _aten.native_layer_norm,
    _aten.native_group_norm,
}
_REDUCED = (torch.bfloat16, torch.float16)


def _float32_statistics(func: Any, args: tuple) -> tuple[int, ...]:
    """Indices of the outputs of ``func`` whose real storage is float32 although a dry run's is not."""
    if func.overloadpacket not in _NORMS or not args or not isinstance(args[0], torch.Tensor):
        return ()
    x = args[0]
    if x.device.type != "cpu" or x.dtype not in _REDUCED:
        return ()
    mixed = any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args[1:])
    return (1, 2) if mixed else ()


def _not_computed(func: Any, args: tuple, kwargs: dict) -> frozenset[int]:
    """Outputs a backward kernel leaves undefined where its ``output_mask`` says so (BatchNorm's
    input gradient when the input needs none): the real kernel returns None there, a meta kernel
    a tensor all the same, which a dry run would count."""
    i = _output_mask_position(func)
    if i is None:
        return frozenset()
    mask = args[i] if i < len(args) else kwargs.get("output_mask")
    return frozenset(k for k, wanted in enumerate(mask or ()) if not wanted)


@functools.cache
def _output_mask_position(func: Any) -> int | None:
    """Where ``func`` takes its ``output_mask``, if it takes one: read from the schema once per
    operator, not on every dispatch."""
    names = [a.name for a in func._schema.arguments]
    return names.index("output_mask") if "output_mask" in names else None
