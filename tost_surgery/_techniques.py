"""The ToST techniques, one record each: all that the rest of the library knows of a technique.

prepare runs the graph passes of the enabled techniques in this order and their eager fallbacks
when the model cannot be traced; the schedule anneals their coefficients; ``status``, plan and
report name them and their sites; the benchmarks' ablations turn them off through ``off``.
Adding a technique means adding its record here (and its settings to :class:`~tost_surgery.Recipe`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ._eager import EagerNeurons
from ._fx.passes import insert_ghost_neurons, insert_ghost_skips

if TYPE_CHECKING:
    from torch import fx, nn

    from ._fx._context import PassContext
    from ._schedule import Schedule


class EagerFallback(Protocol):
    """What a technique does to a model that torch.fx cannot trace: put its modules in, or take them out."""

    site_names: list[str]
    """Where it acts, by module path."""

    def swap(self, *, ghosts: bool) -> None: ...


@dataclass(frozen=True)
class Technique:
    """One technique of the recipe."""

    name: str
    """Its short name: the tag of its graph nodes, the key of its coefficient, its name in ``status``."""
    label: str
    """In words, for plan, report and messages."""
    switch: str
    """The Recipe field that turns it on (on when true or non-zero)."""
    off: Mapping[str, Any]
    """Recipe overrides that turn it off."""
    settings: tuple[str, ...] = ()
    """Recipe fields that matter only while it is on."""
    warmup_field: str | None = None
    """The Recipe field of its own warm-up fraction, if it has one (else ``Recipe.warmup``)."""
    is_annealed: Callable[[Any], bool] = lambda recipe: False
    """Whether, under a recipe, it moves with the step count (and retires at the end of its warm-up)."""
    coefficient: Callable[[torch.Tensor], torch.Tensor] | None = None
    """From the annealing progress (a 0-d tensor, 0 -> 1) to what its graph nodes read."""
    insert: Callable[[fx.Graph, PassContext], None] | None = None
    """Its graph pass (it reads ``tost.schedule(name)`` and tags its nodes with ``name``)."""
    eager: Callable[[nn.Module, Any, Schedule], EagerFallback] | None = None
    """Its stand-in for a model that cannot be traced, if it has one."""
    describe_layer: Callable[[Any, Any], str] = field(default=lambda entry, surgery: "")
    """What it added beside a masked layer, for report: ``(mask entry, surgery) -> text``."""

    def is_enabled(self, recipe: Any) -> bool:
        return bool(getattr(recipe, self.switch))

    def warmup_steps(self, recipe: Any) -> int:
        """Optimizer steps over which it anneals (at least 1)."""
        fraction = getattr(recipe, self.warmup_field) if self.warmup_field else None
        fraction = recipe.warmup if fraction is None else fraction
        return max(1, round(fraction * (recipe.total_steps or 0)))

    def progress(self, recipe: Any, step: torch.Tensor) -> torch.Tensor:
        """The shaped annealing progress at ``step`` (a tensor), in [0, 1]."""
        progress = (step.to(torch.float32) / self.warmup_steps(recipe)).clamp(0.0, 1.0)
        if recipe.anneal == "cosine":
            progress = 0.5 - 0.5 * torch.cos(progress * math.pi)
        return progress


def _skip_of_layer(entry: Any, surgery: Any) -> str:
    runner = surgery.runner
    retired = "" if "skips" in runner.active else " (retired)"
    conv_to_skip = runner.context.conv_to_skip
    if entry.attr == "weight" and entry.module_name in conv_to_skip:
        target = conv_to_skip[entry.module_name]
        if target is None:
            return "identity skip" + retired
        return f"ghost skip {target.rsplit('.', 1)[-1]} ({runner.context.scaffold.skip_at(target).kind}){retired}"
    if entry.attr == "weight" and entry.module_name in runner.linear_skips():
        return "identity skip" + retired
    return ""


def _rescale_of_layer(entry: Any, surgery: Any) -> str:
    factor = surgery.decided.rescaled.get(entry.name)
    return "" if factor is None else f"rescaled x{factor:.2f}"


def _eager_neurons(model: nn.Module, recipe: Any, schedule: Schedule) -> EagerNeurons:
    kinds = {"relu", "relu6"} if recipe.neuron_relu6 else {"relu"}
    return EagerNeurons(model, kinds, recipe.soft_activation, schedule)


TECHNIQUES: list[Technique] = [
    Technique(
        name="neurons",
        label="ghost neuron",
        switch="ghost_neurons",
        off={"ghost_neurons": False},
        settings=("soft_activation", "neuron_warmup", "neuron_relu6"),
        warmup_field="neuron_warmup",
        is_annealed=lambda recipe: recipe.ghost_neurons,
        coefficient=lambda progress: progress,  # the blend b, 0 -> 1
        insert=insert_ghost_neurons,
        eager=_eager_neurons,
    ),
    Technique(
        name="skips",
        label="ghost skip",
        switch="ghost_skips",
        off={"ghost_skips": False},
        settings=("skip_branch", "skip_init", "skip_pointwise", "skip_linear", "skip_warmup"),
        warmup_field="skip_warmup",
        is_annealed=lambda recipe: recipe.ghost_skips,
        coefficient=lambda progress: 1.0 - progress,  # the scale a, 1 -> 0
        insert=insert_ghost_skips,
        describe_layer=_skip_of_layer,
    ),
    Technique(
        name="rescale",
        label="rescaled initialization",
        switch="rescale_init",
        off={"rescale_init": False},
        settings=("rescale_rule", "rescale_scope"),
        describe_layer=_rescale_of_layer,
    ),
    Technique(
        name="labels",
        label="label smoothing",
        switch="label_smoothing",
        off={"label_smoothing": 0.0},
        settings=("label_schedule",),
        is_annealed=lambda recipe: recipe.label_schedule == "anneal" and recipe.label_smoothing > 0,
    ),
]
"""Every technique, in the order their graph passes run."""


def technique(name: str) -> Technique:
    """The record named ``name`` (a ``KeyError`` for no such technique: a bug, not a user error)."""
    return {t.name: t for t in TECHNIQUES}[name]


def graph_techniques() -> list[Technique]:
    """The techniques that rewrite the graph, in pass order."""
    return [t for t in TECHNIQUES if t.insert is not None]
