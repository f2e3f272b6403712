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


def _write_cifar10(
    root, *, n: int = 4, extra: object = None, first: dict | list | None = None, extracted: bool = False
) -> None:
    """A tiny CIFAR-10 archive (or extracted folder); ``first`` replaces data_batch_1's contents."""
    rng = np.random.default_rng(0)
    members = {}
    for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        if extra is not None:
            batch[b"extra"] = extra
        members[member] = pickle.dumps(first if first is not None and member == "data_batch_1" else batch)
    if extracted:
        (root / "cifar-10-batches-py").mkdir()
        for member, raw in members.items():
            (root / "cifar-10-batches-py" / member).write_bytes(raw)
        return
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        for member, raw in members.items():
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
    with pytest.raises(MemfitInputError, match=r"put cifar-10-python.tar.gz"):
        cifar("cifar10", tmp_path)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(MemfitInputError, match="malformed cifar10 archive"):
        cifar("cifar10", tmp_path)


def test_an_archive_that_would_run_code_is_refused(tmp_path) -> None:
    _write_cifar10(tmp_path, extra=print)  # pickles a reference to builtins.print
    with pytest.raises(MemfitInputError, match=r"refusing builtins.print"):
        cifar("cifar10", tmp_path)


def _images(n: int) -> np.ndarray:
    return np.zeros((n, 3072), dtype=np.uint8)


@pytest.mark.parametrize(
    ("first", "message"),
    [
        ({b"data": _images(16), b"labels": [0, 1, 2]}, "holds 16 images but 3 labels"),
        ({b"data": _images(4), b"labels": [0, 1, 2, 10]}, r"labels should lie in 0\.\.9, found 0\.\.10"),
        ({b"data": _images(4), b"labels": [0, -1, 2, 3]}, r"labels should lie in 0\.\.9, found -1\.\.3"),
        ({b"data": _images(4), b"labels": [0.5, 1, 2, 3]}, "4 images but 4 labels of type float64"),
        ({b"data": np.zeros((4, 1024), dtype=np.uint8), b"labels": [0, 1, 2, 3]}, r"should be uint8 \[N, 3072\]"),
        ({b"data": _images(4).astype(np.float32), b"labels": [0, 1, 2, 3]}, "got float32"),
        ({b"data": _images(4)}, "is not a CIFAR batch"),
        ([_images(4), [0, 1, 2, 3]], "is not a CIFAR batch"),
    ],
)
def test_a_batch_that_does_not_hold_what_cifar_holds_names_the_file(tmp_path, first, message) -> None:
    _write_cifar10(tmp_path, first=first)
    with pytest.raises(MemfitInputError, match=message) as error:
        cifar("cifar10", tmp_path)
    assert "cifar-10-python.tar.gz (member cifar-10-batches-py/data_batch_1)" in str(error.value)
    assert "put cifar-10-python.tar.gz" in str(error.value)


def test_an_extracted_folder_is_checked_too(tmp_path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    _write_cifar10(good, extracted=True)
    assert cifar("cifar10", good).y_train.shape == (20,)
    _write_cifar10(bad, first={b"data": _images(16), b"labels": [0, 1, 2]}, extracted=True)
    with pytest.raises(MemfitInputError, match="holds 16 images but 3 labels") as error:
        cifar("cifar10", bad)
    assert str(bad / "cifar-10-batches-py" / "data_batch_1") in str(error.value)
