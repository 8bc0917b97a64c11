"""N:M semi-structured masks: n of every m consecutive input weights."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .._checks import is_positive_int
from .._errors import MaskError
from .._scope import prunable_weights


def nm(
    model: nn.Module,
    n: int = 2,
    m: int = 4,
    *,
    include: Sequence[str | type[nn.Module]] | None = None,
    exclude: Sequence[str | type[nn.Module]] = (),
) -> dict[str, torch.Tensor]:
    """N:M mask (e.g. 2:4, Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021).

    Each output unit's weights are cut into groups of ``m`` consecutive weights along the input
    dimension, and the ``n`` of largest ``|w|`` in each group are kept (ties to the lower index).
    For a Linear layer that is along ``in_features``; for a Conv layer along the flattened
    ``in_channels / groups * kernel`` of each output channel, in PyTorch's memory order
    ``(in, kh, kw)`` (note: NVIDIA's sparse tensor cores group convolution weights along input
    channels at each kernel position instead). Other weights are grouped along everything
    after their first dimension, a 1-D weight along its only one. The density is exactly
    ``n / m`` in every layer.

    Raises:
        MaskError: ``n``/``m`` are not ints with ``1 <= n <= m``, or a layer's input size is not a
            multiple of ``m`` (the message names it; leave it out with ``exclude=[name]``).

    Example:
        >>> mask = tost_surgery.masks.nm(model, 2, 4, exclude=["conv1.weight"])
    """
    for label, value in (("n", n), ("m", m)):
        if not is_positive_int(value):
            raise MaskError(f"{label} must be an int >= 1, found {value!r}.\nHint: nm(model, n=2, m=4) keeps 2 of 4.")
    if n > m:
        raise MaskError(f"n:m keeps n weights of every m, so n <= m; found n={n}, m={m}.\nHint: 2:4 is n=2, m=4.")
    weights = prunable_weights(model, include, exclude)
    masks = {}
    for name, weight in weights.items():
        rows = weight.reshape(1, -1) if weight.dim() < 2 else weight.reshape(weight.shape[0], -1)
        size = rows.shape[1]
        if size % m:
            raise MaskError(
                f"Layer {name!r} has an input size of {size} (shape {tuple(weight.shape)}), not a multiple of m={m}.\n"
                f"Hint: leave it dense with exclude=[{name!r}]."
            )
        groups = rows.detach().abs().reshape(-1, m)
        groups = torch.where(torch.isnan(groups), torch.full_like(groups, -math.inf), groups)
        best = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
        mask = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device)
        mask.scatter_(1, best, True)
        masks[name] = mask.view(weight.shape)
    return masks
