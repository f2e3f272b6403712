"""The no-download datasets: digits from scikit-learn, CIFAR from a local archive."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from memfit import MemfitInputError
from memfit.io.datasets import cifar, digits


def _write_cifar10(root, *, n: int = 4, extra: object = None) -> None:
    rng = np.random.default_rng(0)
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
            if extra is not None:
                batch[b"extra"] = extra
            raw = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def test_digits_is_real_split_and_deterministic() -> None:
    a, b = digits(8), digits(8)
    assert a.x_train.shape == (1438, 3, 8, 8) and a.x_test.shape == (359, 3, 8, 8)
    assert torch.equal(a.y_test, b.y_test) and set(a.y_train.tolist()) == set(range(10))


def test_cifar_reads_the_standard_archive(tmp_path) -> None:
    _write_cifar10(tmp_path)
    split = cifar("cifar10", tmp_path)
    assert split.x_train.shape == (20, 3, 32, 32) and split.x_test.shape == (4, 3, 32, 32)
    assert split.y_train.tolist()[:4] == [0, 1, 2, 3] and split.num_classes == 10


def test_a_missing_or_malformed_archive_says_where_to_put_it(tmp_path) -> None:
    with pytest.raises(MemfitInputError, match="put cifar-10-python.tar.gz"):
        cifar("cifar10", tmp_path)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(MemfitInputError, match="malformed cifar10 archive"):
        cifar("cifar10", tmp_path)


def test_an_archive_that_would_run_code_is_refused(tmp_path) -> None:
    _write_cifar10(tmp_path, extra=print)  # pickles a reference to builtins.print
    with pytest.raises(MemfitInputError, match="refusing builtins.print"):
        cifar("cifar10", tmp_path)
