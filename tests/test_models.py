"""Tests for memfit.models: registry, tracing, parameter counts, options."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.fx
import torch.utils.checkpoint
from torch import nn

import memfit
from memfit.models import create, list_models, register_model
from memfit.models import registry as registry_module

EXPECTED_NAMES = sorted(
    [
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
        "densenet121", "densenet169", "densenet201", "densenet264", "densenet_bc_100",
        "mobilenet_v2",
        "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
        "gpt", "gpt2",
    ]
)  # fmt: skip

# Published counts (torchvision / GPT-2 small), ImageNet stem, 1000 classes.
PUBLISHED_COUNTS: dict[str, int] = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "densenet121": 7_978_856,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
    "mobilenet_v2": 3_504_872,
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240,
    "vgg19_bn": 143_678_248,
    "gpt2": 124_439_808,
}


def n_params(model: nn.Module) -> int:
    """Count unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def build_on_meta(name: str, **kwargs: object) -> nn.Module:
    """Build a model without allocating real storage (fast, for counting)."""
    with torch.device("meta"):
        return create(name, **kwargs)


def image_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32)


def token_input() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 16))


_CIFAR: dict[str, object] = {"stem": "cifar"}
# name -> (factory options for the forward test, input maker). Every registered
# model must have an entry, so adding a model without a test case fails.
FORWARD_CASES: dict[str, tuple[dict[str, object], Callable[[], torch.Tensor]]] = {
    **{n: (_CIFAR, image_input) for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
    **{n: (_CIFAR, image_input) for n in ("densenet121", "densenet169", "densenet201", "densenet264")},
    "densenet_bc_100": ({}, image_input),
    "mobilenet_v2": (_CIFAR, image_input),
    **{
        n: (_CIFAR, image_input)
        for n in ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")
    },
    "gpt": ({}, token_input),
    "gpt2": ({}, token_input),
}


def test_registered_names() -> None:
    assert list_models() == EXPECTED_NAMES


@pytest.mark.parametrize("name", list_models())
def test_symbolic_trace_matches_eager(name: str) -> None:
    if name not in FORWARD_CASES:
        pytest.fail(f"no forward test case for registered model {name!r}")
    kwargs, make_input = FORWARD_CASES[name]
    torch.manual_seed(0)
    model = create(name, **kwargs).eval()
    traced = torch.fx.symbolic_trace(model)
    assert isinstance(traced, torch.fx.GraphModule)
    x = make_input()
    with torch.no_grad():
        eager_out = model(x)
        traced_out = traced(x)
    if x.dtype == torch.long:
        assert eager_out.shape == (*x.shape, model.config.vocab_size)
    else:
        assert eager_out.shape == (2, 10 if name == "densenet_bc_100" else 1000)
    assert torch.isfinite(eager_out).all()
    assert torch.equal(eager_out, traced_out)


@pytest.mark.parametrize(
    ("name", "kwargs", "make_input"),
    [
        ("gpt", {"dropout": 0.2}, token_input),
        ("densenet_bc_100", {"drop_rate": 0.2}, image_input),
        ("mobilenet_v2", {"stem": "cifar", "width_mult": 0.5}, image_input),
        ("resnet18", {"stem": "cifar", "num_classes": 10}, image_input),
    ],
)
def test_symbolic_trace_matches_eager_in_train_mode(
    name: str, kwargs: dict[str, object], make_input: Callable[[], torch.Tensor]
) -> None:
    model = create(name, **kwargs).train()
    traced = torch.fx.symbolic_trace(model)
    x = make_input()
    torch.manual_seed(123)
    eager_out = model(x)
    torch.manual_seed(123)
    traced_out = traced(x)
    assert torch.equal(eager_out, traced_out)
    traced_out.sum().backward()  # gradients flow through the traced graph


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "mobilenet_v2", "vgg11_bn"])
def test_imagenet_stem_traces(name: str) -> None:
    torch.manual_seed(0)
    model = create(name, num_classes=7).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 7)
        assert torch.equal(out, traced(x))


@pytest.mark.parametrize(("name", "expected"), sorted(PUBLISHED_COUNTS.items()))
def test_published_parameter_counts(name: str, expected: int) -> None:
    assert n_params(build_on_meta(name)) == expected


def densenet_closed_form(
    block_config: tuple[int, ...],
    *,
    growth: int,
    init: int,
    num_classes: int,
    stem_kernel: int,
    stem_bn: bool,
    bn_size: int = 4,
) -> int:
    """Parameter count of a DenseNet-BC (compression 0.5), from the architecture."""
    total = 3 * init * stem_kernel**2 + (2 * init if stem_bn else 0)
    ch = init
    inner = bn_size * growth
    for i, layers in enumerate(block_config):
        for _ in range(layers):
            # BN(ch) + 1x1 conv ch->inner + BN(inner) + 3x3 conv inner->growth
            total += 2 * ch + ch * inner + 2 * inner + inner * growth * 9
            ch += growth
        if i != len(block_config) - 1:
            total += 2 * ch + ch * (ch // 2)  # BN + 1x1 compression conv
            ch //= 2
    return total + 2 * ch + ch * num_classes + num_classes  # final BN + linear


def test_densenet_closed_form_matches_published() -> None:
    # The closed form reproduces torchvision's published numbers ...
    imagenet = {"stem_kernel": 7, "stem_bn": True, "growth": 32, "init": 64, "num_classes": 1000}
    assert densenet_closed_form((6, 12, 24, 16), **imagenet) == PUBLISHED_COUNTS["densenet121"]
    assert densenet_closed_form((6, 12, 32, 32), **imagenet) == PUBLISHED_COUNTS["densenet169"]
    assert densenet_closed_form((6, 12, 48, 32), **imagenet) == PUBLISHED_COUNTS["densenet201"]
    # ... so it is a trustworthy oracle for DenseNet-264 (6, 12, 64, 48).
    expected_264 = densenet_closed_form((6, 12, 64, 48), **imagenet)
    assert expected_264 == 33_337_704
    assert n_params(build_on_meta("densenet264")) == expected_264


def test_densenet_bc_100_count() -> None:
    expected = densenet_closed_form((16, 16, 16), growth=12, init=24, num_classes=10, stem_kernel=3, stem_bn=False)
    assert 0.77 <= round(expected / 1e6, 2) <= 0.80
    model = create("densenet_bc_100")
    assert n_params(model) == expected
    assert model.classifier.out_features == 10
    assert n_params(build_on_meta("densenet_bc_100", num_classes=100)) == expected + 90 * (342 + 1)


def test_cifar_stem_changes_only_the_stem() -> None:
    imagenet = n_params(build_on_meta("resnet18"))
    cifar = n_params(build_on_meta("resnet18", stem="cifar"))
    assert imagenet - cifar == 3 * 64 * (7 * 7 - 3 * 3)
    model = create("resnet18", stem="cifar", num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.maxpool is None
    vgg = build_on_meta("vgg16", stem="cifar", num_classes=10)
    assert n_params(vgg) == n_params(build_on_meta("vgg16")) - (
        512 * 49 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
    ) + (512 * 10 + 10)


def test_resnet_bottleneck_strides_on_3x3() -> None:
    model = build_on_meta("resnet50")
    first = model.layer2[0]
    assert first.conv1.stride == (1, 1)
    assert first.conv2.stride == (2, 2) and first.conv2.kernel_size == (3, 3)
    assert first.downsample[0].stride == (2, 2)


def test_densenet_concatenations_are_graph_nodes() -> None:
    traced = torch.fx.symbolic_trace(create("densenet_bc_100"))
    cats = [n for n in traced.graph.nodes if n.op == "call_function" and n.target is torch.cat]
    assert len(cats) == 3 * 16 + 3  # one per dense layer + one per block output
    assert all(n.target is not torch.utils.checkpoint.checkpoint for n in traced.graph.nodes)


def test_mobilenet_width_mult_changes_count() -> None:
    counts = {w: n_params(build_on_meta("mobilenet_v2", width_mult=w)) for w in (0.5, 1.0, 1.4)}
    assert counts[1.0] == PUBLISHED_COUNTS["mobilenet_v2"]
    assert counts[0.5] < counts[1.0] < counts[1.4]
    for w in (0.35, 0.75):
        model = build_on_meta("mobilenet_v2", width_mult=w)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert all(c.out_channels % 8 == 0 for c in convs)
        assert model.classifier[-1].in_features == 1280


def test_gpt_weight_tying() -> None:
    model = create("gpt", n_layer=1, n_embd=32, n_head=2, vocab_size=100, block_size=8)
    assert model.lm_head.weight is model.wte.weight
    traced = torch.fx.symbolic_trace(model)
    assert traced.lm_head.weight is traced.wte.weight
    untied = 100 * 32  # would be counted twice if the head were not tied
    per_block = 2 * 2 * 32 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)
    assert n_params(model) == 100 * 32 + 8 * 32 + per_block + 2 * 32
    assert sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)) == n_params(model) + untied


def test_gpt2_config() -> None:
    model = build_on_meta("gpt2")
    assert len(model.h) == 12
    assert model.wte.weight.shape == (50257, 768)
    assert model.wpe.weight.shape == (1024, 768)
    assert model.h[0].attn.n_head == 12


def test_gpt_sequence_length_check_eager_and_traced() -> None:
    model = create("gpt", n_layer=1, n_embd=32, n_head=2, vocab_size=50, block_size=8).eval()
    traced = torch.fx.symbolic_trace(model)
    ok = torch.randint(0, 50, (2, 8))
    assert torch.equal(model(ok), traced(ok))
    too_long = torch.randint(0, 50, (2, 9))
    for fn in (model, traced):
        with pytest.raises(ValueError, match="exceeds block_size 8"):
            fn(too_long)
        with pytest.raises(ValueError, match=r"\[B, T\]"):
            fn(torch.randint(0, 50, (8,)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_embd": 30, "n_head": 4},
        {"n_layer": 0},
        {"n_head": -1},
        {"vocab_size": 2.5},
        {"block_size": True},
        {"dropout": 1.0},
        {"dropout": -0.1},
    ],
)
def test_gpt_rejects_bad_options(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        create("gpt", **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", {"stem": "tiny"}),
        ("resnet50", {"num_classes": 0}),
        ("densenet121", {"drop_rate": 1.5}),
        ("densenet121", {"stem": "mnist"}),
        ("densenet_bc_100", {"num_classes": -3}),
        ("mobilenet_v2", {"width_mult": 0}),
        ("vgg11", {"stem": None}),
        ("vgg11_bn", {"dropout": 2}),
    ],
)
def test_cnn_rejects_bad_options(name: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        create(name, **kwargs)


def test_factory_options_are_keyword_only() -> None:
    factory = registry_module._REGISTRY["resnet18"]
    with pytest.raises(TypeError):
        factory(10)  # type: ignore[misc]
    with pytest.raises(TypeError):
        create("resnet18", not_an_option=1)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError) as info:
        create("resnet81")
    message = str(info.value)
    assert "resnet18" in message
    assert "list_models()" in message
    with pytest.raises(ValueError, match="list_models"):
        create("totally-unrelated-thing")


def test_register_model_and_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_model("tiny_mlp_for_test")
    def tiny(*, width: int = 4) -> nn.Module:
        return nn.Linear(width, width)

    @register_model
    def tiny_bare_for_test() -> nn.Module:
        return nn.Identity()

    assert "tiny_mlp_for_test" in list_models() and "tiny_bare_for_test" in list_models()
    assert list_models() == sorted(list_models())
    assert create("tiny_mlp_for_test", width=3).in_features == 3

    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_mlp_for_test")(lambda: nn.Identity())
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18")(tiny)
    with pytest.raises(ValueError):
        register_model("")(tiny)
    # the failed registrations did not replace anything
    assert create("tiny_mlp_for_test").in_features == 4


def test_registry_isolated_after_monkeypatch() -> None:
    assert list_models() == EXPECTED_NAMES


def test_default_init() -> None:
    torch.manual_seed(0)
    model = create("gpt", n_layer=2, n_embd=64, n_head=2, vocab_size=500, block_size=32)
    std = model.h[0].mlp.c_fc.weight.std().item()
    assert math.isclose(std, 0.02, rel_tol=0.1)
    assert torch.count_nonzero(model.h[0].attn.c_attn.bias) == 0
    resnet = create("resnet18", num_classes=10)
    assert torch.all(resnet.bn1.weight == 1) and torch.all(resnet.bn1.bias == 0)


def test_load_builds_zoo_names_and_factories_and_names_what_fails() -> None:
    from memfit import MemfitInputError
    from memfit.models import load

    assert load("resnet18", num_classes=7, stem=None).fc.out_features == 7  # None: the factory's default
    assert isinstance(load("torch.nn:Identity"), nn.Identity)
    with pytest.raises(MemfitInputError, match=r"cannot load 'torch.nn:NoSuchNet'"):
        load("torch.nn:NoSuchNet")
    with pytest.raises(MemfitInputError, match="resnet18"):
        load("resnet18", no_such_option=1)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_a_residual_blocks_eager_forward_peaks_where_its_graph_does(name: str) -> None:
    # The blocks' locals held BatchNorm's output and the shortcut through the last ReLU, which the
    # traced graph frees after the sum: the eager forward peaked one block output above the
    # prediction (8 MiB of ResNet-50 at batch 64).
    torch.manual_seed(0)
    block = memfit.models.create(name, stem="cifar", num_classes=10).layer2[0]
    x = torch.randn(2, block.conv1.in_channels, 16, 16)
    kw = {"optimizer": None, "loss_fn": lambda out: out.mean()}
    predicted, measured = memfit.estimate(block, x, **kw), memfit.measure(block, x, **kw)
    assert predicted.phase_peaks["forward"] == measured.phase_peaks["forward"]
