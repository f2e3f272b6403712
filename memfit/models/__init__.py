"""memfit model zoo: torchvision-free CNNs and a GPT-2 style decoder.

Importing this package registers every model family; build models by name::

    from memfit.models import create, list_models
    model = create("resnet18", num_classes=10, stem="cifar")
"""

from __future__ import annotations

from . import densenet, gpt, mobilenet, resnet, vgg  # noqa: F401  (imports register the models)
from .registry import create, list_models, load, register_model, spec_of

__all__ = ["create", "list_models", "load", "register_model", "spec_of"]
