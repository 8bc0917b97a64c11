"""`status`: where a prepared model stands, as plain data."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from ._surgery import surgery_of
from ._techniques import TECHNIQUES


@dataclass(frozen=True)
class TechniqueStatus:
    """One technique of a prepared model's recipe."""

    name: str
    label: str
    state: str
    """``off`` (not in the recipe), ``active`` (annealing now), ``retired`` (its warm-up is over: its
    scaffolding is out of the graph), ``applied`` (not annealed: rescaling done at prepare, a constant
    label smoothing), or ``not applied`` (it needs a graph and the model runs eagerly)."""
    warmup_steps: int | None = None
    """Optimizer steps it anneals over, for an annealed technique."""
    value: float | None = None
    """Its current coefficient (the ghost neurons' blend, the ghost skips' scale) or label smoothing."""
    scaffolding: bool = False
    """Whether it adds scaffolding to the model (that retires when its warm-up ends)."""


@dataclass(frozen=True)
class Status:
    """A prepared model's schedule, techniques and notes. Print it, or read it as data.

    Example:
        >>> s = tost_surgery.status(model)
        >>> s.step, s.techniques["skips"].state, s.label_smoothing
        (120, 'active', 0.06)
    """

    model: str
    step: int
    total_steps: int | None
    techniques: dict[str, TechniqueStatus]
    label_smoothing: float
    traced: bool
    """Whether the model runs rewritten fx graphs (else its own forward, eagerly)."""
    methods: tuple[str, ...]
    """The methods that run the rewritten network (forward first)."""
    call_layouts: int
    """How many call layouts (argument kinds and non-tensor values) have been traced."""
    sites: dict[str, int]
    """How many sites each active technique has (ReLU call sites, convs with a ghost skip)."""
    masked: int
    """Masked tensors."""
    notes: tuple[str, ...]
    """What was not applied as asked, and why (blocks called whole, an eager fallback, untraced methods)."""
    gradinit: str | None = None
    """With ``rescale_rule="gradinit"``: ``pending`` until :func:`tost_surgery.init.gradinit` applies its
    scales, then ``applied``."""
    sparse_kernels: dict[str, str] = field(default_factory=dict)
    """With ``prepare(sparse_kernels=...)``: per masked layer, ``pending`` (not decided yet: decided at its
    first training call with no scaffolding left), ``sparse (1.80x)`` (the measured speedup of forward +
    backward), ``native (<speedup>x)`` (the compiled kernels, with ``native_kernels=True``), ``dense: why``, or
    ``off: why`` (no sparse kernel for it)."""

    @property
    def active(self) -> tuple[str, ...]:
        """The techniques whose scaffolding is in the graph now."""
        return tuple(name for name, t in self.techniques.items() if t.state == "active")

    @property
    def retired(self) -> bool:
        """Whether all scaffolding has retired (so ``finalize`` is exact)."""
        return not any(t.state == "active" and t.scaffolding for t in self.techniques.values())

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for JSON or a logger)."""
        data = asdict(self)
        data["techniques"] = {name: asdict(t) for name, t in self.techniques.items()}
        data["notes"] = list(self.notes)
        data["methods"] = list(self.methods)
        data["sparse_kernels"] = dict(self.sparse_kernels)
        return data

    def __rich__(self) -> Table:
        total = f" of {self.total_steps}" if self.total_steps else ""
        caption = Text("\n".join(f"note: {note}" for note in self.notes)) if self.notes else None
        table = Table(title=Text(f"{self.model} at step {self.step}{total}", style="bold"), caption=caption)
        for column in ("technique", "state", "warm-up steps", "now"):
            table.add_column(column)
        for t in self.techniques.values():
            value = "" if t.value is None else f"{t.value:.4g}"
            table.add_row(t.label, t.state, "" if t.warmup_steps is None else str(t.warmup_steps), value)
        return table

    def __str__(self) -> str:
        console = Console(width=100, record=True, file=io.StringIO(), color_system=None)
        console.print(self)
        return console.export_text()


def status(model: nn.Module) -> Status:
    """Where a prepared model stands: its step, each technique's state and coefficient, and notes.

    Example:
        >>> print(tost_surgery.status(model))
    """
    surgery = surgery_of(model, "status")
    decided, runner, schedule = surgery.decided, surgery.runner, surgery.schedule
    recipe = decided.recipe
    techniques = {t.name: _technique_status(t, surgery) for t in TECHNIQUES}
    gradinit = None
    if decided.gradinit_layers:
        gradinit = "pending" if surgery.gradinit_pending() else "applied"
    return Status(
        model=decided.model_name,
        step=schedule.steps_taken,
        total_steps=recipe.total_steps,
        techniques=techniques,
        label_smoothing=schedule.label_smoothing(),
        traced=runner.tracing is not None,
        methods=tuple(runner.signatures) if runner.tracing is not None else (),
        call_layouts=len(runner.variants),
        sites={name: len(where) for name, where in runner.sites().items()},
        masked=len(decided.entries),
        notes=tuple(runner.notes),
        gradinit=gradinit,
        sparse_kernels=_kernel_states(surgery),
    )


def _kernel_states(surgery) -> dict[str, str]:  # noqa: ANN001
    kernels = getattr(surgery.runner.context.scaffold, "kernels", None)
    states = {kernel.name: kernel.describe() for kernel in kernels.values()} if kernels is not None else {}
    states.update({name: f"off: {why}" for name, why in surgery.decided.kernel_skipped.items()})
    return states


def _technique_status(technique, surgery) -> TechniqueStatus:  # noqa: ANN001
    recipe, schedule = surgery.decided.recipe, surgery.schedule
    name, label = technique.name, technique.label
    if not technique.is_enabled(recipe):
        return TechniqueStatus(name, label, "off")
    if technique.coefficient is not None:  # scaffolding that anneals away
        if name not in surgery.decided.enabled:
            return TechniqueStatus(name, label, "not applied")
        state = "retired" if schedule.is_finished(name) else "active"
        value = float(schedule(name))
        return TechniqueStatus(name, label, state, technique.warmup_steps(recipe), value, scaffolding=True)
    if technique.is_annealed(recipe):  # label smoothing on a schedule: no scaffolding, a number
        state = "retired" if schedule.is_finished(name) else "active"
        return TechniqueStatus(name, label, state, technique.warmup_steps(recipe))
    return TechniqueStatus(name, label, "applied")
