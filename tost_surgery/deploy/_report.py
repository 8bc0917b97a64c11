"""What ``accelerate`` decided, layer by layer, and what it bought end to end."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from .._checks import DEPLOY_REPORT_ATTRIBUTE as _ATTRIBUTE
from .._errors import TostSurgeryError


@dataclass(frozen=True)
class LayerDecision:
    """One conv or Linear: its density, both timings (ms per call), and the kernel it runs."""

    name: str
    layer: str
    """Type and geometry, e.g. ``"Conv2d 3x3/2"`` or ``"Linear 512->1000"``."""
    density: float | None
    """Fraction of nonzero weights (None for a pooling layer)."""
    macs: int
    """Dense multiply-adds of this layer on the example."""
    kernel: str
    """``"dense"``, ``"csr"``, ``"native"`` or ``"channels_last"``."""
    reason: str = ""
    """Why it stayed dense (empty when a sparse kernel runs)."""
    dense_ms: float | None = None
    sparse_ms: float | None = None
    """Time of the fastest other candidate (a sparse kernel or a layout)."""
    speedup: float | None = None
    """Median over rounds of the paired ratio dense / sparse (None when not timed)."""
    candidate: str = ""
    """The fastest non-dense candidate timed (its time and speedup are the ones shown)."""
    folded: str = ""
    """The BatchNorm folded into this conv, if any."""


@dataclass(frozen=True)
class DeployReport:
    """Per-layer decisions of ``deploy.accelerate``, the end-to-end speedup and the limit.

    ``mac_ratio`` is dense / nonzero multiply-adds of the convs and Linears on the example:
    what the model would gain if those layers cost only their nonzeros and nothing else did.
    """

    rows: list[LayerDecision]
    dense_ms: float
    accelerated_ms: float
    speedup: float
    mac_ratio: float
    threads: int
    min_speedup: float
    notes: tuple[str, ...] = ()
    title: str = field(default="deploy.accelerate", compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings), e.g. for JSON."""
        return {**asdict(self), "rows": [asdict(row) for row in self.rows], "notes": list(self.notes)}

    @property
    def summary(self) -> str:
        """One line: the end-to-end speedup, the layers that run sparse, the limit."""
        sparse = sum(row.kernel in ("csr", "native") for row in self.rows)
        layers = sum(row.density is not None for row in self.rows)
        return (
            f"end to end {self.speedup:.2f}x ({self.dense_ms:.2f} ms dense -> {self.accelerated_ms:.2f} ms, "
            f"median of paired ratios, {self.threads} thread{'s' * (self.threads != 1)}); "
            f"{sparse} of {layers} conv/Linear layers sparse; multiply-adds dense/nonzero {self.mac_ratio:.1f}x"
        )

    def __rich__(self) -> Table:
        caption = Text("\n".join([self.summary, *(f"note: {note}" for note in self.notes)]))
        table = Table(title=Text(self.title, style="bold"), caption=caption)
        for column in ("layer", "type"):
            table.add_column(column)
        for column in ("density", "dense ms", "best ms", "speedup"):
            table.add_column(column, justify="right")
        table.add_column("kernel")
        table.add_column("why dense / folded")
        for row in self.rows:
            times = [_ms(row.dense_ms), _ms(row.sparse_ms), "" if row.speedup is None else f"{row.speedup:.2f}x"]
            note = row.reason or (f"+ {row.folded}" if row.folded else "")
            style = "green" if row.kernel != "dense" else None
            density = "" if row.density is None else f"{row.density:.1%}"
            table.add_row(Text(row.name), row.layer, density, *times, Text(row.kernel, style=style), note)
        return table

    def __str__(self) -> str:
        console = Console(width=150, record=True, file=io.StringIO(), color_system=None)
        console.print(self)
        return console.export_text()


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def attach(model: nn.Module, report: DeployReport) -> None:
    """Keep the report on the accelerated model (read it back with :func:`report`)."""
    object.__setattr__(model, _ATTRIBUTE, report)


def is_accelerated(model: nn.Module) -> bool:
    """Whether ``model`` is a copy made by ``deploy.accelerate``."""
    return isinstance(getattr(model, _ATTRIBUTE, None), DeployReport)


def report(model: nn.Module) -> DeployReport:
    """The per-layer decisions of a model returned by ``deploy.accelerate``.

    Example:
        >>> fast = tost_surgery.deploy.accelerate(model, (x,))
        >>> print(tost_surgery.deploy.report(fast))
    """
    found = getattr(model, _ATTRIBUTE, None)
    if not isinstance(found, DeployReport):
        raise TostSurgeryError(
            f"{type(model).__name__} was not made by deploy.accelerate, so it has no deploy report.\n"
            "Hint: fast = tost_surgery.deploy.accelerate(model, example_inputs); deploy.report(fast)"
        )
    return found
