"""Schedule: annealing shapes, coefficients, label smoothing, resync after load."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tost_surgery import Recipe
from tost_surgery._schedule import Schedule, anneal_progress


@given(step=st.integers(-5, 300), warmup=st.integers(1, 200))
def test_linear_progress_is_clamped_and_monotone(step: int, warmup: int) -> None:
    p = anneal_progress(step, warmup, "linear")
    assert 0.0 <= p <= 1.0
    assert p == min(max(step, 0) / warmup, 1.0)
    assert anneal_progress(step + 1, warmup, "linear") >= p


def test_cosine_progress_endpoints_and_midpoint() -> None:
    assert anneal_progress(0, 10, "cosine") == 0.0
    assert anneal_progress(10, 10, "cosine") == 1.0
    assert anneal_progress(5, 10, "cosine") == pytest.approx(0.5)
    assert anneal_progress(2, 10, "cosine") == pytest.approx(0.5 - 0.5 * math.cos(math.pi * 0.2))


def test_coefficients_follow_the_steps() -> None:
    schedule = Schedule(Recipe.tost(total_steps=100, warmup=0.1, skip_warmup=0.2))
    assert schedule("neurons").item() == 0.0 and schedule("skips").item() == 1.0
    schedule.advance(5)
    assert schedule("neurons").item() == pytest.approx(0.5)
    assert schedule("skips").item() == pytest.approx(0.75)
    assert not schedule.is_finished("neurons")
    schedule.advance(5)
    assert schedule("neurons").item() == 1.0 and schedule.is_finished("neurons")
    assert not schedule.is_finished("skips")
    schedule.advance(100)
    assert schedule("skips").item() == 0.0 and schedule.step.item() == 110


def test_label_smoothing_constant_and_annealed() -> None:
    constant = Schedule(Recipe.tost(total_steps=10, label_schedule="constant"))
    annealed = Schedule(Recipe.tost(total_steps=10, warmup=0.5))
    assert constant.label_smoothing() == annealed.label_smoothing() == pytest.approx(0.1)
    constant.advance(3)
    annealed.advance(3)
    assert constant.label_smoothing() == pytest.approx(0.1)
    assert annealed.label_smoothing() == pytest.approx(0.1 * (1 - 3 / 5))
    annealed.advance(10)
    assert annealed.label_smoothing() == 0.0


def test_only_the_step_is_saved_and_load_resyncs() -> None:
    recipe = Recipe.tost(total_steps=10)
    saved = Schedule(recipe)
    saved.advance(2)
    assert list(saved.state_dict()) == ["step"]
    fresh = Schedule(recipe)
    fresh.load_state_dict(saved.state_dict())
    assert fresh.steps_taken == 2
    torch.testing.assert_close(fresh("neurons"), saved("neurons"))
    torch.testing.assert_close(fresh("skips"), saved("skips"))
