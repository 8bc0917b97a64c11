"""Checks and constants that several modules share."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ._errors import TostSurgeryError
from ._modules import Scaffold

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""The layers whose weights mask makers prune and rescaling rescales by default."""

Batch = tuple[torch.Tensor, torch.Tensor]

DEPLOY_REPORT_ATTRIBUTE = "_tost_deploy_report"
"""Where ``deploy.accelerate`` keeps its per-layer decisions on the copy it returns."""


def is_real(value: object) -> bool:
    """A real number (numpy's too), not a bool: ``warmup=True`` is a mistake, not 1.0."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_positive_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def is_positive_number(value: object) -> bool:
    """A finite real number above zero."""
    return is_real(value) and 0 < value < math.inf


def is_non_negative_number(value: object) -> bool:
    """A real number at or above zero (infinity included), not NaN."""
    return is_real(value) and not math.isnan(value) and value >= 0


def is_prepared(model: object) -> bool:
    """Whether ``model`` is prepared by tost_surgery (it carries the scaffold under ``model.tost``).

    A ``torch.compile`` wrapper counts: it forwards attribute reads to the model inside.
    """
    return isinstance(model, nn.Module) and isinstance(getattr(model, "tost", None), Scaffold)


def checked_batches(
    batches: object, device: torch.device, verb: str, error: type[TostSurgeryError], example: str
) -> Iterator[Batch]:
    """The ``(x, y)`` pairs of ``batches`` moved to ``device``, read once; ``error`` if it is no such iterable.

    ``verb`` names the caller in messages, ``example`` shows a right call.
    """
    one_pair = isinstance(batches, (tuple, list)) and len(batches) == 2 and isinstance(batches[0], torch.Tensor)
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable) or one_pair:
        raise error(
            f"batches is an iterable of (inputs, targets) pairs, found {type(batches).__name__}.\n"
            f"Hint: wrap a single batch in a list: {example}."
        )
    count = 0
    for index, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[0], torch.Tensor):
            length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
            inputs = f" whose inputs are a {type(batch[0]).__name__}" if length == " of length 2" else ""
            raise error(
                f"Batch {index} of {verb} is not an (inputs, targets) pair, found {type(batch).__name__}{length}"
                f"{inputs}.\n"
                "Hint: yield (x, y) from the iterable, like a classification DataLoader."
            )
        count += 1
        yield tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in batch)  # type: ignore[misc]
    if count == 0:
        raise error(f"{verb} needs data: batches gave no (inputs, targets) pair.\nHint: pass a few batches, {example}.")
