"""The models and the five variants ``benchmarks/overhead.py`` measures, and one training step."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import tost_surgery as tost


def build_model(name: str, image_size: int) -> nn.Module:
    """A randomly initialized torchvision / timm model (no download)."""
    import torchvision.models as tv

    if name in ("resnet18", "resnet50", "resnet152", "mobilenet_v2", "convnext_tiny"):
        return getattr(tv, name)()
    if name in ("vit_tiny", "vit_base"):
        import timm

        return timm.create_model(f"{name}_patch16_224", pretrained=False, img_size=image_size)
    if name == "tiny_cnn":  # for smoke tests
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )  # fmt: skip
    raise SystemExit(f"unknown model {name!r}")


def steps_to_retire(recipe: tost.Recipe) -> int:
    """Optimizer steps until every technique with scaffolding (an annealed coefficient) has retired.

    Read from the recipe, not from ``tost.status(model)``: a status call keeps two 0-d tensors
    alive, which the static memory of variant (e) would count.
    """
    enabled = set(recipe.enabled())
    scaffolded = [t.name for t in recipe.techniques() if t.name in enabled and t.coefficient is not None]
    return max((recipe.warmup_steps(name) for name in scaffolded), default=0)


def make_variant(variant: str, base: nn.Module, mask: dict[str, torch.Tensor], overrides: dict[str, Any]) -> nn.Module:
    """A fresh copy of ``base`` set up as ``variant`` (a-e); ``overrides`` change ``Recipe.tost`` in (d), (e)."""
    model = copy.deepcopy(base)
    if variant == "a":
        return model
    if variant == "b":
        modules = dict(model.named_modules())
        for name, m in mask.items():
            module_name, _, attr = name.rpartition(".")
            prune.custom_from_mask(modules[module_name], attr, m)
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant == "c":
            return tost.prepare(model, mask, tost.Recipe.baseline())
        if variant == "d":
            return tost.prepare(model, mask, tost.Recipe.tost(total_steps=10**9, **overrides))
        if variant == "e":
            recipe = tost.Recipe.tost(total_steps=100, **overrides)
            tost.prepare(model, mask, recipe)
            tost.step(model, steps_to_retire(recipe))
            return model
    raise SystemExit(f"unknown variant {variant!r}")


class Stepper:
    """One training step of one model: forward, cross-entropy, backward, SGD step."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model.train(), x, y
        # A tiny learning rate: the weights barely move, so every round does the same work.
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)

    def __call__(self) -> None:
        out = self.model(self.x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        loss = F.cross_entropy(out, self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def batch(size: int, image_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed (seeded) batch every variant trains on."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size, 3, image_size, image_size, generator=generator)
    y = torch.randint(0, 10, (size,), generator=generator)
    return x.to(device), y.to(device)


def seeded_model_and_mask(name: str, image_size: int, sparsity: float) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(name, image_size)
    return model, tost.masks.erk(model, sparsity, seed=0)
