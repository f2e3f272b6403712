""".memfit files that cannot lie: a flipped bit, a truncation, an edited or crafted header and files
of another kind are clear MemfitFileErrors; saving is atomic, honours the umask and names the path."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

import memfit
from memfit import MemfitFileError, MemfitInputError
from memfit.compressors import get_method
from memfit.io import container, header, serialize


def _net() -> nn.Module:
    torch.manual_seed(0)
    return memfit.models.create("resnet18", stem="cifar", num_classes=10, width=4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A small file per method, the classifier compressed too so every method's fields are in it."""
    folder = tmp_path_factory.mktemp("saved")
    paths = {}
    for method in ("ternary", "generated", "shared"):
        config = get_method(method).config_type(skip_classifier=False)
        paths[method] = folder / f"{method}.memfit"
        memfit.save(memfit.compress(_net(), method, config), paths[method])
    return paths


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of ``src`` whose header ``edit`` changed, re-signed: a crafted file the digest cannot catch."""
    meta, data = container.read(str(src))
    content = json.loads(zlib.decompress(base64.b64decode(meta["header"])))
    edit(content)
    meta["header"] = base64.b64encode(zlib.compress(json.dumps(content).encode())).decode()
    meta["sha256"] = serialize._digest(meta["header"], data)
    container.write(str(dst), meta, data)
    return dst


@pytest.mark.parametrize("method", ["ternary", "generated", "shared"])
def test_a_flipped_bit_anywhere_is_refused(saved, method: str, tmp_path) -> None:
    raw = saved[method].read_bytes()
    memfit.load(saved[method])  # the file itself is good
    flipped = tmp_path / "flipped.memfit"
    for at in [*range(0, len(raw), 64), len(raw) - 1]:
        damaged = bytearray(raw)
        damaged[at] ^= 1 << (at // 64 % 8)
        flipped.write_bytes(bytes(damaged))
        with pytest.raises(MemfitFileError, match=str(flipped)):
            memfit.load(flipped)


def test_the_flips_the_old_format_missed_are_refused(saved, tmp_path) -> None:
    """Every bit of the version and of the header's last base64 characters: version 1 files loaded
    with a version digit flipped, or with unused bits of the header's base64 flipped."""
    raw = saved["ternary"].read_bytes()
    version = raw.index(b'"version":"') + len(b'"version":"')
    header_end = raw.index(b'"', raw.index(b'"header":"') + len(b'"header":"'))
    flipped = tmp_path / "flipped.memfit"
    for at in [version, *range(header_end - 8, header_end)]:
        for bit in range(8):
            damaged = bytearray(raw)
            damaged[at] ^= 1 << bit
            flipped.write_bytes(bytes(damaged))
            with pytest.raises(MemfitFileError):
                memfit.load(flipped)


def test_truncated_and_empty_files_are_refused(saved, tmp_path) -> None:
    raw = saved["ternary"].read_bytes()
    cut = tmp_path / "cut.memfit"
    for size in (0, 1, 7, 8, 100, len(raw) // 2, len(raw) - 1):
        cut.write_bytes(raw[:size])
        with pytest.raises(MemfitFileError, match="is empty" if size == 0 else "truncated"):
            memfit.load(cut)


def test_an_edited_header_with_its_old_digest_is_refused(saved, tmp_path) -> None:
    meta, data = container.read(str(saved["ternary"]))
    content = json.loads(zlib.decompress(base64.b64decode(meta["header"])))
    del content["layers"]
    meta["header"] = base64.b64encode(zlib.compress(json.dumps(content).encode())).decode()
    container.write(str(tmp_path / "edited.memfit"), meta, data)
    with pytest.raises(MemfitFileError, match="do not match the SHA-256 digest"):
        memfit.load(tmp_path / "edited.memfit")


def _set(path: list, value):
    def edit(content):
        *parents, last = path
        for key in parents:
            content = content[key]
        content[last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _set(["architecture", "options", "num_classes"], 10**10),
            r"shape \[10, 32\], the architecture its header names has \[10000000000",
        ),
        (
            _set(["architecture", "options", "stem"], "imagenet"),
            "different architecture than the architecture its header names",
        ),
        (_set(["architecture", "options", "num_classes"], 1e10), "cannot be built"),
        (_set(["architecture", "options", "stem"], ["cifar"]), "cannot be built"),
        (_set(["architecture", "name"], "resnet9000"), "cannot be built"),
        (_set(["architecture"], "resnet18"), "architecture should be null or"),
        (_set(["layers"], []), "layers should be an object"),
        (_set(["layers", "layer1.0.conv1"], {"method": "ternary"}), "layer layer1.0.conv1 should be"),
        (_set(["layers", "layer1.0.conv1", "method"], "zip"), "unknown compression method 'zip'"),
        (_set(["layers", "layer1.0.conv1", "meta", "shape"], [10**6, 4, 3, 3]), "saved with weight shape"),
        (_set(["layers", "layer1.0.conv1", "meta", "format"], "dense"), "cannot be unpacked"),
        (_set(["layers", "layer1.0.conv1", "meta", "nnz"], "many"), "cannot be unpacked"),
        (_set(["tensors"], {}), "tensors should be a list"),
        (_set(["tensors", 0, 2], [-1]), r"\[name, dtype, \[sizes >= 0\]\]"),
        (_set(["tensors", 0, 2], [10**12, 10**12]), "needs more data than the file holds"),
        (_set(["tensors", 0, 2], ["4"]), r"\[name, dtype, \[sizes >= 0\]\]"),
        (_set(["tensors", 0, 1], "nn"), "unknown dtype 'nn'"),
        (_set(["tensors", 0, 0], "state/fc.weight2"), "unexpected"),
        (_set(["tensors", 0, 0], "packed/nowhere/codes"), "belong to no layer"),
        (lambda content: content["tensors"].append(content["tensors"][0]), "distinct names"),
        (lambda content: content.pop("tensors"), "should be an object with architecture, layers and tensors"),
    ],
)
def test_a_crafted_header_is_a_clear_error_before_anything_is_allocated(saved, tmp_path, edit, message) -> None:
    crafted = _rewrite(saved["ternary"], tmp_path / "crafted.memfit", edit)
    with pytest.raises(MemfitFileError, match=message):
        memfit.load(crafted)


def test_a_model_larger_than_memory_is_refused_before_it_is_built(saved, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(header, "_memory_bytes", lambda: 1 << 10)
    with pytest.raises(MemfitFileError, match=r"more than this machine's 0.0 GiB of memory"):
        memfit.load(saved["ternary"])


def test_a_header_that_inflates_past_the_bound_is_refused(saved, tmp_path) -> None:
    meta, data = container.read(str(saved["ternary"]))
    meta["header"] = base64.b64encode(zlib.compress(b" " * (serialize._MAX_HEADER_BYTES + 1))).decode()
    meta["sha256"] = serialize._digest(meta["header"], data)
    container.write(str(tmp_path / "bomb.memfit"), meta, data)
    with pytest.raises(MemfitFileError, match="at most 64 MiB"):
        memfit.load(tmp_path / "bomb.memfit")


def test_a_version_1_file_still_loads_and_its_header_is_checked(saved, tmp_path) -> None:
    meta, data = container.read(str(saved["ternary"]))
    content = json.loads(zlib.decompress(base64.b64decode(meta["header"])))
    content["sha256"] = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    legacy = {
        "format": "memfit",
        "version": "1",
        "header": base64.b64encode(zlib.compress(json.dumps(content).encode())).decode(),
    }
    container.write(str(tmp_path / "v1.memfit"), legacy, data)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(memfit.load(tmp_path / "v1.memfit").eval()(x), memfit.load(saved["ternary"]).eval()(x))
    content["layers"] = None  # its digest covers the data only: an edited header must still be an error
    legacy["header"] = base64.b64encode(zlib.compress(json.dumps(content).encode())).decode()
    container.write(str(tmp_path / "v1.memfit"), legacy, data)
    with pytest.raises(MemfitFileError, match="layers should be an object"):
        memfit.load(tmp_path / "v1.memfit")


def test_the_file_is_still_a_safetensors_file(saved) -> None:
    from safetensors import safe_open

    with safe_open(str(saved["ternary"]), framework="pt") as f:
        assert f.metadata()["format"] == "memfit" and f.metadata()["version"] == str(serialize.FORMAT_VERSION)
        assert torch.equal(f.get_tensor("data"), container.read(str(saved["ternary"]))[1])


def test_load_names_what_the_path_is_when_it_is_no_memfit_file(tmp_path) -> None:
    state = nn.Linear(2, 2).state_dict()
    torch.save(state, tmp_path / "checkpoint.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "notes.txt").write_text("not a model, just a few words of text")
    cases = {
        tmp_path / "checkpoint.pt": (
            r"is a torch.save file, not a memfit file: load it with torch.load\(.*weights_only=True\)"
        ),
        tmp_path / "legacy.pt": r"is a pickle .* weights_only=True",
        tmp_path: "is a directory, not a memfit file",
        tmp_path / "missing.memfit": "no such file",
        tmp_path / "notes.txt": "not a safetensors file",
    }
    for path, message in cases.items():
        with pytest.raises(MemfitFileError, match=message) as error:
            memfit.load(path)
        assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"path": "net.memfit", "model": "resnet18"},
            "memfit.load: model must be an nn.Module or None, got str 'resnet18'",
        ),
        ({"path": "net.memfit", "model": nn.Linear}, r"memfit.load: model .* pass an instance, e.g. Linear\(...\)"),
        ({"path": None}, "memfit.load: path must be a file path"),
        ({"path": b"net.memfit"}, "memfit.load: path must be a file path"),
    ],
)
def test_load_names_a_wrong_typed_argument(kwargs, message) -> None:
    with pytest.raises(MemfitInputError, match=message):
        memfit.load(**kwargs)


def test_save_names_the_path_it_cannot_write_and_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    net = nn.Linear(2, 2)
    (tmp_path / "file").write_text("x")
    cases = {
        tmp_path: "is a directory; give a file name inside it",
        tmp_path / "missing" / "net.memfit": "the folder .*missing does not exist; create it first",
        tmp_path / "file" / "net.memfit": "the folder .*file is a file, not a folder",
    }
    for path, message in cases.items():
        with pytest.raises(MemfitFileError, match=message) as error:
            memfit.save(net, path)
        assert str(path) in str(error.value)
    real_open = os.open
    locked = tmp_path / "locked"
    locked.mkdir()

    def refuse(name, flags, mode=0o777):
        if os.path.dirname(name) == str(locked):
            raise PermissionError(13, "Permission denied", name)
        return real_open(name, flags, mode)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(MemfitFileError, match=f"cannot write {locked / 'net.memfit'} \\(Permission denied\\)"):
        memfit.save(net, locked / "net.memfit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "locked"] and not list(locked.iterdir())
    with pytest.raises(MemfitInputError, match=r"memfit.save: model must be an nn.Module, got str"):
        memfit.save("resnet18", tmp_path / "net.memfit")


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "net.memfit"
    memfit.save(nn.Linear(2, 2), path)
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(MemfitFileError, match=f"writing {path} failed \\(No space left on device\\)"):
        memfit.save(nn.Linear(3, 3), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["net.memfit"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_honour_the_umask(tmp_path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        memfit.save(nn.Linear(2, 2), tmp_path / "net.memfit")
    finally:
        os.umask(old)
    assert (tmp_path / "net.memfit").stat().st_mode & 0o777 == mode
