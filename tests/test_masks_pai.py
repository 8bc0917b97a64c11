"""Pruning at initialization: ``keep_top``, ``magnitude``, ``snip``, ``grasp``, ``synflow`` and ``nm``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import tost_surgery
from tost_surgery import MaskError
from tost_surgery.masks import _scores as scores_module
from tost_surgery.masks import grasp, keep_top, magnitude, nm, prunable_weights, snip, synflow
from tost_surgery.masks._scores import _grasp_scores, _snip_scores

HYP = settings(max_examples=60, deadline=None)
SPARSITIES = [0.5, 0.9, 0.98, 0.995]


class SmallCNN(nn.Module):
    """Conv-BN-ReLU twice, dropout and a head: BN running stats and the RNG both matter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(x.mean(dim=(2, 3))))


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN()
    generator = torch.Generator().manual_seed(5)
    for bn in (model.bn1, model.bn2):  # non-trivial (and negative) running stats, as after training
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
        bn.num_batches_tracked.fill_(7)
    return model


def cnn_batches(count: int = 2, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 3, 8, 8, generator=generator), torch.randint(0, 10, (size,), generator=generator))
        for _ in range(count)
    ]


def make_mask(method: str, model: nn.Module, sparsity: float, **kwargs) -> dict[str, torch.Tensor]:
    if method == "magnitude":
        return magnitude(model, sparsity, **kwargs)
    if method == "magnitude-layer":
        return magnitude(model, sparsity, scope="layer", **kwargs)
    if method == "snip":
        return snip(model, sparsity, cnn_batches(), **kwargs)
    if method == "grasp":
        return grasp(model, sparsity, cnn_batches(), **kwargs)
    assert method == "synflow"
    return synflow(model, sparsity, input_shape=(3, 8, 8), iterations=20, **kwargs)


METHODS = ["magnitude", "magnitude-layer", "snip", "grasp", "synflow"]


def kept(mask: dict[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in mask.values())


def expected_kept(model: nn.Module, sparsity: float) -> int:
    weights = prunable_weights(model)
    return max(len(weights), round((1 - sparsity) * sum(w.numel() for w in weights.values())))


# --------------------------------------------------------------------------- every method


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("method", METHODS)
def test_exact_global_count_and_prepare_accepts(method, sparsity) -> None:
    model = small_cnn()
    mask = make_mask(method, model, sparsity)
    params = dict(model.named_parameters())
    assert list(mask) == ["conv1.weight", "conv2.weight", "fc.weight"]
    for name, m in mask.items():
        assert m.dtype == torch.bool and m.shape == params[name].shape and m.device == params[name].device
        assert not m.requires_grad
        assert m.any(), name
    assert kept(mask) == expected_kept(model, sparsity)

    tost_surgery.prepare(model, mask)
    tost_surgery.finalize(model)
    for name, m in mask.items():
        assert bool((params[name][~m] == 0).all()), name


@pytest.mark.parametrize("method", METHODS)
def test_one_weight_per_layer_floor(method) -> None:
    model = small_cnn()
    mask = make_mask(method, model, 0.9999)
    assert [int(m.sum()) for m in mask.values()] == [1, 1, 1]


@pytest.mark.parametrize("method", METHODS)
def test_zero_sparsity_keeps_everything(method) -> None:
    assert all(m.all() for m in make_mask(method, small_cnn(), 0.0).values())


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_model_and_rng_untouched(method, training) -> None:
    model = small_cnn().train(training)
    model.bn1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    make_mask(method, model, 0.9)
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert after[key].dtype == before[key].dtype, key
        assert torch.equal(after[key], before[key]), key
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_deterministic(method) -> None:
    model = small_cnn()  # train mode: dropout draws from the (restored) global RNG
    a, b = make_mask(method, model, 0.9), make_mask(method, model, 0.9)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("method", METHODS)
def test_include_exclude(method) -> None:
    model = small_cnn()
    assert list(make_mask(method, model, 0.5, include=[nn.Linear])) == ["fc.weight"]
    assert list(make_mask(method, model, 0.5, exclude=["fc.*"])) == ["conv1.weight", "conv2.weight"]


# --------------------------------------------------------------------------- magnitude


def test_magnitude_global_keeps_largest() -> None:
    model = small_cnn()
    mask = magnitude(model, 0.7)
    weights = prunable_weights(model)
    kept_values = torch.cat([w.detach().abs()[mask[n]] for n, w in weights.items()])
    dropped = torch.cat([w.detach().abs()[~mask[n]] for n, w in weights.items()])
    assert kept_values.min() >= dropped.max()
    # global, not per layer: the layers' densities differ
    densities = {n: m.float().mean().item() for n, m in mask.items()}
    assert max(densities.values()) - min(densities.values()) > 0.05


def test_magnitude_layer_keeps_largest_per_layer() -> None:
    model = small_cnn()
    for sparsity in (0.3, 0.7, 0.95):
        mask = magnitude(model, sparsity, scope="layer")
        assert kept(mask) == expected_kept(model, sparsity)
        for name, w in prunable_weights(model).items():
            m = mask[name]
            assert abs(int(m.sum()) - (1 - sparsity) * m.numel()) <= 1, (sparsity, name)
            assert w.detach().abs()[m].min() >= w.detach().abs()[~m].max()


def test_magnitude_bad_scope() -> None:
    with pytest.raises(MaskError, match="scope"):
        magnitude(small_cnn(), 0.5, scope="local")


# --------------------------------------------------------------------------- SNIP


def test_snip_scores_by_hand() -> None:
    torch.manual_seed(3)
    net = nn.Linear(4, 3, bias=False)
    generator = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(5, 4, generator=generator), torch.randint(0, 3, (5,), generator=generator)) for _ in range(3)
    ]
    gradient = torch.zeros(3, 4)
    for x, y in batches:  # d mean CE(x W^T, y) / dW = (softmax - onehot)^T x / B
        probabilities = torch.softmax(x @ net.weight.detach().T, dim=1)
        gradient += (probabilities - F.one_hot(y, 3).float()).T @ x / len(x)
    got = _snip_scores(net, ["weight"], batches, F.cross_entropy)
    torch.testing.assert_close(got["weight"], (gradient * net.weight.detach()).abs())


def test_snip_scores_match_autograd_on_a_deeper_net() -> None:
    model = small_cnn().eval()
    names = list(prunable_weights(model))
    batches = cnn_batches(3)
    reference = small_cnn().eval()
    for x, y in batches:
        F.cross_entropy(reference(x), y).backward()
    got = _snip_scores(model, names, batches, F.cross_entropy)
    params = dict(reference.named_parameters())
    for name in names:
        torch.testing.assert_close(got[name], (params[name].grad * params[name].detach()).abs())


def test_snip_keeps_highest_sensitivity() -> None:
    model = small_cnn().eval()
    names = list(prunable_weights(model))
    batches = cnn_batches()
    scores = _snip_scores(model, names, batches, F.cross_entropy)
    mask = snip(model, 0.8, batches)
    kept_values = torch.cat([scores[n][mask[n]] for n in names])
    dropped = torch.cat([scores[n][~mask[n]] for n in names])
    assert kept_values.min() >= dropped.max()


# --------------------------------------------------------------------------- GraSP


def test_grasp_hessian_gradient_matches_autograd_hvp() -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    generator = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(5, 4, generator=generator, dtype=torch.float64), torch.randint(0, 3, (5,), generator=generator))
        for _ in range(2)
    ]
    names = ["0.weight", "2.weight"]
    temperature = 2.0
    fixed = {n: p.detach() for n, p in net.named_parameters() if n not in names}

    def total_loss(w0: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        params = {**fixed, "0.weight": w0, "2.weight": w2}
        return sum(F.cross_entropy(functional_call(net, params, (x,)) / temperature, y) for x, y in batches)

    theta = tuple(dict(net.named_parameters())[n].detach() for n in names)
    gradient = torch.autograd.functional.jacobian(total_loss, theta)
    _, hessian_gradient = torch.autograd.functional.hvp(total_loss, theta, gradient)
    got = _grasp_scores(net, names, batches, F.cross_entropy, temperature)
    for name, w, hg in zip(names, theta, hessian_gradient):
        torch.testing.assert_close(got[name], -w * hg, rtol=1e-9, atol=1e-12)
    assert any(got[n].abs().max() > 1e-6 for n in names)


def squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((output - target) ** 2).sum()


def test_grasp_keeps_the_lowest_score() -> None:
    # One linear unit, L = (w.x - y)^2 / 2: g = r x, H = x x^T, Hg = r |x|^2 x with r = w.x - y.
    # w = (1, -2), x = (3, 1), y = 0: r = 1, Hg = (30, 10), S = -w * Hg = (-30, 20).
    # Removing w[1] raises |g|^2 from 10 to 90; removing w[0] only to 40. GraSP removes the
    # highest score (w[1], the larger weight) and keeps w[0]; magnitude would keep w[1].
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -2.0]]))
    batches = [(torch.tensor([[3.0, 1.0]]), torch.tensor([[0.0]]))]
    scores = _grasp_scores(net, ["weight"], batches, squared_error, 1.0)
    torch.testing.assert_close(scores["weight"], torch.tensor([[-30.0, 20.0]]))
    mask = grasp(net, 0.5, batches, loss_fn=squared_error, temperature=1.0)
    assert mask["weight"].tolist() == [[True, False]]
    assert magnitude(net, 0.5)["weight"].tolist() == [[False, True]]
    # the temperature divides the output: g and H scale by 1 / T^2, so S by 1 / T^4
    scaled = _grasp_scores(net, ["weight"], batches, squared_error, 2.0)
    torch.testing.assert_close(scaled["weight"], torch.tensor([[-30.0, 20.0]]) / 16)


def test_grasp_bad_temperature() -> None:
    for temperature in (0, -1.0, float("inf"), "200", True):
        with pytest.raises(MaskError, match="temperature"):
            grasp(small_cnn(), 0.5, cnn_batches(), temperature=temperature)


# --------------------------------------------------------------------------- SynFlow


def _synflow_scores(model, names, input_shape, masks=None):
    """One scoring pass of synflow on a linearized copy, as synflow's own loop runs it."""
    with scores_module._scratch_copy(model) as net:
        scores_module._linearize(net)
        if masks is None:
            params = dict(net.named_parameters())
            masks = {name: torch.ones_like(params[name], dtype=torch.bool) for name in names}
        return scores_module._synflow_pass(net, names, tuple(input_shape), masks)


def test_synflow_scores_by_hand_on_a_positive_linear_net() -> None:
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(-net[0].weight.abs())  # signs do not matter: SynFlow takes |w|
    w1, w2 = net[0].weight.detach().double().abs(), net[2].weight.detach().double().abs()
    # R = 1^T W2 W1 1; dR/dW1[i, j] = sum_k W2[k, i]; dR/dW2[k, i] = sum_j W1[i, j]
    expected1 = w1 * w2.sum(dim=0)[:, None]
    expected2 = w2 * w1.sum(dim=1)[None, :]
    got = _synflow_scores(net, ["0.weight", "2.weight"], (2,))
    torch.testing.assert_close(got["0.weight"], expected1)
    torch.testing.assert_close(got["2.weight"], expected2)
    flow = (w2 @ w1).sum()  # synaptic flow is conserved: every layer's scores add up to R
    torch.testing.assert_close(got["0.weight"].sum(), flow)
    torch.testing.assert_close(got["2.weight"].sum(), flow)
    assert net[0].weight.detach().max() <= 0  # the model itself kept its signs


def test_synflow_masked_rescoring_by_hand() -> None:
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        net[1].weight.copy_(torch.tensor([[5.0, 6.0]]))
    masks = {"0.weight": torch.tensor([[True, True], [False, True]]), "1.weight": torch.tensor([[True, True]])}
    got = _synflow_scores(net, ["0.weight", "1.weight"], [2], masks)
    # with W1[1, 0] = 0: row sums of W1 are (3, 4); column sums of W2 are (5, 6)
    assert got["0.weight"].tolist() == [[5.0, 10.0], [-math.inf, 24.0]]
    assert got["1.weight"].tolist() == [[15.0, 24.0]]


def test_synflow_schedule_is_exponential_and_exact(monkeypatch) -> None:
    model = small_cnn()
    total = sum(w.numel() for w in prunable_weights(model).values())
    seen: list[int] = []
    real_pass = scores_module._synflow_pass

    def spy(net, names, shape, masks):
        seen.append(sum(int(m.sum()) for m in masks.values()))
        return real_pass(net, names, shape, masks)

    monkeypatch.setattr(scores_module, "_synflow_pass", spy)
    density, iterations = 0.02, 5
    mask = synflow(model, 1 - density, input_shape=(3, 8, 8), iterations=iterations)
    schedule = [round(density ** (k / iterations) * total) for k in range(1, iterations)]
    assert seen == [total, *schedule]
    assert kept(mask) == expected_kept(model, 1 - density)


def test_synflow_one_shot_keeps_the_top_scores() -> None:
    model = small_cnn()
    names = list(prunable_weights(model))
    mask = synflow(model, 0.9, input_shape=(3, 8, 8), iterations=1)
    assert kept(mask) == expected_kept(model, 0.9)
    reference = keep_top(_synflow_scores(model, names, (3, 8, 8)), kept(mask))
    assert all(torch.equal(mask[n], reference[n]) for n in names)
    # conservation makes every layer's scores add up to the same R, so the big conv2 loses:
    # it keeps only the one weight that the floor guarantees
    assert int(mask["conv2.weight"].sum()) == 1


def test_synflow_runs_batchnorm_in_eval_mode_on_a_copy() -> None:
    # BatchNorm1d in training mode rejects a batch of one: scoring must use running stats.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).train()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mask = synflow(model, 0.5, input_shape=(4,), iterations=3)
    assert kept(mask) == expected_kept(model, 0.5)
    assert model.training and model[1].training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model[1].running_mean.max() <= 0


def test_synflow_default_iterations() -> None:
    model = small_cnn()
    assert kept(synflow(model, 0.98, input_shape=(3, 8, 8))) == expected_kept(model, 0.98)


@pytest.mark.parametrize("input_shape", [3 * 8 * 8, "3,8,8", (3, 0, 8), (3.0, 8, 8), (), None, (True, 8, 8)])
def test_synflow_bad_input_shape(input_shape) -> None:
    with pytest.raises(MaskError, match="input_shape") as info:
        synflow(small_cnn(), 0.5, input_shape=input_shape)
    assert "Hint" in str(info.value)


@pytest.mark.parametrize("iterations", [0, -1, 2.5, True])
def test_synflow_bad_iterations(iterations) -> None:
    with pytest.raises(MaskError, match="iterations"):
        synflow(small_cnn(), 0.5, input_shape=(3, 8, 8), iterations=iterations)


# --------------------------------------------------------------------------- N:M


def test_nm_pattern() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Conv2d(4, 6, 2), nn.Conv1d(6, 3, 2))
    for n, m in ((2, 4), (1, 4), (1, 2), (3, 4), (4, 4), (1, 1)):
        mask = nm(model, n, m)
        assert list(mask) == ["0.weight", "1.weight", "2.weight"]
        for name, w in prunable_weights(model).items():
            rows = mask[name].reshape(w.shape[0], -1)
            groups = rows.reshape(-1, m)
            assert bool((groups.sum(dim=1) == n).all()), (n, m, name)
            magnitudes = w.detach().abs().reshape(-1, m)
            kept_min = torch.where(groups, magnitudes, torch.inf).min(dim=1).values
            dropped_max = torch.where(groups, -torch.inf, magnitudes).max(dim=1).values
            assert bool((kept_min >= dropped_max).all())
            assert mask[name].shape == w.shape and mask[name].dtype == torch.bool


def test_nm_groups_along_the_input_dimension() -> None:
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[4.0, -3.0, 2.0, 1.0], [1.0, 2.0, -3.0, 4.0]]))
    assert nm(layer, 2, 4)["weight"].tolist() == [[True, True, False, False], [False, False, True, True]]
    conv = nn.Conv2d(2, 1, 2, bias=False)  # groups over (in, kh, kw) flattened: 8 weights per output channel
    with torch.no_grad():
        conv.weight.copy_(torch.arange(8.0).view(1, 2, 2, 2))
    assert nm(conv, 1, 4)["weight"].flatten().tolist() == [False, False, False, True, False, False, False, True]
    ties = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        ties.weight.fill_(1.0)
    assert nm(ties, 2, 4)["weight"].tolist() == [[True, True, False, False]]


def test_nm_accepted_by_prepare() -> None:
    model = small_cnn()
    mask = nm(model, 2, 4, exclude=["conv1.weight"])  # 3 * 3 * 3 = 27 inputs: not a multiple of 4
    assert list(mask) == ["conv2.weight", "fc.weight"]
    assert all(m.float().mean().item() == 0.5 for m in mask.values())
    tost_surgery.prepare(model, mask)
    tost_surgery.finalize(model)


def test_nm_indivisible_layer_is_named() -> None:
    with pytest.raises(MaskError, match=r"'conv1.weight' has an input size of 27.*m=4") as info:
        nm(small_cnn(), 2, 4)
    assert "exclude=['conv1.weight']" in str(info.value)


@pytest.mark.parametrize(
    ("n", "m", "match"),
    [
        (3, 2, "n <= m"),
        (0, 4, "n must"),
        (1, 0, "m must"),
        (2, -4, "m must"),
        (2.0, 4, "n must"),
        (True, 4, "n must"),
        (2, None, "m must"),
    ],
)
def test_nm_bad_n_m(n, m, match) -> None:
    with pytest.raises(MaskError, match=match):
        nm(nn.Linear(8, 4), n, m)


# --------------------------------------------------------------------------- keep_top


def test_keep_top_global_ties_and_nan() -> None:
    scores = {"a": torch.tensor([1.0, 1.0, 1.0]), "b": torch.tensor([[1.0, 1.0], [1.0, 1.0]])}
    assert {n: m.flatten().tolist() for n, m in keep_top(scores, 4, allow_empty_layers=True).items()} == {
        "a": [True, True, True],
        "b": [True, False, False, False],
    }
    with_nan = {"a": torch.tensor([float("nan"), 2.0, -5.0]), "b": torch.tensor([float("nan"), -float("inf")])}
    got = keep_top(with_nan, 2, allow_empty_layers=True)
    assert got["a"].tolist() == [False, True, True] and got["b"].tolist() == [False, False]
    got = keep_top(with_nan, 3)
    assert got["a"].tolist() == [False, True, True] and got["b"].tolist() == [True, False]


def test_keep_top_refills_empty_layers_from_the_weakest() -> None:
    scores = {
        "big": torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0]),
        "mid": torch.tensor([5.5, 4.0, 0.0]),
        "small": torch.tensor([-1.0, -2.0]),
        "tiny": torch.tensor([-3.0]),
    }
    got = keep_top(scores, 6)
    # The top 6 are 9, 8, 7, 6, 5 ("big") and 5.5 ("mid"). "small" and "tiny" get their best
    # weight back in place of the weakest kept weights of layers keeping more than one: "big"'s
    # 5 and 6 ("mid"'s 5.5, though weaker than 6, is its only one).
    assert [int(m.sum()) for m in got.values()] == [3, 1, 1, 1]
    assert got["big"].tolist() == [True, True, True, False, False]
    assert got["small"].tolist() == [True, False]
    assert got["mid"].tolist() == [True, False, False]


def test_keep_top_layer_scope() -> None:
    scores = {"a": torch.arange(10.0), "b": -torch.arange(4.0), "c": torch.zeros(1)}
    got = keep_top(scores, 6, scope="layer")
    # wanted 6 / 15 * (10, 4, 1) = (4, 1.6, 0.4): floors (4, 1, 1 by the floor of one), sum 6
    assert [int(m.sum()) for m in got.values()] == [4, 1, 1]
    assert got["a"].tolist() == [False] * 6 + [True] * 4
    assert got["b"].tolist() == [True, False, False, False]


SCORES = st.lists(
    st.tuples(
        st.lists(st.integers(1, 6), min_size=1, max_size=3),
        st.sampled_from(["normal", "ties", "nan"]),
        st.integers(0, 1000),
    ),
    min_size=1,
    max_size=6,
)


def build_scores(layers) -> dict[str, torch.Tensor]:
    scores = {}
    for index, (shape, kind, seed) in enumerate(layers):
        generator = torch.Generator().manual_seed(seed)
        if kind == "ties":
            value = torch.randint(0, 3, shape, generator=generator).float()
        else:
            value = torch.randn(shape, generator=generator)
            if kind == "nan":
                value[torch.rand(shape, generator=generator) < 0.3] = float("nan")
        scores[f"l{index}.weight"] = value
    return scores


@HYP
@given(layers=SCORES, fraction=st.floats(0.0, 1.0))
def test_keep_top_property(layers, fraction) -> None:
    scores = build_scores(layers)
    numels = [s.numel() for s in scores.values()]
    total = sum(numels)
    keep = len(numels) + round(fraction * (total - len(numels)))
    flat = torch.cat([s.flatten() for s in scores.values()])
    flat = torch.where(flat.isnan(), -torch.inf, flat)
    naive = torch.zeros(total, dtype=torch.bool)
    naive[sorted(range(total), key=lambda i: (-flat[i].item(), i))[:keep]] = True

    free = keep_top(scores, keep, allow_empty_layers=True)
    assert torch.equal(torch.cat([m.flatten() for m in free.values()]), naive)

    got = keep_top(scores, keep)
    counts = [int(m.sum()) for m in got.values()]
    assert sum(counts) == keep
    assert all(1 <= c <= n for c, n in zip(counts, numels))
    chosen = torch.cat([m.flatten() for m in got.values()])
    if all(part.any() for part in torch.split(naive, numels)):
        assert torch.equal(chosen, naive)
    else:  # each emptied layer gets its best weight back; nothing else joins
        for part, naive_part, score in zip(
            torch.split(chosen & ~naive, numels), torch.split(naive, numels), torch.split(flat, numels)
        ):
            if naive_part.any():
                assert not part.any()
            else:
                assert part.nonzero().flatten().tolist() == [int(torch.argmax(score))]
    assert all(torch.equal(a, b) for a, b in zip(got.values(), keep_top(scores, keep).values()))

    layer = keep_top(scores, keep, scope="layer")
    layer_counts = [int(m.sum()) for m in layer.values()]
    assert sum(layer_counts) == keep and all(1 <= c <= n for c, n in zip(layer_counts, numels))
    if all(keep / total * n >= 1 for n in numels):
        assert all(abs(c - keep / total * n) < 1 for c, n in zip(layer_counts, numels))


def test_keep_top_devices_and_dtype() -> None:
    scores = {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.randint(0, 5, (5,))}
    got = keep_top(scores, 7)
    assert all(m.dtype == torch.bool and m.shape == scores[n].shape for n, m in got.items())


@pytest.mark.parametrize(
    ("scores", "keep", "kwargs", "match"),
    [
        ({"a": torch.ones(3), "b": torch.ones(2)}, 1, {}, "one per layer.*\n.*allow_empty_layers=True"),
        ({"a": torch.ones(3)}, 4, {}, "from 1 .* to 3, found 4.$"),
        ({"a": torch.ones(3)}, -1, {"allow_empty_layers": True}, "from 0 to 3"),
        ({"a": torch.ones(3)}, 2.0, {}, "found 2.0"),
        ({"a": torch.ones(3)}, True, {}, "found True"),
        ({}, 1, {}, "non-empty dict"),
        ([torch.ones(3)], 1, {}, "non-empty dict"),
        ({"a": [1.0, 2.0]}, 1, {}, "'a' must be a real tensor"),
        ({"a": torch.ones(3)}, 1, {"scope": "local"}, "scope"),
    ],
)
def test_keep_top_bad_input(scores, keep, kwargs, match) -> None:
    with pytest.raises(MaskError, match=match):
        keep_top(scores, keep, **kwargs)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, "0.5", None, float("nan")])
@pytest.mark.parametrize("method", METHODS)
def test_bad_sparsity(method, sparsity) -> None:
    with pytest.raises(MaskError, match="sparsity") as info:
        make_mask(method, small_cnn(), sparsity)
    assert repr(sparsity) in str(info.value)


@pytest.mark.parametrize("maker", [snip, grasp])
def test_bad_batches(maker) -> None:
    model = small_cnn()
    x, y = cnn_batches(1)[0]
    for empty in ([], iter([]), ()):
        with pytest.raises(MaskError, match="needs data: batches gave no"):
            maker(model, 0.5, empty)
    with pytest.raises(MaskError, match=r"wrap a single batch in a list") as info:
        maker(model, 0.5, (x, y))  # one batch, not a list of batches
    assert isinstance(info.value, ValueError)
    for not_iterable in (x, 3, None):
        with pytest.raises(MaskError, match="iterable of \\(inputs, targets\\) pairs"):
            maker(model, 0.5, not_iterable)
    with pytest.raises(MaskError, match="Batch 1 .* not an \\(inputs, targets\\) pair, found tuple of length 3"):
        maker(model, 0.5, [(x, y), (x, y, y)])
    with pytest.raises(MaskError, match="Batch 0 .* found Tensor"):
        maker(model, 0.5, [x])


def test_no_prunable_layer() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    for make in (
        lambda: magnitude(model, 0.5),
        lambda: snip(model, 0.5, [(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))]),
        lambda: synflow(model, 0.5, input_shape=(3,)),
        lambda: nm(model),
    ):
        with pytest.raises(MaskError, match="No prunable layer"):
            make()
