"""Losses that read the recipe's current settings from a prepared model."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._errors import TostSurgeryError
from ._training import label_smoothing

__all__ = ["cross_entropy"]


def cross_entropy(model: nn.Module, logits: torch.Tensor, target: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``F.cross_entropy`` with the recipe's current label smoothing (constant, or annealed to 0).

    The same as ``F.cross_entropy(logits, target, label_smoothing=tost_surgery.label_smoothing(model))``;
    other keyword arguments (``weight``, ``reduction``, ``ignore_index``) pass through.

    Example:
        >>> loss = tost_surgery.losses.cross_entropy(model, model(x), y)
    """
    if "label_smoothing" in kwargs:
        raise TostSurgeryError(
            "losses.cross_entropy takes its label smoothing from the model's recipe; found label_smoothing= too.\n"
            "Hint: set Recipe(label_smoothing=..., label_schedule=...), or call F.cross_entropy directly."
        )
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing(model), **kwargs)
