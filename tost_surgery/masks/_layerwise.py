"""Random masks with per-layer densities: uniform, or Erdos-Renyi-kernel."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .._scope import check_sparsity, prunable_weights
from ._select import largest_remainder, target_count


def random(
    model: nn.Module,
    sparsity: float,
    seed: int | None = None,
    *,
    include: Sequence[str | type[nn.Module]] | None = None,
    exclude: Sequence[str | type[nn.Module]] = (),
) -> dict[str, torch.Tensor]:
    """Uniform random mask: every layer keeps the same fraction ``1 - sparsity`` of weights.

    The total number of kept weights is exact and every layer keeps at least one; where no
    layer would round below one weight, per-layer counts differ by at most one from
    ``(1 - sparsity) * numel``. The model and the global RNG are left untouched.

    Example:
        >>> mask = tost_surgery.masks.random(model, sparsity=0.9, seed=0)
    """
    weights = prunable_weights(model, include, exclude)
    density = 1.0 - check_sparsity(sparsity)
    wanted = {name: density * w.numel() for name, w in weights.items()}
    return _sample(weights, _allocate(weights, wanted, density), seed)


def erk(
    model: nn.Module,
    sparsity: float,
    seed: int | None = None,
    *,
    include: Sequence[str | type[nn.Module]] | None = None,
    exclude: Sequence[str | type[nn.Module]] = (),
) -> dict[str, torch.Tensor]:
    """Erdos-Renyi-kernel random mask (Evci et al., "Rigging the Lottery", ICML 2020).

    Layer density is proportional to ``sum(shape) / prod(shape)`` (in, out and kernel
    sizes), capped at 1 with the excess redistributed over the other layers, so the global
    sparsity is exact. Small layers stay denser than large ones.

    Example:
        >>> mask = tost_surgery.masks.erk(model, sparsity=0.95, seed=0)
    """
    weights = prunable_weights(model, include, exclude)
    density = 1.0 - check_sparsity(sparsity)
    densities = erk_densities({n: tuple(w.shape) for n, w in weights.items()}, density)
    wanted = {name: densities[name] * w.numel() for name, w in weights.items()}
    return _sample(weights, _allocate(weights, wanted, density), seed)


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Per-layer ERK densities whose weighted mean is ``density``; each at most 1."""
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[n] for n in dense)
        free = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        epsilon = budget / free if free else 0.0
        capped = {n for n in shapes if n not in dense and epsilon * raw[n] > 1.0}
        if not capped:
            return {n: 1.0 if n in dense else epsilon * raw[n] for n in shapes}
        dense |= capped


def _allocate(weights: dict[str, torch.Tensor], wanted: dict[str, float], density: float) -> dict[str, int]:
    """Integer kept counts near ``wanted``, summing exactly to the global target, >= 1 each."""
    numels = {n: w.numel() for n, w in weights.items()}
    return largest_remainder(numels, wanted, target_count(numels, density))


def _sample(weights: dict[str, torch.Tensor], counts: dict[str, int], seed: int | None) -> dict[str, torch.Tensor]:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    masks = {}
    for name, weight in weights.items():
        # int32 draws the same permutation as int64, faster and in half the memory.
        index = torch.int32 if weight.numel() < 2**31 else torch.int64
        keep = torch.randperm(weight.numel(), generator=generator, dtype=index)[: counts[name]]
        mask = torch.zeros(weight.numel(), dtype=torch.bool)
        mask[keep] = True
        masks[name] = mask.view(weight.shape).to(weight.device)
    return masks
