"""memfit.compress, the storage accounting and memfit.save/load, for every method."""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
from torch import nn

import memfit
from memfit.compressors import generators, list_methods
from memfit.compressors.accounting import storage_table
from memfit.compressors.layer import GeneratedConv2d

METHODS = list_methods()


def _net(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return memfit.models.create("resnet18", stem="cifar", num_classes=10, width=width)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", METHODS)
def test_compress_copies_the_model_and_trains_its_compact_parameters(method: str, x: torch.Tensor) -> None:
    net = _net()
    before = copy.deepcopy(net.state_dict())
    small = memfit.compress(net, method, example_inputs=x)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"compress modified the user's model ({k})"
    gens = generators(small)
    assert gens and all(isinstance(small.get_submodule(n.removesuffix(".generator")), GeneratedConv2d) for n in gens)
    assert "conv1.generator" not in gens and not any(n.startswith("fc.") for n in gens), (
        "first conv / classifier skipped"
    )
    loss = nn.functional.cross_entropy(small(x), torch.arange(4))
    loss.backward()
    for name, gen in gens.items():
        grads = [p.grad for p in gen.parameters(recurse=True) if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient reaches {name}"


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trips_exactly_and_the_file_matches_the_accounting(
    method: str, x: torch.Tensor, tmp_path
) -> None:
    net = _net(16)
    small = memfit.compress(net, method)
    # a few steps of training so scales and codes are not at their initial values
    opt = torch.optim.SGD(small.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(small(x), torch.arange(4)).backward()
        opt.step()
    path = tmp_path / "net.memfit"
    size = memfit.save(small, path)
    table = storage_table(small)
    assert size == os.path.getsize(path)
    assert abs(size - table.file_bytes) <= 0.05 * table.file_bytes, (size, table.file_bytes)
    if method in ("ternary", "generated"):
        buffer = io.BytesIO()
        torch.save(net.state_dict(), buffer)
        assert size * 10 <= buffer.getbuffer().nbytes, (size, buffer.getbuffer().nbytes)
    loaded = memfit.load(path)
    small.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(small(x), loaded(x))
    for name, gen in generators(loaded).items():
        assert torch.equal(gen(), generators(small)[name]())
    assert any(p.requires_grad for p in loaded.parameters())


def test_truncated_corrupted_and_mismatched_files_are_refused(tmp_path) -> None:
    small = memfit.compress(_net(), "ternary")
    path = tmp_path / "net.memfit"
    memfit.save(small, path)
    data = path.read_bytes()

    truncated = tmp_path / "truncated.memfit"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(memfit.MemfitFileError, match="is truncated: it holds"):
        memfit.load(truncated)

    corrupted = tmp_path / "corrupted.memfit"
    flipped = bytearray(data)
    flipped[-10] ^= 0x40
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(memfit.MemfitInputError, match="corrupted"):
        memfit.load(corrupted)

    with pytest.raises(memfit.MemfitInputError, match="different architecture"):
        memfit.load(path, model=memfit.models.create("resnet34", stem="cifar", num_classes=10, width=8))

    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(memfit.MemfitInputError, match="not one memfit wrote"):
        memfit.load(foreign)


def test_a_model_outside_the_zoo_needs_its_architecture_to_load(small_cnn: nn.Module, tmp_path) -> None:
    small = memfit.compress(
        small_cnn, "ternary", memfit.compressors.get_method("ternary").config_type(skip_classifier=False)
    )
    path = tmp_path / "cnn.memfit"
    memfit.save(small, path)
    with pytest.raises(memfit.MemfitInputError, match="pass model="):
        memfit.load(path)
    loaded = memfit.load(path, model=small_cnn)
    x = torch.randn(2, 3, 8, 8)
    small.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(small(x), loaded(x))


def test_uncompressed_and_planned_models_save_and_load(tmp_path) -> None:
    net = _net()
    x = torch.randn(4, 3, 8, 8)
    planned = memfit.optimize(net, memfit.estimate(net, x).peak_mb * 0.97, x, strategy="dp")
    memfit.save(planned, tmp_path / "planned.memfit")
    loaded = memfit.load(tmp_path / "planned.memfit")
    assert set(loaded.state_dict()) == set(net.state_dict())
    net.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))


def test_the_storage_table_counts_every_field(x: torch.Tensor) -> None:
    small = memfit.compress(_net(), "ternary")
    table = storage_table(small, x)
    text = str(table)
    assert "Bits/w" in text and "MicroNet" in text and "computed, not measured" in text
    for row in table.layers:
        assert row.stored_bits == sum(row.fields.values())
        assert row.dense_macs > 0 and row.adds <= row.dense_macs
    assert table.parameter_ratio > 1
    report = memfit.estimate(small, x)
    assert report.stored_weights_bytes == table.parameter_bytes and "Weights stored, packed" in str(report)
    assert memfit.estimate(_net(), x).stored_weights_bytes is None


def test_bad_method_and_config_are_refused(small_cnn: nn.Module) -> None:
    with pytest.raises(ValueError, match="unknown compression method"):
        memfit.compress(small_cnn, "zip")
    with pytest.raises(memfit.MemfitInputError, match="config for 'ternary'"):
        memfit.compress(small_cnn, "ternary", memfit.compressors.CompressConfig())
    with pytest.raises(memfit.MemfitInputError, match="no layer to compress"):
        memfit.compress(
            small_cnn, "ternary", memfit.compressors.get_method("ternary").config_type(include=("nothing*",))
        )
    once = memfit.compress(small_cnn, "generated")
    with pytest.raises(memfit.MemfitInputError, match="already compressed"):
        memfit.compress(once, "ternary")


def test_optimize_compresses_when_recomputation_alone_cannot_reach_the_budget() -> None:
    net = _net(16)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(memfit.MemfitBudgetError) as err:
        memfit.optimize(net, 1.0, x, optimizer="adam")
    budget = err.value.minimum_mb * 0.7
    planned = memfit.optimize(net, budget, x, optimizer="adam", compress="auto")
    assert planned.plan.compressed and len(planned.plan.compressed) < len(generators(memfit.compress(net, "generated")))
    assert any("Compressed" in note and "generated" in note for note in planned.plan.notes)
    assert planned.plan.peak_after_bytes <= budget * 2**20
    measured = memfit.measure(planned, x, optimizer="adam")
    assert measured.peak_mb <= budget, (measured.peak_mb, budget)
