"""The ``shared`` compressor: kernels of later layers as quantized affine copies of a reference layer's."""

from __future__ import annotations

import copy as copy_module
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit.compressors.base import CompressConfig, storage_bits
from memfit.compressors.bits import index_bits
from memfit.compressors.layer import generated_layer
from memfit.compressors.shared import (
    SharedConfig,
    SharedGenerator,
    SharedMethod,
    find_reference,
    match_affine,
)


class Net(nn.Module):
    """Every layer kind the method meets: reference, 3x3, 1x1, depthwise 3x3, 5x5, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 12, 1, bias=False)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False)
        self.wide = nn.Conv2d(12, 4, 5, padding=2, bias=False)
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(6, 13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(self.stem(x)))
        x = self.wide(self.depthwise(self.point(x)))
        return self.head(F.relu(self.fc(x.mean((2, 3)))))


LAYERS = ["stem", "conv", "point", "depthwise", "wide", "fc", "head"]


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _compress(model: nn.Module, config: SharedConfig | None = None) -> tuple[SharedMethod, dict[str, SharedGenerator]]:
    method = SharedMethod()
    generators = method.build(model, LAYERS, config or SharedConfig())
    for name, generator in generators.items():
        setattr(model, name, generated_layer(model.get_submodule(name), generator))
    return method, generators


@pytest.mark.parametrize(
    ("knob", "value"),
    [
        ("alpha_bits", 1),
        ("alpha_bits", 17),
        ("beta_bits", 0),
        ("beta_bits", 8.0),
        ("bind_size", 1),
        ("bind_size", 10),
        ("bind_size", True),
        ("reference", ""),
        ("reference", 3),
    ],
)
def test_config_rejects_bad_knobs(knob: str, value: object) -> None:
    with pytest.raises(ValueError, match=knob):
        SharedConfig(**{knob: value})


def test_config_defaults() -> None:
    config = SharedConfig()
    assert (config.reference, config.alpha_bits, config.beta_bits, config.bind_size) == (None, 8, 8, 8)
    assert SharedMethod.name == "shared" and SharedMethod.config_type is SharedConfig


def test_reference_is_first_3x3_conv_or_named() -> None:
    cifar = memfit.models.create("resnet18", stem="cifar", num_classes=10, width=4)
    imagenet = memfit.models.create("resnet18", num_classes=10, width=4)
    assert find_reference(cifar) == "conv1"
    assert find_reference(imagenet) == "layer1.0.conv1"  # behind the 7x7 stem
    assert find_reference(imagenet, "layer2.0.conv2") == "layer2.0.conv2"
    with pytest.raises(ValueError, match="3x3"):
        find_reference(imagenet, "conv1")
    with pytest.raises(ValueError, match="not a submodule"):
        find_reference(imagenet, "layer9.conv")
    with pytest.raises(ValueError, match="no 3x3"):
        find_reference(nn.Sequential(nn.Conv2d(3, 4, 5), nn.Linear(4, 2)))


def test_build_skips_reference_and_other_kernel_sizes_with_reasons() -> None:
    model = _net()
    method = SharedMethod()
    generators = method.build(model, LAYERS, SharedConfig())
    assert sorted(generators) == ["conv", "depthwise", "fc", "head", "point"]
    assert sorted(method.skipped) == ["stem", "wide"]
    assert "reference" in method.skipped["stem"] and "5x5" in method.skipped["wide"]
    assert {n: g.kind for n, g in generators.items()} == {
        "conv": "kernel",
        "depthwise": "kernel",
        "point": "vector",
        "fc": "vector",
        "head": "vector",
    }
    with pytest.raises(TypeError, match="SharedConfig"):
        method.build(model, LAYERS, CompressConfig())


def test_build_with_named_reference() -> None:
    model = _net()
    generators = SharedMethod().build(model, ["conv", "point"], SharedConfig(reference="depthwise"))
    assert generators["conv"].reference is model.depthwise and generators["conv"].num_refs == 12


def test_match_affine_picks_max_abs_correlation_and_least_squares() -> None:
    torch.manual_seed(1)
    refs = torch.randn(20, 9)
    targets = torch.randn(30, 9)
    index, alpha, beta = match_affine(targets, refs)
    # Brute force: the smallest least-squares residual over every reference.
    best = []
    for t in targets:
        residuals = []
        for r in refs:
            design = torch.stack([r, torch.ones(9)], 1)
            coef = torch.linalg.lstsq(design, t[:, None]).solution[:, 0]
            residuals.append(((design @ coef - t) ** 2).sum())
        best.append(int(torch.stack(residuals).argmin()))
    assert index.tolist() == best
    fit = alpha[:, None] * refs[index] + beta[:, None]
    design = torch.stack([refs[index], torch.ones(30, 9)], 2)
    lstsq = torch.linalg.lstsq(design, targets[:, :, None]).solution[:, :, 0]
    torch.testing.assert_close(fit, (design @ lstsq[:, :, None])[:, :, 0], atol=1e-5, rtol=1e-5)


def test_match_affine_constant_rows() -> None:
    refs = torch.cat([torch.full((1, 9), 2.0), torch.arange(9.0)[None]])
    index, alpha, beta = match_affine(torch.full((1, 9), 3.0), refs)
    assert alpha.tolist() == [0.0] and beta.tolist() == [3.0]
    index, alpha, beta = match_affine(-2 * torch.arange(9.0)[None] + 1, refs)  # negative correlation
    assert index.tolist() == [1]
    torch.testing.assert_close(alpha, torch.tensor([-2.0]))
    torch.testing.assert_close(beta, torch.tensor([1.0]))


@pytest.mark.parametrize("shape", [(5, 8, 3, 3), (7, 19, 1, 1), (6, 5)])
def test_projection_recovers_exact_affine_copies(shape: tuple[int, ...]) -> None:
    """A weight made of affine copies of reference kernels is rebuilt up to alpha/beta rounding."""
    torch.manual_seed(2)
    reference = nn.Conv2d(4, 6, 3)
    gen = SharedGenerator(shape, reference, "ref", alpha_bits=12, beta_bits=12)
    refs = reference.weight.detach().reshape(24, 9)
    if gen.kind == "vector":
        refs = refs[:, :8]
    index = torch.randint(0, 24, (gen.count,))
    alpha, beta = torch.randn(gen.count), 0.1 * torch.randn(gen.count)
    weight = gen._assemble(alpha[:, None] * refs[index] + beta[:, None])
    gen.project_(weight)
    assert gen().shape == torch.Size(shape)
    assert (gen() - weight).abs().max() < 2e-3 * weight.abs().max()
    if len(shape) == 4 and shape[2] == 3:
        assert torch.equal(gen.indices, index)
    # A lower bit width only costs rounding.
    coarse = SharedGenerator(shape, reference, "ref", alpha_bits=4, beta_bits=4).project_(weight)
    assert (coarse() - weight).norm() > (gen() - weight).norm()


def test_storage_counts_packed_bytes_and_ratio() -> None:
    model = _net()
    _, generators = _compress(model)
    for generator in generators.values():
        fields = {f.name: f for f in generator.storage()}
        assert fields["indices"].bits == index_bits(24) == 5
        assert fields["alpha"].count == fields["beta"].count == fields["indices"].count == generator.count
        meta, tensors = generator.pack()
        json.dumps(meta)
        assert sorted(tensors) == ["alpha", "alpha_scale", "beta", "beta_scale", "indices"]
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert abs(nbytes - math.ceil(generator.stored_bits / 8)) <= len(fields)
        assert all(t.dtype == torch.uint8 for k, t in tensors.items() if not k.endswith("scale"))
        assert all(t.dtype == torch.float32 for k, t in tensors.items() if k.endswith("scale"))
    conv = generators["conv"]
    assert conv.stored_bits == 64 * (5 + 8 + 8) + 64
    assert conv.original_bits / conv.stored_bits > 10
    point = generators["point"]  # 12 rows of 8 inputs: one 8-value sub-vector each
    assert storage_bits(point.storage()) == 12 * 21 + 64


def test_pack_unpack_is_bit_exact_and_trainable() -> None:
    model = _net()
    _, generators = _compress(model)
    x = torch.randn(2, 3, 8, 8)
    # Train a little so latents and scales move off their projected values.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    fresh = _net()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".generator." not in k}, strict=False)
    for name, generator in generators.items():
        meta, tensors = generator.pack()
        loaded = SharedGenerator.unpack(json.loads(json.dumps(meta)), tensors, fresh)
        assert loaded.reference is fresh.stem
        assert torch.equal(loaded(), generator())
        assert not any(p is fresh.stem.weight for p in loaded.parameters())
        loaded().square().sum().backward()
        assert all(p.grad is not None for p in loaded.parameters())
        assert fresh.stem.weight.grad is not None
        setattr(fresh, name, generated_layer(fresh.get_submodule(name), loaded))
    assert torch.equal(fresh(x), model(x))


def test_unpack_rejects_a_different_reference() -> None:
    model = _net()
    _, generators = _compress(model)
    meta, tensors = generators["conv"].pack()
    other = _net()
    other.stem = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="kernels"):
        SharedGenerator.unpack(meta, tensors, other)


def test_reference_is_tied_and_gradients_reach_compact_parameters() -> None:
    model = _net()
    _, generators = _compress(model)
    conv = generators["conv"]
    assert [n for n, _ in conv.named_parameters()] == ["alpha_latent", "beta_latent", "alpha_scale", "beta_scale"]
    assert not any(".generator.reference" in k for k in model.state_dict())
    indices = conv.indices.clone()
    before = conv().detach()
    with torch.no_grad():
        model.stem.weight.mul_(2)
    assert not torch.equal(conv(), before)  # read from the reference at forward time
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    for generator in generators.values():
        for name, param in generator.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert model.stem.weight.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.equal(conv.indices, indices)
    copy = copy_module.deepcopy(model)
    assert copy.conv.generator.reference is copy.stem and copy.stem is not model.stem


def test_fx_trace_ties_reference_and_runs_under_fake_tensors() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = _net()
    _compress(model)
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), model(x))
    attrs = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert "stem.weight" in attrs and not any("reference" in a for a in attrs)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = gm(mode.from_tensor(x))
    assert out.shape == (2, 13)


def test_reproject_keeps_weight_close() -> None:
    model = _net()
    _, generators = _compress(model, SharedConfig(alpha_bits=10, beta_bits=10))
    conv = generators["conv"]
    before = conv().detach()
    conv.project_()
    assert (conv() - before).norm() <= 1e-2 * before.norm()
    with pytest.raises(ValueError, match="shape"):
        conv.project_(torch.zeros(3, 3))


def test_generator_rejects_unsupported_shapes() -> None:
    reference = nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match="shape"):
        SharedGenerator((4, 4, 5, 5), reference, "ref")
    with pytest.raises(ValueError, match="3x3"):
        SharedGenerator((4, 4, 3, 3), nn.Conv2d(2, 2, 1), "ref")
