"""estimate / measure: the user's model is untouched, bad input is refused clearly, reports print."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memfit
from memfit.capture.dryrun import capture
from memfit.capture.trainstep import StepConfig


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ptrs": {k: v.data_ptr() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
    }


def test_estimate_and_measure_leave_the_model_untouched(small_cnn: nn.Module) -> None:
    small_cnn.eval()
    small_cnn[0].register_forward_hook(lambda m, i, o: None)
    before = _snapshot(small_cnn)
    x = torch.randn(4, 3, 16, 16)
    memfit.estimate(small_cnn, x, optimizer="adam")
    memfit.measure(small_cnn, x, optimizer="adam")
    after = _snapshot(small_cnn)
    assert before["training"] == after["training"] == [False] * len(before["training"])
    assert before["ptrs"] == after["ptrs"]
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    assert all(g is None for g in after["grads"])
    assert before["hooks"] == after["hooks"]


def test_estimate_leaves_the_global_rng_alone(small_cnn: nn.Module) -> None:
    torch.manual_seed(123)
    memfit.estimate(small_cnn, torch.randn(4, 3, 16, 16))
    after = torch.rand(3)
    torch.manual_seed(123)
    torch.randn(4, 3, 16, 16)
    assert torch.equal(after, torch.rand(3))


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = _Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x))


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # Python control flow on a traced value: fx cannot follow it
            return x.relu()
        return x


class _ValueGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # depends on the values themselves
            return x.relu()
        return x


def test_a_branch_fx_cannot_trace_is_captured_by_export() -> None:
    report = memfit.estimate(_Branchy(), torch.randn(2, 3, 8, 8))
    measured = memfit.measure(_Branchy(), torch.randn(2, 3, 8, 8))
    assert report.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.03)
    assert any("torch.export" in n and "submodule 'gate' (_Gate)" in n for n in report.notes), report.notes


def test_a_branch_nothing_can_capture_names_the_module_and_the_fix() -> None:
    model = _Branchy()
    model.gate = _ValueGate()
    with pytest.raises(
        memfit.MemfitTraceError, match=r"(?s)_Branchy.*submodule 'gate' \(_ValueGate\).*leaf_modules=\[_ValueGate\]"
    ):
        memfit.estimate(model, torch.randn(2, 3, 8, 8))


def test_a_value_dependent_leaf_is_refused_clearly() -> None:
    model = _Branchy()
    model.gate = _ValueGate()
    with pytest.raises(memfit.MemfitTraceError, match=r"(?s)_ValueGate 'gate'.*depends on tensor values"):
        memfit.estimate(model, torch.randn(2, 3, 8, 8), leaf_modules=[_ValueGate])


def test_a_leaf_module_makes_it_traceable_and_counted() -> None:
    report = memfit.estimate(_Branchy(), torch.randn(2, 3, 8, 8), leaf_modules=[_Gate])
    assert "Opaque (leaf_modules, one node each, never cut inside): gate (_Gate)" in report.notes
    measured = memfit.measure(_Branchy(), torch.randn(2, 3, 8, 8))
    assert report.peak_bytes == pytest.approx(measured.peak_bytes, rel=0.03)


def test_wrong_input_shape_names_the_layer_and_the_shapes(small_cnn: nn.Module) -> None:
    with pytest.raises(memfit.MemfitInputError, match=r"Conv2d '0'.*\[4, 5, 16, 16\]"):
        memfit.estimate(small_cnn, torch.randn(4, 5, 16, 16))


def test_wrong_number_of_inputs(small_cnn: nn.Module) -> None:
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(memfit.MemfitInputError, match="takes 1 tensor argument"):
        memfit.estimate(small_cnn, (x, x))


@pytest.mark.parametrize("bad", [object(), "resnet18", lambda x: x])
def test_a_non_module_is_refused(bad: object) -> None:
    with pytest.raises(memfit.MemfitInputError, match=r"expected a torch.nn.Module"):
        memfit.estimate(bad, torch.randn(2, 3))  # type: ignore[arg-type]


@pytest.mark.parametrize("empty", [nn.Sequential(), nn.ReLU(), nn.Linear(3, 3).requires_grad_(False)])
def test_a_model_without_trainable_parameters_is_refused(empty: nn.Module) -> None:
    with pytest.raises(memfit.MemfitInputError, match="no trainable parameters"):
        memfit.measure(empty, torch.randn(2, 3))


@pytest.mark.parametrize("bad", [None, [], (torch.randn(2), 3)])
def test_bad_example_inputs_are_refused(small_cnn: nn.Module, bad: object) -> None:
    with pytest.raises(memfit.MemfitInputError, match="example_inputs"):
        memfit.estimate(small_cnn, bad)


def test_unknown_optimizer_is_refused(small_cnn: nn.Module) -> None:
    with pytest.raises(memfit.MemfitInputError, match="unknown optimizer 'lion'"):
        memfit.estimate(small_cnn, torch.randn(2, 3, 8, 8), optimizer="lion")


def test_report_prints_a_layer_table_and_labelled_totals(small_cnn: nn.Module) -> None:
    text = str(memfit.estimate(small_cnn, torch.randn(4, 3, 16, 16), optimizer="momentum"))
    assert "memfit memory report (predicted)" in text
    assert "Layer (type)" in text and "Output Shape" in text and "Param #" in text
    assert "0 (Conv2d)" in text and "[4, 8, 16, 16]" in text and "224" in text  # 3*8*9 + 8 params
    assert "Optimizer state (MiB, predicted)" in text
    measured = str(memfit.measure(small_cnn, torch.randn(4, 3, 16, 16)))
    assert "(MiB, measured)" in measured and "predicted" not in measured


def test_optimizer_state_is_counted_exactly(small_cnn: nn.Module) -> None:
    nbytes = sum(p.numel() * 4 for p in small_cnn.parameters())
    x = torch.randn(2, 3, 8, 8)
    assert memfit.estimate(small_cnn, x, optimizer="sgd").optimizer_bytes == 0
    assert memfit.estimate(small_cnn, x, optimizer="momentum").optimizer_bytes == nbytes
    # Adam: two moments per parameter and one scalar step counter per parameter tensor.
    n_tensors = len(list(small_cnn.parameters()))
    assert memfit.estimate(small_cnn, x, optimizer="adam").optimizer_bytes == 2 * nbytes + 4 * n_tensors


def test_the_memgraph_attributes_saved_tensors_and_flops(small_cnn: nn.Module) -> None:
    graph = capture(small_cnn, torch.randn(4, 3, 16, 16), StepConfig())
    conv2 = graph.info("_4")
    assert conv2.module_type == "Conv2d" and conv2.output_shapes == [(4, 16, 8, 8)]
    assert conv2.out_bytes == 4 * 16 * 8 * 8 * 4
    assert conv2.fwd_flops == 2 * 4 * 16 * 8 * 8 * 8 * 9  # 2 * N * Cout * H * W * Cin * k * k
    assert conv2.saved_bytes == 4 * 8 * 8 * 8 * 4  # it saves its input (the pooled map)
    relu = graph.info("_2")
    assert relu.saved_bytes == relu.out_bytes  # ReLU saves its output
    assert graph.info("_7").out_bytes == 0  # flatten is a view
    assert list(graph.dag.successors("_3")) == ["_4"]


def test_leaf_modules_as_a_bare_name_and_unknown_names() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    assert (
        memfit.estimate(_Branchy(), x, leaf_modules="gate").peak_bytes
        == memfit.estimate(_Branchy(), x, leaf_modules=["gate"]).peak_bytes
    )
    with pytest.raises(
        memfit.MemfitInputError, match=r"leaf_modules: _Branchy has no submodule 'gat'; did you mean 'gate'"
    ):
        memfit.estimate(_Branchy(), x, leaf_modules=["gat"])
    with pytest.raises(memfit.MemfitInputError, match=r"leaf_modules: 3 is neither"):
        memfit.estimate(_Branchy(), x, leaf_modules=[3])


def test_compiled_scripted_and_empty_batches(small_cnn: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(small_cnn)
    assert memfit.estimate(compiled, x).peak_bytes == memfit.estimate(small_cnn, x).peak_bytes
    with pytest.raises(memfit.MemfitInputError, match=r"model is a TorchScript module.*pass the nn.Module"):
        memfit.estimate(torch.jit.script(small_cnn), x)
    with pytest.raises(memfit.MemfitInputError, match=r"example_inputs has an empty tensor of shape \[0, 3, 16, 16\]"):
        memfit.estimate(small_cnn, torch.randn(0, 3, 16, 16))


def test_optional_forward_arguments_are_not_counted_as_inputs() -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return self.fc(x if mask is None else x * mask)

    x = torch.randn(4, 8)
    assert memfit.estimate(Masked(), x).peak_bytes == pytest.approx(memfit.measure(Masked(), x).peak_bytes, rel=0.03)


def test_estimates_in_two_threads_equal_the_ones_in_sequence(small_cnn: nn.Module) -> None:
    import threading

    torch.manual_seed(0)
    models = [small_cnn, memfit.models.create("resnet18", stem="cifar", num_classes=10, width=8)]
    inputs = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 32, 32)]
    sequential = [memfit.estimate(m, x).peak_bytes for m, x in zip(models, inputs, strict=True)]
    got: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            got[i] = memfit.estimate(models[i], inputs[i]).peak_bytes
        except Exception as e:  # noqa: BLE001  reported below
            got[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[0], got[1]] == sequential
