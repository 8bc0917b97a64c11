"""Lottery tickets: iterative magnitude pruning with weight rewinding."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._checks import is_positive_int, is_prepared
from .._errors import MaskError, StateError
from .._masking import attach_masks, detach_masks, normalize_mask
from .._scope import check_sparsity, prunable_weights
from .._write_through import plain_reads
from ._select import keep_top


@dataclass(frozen=True, eq=False)
class LotteryTicket:
    """What :func:`lottery` found: the winning mask and the weights to train it from."""

    mask: dict[str, torch.Tensor]
    """``{parameter name: bool tensor}``, for :func:`tost_surgery.prepare`."""
    rewind_state: dict[str, torch.Tensor]
    """The ``state_dict`` every round started from; load it before training the ticket."""

    @property
    def density(self) -> float:
        """Fraction of the masked weights kept."""
        kept = sum(int(m.sum()) for m in self.mask.values())
        return kept / sum(m.numel() for m in self.mask.values())


def lottery(
    model: nn.Module,
    sparsity: float,
    train_fn: Callable[[nn.Module], object],
    *,
    rounds: int = 3,
    rewind_state: Mapping[str, torch.Tensor] | None = None,
    include: Sequence[str | type[nn.Module]] | None = None,
    exclude: Sequence[str | type[nn.Module]] = (),
) -> LotteryTicket:
    """Find a lottery ticket by iterative magnitude pruning with rewinding.

    Frankle & Carbin, "The Lottery Ticket Hypothesis", ICLR 2019; rewinding to early weights:
    Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020.

    Each round trains a copy of ``model`` from ``rewind_state`` under the current mask
    (the mask is attached as a parametrization, which keeps pruned weights exactly zero while
    ``train_fn(copy)`` trains it in place), bakes it, and prunes the smallest ``|w|`` among the
    kept weights, globally over the prunable layers (``include`` / ``exclude`` as in
    :func:`prunable_weights`), so that after round ``r`` the density is
    ``(1 - sparsity) ** (r / rounds)``. The final count is exact (as in :func:`random`) and every
    layer keeps at least one weight. ``model`` itself is never modified.

    Args:
        train_fn: ``train_fn(model) -> None`` trains the model it is given, in place (it may
            move it to another device); called once per round. Its weights are masked: build the
            optimizer on ``model.parameters()`` inside ``train_fn``.
        rounds: pruning rounds; 1 is one-shot magnitude pruning after one training.
        rewind_state: the ``state_dict`` each round starts from; defaults to a copy of
            ``model.state_dict()`` now (its initialization). Pass the weights after a few
            hundred steps for late rewinding.

    Returns:
        A :class:`LotteryTicket` with ``.mask`` and ``.rewind_state``.

    Example:
        >>> ticket = tost_surgery.masks.lottery(model, 0.9, train_fn, rounds=3)
        >>> model.load_state_dict(ticket.rewind_state)
        >>> model = tost_surgery.prepare(model, ticket.mask, tost_surgery.Recipe.tost(total_steps=10_000))
    """
    if not isinstance(model, nn.Module):
        raise MaskError(f"lottery takes an nn.Module, found {type(model).__name__}.")
    if is_prepared(model):
        raise StateError(
            f"lottery takes a plain model, but {type(model).__name__} is prepared by tost_surgery.\n"
            "Hint: finalize it first, or pass the model before prepare."
        )
    density = 1.0 - check_sparsity(sparsity)
    if not is_positive_int(rounds):
        raise MaskError(f"rounds is the number of prune-and-retrain rounds, at least 1, found {rounds!r}.")
    if not callable(train_fn):
        raise MaskError(
            f"train_fn trains the model it is given in place, train_fn(model) -> None; found {type(train_fn).__name__}."
        )
    weights = prunable_weights(model, include, exclude)
    rewind_state = _copy_state(model.state_dict() if rewind_state is None else rewind_state)
    _check_fits(model, rewind_state)
    total = sum(w.numel() for w in weights.values())
    final_count = max(len(weights), round(density * total))
    mask = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    for round_index in range(1, rounds + 1):
        candidate = copy.deepcopy(model)
        candidate.load_state_dict(rewind_state)
        entries = normalize_mask(candidate, mask)
        attach_masks(entries)
        with plain_reads:
            train_fn(candidate)
        detach_masks(entries, bake=True)
        scheduled = round(total * density ** (round_index / rounds))
        count = final_count if round_index == rounds else max(final_count, scheduled)
        trained = {name: candidate.get_parameter(name).detach() for name in weights}
        mask = _keep_largest(trained, mask, count)
        mask = {name: m.to(weights[name].device) for name, m in mask.items()}
    return LotteryTicket(mask=mask, rewind_state=rewind_state)


def _keep_largest(
    trained: dict[str, torch.Tensor], mask: dict[str, torch.Tensor], count: int
) -> dict[str, torch.Tensor]:
    """Keep the ``count`` largest ``|w|`` among the kept weights, globally, at least one per layer."""
    scores = {}
    for name, weight in trained.items():
        if not bool(torch.isfinite(weight).all()):
            raise MaskError(
                f"train_fn left non-finite values in {name!r}, so weights cannot be ranked by magnitude.\n"
                "Hint: lower the learning rate of train_fn."
            )
        score = weight.abs().float().cpu()
        scores[name] = torch.where(mask[name].cpu(), score, torch.full_like(score, -math.inf))
    return keep_top(scores, count)


def _copy_state(state: object) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping):
        raise MaskError(f"rewind_state is a state_dict, found {type(state).__name__}.")
    return {
        key: value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        for key, value in state.items()
    }


def _check_fits(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [
        f"{key}: expected {tuple(value.shape)}, found {tuple(state[key].shape)}"
        for key, value in expected.items()
        if key in state
        and isinstance(value, torch.Tensor)
        and isinstance(state[key], torch.Tensor)
        and state[key].shape != value.shape
    ]
    if missing or unexpected or reshaped:
        details = "".join(
            f"\n  {label}: {items}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped))
            if items
        )
        raise MaskError(
            f"rewind_state does not fit {type(model).__name__}.{details}\n"
            "Hint: pass a state_dict of this model (a plain one, not taken while prepared)."
        )
