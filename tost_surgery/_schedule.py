"""The annealing schedule: one step counter, the only state, and the coefficients derived from it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ._write_through import cached_by_version

if TYPE_CHECKING:
    from ._recipe import Recipe

def anneal_progress(step: int, warmup_steps: int, shape: str) -> float:
    """Fraction of the annealing done after ``step`` steps, shaped, in [0, 1]."""
    linear = min(max(step, 0) / warmup_steps, 1.0)
    if shape == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * linear)
    return linear


class Schedule(nn.Module):
    """The step counter (a saved buffer) and the annealed coefficients, computed from it on every call.

    The rewritten graph calls ``tost.schedule(name)`` for the coefficient of the technique
    ``name`` (``"neurons"``: the blend ``b``, 0 -> 1; ``"skips"``: the skip scale ``a``, 1 -> 0):
    a 0-d float32 tensor computed from the ``step`` buffer, so the graph does not change from step
    to step, and a copy of the state by any route (``load_state_dict``, an EMA helper's in-place
    ``copy_``, a broadcast by DDP) is followed at once. ``steps_taken`` reads the buffer, cached
    until the buffer changes (its version counter moves), so a training loop does not synchronize
    a GPU on every step.
    """

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.recipe = recipe
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._techniques = {t.name: t for t in recipe.techniques()}

    def forward(self, technique: str) -> torch.Tensor:
        """The coefficient the graph reads for ``technique``, as a 0-d float32 tensor.

        Computed again only when the step buffer has changed (eagerly; traced as it is under
        ``torch.compile``).
        """
        record = self._techniques[technique]
        compute = lambda step: record.coefficient(record.progress(self.recipe, step))  # noqa: E731
        return cached_by_version(self, f"_coefficient_{technique}", self._buffers["step"], compute)

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

    def progress(self, technique: str) -> float:
        """Shaped progress of ``technique``'s annealing, in [0, 1]."""
        return anneal_progress(self.steps_taken, self.recipe.warmup_steps(technique), self.recipe.anneal)

    def is_finished(self, technique: str) -> bool:
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
