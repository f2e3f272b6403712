"""memfit model zoo: torchvision-free CNNs and a GPT-2 style decoder.

Importing this package registers every model family; build models by name::

    from memfit.models import create, list_models
    model = create("resnet18", num_classes=10, stem="cifar")

``DenseNet`` builds a DenseNet-BC of any depth (``densenet_bc_100`` is ``DenseNet((16, 16, 16),
growth_rate=12, num_init_features=24, bn_size=4, compression=0.5, num_classes=10, stem=None)``).
"""

from __future__ import annotations

from . import densenet, gpt, mobilenet, resnet, vgg  # noqa: F401  (imports register the models)
from .densenet import DenseNet
from .registry import create, list_models, load, register_model, spec_of

__all__ = ["DenseNet", "create", "list_models", "load", "register_model", "spec_of"]
