"""Modified labels: the label-smoothing schedules, read through label_smoothing(model)."""

from __future__ import annotations

import copy
import math

import pytest

import tost_surgery as tost
from tost_surgery import Recipe

from .conftest import TinyNet, bernoulli_mask


def prepared(recipe: Recipe) -> TinyNet:
    model = TinyNet()
    return tost.prepare(model, bernoulli_mask(model), recipe)


def smoothing_by_step(model: TinyNet, steps: int) -> list[float]:
    values = [tost.label_smoothing(model)]
    for _ in range(steps):
        tost.step(model)
        values.append(tost.label_smoothing(model))
    return values


def test_constant_smoothing_stays_for_the_whole_run() -> None:
    model = prepared(Recipe.tost(total_steps=10, label_smoothing=0.2, label_schedule="constant"))
    assert smoothing_by_step(model, 12) == [0.2] * 13


def test_annealed_smoothing_goes_linearly_to_zero_with_the_scaffolding() -> None:
    model = prepared(Recipe.tost(total_steps=20, warmup=0.25))  # 0.1 -> 0 over 5 steps
    values = smoothing_by_step(model, 8)
    assert values[:6] == pytest.approx([0.1, 0.08, 0.06, 0.04, 0.02, 0.0])
    assert values[5:] == [0.0] * 4
    assert model.tost.schedule.is_finished("skips") and model.tost.schedule.is_finished("neurons")


def test_cosine_anneal_shapes_the_labels_too() -> None:
    model = prepared(Recipe.tost(total_steps=20, warmup=0.2, anneal="cosine"))
    values = smoothing_by_step(model, 4)
    expected = [0.1 * (0.5 + 0.5 * math.cos(math.pi * k / 4)) for k in range(5)]
    assert values == pytest.approx(expected, abs=1e-12)


def test_labels_follow_the_common_warmup_not_a_technique_warmup() -> None:
    recipe = Recipe.tost(total_steps=10, warmup=0.5, neuron_warmup=0.2, skip_warmup=1.0)
    values = smoothing_by_step(prepared(recipe), 5)
    assert values == pytest.approx([0.1, 0.08, 0.06, 0.04, 0.02, 0.0])


def test_baseline_has_no_smoothing_unless_asked() -> None:
    assert tost.label_smoothing(prepared(Recipe.baseline())) == 0.0
    assert tost.label_smoothing(prepared(Recipe.baseline(label_smoothing=0.1))) == 0.1


def test_a_checkpoint_resumes_the_label_schedule() -> None:
    model = prepared(Recipe.tost(total_steps=10, warmup=0.5))
    tost.step(model, 3)
    state = copy.deepcopy(model.state_dict())
    fresh = prepared(Recipe.tost(total_steps=10, warmup=0.5))
    assert tost.label_smoothing(fresh) == pytest.approx(0.1)
    fresh.load_state_dict(state)
    assert tost.label_smoothing(fresh) == tost.label_smoothing(model) == pytest.approx(0.04)
