"""PyPI's torchvision beside the CPU torch, for the foreign models of tests/foreign.py.

PyPI's torchvision 0.28.0 is built against the CUDA torch: its ``_C.so`` links ``libtorch_cuda.so``,
which the CPU torch lacks, so no ``torchvision::*`` op is defined (torchvision swallows that
``OSError``). ``torchvision/_meta_registrations.py`` then registers fake kernels for
``torchvision::nms`` and ``qnms`` without checking ``extension._has_ops()``, and ``import
torchvision`` raises ``RuntimeError: operator torchvision::nms does not exist``. timm imports
torchvision, and so does every transformers model class (through ``image_utils``), so all three fail.
Catching the error does not help: the failed module leaves ``sys.modules`` and every later import
retries. :func:`install_torchvision_shim` defines the two schemas (no kernels) before torchvision is
imported; the classification models never call them (``torchvision.ops.nms`` would raise
``NotImplementedError``). tests/conftest.py calls it, so it is in place for every test.
"""

from __future__ import annotations

import torch

__all__ = ["install_torchvision_shim"]

# The Library that holds the two schemas: when it is garbage-collected its definitions go with it.
_TORCHVISION_STUB: torch.library.Library | None = None


def install_torchvision_shim() -> None:
    """Let PyPI's CUDA-built torchvision import beside the CPU torch (see the module docstring).

    A no-op when a matching torchvision build already defined ``torchvision::nms``, and when called
    twice. Must run before the first ``import torchvision`` (timm, transformers model classes).
    """
    global _TORCHVISION_STUB
    if _TORCHVISION_STUB is not None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018  defined by a torchvision whose _C loaded
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_STUB = lib
