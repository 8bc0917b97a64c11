"""rescale_scope: which layers the fan-in rescaling touches, in pre- and post-activation residual blocks."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import tost_surgery as tost
from tost_surgery import Recipe, RecipeError
from tost_surgery._fx._patterns import feeds_residual_addition, residual_branch_ends

from .conftest import PreActNet, TinyNet, bernoulli_mask

PREACT_RESCALED = {
    "all": {f"{name}.weight" for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "shortcut", "fc")},
    "unnormalized": {"conv1.weight", "conv3.weight", "conv5.weight", "shortcut.weight", "fc.weight"},
    "unnormalized_nonresidual": {"conv1.weight", "fc.weight"},
}


@pytest.mark.parametrize("scope", sorted(PREACT_RESCALED))
def test_pre_activation_branch_ends_leave_the_scope_only_under_nonresidual(scope: str) -> None:
    torch.manual_seed(0)
    model = PreActNet()
    mask = bernoulli_mask(model, density=0.25)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tost.prepare(model, mask, Recipe.tost(total_steps=10, rescale_scope=scope))
    assert set(model.tost.surgery.decided.rescaled) == PREACT_RESCALED[scope]
    for name, m in mask.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        kept = m.flatten(1).sum(1).clamp_min(1).float().view((-1,) + (1,) * (m.dim() - 1))
        scale = (m[0].numel() / kept).sqrt() if name in PREACT_RESCALED[scope] else 1.0
        torch.testing.assert_close(module.parametrizations.weight.original.detach(), before[name] * m * scale)


def test_post_activation_blocks_rescale_the_same_layers_under_either_unnormalized_scope() -> None:
    rescaled = {}
    for scope in ("unnormalized", "unnormalized_nonresidual"):
        model = TinyNet()  # its branch ends in a BatchNorm before the addition
        tost.prepare(model, bernoulli_mask(model, density=0.25), Recipe.tost(total_steps=10, rescale_scope=scope))
        rescaled[scope] = set(model.tost.surgery.decided.rescaled)
    assert rescaled["unnormalized"] == rescaled["unnormalized_nonresidual"] == {"conv3.weight", "fc.weight"}


def test_gradinit_learns_scales_only_inside_the_nonresidual_scope() -> None:
    model = PreActNet()
    recipe = Recipe.tost(total_steps=10, rescale_rule="gradinit", rescale_scope="unnormalized_nonresidual")
    tost.prepare(model, bernoulli_mask(model, density=0.25), recipe)
    assert set(model.tost.surgery.decided.gradinit_layers) == {"conv1.weight", "fc.weight"}


class _Residual(nn.Module):
    def __init__(self, forward) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.offset = nn.Parameter(torch.zeros(1, 4, 1, 1))
        self._forward = forward

    def forward(self, x: torch.Tensor):
        return self._forward(self, x)


def _inplace_add(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = m.conv(x)
    y += x
    return y


@pytest.mark.parametrize(
    ("forward", "expected"),
    [
        (lambda m, x: m.conv(x) + x, True),
        (lambda m, x: x + F.relu(m.conv(x)), True),  # through a scale-equivariant op
        (lambda m, x: torch.add(m.conv(x), x), True),
        (lambda m, x: m.conv(x).add(x), True),
        (_inplace_add, True),
        (lambda m, x: m.bn(m.conv(x)) + x, False),  # a norm before the sum: post-activation
        (lambda m, x: m.conv(x) + 1.0, False),  # a constant, not a skip path
        (lambda m, x: m.conv(x) + m.offset, False),  # a parameter, not a skip path
        (lambda m, x: m.conv(x) * x, False),
        (lambda m, x: (m.conv(x) + x, m.conv(x).sum()), True),  # every call of conv counts separately
    ],
)
def test_feeds_residual_addition(forward, expected: bool) -> None:
    model = _Residual(forward)
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    first = next(node for node in graph.nodes if node.op == "call_module" and node.target == "conv")
    assert feeds_residual_addition(first, modules) is expected


def test_a_layer_read_by_the_sum_and_by_something_else_is_not_a_branch_end() -> None:
    def forward(m: nn.Module, x: torch.Tensor):
        y = m.conv(x)
        return y + x, y.mean()

    model = _Residual(forward)
    graph = fx.symbolic_trace(model).graph
    conv = next(node for node in graph.nodes if node.target == "conv")
    assert not feeds_residual_addition(conv, dict(model.named_modules()))
    assert any(node.target is operator.add for node in graph.nodes)


def test_a_module_is_a_branch_end_only_when_every_call_of_it_is() -> None:
    twice = _Residual(lambda m, x: (m.conv(x) + x, m.conv(x).sum()))
    once = _Residual(lambda m, x: m.conv(x) + x)
    for model, expected in ((twice, frozenset()), (once, frozenset({"conv"}))):
        assert residual_branch_ends(fx.symbolic_trace(model).graph, dict(model.named_modules())) == expected


def test_an_unknown_scope_is_refused_with_a_suggestion() -> None:
    with pytest.raises(RecipeError, match="Did you mean 'unnormalized_nonresidual'"):
        Recipe.tost(total_steps=10, rescale_scope="unnormalized_nonresidul")


def test_the_default_scope_leaves_out_the_ends_of_residual_branches() -> None:
    assert Recipe.tost(total_steps=10).rescale_scope == "unnormalized_nonresidual"
    model = PreActNet()
    tost.prepare(model, bernoulli_mask(model, density=0.25), Recipe.tost(total_steps=10))
    assert set(model.tost.surgery.decided.rescaled) == PREACT_RESCALED["unnormalized_nonresidual"]
