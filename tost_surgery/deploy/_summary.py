"""What ``tost-surgery deploy`` prints: the per-layer report and the checkpoint sizes."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Group
from rich.text import Text
from torch import nn

from ._checkpoint import save
from ._report import DeployReport


@dataclass(frozen=True)
class DeploySummary:
    """An accelerated model's report, and its checkpoint in bytes: ``torch.save`` vs ``deploy.save``."""

    report: DeployReport
    dense_bytes: int
    compressed_bytes: int

    @property
    def compressed_fraction(self) -> float:
        """Compressed bytes over dense bytes."""
        return self.compressed_bytes / self.dense_bytes

    def to_dict(self) -> dict[str, Any]:
        """Plain data, e.g. for JSON."""
        return {
            "report": self.report.to_dict(),
            "checkpoint": {
                "dense_bytes": self.dense_bytes,
                "compressed_bytes": self.compressed_bytes,
                "compressed_fraction": self.compressed_fraction,
            },
        }

    def __rich__(self) -> Group:
        line = (
            f"checkpoint: {self.dense_bytes / 2**20:.2f} MiB with torch.save, {self.compressed_bytes / 2**20:.2f} MiB "
            f"with deploy.save ({self.compressed_fraction:.1%})"
        )
        return Group(self.report, Text(line))


def checkpoint_bytes(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | None = None
) -> tuple[int, int]:
    """``(torch.save bytes, deploy.save bytes)`` of a state_dict; the compressed file is kept at ``path`` if given.

    Example:
        >>> dense, compressed = tost_surgery.deploy.checkpoint_bytes(model)
    """
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    buffer = io.BytesIO()
    torch.save(state, buffer)
    if path is not None:
        return len(buffer.getvalue()), save(state, path)
    with tempfile.TemporaryDirectory() as directory:
        return len(buffer.getvalue()), save(state, os.path.join(directory, "model.tost.pt"))
