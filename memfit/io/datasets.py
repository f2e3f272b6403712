"""Small real datasets that need no download: scikit-learn's digits, and CIFAR from a local archive.

Both return float tensors shaped ``[N, 3, H, W]`` (ready for the zoo's image models) and int64
labels. CIFAR is read from the standard python archive (``cifar-10-python.tar.gz`` or
``cifar-100-python.tar.gz``) with an unpickler that admits only numpy arrays, so a tampered
archive cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MemfitInputError

__all__ = ["Split", "cifar", "digits"]

_CIFAR = {
    "cifar10": (
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        b"labels",
        10,
    ),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], "test", b"fine_labels", 100),
}
_PIXELS = 3 * 32 * 32
_CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
_CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


@dataclass(frozen=True)
class Split:
    """A dataset split in memory.

    Attributes:
        x_train, y_train, x_test, y_test: Images ``[N, 3, H, W]`` (float32) and labels (int64).
        num_classes: Number of classes.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def digits(size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), upsampled to
    ``size`` x ``size``, repeated to 3 channels, standardised, split with a fixed seed.

    Example:
        >>> d = digits(16)
        >>> d.x_train.shape[1:], d.num_classes
        (torch.Size([3, 16, 16]), 10)
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).repeat(1, 3, 1, 1)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test], 10)


class _ArraysOnly(pickle.Unpickler):
    """Admits the few globals numpy arrays need; anything else in the archive is refused."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR batch holds only arrays and lists")


def _check_batch(
    batch: object, label_key: bytes, num_classes: int, source: str, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """A batch's images ``[N, 3072]`` (uint8) and ``N`` labels in ``[0, num_classes)``; anything else
    is a MemfitInputError naming ``source``, since mismatched pairs would train silently on noise."""
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise MemfitInputError(
            f"{source} is not a CIFAR batch (a dict with b'data' and {label_key!r}, got {keys}); {where}"
        )
    data, labels = batch[b"data"], np.asarray(batch[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise MemfitInputError(f"{source}: its images should be uint8 [N, {_PIXELS}] (32x32 RGB), got {got}; {where}")
    if labels.shape != (len(data),) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise MemfitInputError(
            f"{source} holds {len(data)} images but {labels.size} labels of type {labels.dtype}; {where}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise MemfitInputError(
            f"{source}: labels should lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}; {where}"
        )
    return data, labels


def cifar(name: str, root: str | os.PathLike) -> Split:
    """CIFAR-10 or CIFAR-100 from the standard python archive in ``root`` (no download).

    Every batch is checked: images ``[N, 3072]`` uint8, as many labels as images, each label a
    class of the data set.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        root: Directory holding ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (or the
            extracted ``cifar-10-batches-py`` / ``cifar-100-python`` directory).

    Raises:
        MemfitInputError: The archive is missing or malformed (a batch whose images and labels
            differ in number, or a label out of range, included); the message names the file and
            says where to put a good one.
    """
    if name not in _CIFAR:
        raise MemfitInputError(f"unknown dataset {name!r}; choose one of {sorted(_CIFAR)}")
    archive, folder, train_files, test_file, label_key, num_classes = _CIFAR[name]
    where = (
        f"put {archive} (from https://www.cs.toronto.edu/~kriz/cifar.html, python version) or its extracted "
        f"{folder}/ directory in {os.fspath(root)}"
    )
    tar_path, dir_path = os.path.join(root, archive), os.path.join(root, folder)

    def read(member: str) -> tuple[np.ndarray, np.ndarray]:
        extracted = os.path.isdir(dir_path)
        source = os.path.join(dir_path, member) if extracted else f"{tar_path} (member {folder}/{member})"
        try:
            if extracted:
                with open(os.path.join(dir_path, member), "rb") as f:
                    raw = f.read()
            else:
                with tarfile.open(tar_path, "r:gz") as tar:
                    handle = tar.extractfile(f"{folder}/{member}")
                    if handle is None:
                        raise KeyError(member)
                    raw = handle.read()
            batch = _ArraysOnly(io.BytesIO(raw), encoding="bytes").load()
        except FileNotFoundError:
            raise MemfitInputError(f"no {name} data in {os.fspath(root)}: {where}") from None
        except (tarfile.TarError, KeyError, EOFError, OSError, pickle.UnpicklingError, ValueError) as e:
            raise MemfitInputError(
                f"malformed {name} archive in {os.fspath(root)} ({type(e).__name__}: {e}); {where}"
            ) from e
        return _check_batch(batch, label_key, num_classes, f"malformed {name} batch {source}", where)

    def arrays(members: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [read(m) for m in members]
        data = np.concatenate([images for images, _ in batches]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([labels for _, labels in batches])
        x = (torch.from_numpy(data).float() / 255.0 - _CIFAR_MEAN) / _CIFAR_STD
        return x, torch.from_numpy(labels.astype(np.int64))

    x_train, y_train = arrays(train_files)
    x_test, y_test = arrays([test_file])
    return Split(x_train, y_train, x_test, y_test, num_classes)
