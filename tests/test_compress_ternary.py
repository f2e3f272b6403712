"""The ternary compressor: EC2T/TTQ assignment, gradients, phases, storage formats, pack/unpack."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from memfit.compressors.base import CompressConfig, Field
from memfit.compressors.bits import index_bits, packed_nbytes
from memfit.compressors.layer import generated_layer
from memfit.compressors.ternary import (
    FORMATS,
    TernaryConfig,
    TernaryGenerator,
    TernaryMethod,
    code_formats,
    freeze_assignment_,
    ternary_generators,
    ternary_sparsity,
    unfreeze_assignment_,
)


def _generator(shape: tuple[int, ...] = (6, 4, 3, 3), seed: int = 0, **options: Any) -> TernaryGenerator:
    torch.manual_seed(seed)
    return TernaryGenerator.from_weight(torch.randn(shape) * 0.1, **options)


def _codes_with(n_pos: int, n_neg: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    codes = torch.zeros(math.prod(shape), dtype=torch.int8)
    where = torch.randperm(codes.numel(), generator=torch.Generator().manual_seed(seed))
    codes[where[:n_pos]] = 1
    codes[where[n_pos : n_pos + n_neg]] = -1
    return codes.reshape(shape)


def _frozen_with(codes: torch.Tensor, w_p: float = 0.3, w_n: float = 0.2) -> TernaryGenerator:
    gen = TernaryGenerator(tuple(codes.shape))
    with torch.no_grad():
        gen.w_p.fill_(w_p)
        gen.w_n.fill_(w_n)
        gen.frozen_codes.copy_(codes)
        gen.frozen.fill_(True)
    return gen


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knob", "value"),
    [
        ("rule", "tnn"),
        ("strength", -0.1),
        ("strength", float("nan")),
        ("strength", True),
        ("strength", "0.1"),
        ("ttq_threshold", 1.0),
        ("ttq_threshold", -0.01),
    ],
)
def test_config_rejects_bad_knobs_naming_them(knob: str, value: object) -> None:
    with pytest.raises(ValueError, match=knob):
        TernaryConfig(**{knob: value})


def test_config_keeps_base_validation_and_defaults() -> None:
    with pytest.raises(ValueError, match="include"):
        TernaryConfig(include="layer1.*")
    cfg = TernaryConfig()
    assert (cfg.rule, cfg.skip_first_conv, cfg.skip_classifier) == ("ec2t", True, True)
    assert TernaryMethod.config_type is TernaryConfig and TernaryMethod.name == "ternary"


# -- assignment rules -----------------------------------------------------------------------------


def test_ttq_rule_thresholds_at_t_times_max() -> None:
    w = torch.tensor([[1.0, 0.3, 0.2, -0.25, -0.31, 0.0, -1.0, 0.5]])
    gen = TernaryGenerator.from_weight(w, rule="ttq", ttq_threshold=0.3)
    assert gen.codes().tolist() == [[1, 0, 0, 0, -1, 0, -1, 1]]
    assert torch.equal(gen(), torch.where(gen.codes() == 1, gen.w_p, torch.where(gen.codes() == -1, -gen.w_n, 0.0)))


def test_scales_start_at_mean_positive_and_negative_magnitudes_in_power_of_two_units() -> None:
    w = torch.tensor([[0.4, 0.2, -0.1, -0.5, -0.3]])
    gen = TernaryGenerator.from_weight(w)
    assert gen.unit.item() == 0.5
    assert [s.item() for s in gen.scales()] == pytest.approx([0.3, 0.3])
    assert torch.equal(gen.latent.detach() * gen.unit, w)


def _reference_ec2t(values: list[float], w_p: float, w_n: float, lam: float) -> list[int]:
    """EC2T's assignment written out loop by loop: the zero band (at least the nearest-centroid
    band) minimising distortion with each side at its mean plus lam * total bits, searched over the
    grid's edges; then each weight's argmin of (v - c)**2 + lam * I_c under that band's
    frequencies."""
    grid = 128
    top = max(abs(x) for x in values)
    v = [x / top for x in values]
    p, q = w_p / top, w_n / top
    bins = [min(math.floor(abs(x) * grid), grid) for x in v]
    centre = [min(b + 0.5, grid) / grid for b in bins]
    n = len(v)

    def side(k: int, negative: bool) -> tuple[int, float]:
        members = [c for x, b, c in zip(v, bins, centre, strict=True) if (x < 0) == negative and b >= k]
        return len(members), sum(members)

    def bits(counts: tuple[int, ...]) -> float:
        return sum(-c * math.log2(c / n) for c in counts if c)

    best = None
    for kn in range(math.floor(q * grid / 2), grid + 2):
        n_neg, s_neg = side(kn, True)
        for kp in range(math.floor(p * grid / 2), grid + 2):
            n_pos, s_pos = side(kp, False)
            gain = (s_pos**2 / n_pos if n_pos else 0.0) + (s_neg**2 / n_neg if n_neg else 0.0)
            counts = (n - n_pos - n_neg, n_pos, n_neg)
            cost = lam * bits(counts) - gain
            if best is None or cost < best[0] - 1e-9:
                best = (cost, counts)
    info = [-math.log2(max(c, 1) / n) for c in best[1]]
    centroids = (0.0, p, -q)
    costs = [[(x - c) ** 2 + lam * i for c, i in zip(centroids, info, strict=True)] for x in v]
    return [(0, 1, -1)[min(range(3), key=lambda j: (row[j], j))] for row in costs]


@pytest.mark.parametrize("lam", [0.0, 0.005, 0.02, 0.05, 0.12])
def test_ec2t_assignment_matches_a_loop_reference(lam: float) -> None:
    torch.manual_seed(3)
    # Values at bin centres make the search's histogram exact.
    ks = torch.randint(0, 128, (60,)).double()
    values = [*((ks + 0.5) / 128 * torch.randn(60).sign()).tolist(), 1.0]
    gen = TernaryGenerator.from_weight(torch.tensor(values), lam=lam)
    expected = _reference_ec2t(values, *(s.item() for s in gen.scales()), lam)
    assert gen.codes().tolist() == expected


def test_ec2t_without_penalty_is_nearest_centroid() -> None:
    gen = _generator(lam=0.0)
    x = gen.latent.detach()
    dist = torch.stack(((x - 0) ** 2, (x - gen.w_p.detach()) ** 2, (x + gen.w_n.detach()) ** 2))
    nearest = torch.tensor([0, 1, -1], dtype=torch.int8)[dist.argmin(0)]
    assert torch.equal(gen.codes(), nearest)


def test_ec2t_sparsity_grows_with_lambda_even_on_a_gaussian_layer() -> None:
    # Zero starts as the rarest code here; the penalty must still add zeros, not remove them.
    gens = [_generator(shape=(32, 16, 3, 3), lam=lam) for lam in (0.0, 0.005, 0.01, 0.02, 0.04, 1.0)]
    sparsities = [g.sparsity() for g in gens]
    assert sparsities[0] < 1 / 3 and sparsities == sorted(sparsities)
    assert 0.5 < sparsities[3] < 0.9 and sparsities[-1] == 1.0
    for gen in gens:  # a zero band: codes never decrease along increasing latents
        order = gen.latent.detach().reshape(-1).argsort()
        assert bool((gen.codes().reshape(-1)[order].diff() >= 0).all())


def test_ec2t_penalty_never_makes_a_layer_binary() -> None:
    # Uniform weights: binary codes beat a nearest-centroid zero band on the objective at this lam.
    torch.manual_seed(0)
    gen = TernaryGenerator.from_weight(torch.rand(32, 16, 3, 3) - 0.5, lam=0.12)
    assert 0.2 < gen.sparsity() < 0.3


def test_build_scales_lambda_by_layer_size_relative_to_largest() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8, 2))
    gens = TernaryMethod().build(model, ["0", "1", "3"], TernaryConfig(strength=0.2))
    assert gens["1"].lam == pytest.approx(0.2)
    assert gens["0"].lam == pytest.approx(0.2 * 108 / 288) and gens["3"].lam == pytest.approx(0.2 * 16 / 288)
    assert all(g.rule == "ec2t" for g in gens.values())
    assert torch.equal(gens["0"].latent.detach() * gens["0"].unit, model[0].weight.detach())
    with pytest.raises(TypeError, match="TernaryConfig"):
        TernaryMethod().build(model, ["0"], CompressConfig())
    with pytest.raises(TypeError, match="Flatten"):
        TernaryMethod().build(model, ["2"], TernaryConfig())


# -- gradients and phases -------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["ec2t", "ttq"])
def test_gradients_straight_through_to_latents_and_code_sums_to_scales(rule: str) -> None:
    gen = _generator(rule=rule, lam=0.05)
    upstream = torch.randn(gen.shape)
    (gen() * upstream).sum().backward()
    codes, unit = gen.codes(), gen.unit.item()
    assert unit < 1  # the parameters are in units of a power of two; the chain rule scales by it
    assert torch.equal(gen.latent.grad, upstream * unit)
    assert gen.w_p.grad.item() == pytest.approx(unit * upstream[codes == 1].sum().item(), rel=1e-5)
    assert gen.w_n.grad.item() == pytest.approx(-unit * upstream[codes == -1].sum().item(), rel=1e-5)


def test_freeze_keeps_codes_trains_only_scales_and_unfreeze_reassigns() -> None:
    # TTQ's symmetric threshold makes negated latents exactly negated codes.
    model = nn.Sequential(generated_layer(nn.Conv2d(4, 6, 3), _generator(rule="ttq")))
    gen = ternary_generators(model)[0]
    before = gen.codes().clone()
    assert freeze_assignment_(model) == 1
    with torch.no_grad():
        gen.latent.neg_()  # would flip every code if the assignment were live
    assert torch.equal(gen.codes(), before)
    model(torch.randn(2, 4, 5, 5)).square().sum().backward()
    assert gen.latent.grad is not None and not gen.latent.grad.any()
    assert gen.w_p.grad.abs() > 0 and gen.w_n.grad.abs() > 0
    assert unfreeze_assignment_(model) == 1
    assert torch.equal(gen.codes(), -before)


def test_phase_functions_and_sparsity_need_ternary_layers() -> None:
    for fn in (freeze_assignment_, unfreeze_assignment_, ternary_sparsity):
        with pytest.raises(ValueError, match="no ternary"):
            fn(nn.Linear(2, 2))


def test_model_sparsity_is_size_weighted() -> None:
    small = _frozen_with(_codes_with(1, 1, (2, 2)))  # 2 zeros of 4
    big = _frozen_with(_codes_with(2, 2, (4, 5)))  # 16 zeros of 20
    assert small.sparsity() == 0.5 and big.sparsity() == 0.8
    assert ternary_sparsity(nn.ModuleList([small, big])) == pytest.approx(18 / 24)


def test_traced_graph_follows_the_frozen_flag() -> None:
    torch.manual_seed(0)
    layer = generated_layer(nn.Conv2d(3, 4, 3), _generator(shape=(4, 3, 3, 3), lam=0.01))
    assert 0.3 < layer.generator.sparsity() < 0.9
    graph = torch.fx.symbolic_trace(nn.Sequential(layer))
    x = torch.randn(1, 3, 6, 6)
    live = graph(x)
    assert torch.equal(live, layer(x))
    freeze_assignment_(layer)
    with torch.no_grad():
        layer.generator.latent.neg_()
    assert torch.equal(graph(x), live)
    unfreeze_assignment_(layer)
    assert not torch.equal(graph(x), live)


@pytest.mark.parametrize("rule", ["ec2t", "ttq"])
def test_build_and_forward_run_on_fake_tensors(rule: str) -> None:
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
        gen = TernaryMethod().build(model, ["1"], TernaryConfig(rule=rule))["1"]
        weight = gen()
    assert weight.shape == (4, 4, 3, 3)


# -- storage --------------------------------------------------------------------------------------


def test_code_formats_count_every_bit() -> None:
    codes = _codes_with(3, 2, (4, 10))  # 40 weights, 5 nonzero, 10 columns
    assert code_formats(codes) == {
        "dense": [Field("codes", 40, 2)],
        "bitmask": [Field("mask", 40, 1), Field("signs", 5, 1)],
        "csr": [Field("cols", 5, 4), Field("signs", 5, 1), Field("row_ends", 4, index_bits(6))],
    }


@pytest.mark.parametrize(
    ("n_pos", "n_neg", "fmt"),
    [(300, 276, "dense"), (100, 90, "bitmask"), (10, 5, "csr"), (0, 0, "csr")],
)
def test_pack_uses_the_smallest_format_and_round_trips_bit_exactly(n_pos: int, n_neg: int, fmt: str) -> None:
    shape = (8, 8, 3, 3)
    gen = _frozen_with(_codes_with(n_pos, n_neg, shape, seed=n_pos))
    sizes = {f: sum(x.total_bits for x in fields) for f, fields in code_formats(gen.codes()).items()}
    assert gen.storage_format == fmt and sizes[fmt] == min(sizes.values())
    meta, tensors = gen.pack()
    assert meta["format"] == fmt and meta["nnz"] == n_pos + n_neg
    assert tensors["scales"].dtype == torch.float32 and tensors["scales"].tolist() == pytest.approx([0.3, 0.2])
    fields = gen.storage()
    assert gen.stored_bits == sizes[fmt] + 64
    stored_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored_bytes == sum(packed_nbytes(f.count, f.bits) for f in fields)
    assert math.ceil(gen.stored_bits / 8) <= stored_bytes <= math.ceil(gen.stored_bits / 8) + len(fields)
    loaded = TernaryGenerator.unpack(meta, tensors, nn.Module())
    assert torch.equal(loaded.codes(), gen.codes())
    assert torch.equal(loaded(), gen())


@pytest.mark.parametrize("rule", ["ec2t", "ttq"])
def test_unpacked_generator_is_frozen_exact_and_trainable(rule: str) -> None:
    gen = _generator(rule=rule, lam=0.02)
    meta, tensors = gen.pack()
    loaded = TernaryGenerator.unpack(meta, tensors, nn.Module())
    assert (loaded.rule, loaded.lam, bool(loaded.frozen)) == (rule, gen.lam, True)
    assert torch.equal(loaded(), gen())
    assert torch.equal(loaded.latent.detach() * loaded.unit, gen().detach())  # latents are code * scale
    loaded().sum().backward()
    assert loaded.w_p.grad is not None and loaded.w_p.grad != 0


def test_unfrozen_ttq_load_gives_back_the_codes() -> None:
    gen = _generator(rule="ttq")
    loaded = TernaryGenerator.unpack(*gen.pack(), nn.Module())
    unfreeze_assignment_(loaded)
    assert torch.equal(loaded.codes(), gen.codes())


@pytest.mark.parametrize("fmt", FORMATS)
def test_unpack_rejects_corrupt_input(fmt: str) -> None:
    sparse = {"dense": (300, 276), "bitmask": (100, 90), "csr": (10, 5)}[fmt]
    meta, tensors = _frozen_with(_codes_with(*sparse, (8, 8, 3, 3))).pack()
    assert meta["format"] == fmt
    with pytest.raises(ValueError):
        TernaryGenerator.unpack({**meta, "format": "coo"}, tensors, nn.Module())
    with pytest.raises(ValueError):
        TernaryGenerator.unpack({**meta, "nnz": meta["nnz"] + 9}, tensors, nn.Module())
    with pytest.raises(ValueError, match="scales"):
        TernaryGenerator.unpack(meta, {**tensors, "scales": torch.ones(3)}, nn.Module())
