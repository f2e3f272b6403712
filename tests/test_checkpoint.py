"""memfit.checkpoint: digest-checked, atomic training checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import memfit


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoint.pt"
    torch.manual_seed(0)
    memfit.checkpoint.save({"model": {"w": torch.randn(64), "b": torch.zeros(3)}, "step": 7}, path)
    return path


def test_round_trip_keeps_every_tensor_and_number(small: Path) -> None:
    torch.manual_seed(0)
    loaded = memfit.checkpoint.load(small)
    torch.testing.assert_close(loaded["model"]["w"], torch.randn(64), rtol=0, atol=0)
    assert loaded["step"] == 7


def test_a_flipped_bit_anywhere_is_rejected(small: Path) -> None:
    data = small.read_bytes()
    for offset in range(0, len(data), 64):
        flipped = bytearray(data)
        flipped[offset] ^= 1
        small.write_bytes(bytes(flipped))
        with pytest.raises(memfit.MemfitFileError, match=str(small)):
            memfit.checkpoint.load(small, plain=True)
    small.write_bytes(data[:-1])
    with pytest.raises(memfit.MemfitFileError, match="corrupted"):
        memfit.checkpoint.load(small)


def test_a_plain_torch_file_loads_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(memfit.MemfitFileError, match="not a memfit checkpoint"):
        memfit.checkpoint.load(path)
    assert memfit.checkpoint.load(path, plain=True)["w"].tolist() == [1.0, 1.0]
    (tmp_path / "junk.memfit").write_bytes(b"not torch at all")
    with pytest.raises(memfit.MemfitFileError, match="neither a memfit checkpoint nor a torch file"):
        memfit.checkpoint.load(tmp_path / "junk.memfit", plain=True)


def test_the_file_honours_the_umask_and_leaves_no_temporary(tmp_path: Path) -> None:
    before = os.umask(0o027)
    try:
        memfit.checkpoint.save({"x": 1}, tmp_path / "c.pt")
    finally:
        os.umask(before)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_an_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(memfit.MemfitInputError, match=r"memfit.checkpoint.save: .*c.pt|is a directory"):
        memfit.checkpoint.save({"x": 1}, tmp_path / "file" / "c.pt")
    with pytest.raises(memfit.MemfitInputError, match=r"memfit.checkpoint.save: .*c.pt|is a directory"):
        memfit.checkpoint.save({"x": 1}, tmp_path)
