"""The annealing schedule: one step counter, and the coefficients the graph reads."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ._recipe import Recipe

Technique = Literal["neurons", "skips"]
TECHNIQUES: tuple[Technique, ...] = ("neurons", "skips")


def anneal_progress(step: int, warmup_steps: int, shape: str) -> float:
    """Fraction of the annealing done after ``step`` steps, shaped, in [0, 1]."""
    linear = min(max(step, 0) / warmup_steps, 1.0)
    if shape == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * linear)
    return linear


class Schedule(nn.Module):
    """Step counter (a saved buffer) and the annealed coefficients (0-d buffers).

    The graph reads ``neuron_blend`` (``b``, 0 -> 1) and ``skip_scale`` (``a``, 1 -> 0) as
    tensors, so the rewritten graph does not change from step to step. Only ``step`` is in
    ``state_dict``; the coefficients are derived from it, also after ``load_state_dict``.
    """

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("neuron_blend", torch.zeros(()), persistent=False)
        self.register_buffer("skip_scale", torch.ones(()), persistent=False)
        # A Python mirror of ``step``: reading the buffer would sync a GPU every step.
        self.steps_taken = 0
        self.register_load_state_dict_post_hook(_resync_after_load)
        self._update_coefficients()

    def _apply(self, fn, recurse: bool = True):
        # ``model.to(dtype)`` would cast the coefficients too: in bfloat16 the blend moves in stairs
        # of 1/256 (1/3 becomes 0.333984375). The graph's ops take a 0-d float32 tensor as it is.
        super()._apply(fn, recurse)
        for name in ("neuron_blend", "skip_scale"):
            if self._buffers[name].dtype != torch.float32:
                self._buffers[name] = self._buffers[name].float()
        self._update_coefficients()
        return self

    def advance(self, n: int) -> None:
        """Count ``n`` more optimizer steps."""
        self.step.add_(n)
        self.steps_taken += n
        self._update_coefficients()

    def progress(self, technique: Technique | Literal["labels"]) -> float:
        """Shaped progress of ``technique``'s annealing, in [0, 1]."""
        return anneal_progress(self.steps_taken, self.recipe.warmup_steps(technique), self.recipe.anneal)

    def is_finished(self, technique: Technique) -> bool:
        """Whether ``technique`` has reached its end state (and may retire)."""
        return self.steps_taken >= self.recipe.warmup_steps(technique)

    def label_smoothing(self) -> float:
        """Current label smoothing of the recipe."""
        amount = float(self.recipe.label_smoothing)
        if self.recipe.label_schedule == "anneal":
            return amount * (1.0 - self.progress("labels"))
        return amount

    def _update_coefficients(self) -> None:
        self.neuron_blend.fill_(self.progress("neurons"))
        self.skip_scale.fill_(1.0 - self.progress("skips"))

    def extra_repr(self) -> str:
        return f"steps_taken={self.steps_taken}"


def _resync_after_load(module: Schedule, incompatible_keys: object) -> None:
    module.steps_taken = int(module.step.item())
    module._update_coefficients()
