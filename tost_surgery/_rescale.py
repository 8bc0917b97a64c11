"""Layer-wise rescaled initialization (LRsI), deterministic form."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import fx, nn

from ._checks import LAYER_TYPES
from ._fx._patterns import feeds_normalization, feeds_residual_addition, layers_where
from ._masking import MaskEntry
from ._recipe import Recipe, RescaleScope


def outside_scope(graph: fx.Graph, modules: Mapping[str, nn.Module], scope: RescaleScope) -> frozenset[str]:
    """Modules that ``rescale_scope`` leaves alone: none for ``all``; those feeding a norm for
    ``unnormalized``; those and the ends of residual branches for ``unnormalized_nonresidual``."""
    if scope == "all":
        return frozenset()
    if scope == "unnormalized":
        return layers_where(graph, modules, feeds_normalization)
    return layers_where(graph, modules, lambda n, m: feeds_normalization(n, m) or feeds_residual_addition(n, m))


def rescaled_layers(entries: list[MaskEntry], recipe: Recipe, outside: frozenset[str]) -> list[MaskEntry]:
    """The masked conv/linear weights inside ``recipe.rescale_scope`` (``outside``: from :func:`outside_scope`)."""
    return [
        entry
        for entry in entries
        if entry.attr == "weight"
        and isinstance(entry.module, LAYER_TYPES)
        and entry.given.dim() >= 2
        and entry.module_name not in outside
    ]


def rescale_factors(
    entries: list[MaskEntry], recipe: Recipe, outside: frozenset[str]
) -> dict[str, torch.Tensor | float]:
    """Multipliers for the surviving weights of each masked conv/linear weight.

    ``fan_in``: output unit ``j`` keeps ``k_j`` of its ``n`` inputs, so its weights are
    multiplied by ``sqrt(n / k_j)`` and its pre-activation variance is what the dense
    initialization intended. ``layer``: one factor ``sqrt(1 / density)`` per layer.
    ``gradinit``: none here (learned later by :func:`tost_surgery.init.gradinit`).
    Layers listed in ``outside`` (out of ``recipe.rescale_scope``, see :func:`outside_scope`)
    are skipped. Returns ``{parameter name: factor}``.
    """
    factors: dict[str, torch.Tensor | float] = {}
    if not recipe.rescale_init or recipe.rescale_rule == "gradinit":
        return factors
    for entry in rescaled_layers(entries, recipe, outside):
        if recipe.rescale_rule == "layer":
            factors[entry.name] = math.sqrt(1.0 / entry.density)
            continue
        mask = entry.mask
        fan_in = mask[0].numel()
        kept = mask.flatten(1).sum(dim=1).clamp_min(1).to(torch.float32)
        shape = (-1,) + (1,) * (mask.dim() - 1)
        factors[entry.name] = (fan_in / kept).sqrt().view(shape)
    return factors
