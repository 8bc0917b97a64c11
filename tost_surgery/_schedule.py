"""The annealing schedule: one step counter, the only state, and the coefficients derived from it."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ._recipe import Recipe
from ._write_through import cached_by_version

Technique = Literal["neurons", "skips"]


def anneal_progress(step: int, warmup_steps: int, shape: str) -> float:
    """Fraction of the annealing done after ``step`` steps, shaped, in [0, 1]."""
    linear = min(max(step, 0) / warmup_steps, 1.0)
    if shape == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * linear)
    return linear


class Schedule(nn.Module):
    """The step counter (a saved buffer) and the annealed coefficients, computed from it on every call.

    The rewritten graph calls ``tost.schedule("neurons")`` (the blend ``b``, 0 -> 1) and
    ``tost.schedule("skips")`` (the skip scale ``a``, 1 -> 0): 0-d float32 tensors computed from
    the ``step`` buffer, so the graph does not change from step to step, and a copy of the state
    by any route (``load_state_dict``, an EMA helper's in-place ``copy_``, a broadcast) is followed
    at once. ``steps_taken`` reads the buffer, cached until the buffer changes (its version counter
    moves), so a training loop does not synchronize a GPU on every step.
    """

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, technique: Technique) -> torch.Tensor:
        """The coefficient the graph reads for ``technique``, as a 0-d float32 tensor.

        Computed again only when the step buffer has changed (eagerly; traced as it is under
        ``torch.compile``).
        """
        compute = self._neuron_blend if technique == "neurons" else self._skip_scale
        return cached_by_version(self, f"_coefficient_{technique}", self._buffers["step"], compute)

    def _neuron_blend(self, step: torch.Tensor) -> torch.Tensor:
        return self._progress(step, "neurons")

    def _skip_scale(self, step: torch.Tensor) -> torch.Tensor:
        return 1.0 - self._progress(step, "skips")

    def _progress(self, step: torch.Tensor, technique: Technique) -> torch.Tensor:
        progress = (step.to(torch.float32) / self.recipe.warmup_steps(technique)).clamp(0.0, 1.0)
        if self.recipe.anneal == "cosine":
            progress = 0.5 - 0.5 * torch.cos(progress * math.pi)
        return progress


    @property
    def neuron_blend(self) -> torch.Tensor:
        """``b`` of the ghost neurons, 0 -> 1."""
        return self("neurons")

    @property
    def skip_scale(self) -> torch.Tensor:
        """``a`` of the ghost skips, 1 -> 0."""
        return self("skips")

    @property
    def steps_taken(self) -> int:
        """The ``step`` buffer's value, read again whenever the buffer has changed."""
        return cached_by_version(self, "_seen", self._buffers["step"], _as_int)

    def advance(self, n: int) -> None:
        """Count ``n`` more optimizer steps."""
        before = self.steps_taken
        self.step.add_(n)
        if not torch.is_inference(self.step):  # its new value is known: no read of the device
            self.__dict__["_seen"] = (self.step, self.step._version, before + n)

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

    def version(self) -> tuple[int, int]:
        """Changes whenever the step buffer is replaced or written (a step, a load, an in-place copy)."""
        step = self._buffers["step"]
        return (id(step), -1 if torch.is_inference(step) else step._version)

    def extra_repr(self) -> str:
        return f"steps_taken={self.steps_taken}"


def _as_int(step: torch.Tensor) -> int:
    return int(step.item())
