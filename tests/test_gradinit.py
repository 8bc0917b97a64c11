"""GradInit, the learned form of layer-wise rescaled initialization (tost_surgery.init)."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

import tost_surgery as tost
from tost_surgery import Recipe, StateError, TostSurgeryError, TostSurgeryWarning
from tost_surgery.init import GradInitReport, gradinit

from .conftest import TinyNet, bernoulli_mask


def relu_mlp(seed: int = 0) -> nn.Sequential:
    """Variance-preserving init (He), small classifier: without a mask, activations keep their scale."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    nn.init.normal_(model[4].weight, std=0.01)
    return model


def teacher_batches(count: int = 6, size: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Learnable labels: the argmax of a fixed random linear map of the inputs."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(32, 10, generator=generator)
    batches = []
    for _ in range(count):
        x = torch.randn(size, 32, generator=generator)
        batches.append((x, (x @ teacher).argmax(dim=1)))
    return batches


def mlp_mask(model: nn.Module, hidden_density: float) -> dict[str, torch.Tensor]:
    """Every linear weight kept, except the hidden 128x128 layer at ``hidden_density``."""
    mask = {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters() if p.dim() == 2}
    mask["2.weight"] = torch.rand(128, 128, generator=torch.Generator().manual_seed(1)) < hidden_density
    return mask


def images_batches(count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [(torch.randn(4, 3, 16, 16, generator=generator), torch.arange(4) % 10) for _ in range(count)]


def test_a_layer_whose_mask_collapses_the_variance_is_scaled_up() -> None:
    sparse_model = relu_mlp()
    sparse_mask = mlp_mask(sparse_model, hidden_density=0.02)
    x = teacher_batches()[0][0]
    with torch.no_grad():  # the mask collapses the hidden layer's output variance ~50x
        hidden = sparse_model[1](sparse_model[0](x))
        collapsed = hidden @ (sparse_model[2].weight * sparse_mask["2.weight"]).T
        dense = hidden @ sparse_model[2].weight.T
    assert collapsed.var() < dense.var() / 20

    sparse = gradinit(sparse_model, teacher_batches(), sparse_mask, steps=50)
    control = gradinit(relu_mlp(), teacher_batches(), mlp_mask(relu_mlp(), hidden_density=1.0), steps=50)

    assert sparse.scales["2.weight"] > 1.2
    assert sparse.scales["2.weight"] > control.scales["2.weight"] + 0.3
    assert sparse.constraint_steps == 0
    assert sparse.objective_after < sparse.objective_before - 0.005  # the learned objective decreased


def test_the_objective_decreases_without_the_constraint_with_adam_too() -> None:
    model = relu_mlp(seed=1)
    result = gradinit(model, teacher_batches(seed=1), mlp_mask(model, 0.05), algorithm="adam", eta=0.01, gamma=math.inf)
    assert result.constraint_steps == 0
    assert result.objective_after < result.objective_before


def test_a_tight_gradient_norm_bound_lowers_the_gradient_norm() -> None:
    model = relu_mlp()
    result = gradinit(model, teacher_batches(), mlp_mask(model, 1.0), steps=30, gamma=1e-3)
    assert result.constraint_steps == 30
    assert result.grad_norm_after < result.grad_norm_before / 2
    assert all(scale < 1 for scale in result.scales.values())


def test_scales_respect_the_lower_bound_and_a_scale_at_it_is_flagged() -> None:
    model = relu_mlp()
    with pytest.warns(TostSurgeryWarning) as caught:
        result = gradinit(model, teacher_batches(), mlp_mask(model, 1.0), steps=30, gamma=1e-6, lr=0.5, min_scale=0.3)
    assert min(result.scales.values()) == pytest.approx(0.3)
    pinned = sorted(name for name, scale in result.scales.items() if scale == pytest.approx(0.3))
    message = str(caught[0].message)
    assert f"the scale of {pinned} ended at min_scale=0.3" in message
    assert "30 of 30 steps lowered the gradient norm" in message
    assert f"norm {result.grad_norm_before:.4g} before, {result.grad_norm_after:.4g} after, gamma=1e-06" in message
    assert "Hint: raise gamma" in message


def test_scales_learned_inside_the_bound_raise_no_warning() -> None:
    model = relu_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = gradinit(model, teacher_batches(), mlp_mask(model, 0.05), steps=20)
    assert min(result.scales.values()) > 0.01


def test_prepared_model_changes_only_by_the_scales(images) -> None:
    torch.manual_seed(0)
    recipe = Recipe.tost(total_steps=20, rescale_init=False)  # not stacked on the fan-in rule
    model = tost.prepare(TinyNet(), bernoulli_mask(TinyNet(), density=0.3), recipe)
    model(images)  # running statistics away from their defaults
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    surgery = model.tost.surgery
    layers = {e.name: e for e in surgery.decided.entries}

    result = gradinit(model, images_batches(), steps=5)

    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and model.tost.schedule.steps_taken == 0
    assert set(result.scales) == set(layers) == {"conv1.weight", "conv2.weight", "conv3.weight", "fc.weight"}
    after = model.state_dict()
    for key, value in before.items():
        owner = key.removesuffix(".parametrizations.weight.original")
        name = f"{owner}.weight"
        if key.endswith("parametrizations.weight.original"):
            assert torch.equal(after[key], value * result.scales[name]), key
            assert surgery.decided.rescaled[name] == pytest.approx(result.scales[name])
        else:  # BatchNorm running statistics, masks, scaffolding, the schedule's step
            assert torch.equal(after[key], value), key
    for entry in layers.values():
        layer = model.get_submodule(entry.module_name)
        assert torch.all(layer.parametrizations.weight.original[~entry.mask] == 0)
        assert torch.all(layer.weight[~entry.mask] == 0)
    assert "rescaled x" in str(tost.report(model))


def test_plain_model_with_a_mask_keeps_its_zeros_and_stays_plain(images) -> None:
    model = TinyNet()
    mask = bernoulli_mask(model, density=0.4)
    with torch.no_grad():
        for name, keep in mask.items():
            model.get_parameter(name).mul_(keep)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    result = gradinit(model, images_batches(), mask, steps=3)

    assert not hasattr(model, "tost") and not any(hasattr(m, "parametrizations") for m in model.modules())
    for name, p in model.named_parameters():
        expected = before[name] * result.scales[name] if name in mask else before[name]
        assert torch.equal(p.detach(), expected), name
    for name, keep in mask.items():
        assert torch.all(model.get_parameter(name)[~keep] == 0)


def test_bindings_are_not_copied(images) -> None:
    model = tost.prepare(TinyNet(), bernoulli_mask(TinyNet()), Recipe.tost(total_steps=20, rescale_init=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tost.bind(model, optimizer)
    gradinit(model, images_batches(), steps=2)
    model(images).sum().backward()
    optimizer.step()
    assert model.tost.schedule.steps_taken == 1


def test_batches_are_read_lazily_and_reused(images) -> None:
    model = tost.prepare(TinyNet(), bernoulli_mask(TinyNet()), Recipe.baseline())
    read = []

    def one_shot():
        for batch in images_batches(2):
            read.append(batch)
            yield batch

    result = gradinit(model, one_shot(), steps=4)  # 12 batches drawn from the 2 given, in turn
    assert len(read) == 2 and result.steps == 4
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*images_batches(1)[0]), batch_size=2)
    with pytest.warns(TostSurgeryWarning, match="an earlier gradinit call"):
        gradinit(model, loader, steps=3)  # a DataLoader is iterated again, not cached


def test_report_prints_a_table_and_round_trips_to_json() -> None:
    model = relu_mlp()
    result = gradinit(model, teacher_batches(count=3), mlp_mask(model, 0.1), steps=2)
    assert isinstance(result, GradInitReport)
    text = str(result)
    assert "GradInit scales" in text and "2.weight" in text and "objective" in text
    data = json.loads(json.dumps(result.to_dict()))
    assert data["steps"] == 2 and [row["name"] for row in data["layers"]] == ["0.weight", "2.weight", "4.weight"]
    assert data["settings"]["algorithm"] == "sgd" and data["settings"]["eta"] == 0.1
    with pytest.raises(AttributeError):
        result.steps = 3  # frozen


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, b: gradinit(m, b), "not prepared and no mask"),
        (lambda m, b: gradinit(m, b[0], {"conv1.weight": torch.ones(8, 3, 3, 3)}), "wrap a single batch"),
        (lambda m, b: gradinit(m, [], {"conv1.weight": torch.ones(8, 3, 3, 3)}), "needs data"),
        (lambda m, b: gradinit(m, [torch.ones(2)], {"conv1.weight": torch.ones(8, 3, 3, 3)}), "Batch 0"),
        (lambda m, b: gradinit(m, b, {"fc.bias": torch.ones(10)}), "covers none"),
        (lambda m, b: gradinit(m, b, {"conv1.weight": torch.ones(8, 3, 3, 3)}, algorithm="lamb"), "algorithm"),
        (lambda m, b: gradinit(m, b, {"conv1.weight": torch.ones(8, 3, 3, 3)}, steps=0), "steps"),
        (lambda m, b: gradinit(m, b, {"conv1.weight": torch.ones(8, 3, 3, 3)}, gamma=0), "gamma"),
        (lambda m, b: gradinit(m, b, {"conv1.weight": torch.ones(8, 3, 3, 3)}, eta=-1.0), "eta"),
        (lambda m, b: gradinit(m, b, {"nope.weight": torch.ones(1)}), "names no parameter"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(call, message) -> None:
    model = TinyNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TostSurgeryError, match=message):
        call(model, images_batches())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_prepared_model_uses_its_own_masks() -> None:
    model = tost.prepare(TinyNet(), bernoulli_mask(TinyNet()), Recipe.baseline())
    with pytest.raises(StateError, match="without mask="):
        gradinit(model, images_batches(), bernoulli_mask(TinyNet()))


def test_stacking_on_the_fan_in_rule_is_flagged() -> None:
    model = tost.prepare(TinyNet(), bernoulli_mask(TinyNet()), Recipe.tost(total_steps=20))  # conv3, fc rescaled
    fan_in = dict(model.tost.surgery.decided.rescaled)
    with pytest.warns(TostSurgeryWarning, match="rescale_rule='gradinit'"):
        result = gradinit(model, images_batches(), steps=1)
    rescaled = model.tost.surgery.decided.rescaled
    assert rescaled["fc.weight"] == pytest.approx(fan_in["fc.weight"] * result.scales["fc.weight"])


# ------------------------------------------------------------------ Recipe(rescale_rule="gradinit")


def gradinit_prepared(**overrides) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    recipe = Recipe.tost(total_steps=20, rescale_rule="gradinit", **overrides)
    return tost.prepare(model, bernoulli_mask(model), recipe)


def test_the_recipe_can_choose_gradinit_over_the_fan_in_rule() -> None:
    torch.manual_seed(0)
    plain = TinyNet()
    mask = bernoulli_mask(plain)
    model = gradinit_prepared()
    assert model.tost.surgery.decided.rescaled == {}  # prepare applied no deterministic scale
    for name, m in mask.items():
        expected = dict(plain.named_parameters())[name].detach() * m
        module_name, attr = name.rsplit(".", 1)
        assert torch.equal(getattr(model.get_submodule(module_name), attr).detach(), expected), name
    in_scope = set(model.tost.surgery.decided.gradinit_layers)
    assert in_scope == {"conv3.weight", "fc.weight"}  # the layers feeding no BatchNorm (rescale_scope)
    result = gradinit(model, images_batches(), steps=3)
    assert set(result.scales) == in_scope
    assert set(model.tost.surgery.decided.rescaled) == in_scope
    assert bool(model.tost.gradinit_done)


def test_rescale_scope_all_gives_gradinit_every_masked_layer() -> None:
    model = gradinit_prepared(rescale_scope="all")
    result = gradinit(model, images_batches(), steps=1)
    assert set(result.scales) == {e.name for e in model.tost.surgery.decided.entries if e.given.dim() >= 2}


def test_training_before_gradinit_warns_once() -> None:
    model = gradinit_prepared()
    with pytest.warns(TostSurgeryWarning, match=r"rescale_rule='gradinit'.*2 layer\(s\)"):
        tost.step(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tost.step(model)  # once is enough


def test_gradinit_done_is_saved_and_a_second_call_warns() -> None:
    model = gradinit_prepared()
    gradinit(model, images_batches(), steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tost.step(model)  # applied: no warning
    state = model.state_dict()
    assert state["tost.gradinit_done"].item() is True
    resumed = gradinit_prepared()
    resumed.load_state_dict(state, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tost.step(resumed)  # the checkpoint's weights hold the scales
    with pytest.warns(TostSurgeryWarning, match="already applied"):
        gradinit(resumed, images_batches(), steps=1)


def test_gradinit_with_no_layer_in_scope_says_which_scope() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    recipe = Recipe.baseline(rescale_init=True, rescale_rule="gradinit")
    tost.prepare(model, {"0.weight": torch.ones(4, 3, 3, 3)}, recipe)
    assert not hasattr(model.tost, "gradinit_done")
    assert any("rescale_scope='unnormalized_nonresidual'" in note for note in model.tost.surgery.runner.notes)
    batches = [(torch.randn(2, 3, 8, 8), torch.randint(0, 4, (2,)))]
    with pytest.raises(TostSurgeryError, match="rescale_scope='all'"):
        gradinit(model, batches, loss_fn=lambda out, y: out.mean(), steps=1)
