"""Pruning at initialization: masks from per-weight scores (magnitude, SNIP, GraSP, SynFlow).

Every maker scores a ``copy.deepcopy`` of the model, so the model's weights, buffers,
``requires_grad`` flags and training mode, and the global RNG state, are as before; it then
keeps exactly ``max(n_layers, round((1 - sparsity) * total))`` weights with
:func:`~tost_surgery.masks.keep_top`, at least one in every layer.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import checked_batches, is_positive_int, is_positive_number
from .._errors import MaskError
from .._scope import check_sparsity, prunable_weights
from ._select import keep_top, target_count

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Rules = Sequence[str | type[nn.Module]]


def magnitude(
    model: nn.Module,
    sparsity: float,
    *,
    scope: str = "global",
    include: Rules | None = None,
    exclude: Rules = (),
) -> dict[str, torch.Tensor]:
    """Keep the weights of largest ``|w|`` (magnitude pruning, e.g. Han et al., NeurIPS 2015).

    ``scope="global"`` ranks all layers together; ``scope="layer"`` keeps the same fraction of
    every layer (rounded like :func:`random`: within one weight of ``(1 - sparsity) * numel``
    where the one-weight floor does not bind).

    Example:
        >>> mask = tost_surgery.masks.magnitude(model, sparsity=0.9, scope="layer")
    """
    weights = prunable_weights(model, include, exclude)
    density = 1.0 - check_sparsity(sparsity)
    scores = {name: w.detach().abs() for name, w in weights.items()}
    return _on_devices(keep_top(scores, target_count(_numels(weights), density), scope=scope), weights)


def snip(
    model: nn.Module,
    sparsity: float,
    batches: Iterable[Batch],
    *,
    loss_fn: LossFn = F.cross_entropy,
    include: Rules | None = None,
    exclude: Rules = (),
) -> dict[str, torch.Tensor]:
    """SNIP (Lee et al., "SNIP: Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019).

    Keeps the weights of highest connection sensitivity ``|w * g|``, where ``g`` is the
    gradient of ``loss_fn(model(x), y)`` summed over ``batches`` (the gradient of the loss with
    respect to a multiplicative mask at 1). The copy runs in the model's current mode; ``x``
    and ``y`` are moved to the device of the first pruned weight.

    Args:
        batches: an iterable of ``(x, y)`` pairs, e.g. a few batches of a DataLoader, read once.

    Example:
        >>> mask = tost_surgery.masks.snip(model, 0.9, [next(iter(loader))])
    """
    weights = prunable_weights(model, include, exclude)
    density = 1.0 - check_sparsity(sparsity)
    scores = _snip_scores(model, list(weights), batches, loss_fn)
    return _on_devices(keep_top(scores, target_count(_numels(weights), density)), weights)


def grasp(
    model: nn.Module,
    sparsity: float,
    batches: Iterable[Batch],
    *,
    loss_fn: LossFn = F.cross_entropy,
    temperature: float = 200.0,
    include: Rules | None = None,
    exclude: Rules = (),
) -> dict[str, torch.Tensor]:
    """GraSP (Wang et al., "Picking Winning Tickets Before Training by Preserving Gradient Flow", ICLR 2020).

    With ``g`` the gradient of ``loss_fn(model(x) / temperature, y)`` summed over ``batches``
    and ``H`` the Hessian (both over the pruned weights), the score ``S = -w * (H g)`` is, to
    first order, half the change of the gradient norm ``|g|^2`` when the weight is removed.
    GraSP removes the weights of HIGHEST score and keeps those of LOWEST score (whose removal
    would reduce gradient flow the most); this is the authors' code (alecwangcq/GraSP,
    ``keep_masks = scores <= threshold`` of the top ``sparsity`` fraction). Unlike that code,
    Linear layers are not re-initialized. The copy runs in the model's current mode; ``x``
    and ``y`` are moved to the device of the first pruned weight.

    Args:
        batches: an iterable of ``(x, y)`` pairs, read once and kept for the two passes.
        temperature: the logits are divided by it (200 in the paper) before ``loss_fn``.

    Example:
        >>> mask = tost_surgery.masks.grasp(model, 0.9, [next(iter(loader))])
    """
    weights = prunable_weights(model, include, exclude)
    density = 1.0 - check_sparsity(sparsity)
    if not is_positive_number(temperature):
        raise MaskError(f"temperature divides the logits: a positive number, found {temperature!r}.")
    scores = _grasp_scores(model, list(weights), batches, loss_fn, float(temperature))
    lowest_first = {name: -score for name, score in scores.items()}
    return _on_devices(keep_top(lowest_first, target_count(_numels(weights), density)), weights)


def synflow(
    model: nn.Module,
    sparsity: float,
    *,
    input_shape: Sequence[int],
    iterations: int = 100,
    include: Rules | None = None,
    exclude: Rules = (),
) -> dict[str, torch.Tensor]:
    """SynFlow (Tanaka et al., "Pruning neural networks without any data by iteratively conserving
    synaptic flow", NeurIPS 2020). Data-free.

    On a copy whose floating-point parameters and buffers are all replaced by their absolute
    values, in eval mode (BatchNorm uses its running statistics, as in the authors' code) and
    in float64 (``R`` grows like the product of the layers' norms and overflows float32 in deep
    nets), ``R = sum(model(ones(1, *input_shape)))`` and the score is ``|w * dR/dw|``.
    Pruning is iterative: after iteration ``k`` of ``iterations`` the mask keeps
    ``density ** (k / iterations)`` of the weights, re-scored with the pruned weights at zero
    (a pruned weight never comes back); the last iteration keeps the exact target.

    Args:
        input_shape: the shape of one input, without the batch dimension, e.g. ``(3, 32, 32)``.
        iterations: the number of prune-and-rescore rounds (100 in the paper).

    Example:
        >>> mask = tost_surgery.masks.synflow(model, 0.98, input_shape=(3, 32, 32))
    """
    weights = prunable_weights(model, include, exclude)
    density = 1.0 - check_sparsity(sparsity)
    shape = _check_input_shape(input_shape)
    if not is_positive_int(iterations):
        raise MaskError(f"iterations is the number of prune-and-rescore rounds, an int >= 1, found {iterations!r}.")
    numels = _numels(weights)
    target = target_count(numels, density)
    masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    current = sum(numels.values())
    with _scratch_copy(model) as net:
        _linearize(net)
        for k in range(1, iterations + 1):
            keep = target if k == iterations else max(target, target_count(numels, density ** (k / iterations)))
            if keep == current:
                continue
            scores = _synflow_pass(net, list(weights), shape, masks)
            masks, current = keep_top(scores, keep), keep
    return _on_devices(masks, weights)


# --------------------------------------------------------------------------- scores


def _snip_scores(
    model: nn.Module, names: list[str], batches: Iterable[Batch], loss_fn: LossFn
) -> dict[str, torch.Tensor]:
    """``|w * sum over batches of dL/dw|`` for each named weight, on a copy of ``model``."""
    with _scratch_copy(model) as net:
        weights = _differentiable(net, names)
        total = [torch.zeros_like(w) for w in weights]
        for x, y in _each_batch(batches, weights[0].device, "snip"):
            grads = torch.autograd.grad(loss_fn(net(x), y), weights, allow_unused=True)
            _accumulate(total, grads)
        return {name: (w.detach() * g).abs() for name, w, g in zip(names, weights, total)}


def _grasp_scores(
    model: nn.Module, names: list[str], batches: Iterable[Batch], loss_fn: LossFn, temperature: float
) -> dict[str, torch.Tensor]:
    """``-w * (H g)`` for each named weight, on a copy of ``model`` (GraSP keeps the lowest)."""
    with _scratch_copy(model) as net:
        weights = _differentiable(net, names)
        data = list(_each_batch(batches, weights[0].device, "grasp"))
        gradient = [torch.zeros_like(w) for w in weights]
        for x, y in data:
            _accumulate(gradient, torch.autograd.grad(loss_fn(net(x) / temperature, y), weights, allow_unused=True))
        hessian_gradient = [torch.zeros_like(w) for w in weights]
        for x, y in data:
            grads = torch.autograd.grad(loss_fn(net(x) / temperature, y), weights, create_graph=True, allow_unused=True)
            terms = [(g * fixed).sum() for g, fixed in zip(grads, gradient) if g is not None and g.requires_grad]
            if terms:
                _accumulate(hessian_gradient, torch.autograd.grad(torch.stack(terms).sum(), weights, allow_unused=True))
        return {name: -w.detach() * hg for name, w, hg in zip(names, weights, hessian_gradient)}


def _linearize(net: nn.Module) -> None:
    """Make ``net`` (a scratch copy) a positive float64 network in eval mode."""
    net.eval()
    net.to(torch.float64)
    with torch.no_grad():
        for value in net.state_dict().values():
            if value.is_floating_point():
                value.abs_()


def _synflow_pass(
    net: nn.Module, names: list[str], shape: tuple[int, ...], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    weights = _differentiable(net, names)
    with torch.no_grad():
        for name, w in zip(names, weights):
            w.mul_(masks[name].to(w.device))
    ones = torch.ones((1, *shape), dtype=torch.float64, device=weights[0].device)
    flow = _sum_of_outputs(net(ones), type(net).__name__)
    grads = torch.autograd.grad(flow, weights, allow_unused=True)
    scores = {}
    for name, w, g in zip(names, weights, grads):
        score = torch.zeros_like(w) if g is None else (g * w).detach().abs()
        score = torch.nan_to_num(score, nan=0.0)
        scores[name] = score.masked_fill(~masks[name].to(w.device), -math.inf)
    return scores


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _scratch_copy(model: nn.Module) -> Iterator[nn.Module]:
    """A deep copy to score on; the global CPU (and initialized CUDA) RNG states are restored after."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield copy.deepcopy(model)
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _differentiable(net: nn.Module, names: list[str]) -> list[torch.Tensor]:
    """The named weights of the scratch copy, the only parameters that require grad."""
    params = dict(net.named_parameters())
    for p in net.parameters():
        p.requires_grad_(False)
    weights = [params[name] for name in names]
    for w in weights:
        w.requires_grad_(True)
    return weights


def _each_batch(batches: object, device: torch.device, method: str) -> Iterator[Batch]:
    """The ``(x, y)`` pairs of ``batches`` on ``device``; a MaskError if it is no such iterable or empty."""
    return checked_batches(batches, device, method, MaskError, f"tost_surgery.masks.{method}(model, 0.9, [(x, y)])")


def _accumulate(total: list[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    for running, g in zip(total, grads):
        if g is not None:
            running.add_(g.detach())


def sum_of_tensors(output: object) -> torch.Tensor | None:
    """The sum of a model's output: a tensor, or a tuple, list or dict of tensors; None for anything else."""
    if isinstance(output, torch.Tensor):
        return output.sum()
    leaves = list(output.values()) if isinstance(output, Mapping) else output
    if isinstance(leaves, (tuple, list)) and leaves and all(isinstance(v, torch.Tensor) for v in leaves):
        return torch.stack([v.sum() for v in leaves]).sum()
    return None


def _sum_of_outputs(output: object, model_name: str) -> torch.Tensor:
    total = sum_of_tensors(output)
    if total is None:
        raise MaskError(f"SynFlow sums the outputs of {model_name}: tensors, found {type(output).__name__}.")
    return total


def _check_input_shape(input_shape: object) -> tuple[int, ...]:
    if (
        not isinstance(input_shape, (tuple, list, torch.Size))
        or not input_shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape)
    ):
        raise MaskError(
            "input_shape is the shape of one input without the batch dimension, a tuple of positive ints, "
            f"found {input_shape!r}.\nHint: input_shape=(3, 32, 32) for CIFAR images."
        )
    return tuple(input_shape)


def _numels(weights: Mapping[str, torch.Tensor]) -> dict[str, int]:
    return {name: w.numel() for name, w in weights.items()}


def _on_devices(masks: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: masks[name].to(weights[name].device) for name in weights}
