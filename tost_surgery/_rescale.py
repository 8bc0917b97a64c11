"""Layer-wise rescaled initialization (LRsI), deterministic form."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._masking import MaskEntry
from ._recipe import Recipe


def rescale_factors(
    entries: list[MaskEntry], recipe: Recipe, normalized: frozenset[str]
) -> dict[str, torch.Tensor | float]:
    """Multipliers for the surviving weights of each masked conv/linear weight.

    ``fan_in``: output unit ``j`` keeps ``k_j`` of its ``n`` inputs, so its weights are
    multiplied by ``sqrt(n / k_j)`` and its pre-activation variance is what the dense
    initialization intended. ``layer``: one factor ``sqrt(1 / density)`` per layer.
    Layers listed in ``normalized`` (their output feeds a norm) are skipped when
    ``recipe.rescale_scope == "unnormalized"``. Returns ``{parameter name: factor}``.
    """
    factors: dict[str, torch.Tensor | float] = {}
    if not recipe.rescale_init:
        return factors
    for entry in entries:
        layer_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        is_layer_weight = entry.attr == "weight" and isinstance(entry.module, layer_types)
        if not is_layer_weight or entry.mask.dim() < 2:
            continue
        if recipe.rescale_scope == "unnormalized" and entry.module_name in normalized:
            continue
        if recipe.rescale_rule == "layer":
            factors[entry.name] = math.sqrt(1.0 / entry.density)
            continue
        mask = entry.mask
        fan_in = mask[0].numel()
        kept = mask.flatten(1).sum(dim=1).clamp_min(1).to(torch.float32)
        shape = (-1,) + (1,) * (mask.dim() - 1)
        factors[entry.name] = (fan_in / kept).sqrt().view(shape)
    return factors
