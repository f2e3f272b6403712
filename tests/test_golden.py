"""The printed tables, character for character, against tests/golden/*.txt: the memory report
(predicted with layers, measured without, compressed with its stored weights), the before/after
comparison, the plan, the tradeoff curve and the storage table of a compressed model.

Every table is rendered from report objects built here with fixed numbers, never from a live
estimate (whose figures depend on this machine's kernels). To change a table on purpose, see
tests/golden.py for how to regenerate the files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from memfit.compressors.accounting import LayerStorage, StorageReport
from memfit.planner.plan import Plan, Segment
from memfit.report.memory import Comparison, LayerRow, MemoryReport
from memfit.report.tradeoff import Tradeoff, TradeoffPoint

from . import golden
from .golden import assert_golden

KiB = 1024
MiB = 2**20


def predicted() -> MemoryReport:
    """A small CNN's predicted step: every FLOP unit, a layer without parameters, and workspace."""
    return MemoryReport(
        source="predicted",
        model="SmallCNN",
        description="sgd, fp32",
        batch_size=8,
        parameters_bytes=1_234_567,
        buffers_bytes=4 * KiB,
        inputs_bytes=98_304,
        gradients_bytes=1_234_567,
        optimizer_bytes=0,
        activations_bytes=3 * MiB + 12_345,
        peak_bytes=6 * MiB + 54_321,
        tensor_peak_bytes=6 * MiB,
        peak_phase="backward",
        peak_breakdown={
            "parameter": 1_234_567,
            "activation": 3 * MiB,
            "gradient": 0,
            "temporary": 500_000,
            "workspace": 54_321,
        },
        phase_peaks={"forward": 5 * MiB, "backward": 6 * MiB + 54_321, "optimizer": 3 * MiB},
        layers=[
            LayerRow("features.0", "Conv2d", "[8, 16, 32, 32]", 448, MiB, 3_538_944),
            LayerRow("features.1", "BatchNorm2d", "[8, 16, 32, 32]", 32, MiB, 262_144),
            LayerRow("features.2", "ReLU", "[8, 16, 32, 32]", 0, MiB, 0),
            LayerRow("flatten", "flatten", "[8, 16384]", 0, 0, 0),
            LayerRow("classifier", "Linear", "[8, 10]", 163_850, 131_072, 1_310_720_000_000),
            LayerRow("head", "Linear", "[8, 2]", 22, 320, 999),
        ],
        notes=["Peak while running: features.0 in backward"],
    )


def measured() -> MemoryReport:
    return MemoryReport(
        source="measured",
        model="SmallCNN",
        description="adam, bf16 autocast",
        batch_size=8,
        parameters_bytes=1_234_567,
        buffers_bytes=0,
        inputs_bytes=98_304,
        gradients_bytes=1_234_567,
        optimizer_bytes=2 * 1_234_567,
        activations_bytes=2 * MiB,
        peak_bytes=7 * MiB,
        tensor_peak_bytes=7 * MiB - 4096,
        peak_phase="optimizer",
        peak_breakdown={"parameter": 1_234_567, "optimizer": 2 * 1_234_567, "input": 0},
    )


def test_memory_report_predicted_with_layers() -> None:
    assert_golden("memory_report_predicted", str(predicted()))


def test_memory_report_measured_without_layers() -> None:
    assert_golden("memory_report_measured", str(measured()))


def test_memory_report_of_a_compressed_model_shows_its_stored_weights() -> None:
    report = predicted()
    report.stored_weights_bytes = 77_160
    report.original_weights_bytes = 1_234_567
    assert_golden("memory_report_compressed", str(report))


def test_comparison_before_and_after() -> None:
    after = predicted()
    after.peak_bytes = 4 * MiB
    after.gradients_bytes = 0
    assert_golden("comparison", str(Comparison(before=predicted(), after=after)))


def test_plan_with_every_kind_of_segment() -> None:
    parts = (Segment(("conv3", "bn3"), "recompute"), Segment(("relu3",), "recompute"))
    plan = Plan(
        segments=[
            Segment(
                ("conv1", "bn1", "relu1"),
                "recompute",
                kept_bytes=MiB,
                recomputed_bytes=3 * MiB,
                recomputed_flops=1_500_000_000,
                layers=("features.0", "features.1", "features.2"),
                recomputed_seconds=0.004,
            ),
            Segment(("pool",), "plain", layers=("features.3",)),
            Segment(
                ("conv2", "bn2"),
                "selective",
                kept_bytes=2 * MiB + 1,
                recomputed_bytes=512 * KiB,
                recomputed_flops=2_000_000,
                recomputed_seconds=0.0005,
            ),
            Segment(
                ("conv3", "bn3", "relu3"),
                "nested",
                kept_bytes=256 * KiB,
                recomputed_bytes=6 * MiB,
                recomputed_flops=12_000_000_000,
                inner=parts,
                layers=("block",),
                recomputed_seconds=0.0125,
            ),
            Segment(("fc",), "plain"),
        ],
        strategy="dp",
        budget_bytes=48 * MiB,
        peak_before_bytes=64 * MiB + 123,
        peak_after_bytes=47 * MiB + 456_789,
        activations_before_bytes=40 * MiB,
        activations_after_bytes=22 * MiB + 1,
        forward_flops=20_000_000_000,
        step_seconds=0.25,
        planning_seconds=1.234,
        notes=["Compressed: classifier (ternary)"],
    )
    assert_golden("plan", str(plan))


def test_plan_that_recomputes_nothing() -> None:
    plan = Plan(
        segments=[Segment(("conv1", "fc"), "plain")],
        strategy="none",
        peak_before_bytes=3 * MiB,
        peak_after_bytes=3 * MiB,
        activations_before_bytes=MiB,
        activations_after_bytes=MiB,
        forward_flops=1_000_000,
        planning_seconds=0.05,
    )
    assert_golden("plan_unplanned", str(plan))


def test_tradeoff_curve() -> None:
    curve = Tradeoff(
        model="ResNet",
        minimum_mb=21.5,
        unplanned_mb=64.125,
        points=[
            TradeoffPoint(21.5, 21.49, 41.25, 0.0123, 30.5, "dp", 9),
            TradeoffPoint(42.8125, 42.0, 8.0, 0.00251, 6.2, "selective", 12),
            TradeoffPoint(64.125, 64.125, 0.0, None, None, "none", 0),
        ],
    )
    assert_golden("tradeoff", str(curve))


def test_storage_table_of_a_compressed_model() -> None:
    report = StorageReport(
        layers=[
            LayerStorage(
                "features.0",
                "ternary",
                (16, 3, 3, 3),
                13_824,
                1_248,
                {"codes": 864, "scales": 384},
                0.625,
                mults=100_000,
                adds=200_000,
                dense_macs=442_368,
            ),
            LayerStorage(
                "classifier",
                "codebook",
                (10, 16384),
                5_242_880,
                330_000,
                {"indices": 327_680, "codebook": 2_320},
                1.0,
                mults=160,
                adds=163_840,
                dense_macs=163_840,
            ),
        ],
        other_parameter_bytes=2_048,
        buffer_bytes=256,
        original_parameter_bytes=2_048 + (13_824 + 5_242_880) // 8,
        dense_macs=1_000_000,
        notes=["Shared bases: none"],
    )
    assert_golden("storage", str(report))


def test_storage_table_without_operation_counts() -> None:
    layer = LayerStorage("fc", "int4", (4, 8), 1_024, 160, {"codes": 128, "scale": 32}, 0.5)
    report = StorageReport(layers=[layer], other_parameter_bytes=16, buffer_bytes=0, original_parameter_bytes=144)
    assert_golden("storage_no_ops", str(report))


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The golden directory moved to an empty folder holding one file, ``t.txt``: "a\\nb\\n"."""
    monkeypatch.setattr(golden, "GOLDEN_DIR", tmp_path)
    monkeypatch.delenv(golden.REGEN_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)
    (tmp_path / "t.txt").write_text("a\nb\n")
    return tmp_path / "t.txt"


def test_a_difference_fails_with_a_diff_and_how_to_regenerate(scratch: Path) -> None:
    assert_golden("t", "a\nb")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)-b\n\+c\n.*MEMFIT_REGEN_GOLDEN=1 python -m pytest"):
        assert_golden("t", "a\nc")
    with pytest.raises(pytest.fail.Exception, match=r"missing\.txt does not exist"):
        assert_golden("missing", "a")


def test_regeneration_rewrites_a_changed_file_and_fails(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(golden.REGEN_ENV, "1")
    assert_golden("t", "a\nb")  # unchanged: nothing to review
    with pytest.raises(pytest.fail.Exception, match=r"rewrote tests/golden/t\.txt"):
        assert_golden("t", "a\nc")
    assert scratch.read_text() == "a\nc\n"


def test_regeneration_is_refused_in_ci(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(golden.REGEN_ENV, "1")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="set in CI"):
        assert_golden("t", "a\nc")
    assert scratch.read_text() == "a\nb\n"
