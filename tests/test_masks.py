"""Mask makers: ``tost_surgery.masks.random`` / ``erk`` / ``erk_densities`` / ``prunable_weights``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tost_surgery
from tost_surgery import MaskError
from tost_surgery.masks import erk, erk_densities, prunable_weights, random

MAKERS = [pytest.param(random, id="random"), pytest.param(erk, id="erk")]
HYP = settings(max_examples=60, deadline=None)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.downsample = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))


class SmallCNN(nn.Module):
    """Every default type (Conv1d/2d/3d, Linear) plus BN, LayerNorm, biases and a nested block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem1d = nn.Conv1d(3, 4, 5)
        self.stem3d = nn.Conv3d(2, 4, (1, 3, 3), bias=False)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.block = Block()
        self.dw = nn.Conv2d(16, 16, 3, groups=16, bias=False)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))


SMALL_CNN_WEIGHTS = [
    "stem1d.weight",
    "stem3d.weight",
    "conv1.weight",
    "block.conv.weight",
    "block.downsample.0.weight",
    "dw.weight",
    "head.0.weight",
    "head.2.weight",
]


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


def expected_kept(model: nn.Module, sparsity: float) -> int:
    total = sum(w.numel() for w in prunable_weights(model).values())
    return round((1 - sparsity) * total)


def rigl_erk(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """ERK as in google-research/rigl ``sparse_utils.get_sparsities``: cap the densest layer(s), repeat."""
    dense: set[str] = set()
    while True:
        rhs, divisor, raw = 0.0, 0.0, {}
        for name, shape in shapes.items():
            n_param = math.prod(shape)
            if name in dense:
                rhs -= n_param * (1 - density)
            else:
                rhs += n_param * density
                raw[name] = sum(shape) / n_param
                divisor += raw[name] * n_param
        eps = rhs / divisor
        max_prob = max(raw.values())
        if max_prob * eps > 1:
            dense |= {name for name, p in raw.items() if p == max_prob}
            continue
        return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}


# --------------------------------------------------------------------------- scope and format


@pytest.mark.parametrize("maker", MAKERS)
def test_mask_format_and_default_scope(maker) -> None:
    model = small_cnn()
    mask = maker(model, 0.5, seed=0)
    params = dict(model.named_parameters())
    assert list(mask) == SMALL_CNN_WEIGHTS  # model order, no bias / BN / LayerNorm
    for name, m in mask.items():
        assert m.dtype == torch.bool
        assert m.shape == params[name].shape
        assert m.device == params[name].device
        assert not m.requires_grad


def test_prunable_weights_default_scope_is_conv_and_linear_weights() -> None:
    model = small_cnn()
    weights = prunable_weights(model)
    params = dict(model.named_parameters())
    assert list(weights) == SMALL_CNN_WEIGHTS
    for name, w in weights.items():
        assert w is params[name]


def test_bare_layer_is_named_weight() -> None:
    layer = nn.Linear(4, 6)
    mask = random(layer, 0.5, seed=0)
    assert list(mask) == ["weight"]
    assert mask["weight"].shape == (6, 4)


@pytest.mark.parametrize("maker", MAKERS)
def test_mask_on_param_device(maker) -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))
    mask = maker(model, 0.5, seed=0)
    assert set(mask) == {"0.weight", "1.weight"}
    assert all(m.device.type == "meta" and m.dtype == torch.bool for m in mask.values())


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"include": ["head.*"]}, ["head.0.weight", "head.2.weight"]),
        ({"include": [nn.Linear]}, ["head.0.weight", "head.2.weight"]),
        ({"include": [nn.Conv1d, nn.Conv3d]}, ["stem1d.weight", "stem3d.weight"]),
        ({"include": [nn.BatchNorm2d]}, ["bn1.weight", "block.bn.weight", "block.downsample.1.weight"]),
        ({"include": ["*.downsample.*"]}, ["block.downsample.0.weight", "block.downsample.1.weight"]),
        ({"include": ["conv1.weight", nn.Linear]}, ["conv1.weight", "head.0.weight", "head.2.weight"]),
        ({"exclude": ["head.*"]}, SMALL_CNN_WEIGHTS[:-2]),
        ({"exclude": [nn.Linear, nn.Conv1d, nn.Conv3d]}, SMALL_CNN_WEIGHTS[2:-2]),
        (
            {"exclude": ["*.downsample.*", "dw.weight"]},
            [n for n in SMALL_CNN_WEIGHTS if n not in {"block.downsample.0.weight", "dw.weight"}],
        ),
        ({"include": [nn.Conv2d], "exclude": ["block.*"]}, ["conv1.weight", "dw.weight"]),
        ({"include": ["head.*"], "exclude": [nn.ReLU]}, ["head.0.weight", "head.2.weight"]),
    ],
)
@pytest.mark.parametrize("maker", MAKERS)
def test_include_exclude(maker, kwargs, names) -> None:
    model = small_cnn()
    assert list(prunable_weights(model, **kwargs)) == names
    mask = maker(model, 0.5, seed=0, **kwargs)
    assert list(mask) == names
    params = dict(model.named_parameters())
    assert all(mask[n].shape == params[n].shape for n in names)


def test_glob_is_case_sensitive_and_anchored() -> None:
    model = small_cnn()
    with pytest.raises(MaskError):
        prunable_weights(model, include=["HEAD.*"])
    with pytest.raises(MaskError):
        prunable_weights(model, include=["head"])  # a pattern over parameter names, not module names


# --------------------------------------------------------------------------- exact global count


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98, 0.995])
@pytest.mark.parametrize("maker", MAKERS)
def test_exact_global_count_small_cnn(maker, sparsity) -> None:
    model = small_cnn()
    mask = maker(model, sparsity, seed=0)
    assert sum(int(m.sum()) for m in mask.values()) == max(len(mask), expected_kept(model, sparsity))
    assert all(m.any() for m in mask.values())


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98, 0.995])
@pytest.mark.parametrize("maker", MAKERS)
def test_exact_global_count_resnet18(resnet18, maker, sparsity) -> None:
    mask = maker(resnet18, sparsity, seed=0)
    assert len(mask) == 21  # 20 convs (3 downsample) and the fc
    assert sum(int(m.sum()) for m in mask.values()) == expected_kept(resnet18, sparsity)
    assert all(m.any() for m in mask.values())
    if maker is erk:
        shapes = {n: tuple(w.shape) for n, w in prunable_weights(resnet18).items()}
        reference = rigl_erk(shapes, 1 - sparsity)
        for name, m in mask.items():
            assert abs(int(m.sum()) - reference[name] * m.numel()) <= 1, name
    else:
        for name, m in mask.items():
            assert abs(int(m.sum()) - (1 - sparsity) * m.numel()) <= 1, name


@pytest.mark.parametrize("maker", MAKERS)
def test_zero_sparsity_keeps_everything(maker) -> None:
    mask = maker(small_cnn(), 0, seed=0)
    assert all(m.all() for m in mask.values())


LAYER = st.one_of(
    st.tuples(st.just("linear"), st.integers(1, 12), st.integers(1, 12), st.just(1)),
    st.tuples(st.sampled_from(["conv1d", "conv2d", "conv3d"]), st.integers(1, 6), st.integers(1, 6), st.integers(1, 3)),
)


def build(layers: list[tuple[str, int, int, int]]) -> nn.Sequential:
    make = {
        "linear": lambda i, o, k: nn.Linear(i, o),
        "conv1d": lambda i, o, k: nn.Conv1d(i, o, k),
        "conv2d": lambda i, o, k: nn.Conv2d(i, o, k),
        "conv3d": lambda i, o, k: nn.Conv3d(i, o, k),
    }
    return nn.Sequential(*(make[kind](i, o, k) for kind, i, o, k in layers))


@HYP
@given(layers=st.lists(LAYER, min_size=1, max_size=6), sparsity=st.floats(0.0, 0.999), seed=st.integers(0, 2**32))
def test_exact_count_property(layers, sparsity, seed) -> None:
    model = build(layers)
    numels = [m.weight.numel() for m in model]
    target = max(len(numels), round((1 - sparsity) * sum(numels)))
    for maker in (random, erk):
        mask = maker(model, sparsity, seed=seed)
        counts = [int(m.sum()) for m in mask.values()]
        assert sum(counts) == target
        assert all(1 <= c <= n for c, n in zip(counts, numels, strict=True))
    # random: within one weight of uniform whenever the ">= 1 per layer" floor does not bind
    counts = [int(m.sum()) for m in random(model, sparsity, seed=seed).values()]
    if all((1 - sparsity) * n >= 1 for n in numels):
        assert all(abs(c - (1 - sparsity) * n) <= 1 for c, n in zip(counts, numels, strict=True))


def test_random_per_layer_density_within_one_weight() -> None:
    model = small_cnn()
    for sparsity in (0.3, 0.5, 0.77, 0.9):
        mask = random(model, sparsity, seed=1)
        for name, m in mask.items():
            assert abs(int(m.sum()) - (1 - sparsity) * m.numel()) <= 1, (sparsity, name)


def test_tiny_layers_keep_one_weight() -> None:
    model = nn.Sequential(nn.Linear(1, 1), nn.Linear(2, 1), nn.Linear(100, 100))
    for maker in (random, erk):
        mask = maker(model, 0.995, seed=0)
        assert [int(m.sum()) for m in mask.values()][:2] == [1, 1]
        assert sum(int(m.sum()) for m in mask.values()) == round(0.005 * 10003)


# --------------------------------------------------------------------------- ERK


def test_erk_densities_match_reference_small_cnn() -> None:
    shapes = {n: tuple(w.shape) for n, w in prunable_weights(small_cnn()).items()}
    for density in (0.5, 0.1, 0.02, 0.005):
        got, want = erk_densities(shapes, density), rigl_erk(shapes, density)
        assert list(got) == list(shapes)
        for name in shapes:
            assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12), (density, name)


@HYP
@given(
    shapes=st.lists(st.lists(st.integers(1, 40), min_size=2, max_size=5).map(tuple), min_size=1, max_size=8),
    density=st.floats(0.001, 0.999),
)
def test_erk_densities_property(shapes, density) -> None:
    shapes = {f"l{i}.weight": s for i, s in enumerate(shapes)}
    got, want = erk_densities(shapes, density), rigl_erk(shapes, density)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    for name in shapes:
        assert 0 < got[name] <= 1
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12)
    mean = sum(got[n] * numel[n] for n in shapes) / sum(numel.values())
    assert mean == pytest.approx(density, rel=1e-9)
    # uncapped layers follow epsilon * sum(shape) / prod(shape) with one common epsilon
    free = [n for n in shapes if got[n] < 1]
    eps = {got[n] * numel[n] / sum(shapes[n]) for n in free}
    assert all(e == pytest.approx(next(iter(eps)), rel=1e-9) for e in eps)
    # denser layers never have a smaller raw ratio
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}
    for a in shapes:
        for b in shapes:
            if raw[a] > raw[b]:
                assert got[a] >= got[b] - 1e-12


def test_erk_capping_redistributes() -> None:
    shapes = {"tiny.weight": (2, 2), "big.weight": (100, 100)}
    got = erk_densities(shapes, 0.5)
    # uncapped, epsilon = 0.5 * 10004 / (4 * 1 + 10000 * 0.02) gives the tiny layer ~24.5
    assert 0.5 * 10004 / (4 * 1.0 + 10000 * 0.02) * 1.0 > 1
    assert got["tiny.weight"] == 1.0
    assert got["big.weight"] == pytest.approx((0.5 * 10004 - 4) / 10000, rel=1e-12)
    assert got == pytest.approx(rigl_erk(shapes, 0.5))

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(100, 100))
    mask = erk(model, 0.5, seed=0)
    assert bool(mask["0.weight"].all())
    assert int(mask["1.weight"].sum()) == round(0.5 * 10004) - 4


def test_erk_cascading_caps() -> None:
    # Capping the smallest layer pushes the next one over 1 as well.
    shapes = {"a": (1, 1), "b": (3, 3), "c": (8, 8), "d": (200, 200)}
    for density in (0.3, 0.6, 0.9, 0.99):
        got = erk_densities(shapes, density)
        assert got == pytest.approx(rigl_erk(shapes, density), rel=1e-9)
        assert max(got.values()) <= 1.0
        total = sum(math.prod(s) for s in shapes.values())
        assert sum(got[n] * math.prod(s) for n, s in shapes.items()) == pytest.approx(density * total, rel=1e-9)
    assert erk_densities(shapes, 0.9)["c"] == 1.0


def test_erk_small_layers_denser_than_large() -> None:
    mask = erk(small_cnn(), 0.9, seed=0)
    density = {n: m.float().mean().item() for n, m in mask.items()}
    assert density["head.2.weight"] > density["block.conv.weight"]
    assert density["dw.weight"] > density["block.conv.weight"]


def test_erk_mask_matches_densities() -> None:
    model = small_cnn()
    shapes = {n: tuple(w.shape) for n, w in prunable_weights(model).items()}
    for sparsity in (0.5, 0.8, 0.9):
        mask = erk(model, sparsity, seed=3)
        reference = rigl_erk(shapes, 1 - sparsity)
        for name, m in mask.items():
            assert abs(int(m.sum()) - reference[name] * m.numel()) <= 1, (sparsity, name)


# --------------------------------------------------------------------------- determinism and purity


@pytest.mark.parametrize("maker", MAKERS)
def test_same_seed_same_mask_other_seed_other_mask(maker) -> None:
    model = small_cnn()
    a, b, c = maker(model, 0.9, seed=7), maker(model, 0.9, seed=7), maker(model, 0.9, seed=8)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    # the same seed on a fresh copy of the architecture gives the same mask too
    d = maker(small_cnn(), 0.9, seed=7)
    assert all(torch.equal(a[n], d[n]) for n in a)


@pytest.mark.parametrize("seed", [None, 0, 123])
@pytest.mark.parametrize("maker", MAKERS)
def test_global_rng_and_model_untouched(maker, seed) -> None:
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    maker(model, 0.8, seed=seed)
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


@pytest.mark.parametrize("maker", MAKERS)
def test_seed_none_varies(maker) -> None:
    model = small_cnn()
    a, b = maker(model, 0.9), maker(model, 0.9)
    assert any(not torch.equal(a[n], b[n]) for n in a)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("sparsity", [1.0, 1, -0.1, 1.5, "0.5", True, False, None, float("nan"), float("inf")])
@pytest.mark.parametrize("maker", MAKERS)
def test_bad_sparsity(maker, sparsity) -> None:
    with pytest.raises(MaskError, match="sparsity") as info:
        maker(small_cnn(), sparsity, seed=0)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, tost_surgery.TostSurgeryError)
    assert repr(sparsity) in str(info.value)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.LayerNorm(4)), id="norms"),
        pytest.param(nn.Sequential(nn.Embedding(10, 4), nn.ConvTranspose2d(3, 3, 3)), id="other-weights"),
        pytest.param(nn.ReLU(), id="no-params"),
    ],
)
@pytest.mark.parametrize("maker", MAKERS)
def test_no_prunable_layer(maker, model) -> None:
    with pytest.raises(MaskError, match="No prunable layer") as info:
        maker(model, 0.5, seed=0)
    assert isinstance(info.value, ValueError)
    assert "Hint" in str(info.value)


@pytest.mark.parametrize("maker", MAKERS)
def test_empty_scope_after_filters(maker) -> None:
    with pytest.raises(MaskError):
        maker(small_cnn(), 0.5, seed=0, include=["nothing.*"])
    with pytest.raises(MaskError):
        maker(small_cnn(), 0.5, seed=0, exclude=[nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear])


def test_random_masks_are_the_same_as_with_int64_permutations() -> None:
    """The layerwise draw uses int32 indices; the masks must be those of int64 ``randperm`` (seeded runs stay put)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(40, 30))
    mask = random(model, 0.9, seed=5)
    generator = torch.Generator().manual_seed(5)
    for name, weight in prunable_weights(model).items():
        keep = torch.randperm(weight.numel(), generator=generator)[: int(mask[name].sum())]
        expected = torch.zeros(weight.numel(), dtype=torch.bool)
        expected[keep] = True
        assert torch.equal(mask[name], expected.view(weight.shape)), name
