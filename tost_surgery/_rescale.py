"""Layer-wise rescaled initialization (LRsI), deterministic form."""

from __future__ import annotations

import math

import torch

from ._checks import LAYER_TYPES
from ._masking import MaskEntry
from ._recipe import Recipe


def rescaled_layers(entries: list[MaskEntry], recipe: Recipe, normalized: frozenset[str]) -> list[MaskEntry]:
    """The masked conv/linear weights inside ``recipe.rescale_scope`` (``normalized``: modules feeding a norm)."""
    return [
        entry
        for entry in entries
        if entry.attr == "weight"
        and isinstance(entry.module, LAYER_TYPES)
        and entry.given.dim() >= 2
        and not (recipe.rescale_scope == "unnormalized" and entry.module_name in normalized)
    ]


def rescale_factors(
    entries: list[MaskEntry], recipe: Recipe, normalized: frozenset[str]
) -> dict[str, torch.Tensor | float]:
    """Multipliers for the surviving weights of each masked conv/linear weight.

    ``fan_in``: output unit ``j`` keeps ``k_j`` of its ``n`` inputs, so its weights are
    multiplied by ``sqrt(n / k_j)`` and its pre-activation variance is what the dense
    initialization intended. ``layer``: one factor ``sqrt(1 / density)`` per layer.
    ``gradinit``: none here (learned later by :func:`tost_surgery.init.gradinit`).
    Layers listed in ``normalized`` (their output feeds a norm) are skipped when
    ``recipe.rescale_scope == "unnormalized"``. Returns ``{parameter name: factor}``.
    """
    factors: dict[str, torch.Tensor | float] = {}
    if not recipe.rescale_init or recipe.rescale_rule == "gradinit":
        return factors
    for entry in rescaled_layers(entries, recipe, normalized):
        if recipe.rescale_rule == "layer":
            factors[entry.name] = math.sqrt(1.0 / entry.density)
            continue
        mask = entry.mask
        fan_in = mask[0].numel()
        kept = mask.flatten(1).sum(dim=1).clamp_min(1).to(torch.float32)
        shape = (-1,) + (1,) * (mask.dim() - 1)
        factors[entry.name] = (fan_in / kept).sqrt().view(shape)
    return factors
