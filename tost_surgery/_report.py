"""`report`: what a mask keeps, layer by layer, and what scaffolding a prepared model carries."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from ._checks import DEPLOY_REPORT_ATTRIBUTE, is_prepared
from ._errors import MaskError
from ._masking import MaskEntry
from ._modules import Scaffold
from ._scope import prunable_weights
from ._techniques import TECHNIQUES

if TYPE_CHECKING:
    from .deploy import DeployReport


@dataclass(frozen=True)
class LayerRow:
    """One masked parameter: its name and shape, the weights it keeps, and its scaffolding."""

    name: str
    shape: tuple[int, ...]
    kept: int
    total: int
    density: float
    scaffolding: str = ""
    """For a prepared model: ``"ghost skip tost_skip_3"``, ``"identity skip"``, ``"rescaled x2.31"``."""


@dataclass(frozen=True)
class Report:
    """Per-layer and global densities; print it, or read ``rows`` / ``to_dict()``.

    The rows add up exactly to the global ``kept`` and ``total``.
    """

    rows: list[LayerRow]
    kept: int
    total: int
    density: float
    title: str = field(default="Mask", compare=False)
    notes: tuple[str, ...] = field(default=(), compare=False)
    """For a prepared model: what ``prepare`` did not apply as asked (blocks called whole, eager fallback)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, ints, floats, strings), e.g. for JSON or a logger."""
        rows = [{**asdict(row), "shape": list(row.shape)} for row in self.rows]
        return {
            "title": self.title,
            "rows": rows,
            "kept": self.kept,
            "total": self.total,
            "density": self.density,
            "notes": list(self.notes),
        }

    def __rich__(self) -> Table:
        has_scaffolding = any(row.scaffolding for row in self.rows)
        # Names and notes are shown as given: Text() keeps rich from reading "[...]" in them as markup.
        caption = Text("\n".join(f"note: {note}" for note in self.notes)) if self.notes else None
        table = Table(title=Text(self.title, style="bold"), caption=caption, show_footer=True)
        table.add_column("layer", footer=Text("global", style="bold"))
        table.add_column("shape")
        table.add_column("kept", footer=Text(f"{self.kept:,}", style="bold"), justify="right")
        table.add_column("total", footer=Text(f"{self.total:,}", style="bold"), justify="right")
        table.add_column("density", footer=Text(f"{self.density:.4f}", style="bold"), justify="right")
        if has_scaffolding:
            table.add_column("scaffolding")
        for row in self.rows:
            cells = [Text(row.name), "x".join(map(str, row.shape)), f"{row.kept:,}", f"{row.total:,}"]
            cells.append(f"{row.density:.4f}")
            table.add_row(*cells, *([Text(row.scaffolding)] if has_scaffolding else []))
        return table

    def __str__(self) -> str:
        longest = max((len(row.name) + len(row.scaffolding) for row in self.rows), default=0)
        console = Console(width=max(100, longest + 70), record=True, file=io.StringIO(), color_system=None)
        console.print(self)
        return console.export_text()


def report(model_or_mask: nn.Module | Mapping[str, torch.Tensor]) -> Report | DeployReport:
    """Layer-by-layer density of a mask, a plain (e.g. finalized) model, or a prepared model.

    - a mask ``{name: 0/1 or bool tensor}``: what it keeps;
    - a plain model: its prunable weights (see ``masks.prunable_weights``), kept = not exactly zero;
    - a prepared model: the masks of its parametrizations, with each layer's scaffolding;
    - a copy made by ``deploy.accelerate``: its per-layer decisions (``deploy.report``), whose
      sparse layers hold their weights as CSR buffers, not parameters.

    Example:
        >>> print(tost_surgery.report(model))
        >>> rich.print(tost_surgery.report(mask))
    """
    if isinstance(model_or_mask, nn.Module):
        if (deployed := getattr(model_or_mask, DEPLOY_REPORT_ATTRIBUTE, None)) is not None:
            return deployed
        if is_prepared(model_or_mask):
            return _prepared_report(model_or_mask, model_or_mask.tost)
        weights = prunable_weights(model_or_mask)
        rows = [_row(name, weight.detach() != 0) for name, weight in weights.items()]
        return _build(rows, f"{type(model_or_mask).__name__}: nonzero weights")
    if not isinstance(model_or_mask, Mapping):
        raise MaskError(
            f"report takes a mask (dict of parameter name to tensor) or an nn.Module, "
            f"found {type(model_or_mask).__name__}."
        )
    if not model_or_mask:
        raise MaskError("report got an empty mask: it names no parameter.")
    rows = [_row(name, _as_bool(name, value)) for name, value in model_or_mask.items()]
    return _build(rows, "Mask")


def _prepared_report(model: nn.Module, scaffold: Scaffold) -> Report:
    surgery = scaffold.surgery
    rows = [_row(entry.name, entry.mask, _scaffolding_of(entry, surgery)) for entry in surgery.decided.entries]
    techniques = ", ".join(sorted(surgery.runner.active)) or "masks only"
    return _build(rows, f"{type(model).__name__} prepared ({techniques})", tuple(surgery.runner.notes))


def _scaffolding_of(entry: MaskEntry, surgery: Any) -> str:
    """What each technique added beside ``entry``'s layer, in words."""
    parts = (t.describe_layer(entry, surgery) for t in TECHNIQUES)
    return ", ".join(part for part in parts if part)


def _as_bool(name: object, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise MaskError(f"Mask for {name!r} must be a torch.Tensor, found {type(value).__name__}.")
    if value.dtype == torch.bool:
        return value
    if value.is_complex() or not bool(((value == 0) | (value == 1)).all()):
        raise MaskError(
            f"Mask for {name!r} is not binary (0/1 or True/False).\nHint: threshold scores first, e.g. scores > t."
        )
    return value != 0


def _row(name: str, mask: torch.Tensor, scaffolding: str = "") -> LayerRow:
    kept, total = int(mask.sum()), mask.numel()
    return LayerRow(name, tuple(mask.shape), kept, total, kept / total if total else 0.0, scaffolding)


def _build(rows: list[LayerRow], title: str, notes: tuple[str, ...] = ()) -> Report:
    kept = sum(row.kept for row in rows)
    total = sum(row.total for row in rows)
    density = kept / total if total else 0.0
    return Report(rows=rows, kept=kept, total=total, density=density, title=title, notes=notes)
