"""Which parameters a mask-making method prunes."""

from __future__ import annotations

import fnmatch
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from ._checks import LAYER_TYPES, is_real
from ._errors import MaskError

DEFAULT_TYPES = LAYER_TYPES


def prunable_weights(
    model: nn.Module,
    include: Sequence[str | type[nn.Module]] | None = None,
    exclude: Sequence[str | type[nn.Module]] = (),
) -> dict[str, torch.Tensor]:
    """``{name: weight}`` of the layers to prune, in model order.

    By default every ``weight`` of a Conv1d/2d/3d or Linear layer, the first and last
    layers included. ``include`` / ``exclude`` take module types or glob patterns over
    parameter names (``"head.*"``, ``"*.downsample.*"``). A weight shared by several layers (tied)
    is listed once, under the first name that is chosen.
    """
    chosen = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or id(weight) in seen:
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        rules = DEFAULT_TYPES if include is None else include
        if _matches(name, module, rules) and not _matches(name, module, exclude):
            chosen[name] = weight
            seen.add(id(weight))
    if not chosen:
        raise MaskError(
            f"No prunable layer in {type(model).__name__} (looked for {[t.__name__ for t in DEFAULT_TYPES]}"
            f" weights, include={include!r}, exclude={list(exclude)!r}).\n"
            "Hint: pass include=[...] with module types or name patterns."
        )
    return chosen


def _matches(name: str, module: nn.Module, rules: Sequence[str | type[nn.Module]]) -> bool:
    for rule in rules:
        if isinstance(rule, str):
            if fnmatch.fnmatchcase(name, rule):
                return True
        elif isinstance(module, rule):
            return True
    return False


def check_sparsity(sparsity: object) -> float:
    """``sparsity`` (any real number: a float, a numpy scalar, a one-element tensor) as a float in [0, 1),
    or a :class:`MaskError`."""
    value = sparsity
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if not is_real(value):
        short = isinstance(sparsity, (str, bool, numbers.Number, type(None)))
        shown = repr(sparsity) if short else f"a {type(sparsity).__name__}"
        raise MaskError(
            f"sparsity is the fraction of weights removed, a number in [0, 1), found {shown}.\n"
            "Hint: sparsity=0.95 keeps 5% of the weights; check the order of the arguments "
            "(model, sparsity, ...)."
        )
    if not 0.0 <= float(value) < 1.0:
        raise MaskError(
            f"sparsity is the fraction of weights removed, in [0, 1), found {float(value)!r}.\n"
            "Hint: sparsity=0.95 keeps 5% of the weights."
        )
    return float(value)
