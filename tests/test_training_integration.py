"""The training loop: bind counts optimizer steps (accumulation, set_to_none, skipped AMP steps),
and the scaffolding's parameters form their own optimizer group."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tost_surgery as tost
from tost_surgery import Recipe

from .conftest import TinyNet, bernoulli_mask

ACCUMULATE = 3


def _smoothed_cross_entropy(model, logits, target, **kwargs):
    """Cross-entropy with the recipe's current label smoothing, as a training loop computes it."""
    return F.cross_entropy(logits, target, label_smoothing=tost.label_smoothing(model), **kwargs)


def micro_batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + index)
    return torch.randn(4, 3, 16, 16, generator=generator), torch.randint(0, 10, (4,), generator=generator)


def prepared(recipe: Recipe) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    return tost.prepare(model, bernoulli_mask(model), recipe)


def train_accumulating(model: nn.Module, optimizer_steps: int, *, bound: bool) -> tuple[list[float], list[tuple]]:
    """``ACCUMULATE`` micro-batches per optimizer step; returns the losses and, after each step,
    (steps taken, label smoothing, active techniques)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if bound:
        tost.bind(model, optimizer)
    losses, states = [], []
    for step in range(optimizer_steps):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(ACCUMULATE):
            x, y = micro_batch(step * ACCUMULATE + micro)
            loss = _smoothed_cross_entropy(model, model(x), y) / ACCUMULATE
            loss.backward()
            losses.append(loss.item())
        optimizer.step()
        if not bound:
            tost.step(model)
        surgery = model.tost.surgery
        states.append((surgery.schedule.steps_taken, tost.label_smoothing(model), surgery.runner.active))
    return losses, states


def test_bind_counts_optimizer_steps_not_micro_batches() -> None:
    model = prepared(Recipe.tost(total_steps=8, warmup=0.5))  # everything anneals over 4 optimizer steps
    _, states = train_accumulating(model, 6, bound=True)
    assert [s[0] for s in states] == [1, 2, 3, 4, 5, 6]
    assert [s[1] for s in states] == pytest.approx([0.075, 0.05, 0.025, 0.0, 0.0, 0.0])
    assert [s[2] for s in states] == [frozenset({"neurons", "skips"})] * 3 + [frozenset()] * 3  # retired at step 4
    tost.finalize(model)


def test_bind_is_the_same_as_calling_step_after_each_optimizer_step() -> None:
    recipe = Recipe.tost(total_steps=8, warmup=0.5)
    bound_losses, bound_states = train_accumulating(prepared(recipe), 6, bound=True)
    manual_losses, manual_states = train_accumulating(prepared(recipe), 6, bound=False)
    assert bound_losses == manual_losses
    assert bound_states == manual_states


def test_a_step_that_grad_scaler_skips_is_not_counted() -> None:
    model = prepared(Recipe.tost(total_steps=10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tost.bind(model, optimizer)
    scaler = torch.amp.GradScaler("cpu")
    x, y = micro_batch(0)
    for poison in (True, False, False):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(_smoothed_cross_entropy(model, model(x), y)).backward()
        if poison:
            model.fc.bias.grad[0] = float("inf")
        scaler.step(optimizer)
        scaler.update()
    assert model.tost.schedule.steps_taken == 2


def test_finalize_unbinds_the_optimizer() -> None:
    model = prepared(Recipe.tost(total_steps=2, warmup=0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tost.bind(model, optimizer)
    x, y = micro_batch(0)
    _smoothed_cross_entropy(model, model(x), y).backward()
    optimizer.step()
    tost.finalize(model)
    optimizer.step()  # no schedule left to advance, and no error
    assert not hasattr(model, "tost")


def test_the_scaffolding_parameters_are_exactly_those_under_model_tost() -> None:
    model = prepared(Recipe.tost(total_steps=10))
    scaffold = list(model.tost.parameters())
    expected = [p for name, p in model.named_parameters() if name.startswith("tost.")]
    assert len(scaffold) == len(expected) == 8  # 3 ghost skips: two 1x1 conv + BatchNorm, one BatchNorm (8 -> 8)
    assert all(a is b for a, b in zip(scaffold, expected))
    assert list(model.tost.parameters()) == scaffold  # stable order
    assert list(prepared(Recipe.baseline()).tost.parameters()) == []


def test_the_scaffolding_parameters_get_their_own_learning_rate_and_weight_decay() -> None:
    model = prepared(Recipe.tost(total_steps=4, warmup=0.5))
    scaffold = list(model.tost.parameters())
    ids = {id(p) for p in scaffold}
    rest = [p for p in model.parameters() if id(p) not in ids]
    assert len(rest) + len(scaffold) == len(list(model.parameters()))
    optimizer = torch.optim.SGD(
        [{"params": rest}, {"params": scaffold, "lr": 0.0, "weight_decay": 0.0}], lr=0.1, weight_decay=5e-4
    )
    tost.bind(model, optimizer)
    scaffold_before = [p.detach().clone() for p in scaffold]
    rest_before = [p.detach().clone() for p in rest]
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        x, y = micro_batch(step)
        _smoothed_cross_entropy(model, model(x), y).backward()
        if step == 0:
            assert all(p.grad is not None for p in scaffold)  # they do train while active
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(scaffold, scaffold_before))  # lr 0: untouched
    assert any(not torch.equal(p, b) for p, b in zip(rest, rest_before))
    assert all(p.grad is None for p in scaffold)  # retired after 2 steps: no gradient, skipped by the optimizer


def test_retired_scaffolding_is_not_decayed_by_weight_decay() -> None:
    model = prepared(Recipe.tost(total_steps=2, warmup=0.5))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    tost.bind(model, optimizer)
    x, y = micro_batch(0)
    optimizer.zero_grad(set_to_none=True)
    _smoothed_cross_entropy(model, model(x), y).backward()
    optimizer.step()  # the skips retire here
    frozen = copy.deepcopy([p.detach() for p in list(model.tost.parameters())])
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        _smoothed_cross_entropy(model, model(x), y).backward()
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(list(model.tost.parameters()), frozen))
