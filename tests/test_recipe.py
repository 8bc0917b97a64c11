"""Recipe: presets, validation, round trip."""

from __future__ import annotations

import dataclasses

import pytest

from tost_surgery import Recipe, RecipeError, TostSurgeryError


def test_tost_preset_turns_every_technique_on() -> None:
    recipe = Recipe.tost(total_steps=100)
    assert recipe.ghost_neurons and recipe.ghost_skips and recipe.rescale_init
    assert recipe.label_smoothing == 0.1 and recipe.label_schedule == "anneal"
    assert recipe.is_annealed


def test_baseline_is_masks_only() -> None:
    recipe = Recipe.baseline()
    assert not (recipe.ghost_neurons or recipe.ghost_skips or recipe.rescale_init)
    assert recipe.label_smoothing == 0.0 and not recipe.is_annealed


def test_overrides_and_round_trip() -> None:
    recipe = Recipe.tost(total_steps=50, warmup=0.6, soft_activation="mish", skip_branch="auto")
    assert (recipe.warmup, recipe.soft_activation, recipe.skip_branch) == (0.6, "mish", "auto")
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_recipe_is_frozen_and_keyword_only() -> None:
    recipe = Recipe.baseline()
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.warmup = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        Recipe(10)  # type: ignore[misc]


def test_warmup_steps_per_technique() -> None:
    recipe = Recipe.tost(total_steps=1000, warmup=0.3, skip_warmup=0.6)
    assert recipe.warmup_steps("neurons") == 300
    assert recipe.warmup_steps("skips") == 600
    assert recipe.warmup_steps("labels") == 300
    assert Recipe.tost(total_steps=1, warmup=0.1).warmup_steps("neurons") == 1


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(total_steps=10, warmup=0.0), "warmup is a fraction"),
        (dict(total_steps=10, warmup=1.5), "warmup is a fraction"),
        (dict(total_steps=10, neuron_warmup=-0.2), "neuron_warmup"),
        (dict(total_steps=0), "total_steps must be a positive int"),
        (dict(total_steps=2.5), "total_steps must be a positive int"),
        (dict(total_steps=True), "total_steps must be a positive int"),
        (dict(total_steps=10, label_smoothing=1.0), "label_smoothing must be in"),
        (dict(total_steps=10, soft_activation="swish"), "soft_activation must be one of"),
        (dict(total_steps=10, soft_activation="mishh"), "Did you mean 'mish'"),
        (dict(total_steps=10, anneal="exp"), "anneal must be one of"),
        (dict(total_steps=10, skip_branch="identity"), "skip_branch must be one of"),
        (dict(total_steps=10, rescale_rule="fanin"), "Did you mean 'fan_in'"),
        (dict(total_steps=10, skip_init=float("nan")), "skip_init must be a finite"),
        (dict(total_steps=10, ghost_skips="yes"), "ghost_skips must be a bool"),
        (dict(total_steps=10, warmpu=0.5), "Did you mean 'warmup'"),
    ],
)
def test_impossible_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe.tost(**settings)


def test_annealing_without_total_steps_is_refused() -> None:
    with pytest.raises(RecipeError, match="total_steps is None"):
        Recipe(ghost_neurons=True)
    with pytest.raises(RecipeError, match="total_steps is None"):
        Recipe.baseline(label_smoothing=0.1, label_schedule="anneal")
    # A constant smoothing needs no horizon.
    assert Recipe.baseline(label_smoothing=0.1).label_smoothing == 0.1


def test_errors_are_value_errors() -> None:
    assert issubclass(RecipeError, TostSurgeryError) and issubclass(TostSurgeryError, ValueError)
