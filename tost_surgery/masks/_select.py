"""Turn per-weight scores into a mask with an exact number of kept weights."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .._errors import MaskError

SCOPES = ("global", "layer")


def keep_top(
    scores: Mapping[str, torch.Tensor],
    keep: int,
    *,
    scope: str = "global",
    allow_empty_layers: bool = False,
) -> dict[str, torch.Tensor]:
    """Keep exactly ``keep`` weights, those with the highest scores.

    Ties go to the lower flat index (layers in the order given, then row-major within a
    layer), so the result is deterministic; NaN scores count as ``-inf``.

    With ``scope="global"`` the scores of all layers compete. Unless ``allow_empty_layers``,
    every layer keeps at least one weight: a layer left empty gets its best weight back, paid
    for by dropping the globally weakest kept weights of layers that keep more than one, so
    the total stays ``keep``. With ``scope="layer"`` every layer keeps its own top
    ``keep / total * numel`` weights, rounded by largest remainder so the counts add up to
    ``keep`` (the rounding :func:`tost_surgery.masks.random` uses).

    Args:
        scores: ``{parameter name: scores shaped like the parameter}``.
        keep: how many weights to keep in all, between the number of layers (0 with
            ``allow_empty_layers``) and the total number of weights.
        scope: ``"global"`` or ``"layer"``.
        allow_empty_layers: let a layer keep nothing.

    Returns:
        ``{name: bool mask}``, each on the device of its scores.

    Raises:
        MaskError: no scores, a score that is not a tensor, an unknown scope, or ``keep`` out of range.

    Example:
        >>> scores = {n: w.abs() for n, w in tost_surgery.masks.prunable_weights(model).items()}
        >>> mask = tost_surgery.masks.keep_top(scores, keep=1000)
    """
    if scope not in SCOPES:
        raise MaskError(f"scope is one of {list(SCOPES)}, found {scope!r}.")
    if not isinstance(scores, Mapping) or not scores:
        raise MaskError(
            f"scores is a non-empty dict {{parameter name: tensor}}, found {_describe(scores)}.\n"
            "Hint: build it over tost_surgery.masks.prunable_weights(model)."
        )
    for name, value in scores.items():
        if not isinstance(value, torch.Tensor) or value.is_complex():
            raise MaskError(f"Scores for {name!r} must be a real tensor, found {_describe(value)}.")
    numels = {name: value.numel() for name, value in scores.items()}
    total = sum(numels.values())
    least = 0 if allow_empty_layers else len(scores)
    if isinstance(keep, bool) or not isinstance(keep, int) or not least <= keep <= total:
        floor = "0" if allow_empty_layers else f"{least} (one per layer)"
        too_few = isinstance(keep, int) and not isinstance(keep, bool) and 0 <= keep < least
        raise MaskError(
            f"keep is the number of weights to keep, an int from {floor} to {total}, found {keep!r}."
            + ("\nHint: pass allow_empty_layers=True to let layers go empty." if too_few else "")
        )
    if scope == "layer":
        wanted = {name: keep * n / total for name, n in numels.items()} if total else dict.fromkeys(numels, 0.0)
        counts = largest_remainder(numels, wanted, keep, minimum=0 if allow_empty_layers else 1)
        return {name: _top_k(value, counts[name]) for name, value in scores.items()}
    return _keep_top_global(scores, keep, allow_empty_layers)


def target_count(numels: Mapping[str, int], density: float) -> int:
    """Weights kept at ``density``: ``round(density * total)``, at least one per layer."""
    return max(len(numels), round(density * sum(numels.values())))


def largest_remainder(
    numels: Mapping[str, int], wanted: Mapping[str, float], target: int, *, minimum: int = 1
) -> dict[str, int]:
    """Integer counts near ``wanted`` that add up to ``target``, each in ``[minimum, numel]``.

    Floor, then hand out the rest one weight at a time to the largest fractional parts (take
    back from the smallest).
    """
    counts = {n: min(numels[n], max(minimum, math.floor(c))) for n, c in wanted.items()}
    order = sorted(wanted, key=lambda n: wanted[n] - math.floor(wanted[n]), reverse=True)
    while sum(counts.values()) != target:
        step = 1 if sum(counts.values()) < target else -1
        for name in order if step == 1 else reversed(order):
            if sum(counts.values()) == target:
                break
            if minimum <= counts[name] + step <= numels[name]:
                counts[name] += step
    return counts


def _keep_top_global(
    scores: Mapping[str, torch.Tensor], keep: int, allow_empty_layers: bool
) -> dict[str, torch.Tensor]:
    names = list(scores)
    numels = [scores[n].numel() for n in names]
    device = next(iter(scores.values())).device
    # float64: no new ties from rounding float64 scores, and no overflow to inf.
    flat = torch.cat([_finite_order(scores[n]).to(device=device, dtype=torch.float64) for n in names])
    kept = _top_mask(flat, keep)
    if not allow_empty_layers:
        _refill_empty_layers(kept, flat, numels)
    masks = {}
    for name, chunk in zip(names, torch.split(kept, numels)):
        masks[name] = chunk.view(scores[name].shape).to(scores[name].device)
    return masks


def _top_mask(flat: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` highest of ``flat`` (no NaN), ties to the lower index.

    A selection (``kthvalue``), not a sort: linear time, which matters when SynFlow calls it
    a hundred times over tens of millions of weights.
    """
    total = flat.numel()
    if keep <= 0 or keep >= total:
        return torch.full((total,), keep > 0, dtype=torch.bool, device=flat.device)
    threshold = torch.kthvalue(flat, total - keep + 1).values  # the keep-th largest
    kept = flat > threshold
    missing = keep - int(torch.count_nonzero(kept))
    kept[torch.nonzero(flat == threshold).flatten()[:missing]] = True
    return kept


def _refill_empty_layers(kept: torch.Tensor, flat: torch.Tensor, numels: list[int]) -> None:
    """Give each empty layer its best weight; drop as many of the weakest kept weights elsewhere."""
    offsets = [0]
    for n in numels:
        offsets.append(offsets[-1] + n)
    counts = [int(torch.count_nonzero(part)) for part in torch.split(kept, numels)]
    empty = [i for i, c in enumerate(counts) if c == 0]
    if not empty:
        return
    # Walking up from the weakest kept weight, each step either drops one weight or passes a
    # layer's last one (once per layer), so this many of the weakest are enough.
    weakest = _weakest_kept(kept, flat, len(empty) + len(numels))
    boundaries = torch.tensor(offsets[1:], device=flat.device)
    layers = torch.bucketize(weakest, boundaries, right=True).tolist()
    dropped = 0
    for index, layer in zip(weakest.tolist(), layers):
        if dropped == len(empty):
            break
        if counts[layer] > 1:
            kept[index] = False
            counts[layer] -= 1
            dropped += 1
    for layer in empty:
        start = offsets[layer]
        kept[start + int(torch.argmax(flat[start : offsets[layer + 1]]))] = True


def _weakest_kept(kept: torch.Tensor, flat: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the ``count`` weakest kept weights, weakest first (the reverse of keep order)."""
    indices = torch.nonzero(kept).flatten()
    values = flat[indices]
    if count < values.numel():
        near = values <= torch.kthvalue(values, count).values
        indices, values = indices[near], values[near]
    # ascending score, ties to the higher index: a stable sort of the index-descending list
    indices, values = indices.flip(0), values.flip(0)
    return indices[torch.sort(values, stable=True).indices][:count]


def _top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    return _top_mask(_finite_order(score).to(torch.float64), k).view(score.shape)


def _finite_order(score: torch.Tensor) -> torch.Tensor:
    """Scores with NaN as -inf, detached and flat."""
    score = score.detach().reshape(-1)
    if score.is_floating_point():
        score = torch.where(torch.isnan(score), torch.full_like(score, -math.inf), score)
    return score


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    if isinstance(value, Mapping):
        return "an empty dict"
    return type(value).__name__
