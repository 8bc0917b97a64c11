"""Layer-wise rescaled initialization (LRsI), learned form: GradInit scales for masked layers.

The deterministic rules run inside :func:`tost_surgery.prepare` (``Recipe.rescale_init``). The
learned form needs data, so it is a step of its own, after ``prepare`` with
``rescale_rule="gradinit"`` (which then rescales nothing itself):

Example:
    >>> recipe = tost.Recipe.tost(total_steps=N, rescale_rule="gradinit")
    >>> model = tost.prepare(model, mask, recipe)
    >>> result = tost.init.gradinit(model, itertools.islice(loader, 8))
    >>> print(result)          # one learned scale per masked layer, objective before / after
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from ._checks import (
    LAYER_TYPES,
    checked_batches,
    is_non_negative_number,
    is_positive_int,
    is_positive_number,
    is_prepared,
)
from ._errors import StateError, TostSurgeryError, TostSurgeryWarning
from ._masking import MaskEntry, attach_masks, normalize_mask, original_parameter, resolve_mask

__all__ = ["GradInitReport", "LayerScale", "gradinit"]

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_EVAL_DRAWS = 4
"""The objective before / after is averaged over the first draws (at most this many), the same both times."""


@dataclass(frozen=True)
class LayerScale:
    """The scale learned for one masked layer."""

    name: str
    """The masked parameter, e.g. ``"layer1.0.conv1.weight"``."""
    scale: float
    """Factor its surviving weights were multiplied by."""
    density: float
    """Fraction of its weights the mask keeps."""


@dataclass(frozen=True)
class GradInitReport:
    """What :func:`gradinit` learned and applied; print it, or read ``scales`` / ``to_dict()``.

    ``objective_*`` is the GradInit objective without the ``1 / eta`` factor: the loss on
    ``S~`` after one step of the target optimizer taken on ``S``, averaged over the first
    draws, with every scale at 1 (before) and at the learned value (after). ``grad_norm_*``
    is the norm the constraint bounds (L2 for ``sgd``, L1 for ``adam``) on the same draws.
    """

    layers: tuple[LayerScale, ...]
    objective_before: float
    objective_after: float
    grad_norm_before: float
    grad_norm_after: float
    steps: int
    """Optimization steps of the scales."""
    constraint_steps: int
    """Steps where the gradient norm exceeded ``gamma``, so the step lowered the norm instead."""
    settings: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def scales(self) -> dict[str, float]:
        """``{masked parameter name: scale}``."""
        return {layer.name: layer.scale for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, floats, strings), e.g. for JSON or a logger."""
        data = asdict(self)
        data["layers"] = [asdict(layer) for layer in self.layers]
        data["settings"] = dict(self.settings)
        return data

    def __rich__(self) -> Group:
        table = Table(title=Text("GradInit scales", style="bold"))
        table.add_column("layer")
        table.add_column("density", justify="right")
        table.add_column("scale", justify="right")
        for layer in self.layers:
            table.add_row(Text(layer.name), f"{layer.density:.4f}", f"{layer.scale:.4f}")
        summary = (
            f"objective {self.objective_before:.4f} -> {self.objective_after:.4f} "
            f"(loss after one {self.settings.get('algorithm', '')} step), "
            f"gradient norm {self.grad_norm_before:.4g} -> {self.grad_norm_after:.4g}; "
            f"{self.steps} steps, {self.constraint_steps} on the constraint"
        )
        return Group(table, Text(summary))

    def __str__(self) -> str:
        longest = max((len(layer.name) for layer in self.layers), default=0)
        console = Console(width=max(120, longest + 40), record=True, file=io.StringIO(), color_system=None)
        console.print(self)
        return console.export_text()


def gradinit(
    model: nn.Module,
    batches: Iterable[Batch],
    mask: Mapping[str, torch.Tensor] | Callable | None = None,
    *,
    loss_fn: LossFn = F.cross_entropy,
    steps: int = 100,
    algorithm: Literal["sgd", "adam"] = "sgd",
    eta: float = 0.1,
    gamma: float = 1.0,
    normalize_grad: bool = True,
    lr: float = 1e-2,
    min_scale: float = 0.01,
    grad_clip: float = 1.0,
) -> GradInitReport:
    """Learn one scale per masked conv/linear layer with GradInit, then apply it once.

    GradInit (Zhu et al., "GradInit: Learning to Initialize Neural Networks for Stable and
    Efficient Training", NeurIPS 2021), restricted to the masked layers: layer ``i``'s weight
    becomes ``alpha_i * w_i * m_i`` with ``w_i`` fixed and ``m_i`` its mask, and only the
    scalars ``alpha`` (all 1 at first) are learned. Each step draws three batches ``b0, b1, b2``
    from ``batches`` (cycling), ``S = b0 + b1`` and ``S~ = b0 + b2``, and with ``g`` the
    gradient of the loss on ``S`` over every trainable parameter (masked entries stay zero):

    - if ``||g|| > gamma`` (L2 norm for ``sgd``, L1 for ``adam``), the step lowers ``||g||``;
    - otherwise it lowers ``L(theta - eta * d; S~) / eta``, the loss after one step of the
      target optimizer, ``d = g / ||g||`` (``sgd``, ``normalize_grad``), ``g`` (``sgd``) or
      ``sign(g)`` (``adam``, its first step); ``d`` is held constant, as in the authors' code.

    The scales take Adam steps of size ``lr`` on their gradient, clipped to ``[-grad_clip,
    grad_clip]``, and are kept ``>= min_scale``. As in GradInit, the search runs with dropout
    off (eval mode) and BatchNorm on batch statistics. The defaults are the authors' CIFAR
    settings (``sgd``, ``eta=0.1``, ``gamma=1``, normalized gradient, ``min_scale=0.01``,
    clip 1) with fewer steps (they use 390) and ``lr=1e-2`` (they use 1e-3 to 1e-1); unlike
    their code, the constraint and objective steps share one Adam state, and biases and norm
    layers get no scale.

    The search runs on a copy; ``model`` changes only by the scales, multiplied once into its
    masked weights at the end (exact zeros stay zero): its other parameters, BatchNorm running
    statistics, mode and schedule are as before, and the search draws nothing from the global
    RNGs (reading ``batches`` may: a shuffling DataLoader draws its order). Call it after
    ``prepare`` and before training. With ``Recipe(rescale_rule="gradinit")`` it learns the layers of
    ``rescale_scope`` and marks the scales applied (saved in ``state_dict``); on a model prepared
    with another recipe it learns every masked conv/linear weight. A :class:`TostSurgeryWarning` says
    when it stacks on scales already applied (a deterministic rule, or a first call), and when a
    scale ends at ``min_scale``: the bound, not the objective, chose it (in a BatchNorm network the
    gradient norm at init can be far above ``gamma``, so every step shrinks the scales).

    Args:
        model: a model prepared by :func:`tost_surgery.prepare` (its masks are used), or a plain
            model with ``mask``.
        batches: ``(inputs, targets)`` pairs, e.g. ``itertools.islice(loader, 8)``; at most
            ``3 * steps`` are read, and reused in turn.
        mask: for a plain model, ``{parameter name: 0/1 tensor}`` or a callable, as for ``prepare``.
        loss_fn: ``loss_fn(model(x), y) -> scalar``.
        steps: optimization steps of the scales.
        algorithm: the optimizer the first step imitates, ``"sgd"`` or ``"adam"``.
        eta: size of that first step.
        gamma: bound on the gradient norm; ``math.inf`` turns the constraint off.
        normalize_grad: for ``sgd``, step along ``g / ||g||``.
        lr: step size of the scales (Adam).
        min_scale: lower bound of every scale.
        grad_clip: per-scale gradient clipping; 0 turns it off.

    Returns:
        A :class:`GradInitReport` with each layer's scale and the objective before and after.

    Example:
        >>> model = tost.prepare(model, mask, tost.Recipe.tost(total_steps=N, rescale_init=False))
        >>> print(tost.init.gradinit(model, itertools.islice(loader, 8)))
    """
    settings = _check_settings(
        steps=steps, algorithm=algorithm, eta=eta, gamma=gamma, lr=lr, min_scale=min_scale, grad_clip=grad_clip
    )
    settings["normalize_grad"] = bool(normalize_grad)
    entries, layers, surgery = _masked_layers(model, mask)
    device = original_parameter(layers[0]).device
    draws = _draws(batches, device)
    fixed = [next(draws) for _ in range(min(steps, _EVAL_DRAWS))]  # the objective before / after is read on these
    net, bases = _search_copy(model, entries, layers, surgery)
    search = _Search(net, bases, loss_fn, algorithm, eta, gamma, bool(normalize_grad))
    alphas = [torch.ones((), device=device, requires_grad=True) for _ in bases]
    with _own_rng(device):
        before = search.evaluate([a.detach() for a in alphas], fixed)
    optimizer = torch.optim.Adam(alphas, lr=lr)
    constraint_steps = 0
    for draw in itertools.chain(fixed, itertools.islice(draws, steps - len(fixed))):
        with _own_rng(device):
            grads, on_constraint = search.scale_gradients(alphas, draw)
        constraint_steps += on_constraint
        for alpha, grad in zip(alphas, grads):
            alpha.grad = grad.clamp(-grad_clip, grad_clip) if grad_clip > 0 else grad
        optimizer.step()
        with torch.no_grad():
            for alpha in alphas:
                alpha.clamp_(min=min_scale)
    learned = [a.detach() for a in alphas]
    with _own_rng(device):
        after = search.evaluate(learned, fixed)
    _warn_at_the_bound(layers, learned, min_scale, (before[1], after[1]), gamma, constraint_steps, steps)
    with torch.no_grad():
        for entry, alpha in zip(layers, learned):
            original_parameter(entry).mul_(alpha.to(original_parameter(entry).dtype))
            if surgery is not None:
                surgery.decided.rescaled[entry.name] = surgery.decided.rescaled.get(entry.name, 1.0) * float(alpha)
        done = getattr(getattr(model, "tost", None), "gradinit_done", None)
        if isinstance(done, torch.Tensor):
            done.fill_(True)
    return GradInitReport(
        layers=tuple(LayerScale(e.name, float(a), e.density) for e, a in zip(layers, learned)),
        objective_before=before[0],
        objective_after=after[0],
        grad_norm_before=before[1],
        grad_norm_after=after[1],
        steps=steps,
        constraint_steps=constraint_steps,
        settings=settings,
    )


def _warn_at_the_bound(
    layers: list[MaskEntry],
    learned: list[torch.Tensor],
    min_scale: float,
    grad_norms: tuple[float, float],
    gamma: float,
    constraint_steps: int,
    steps: int,
) -> None:
    """Warn when a learned scale ended at ``min_scale``: the bound chose it, not the objective."""
    pinned = [entry.name for entry, alpha in zip(layers, learned) if float(alpha) <= min_scale * (1 + 1e-6)]
    if not pinned:
        return
    warnings.warn(
        f"gradinit: the scale of {pinned} ended at min_scale={min_scale:g}, its lower bound, so the bound "
        f"chose it, not the objective. {constraint_steps} of {steps} steps lowered the gradient norm instead "
        f"of the objective (norm {grad_norms[0]:.4g} before, {grad_norms[1]:.4g} after, gamma={gamma:g}).\n"
        "Hint: raise gamma to about the norm before if that norm is expected (e.g. in a BatchNorm network), "
        "lower min_scale to let the scale go further, or use a deterministic rule (rescale_rule='fan_in').",
        TostSurgeryWarning,
        stacklevel=3,
    )


class _Search:
    """The GradInit objective over one copy of the model, as a function of the scales."""

    def __init__(
        self,
        net: nn.Module,
        bases: dict[str, torch.Tensor],
        loss_fn: LossFn,
        algorithm: str,
        eta: float,
        gamma: float,
        normalize_grad: bool,
    ) -> None:
        self.net, self.bases, self.loss_fn = net, bases, loss_fn
        self.algorithm, self.eta, self.gamma, self.normalize_grad = algorithm, eta, gamma, normalize_grad
        self.others = {name: p for name, p in net.named_parameters() if p.requires_grad and name not in bases}

    def parameters(self, alphas: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every trainable tensor of the copy, the masked layers' scaled by their alpha."""
        scaled = {name: alpha.to(base.dtype) * base for (name, base), alpha in zip(self.bases.items(), alphas)}
        return {**scaled, **self.others}

    def loss(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(functional_call(self.net, params, (x,)), y)

    def gradient(self, params: dict[str, torch.Tensor], batch: Batch, *, create_graph: bool):
        grads = torch.autograd.grad(
            self.loss(params, batch), list(params.values()), create_graph=create_graph, allow_unused=True
        )
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]
        if self.algorithm == "adam":
            norm = sum(g.abs().sum() for g in grads)
        else:
            norm = torch.sqrt(sum(g.square().sum() for g in grads))
        return grads, norm

    def lookahead_loss(self, params: dict[str, torch.Tensor], grads, norm, batch: Batch) -> torch.Tensor:
        """``L(theta - eta * d; S~)`` with the direction ``d`` held constant."""
        if self.algorithm == "adam":
            directions = [g.detach().sign() for g in grads]
        elif self.normalize_grad:
            scale = 1.0 / max(float(norm.detach()), 1e-12)
            directions = [g.detach() * scale for g in grads]
        else:
            directions = [g.detach() for g in grads]
        moved = {name: p - self.eta * d for (name, p), d in zip(params.items(), directions)}
        return self.loss(moved, batch)

    def scale_gradients(self, alphas: list[torch.Tensor], draw: tuple[Batch, Batch]) -> tuple[list, bool]:
        """Gradient of this step's objective with respect to each scale; whether it was the constraint."""
        batch, shifted = draw
        params = self.parameters(alphas)
        grads, norm = self.gradient(params, batch, create_graph=math.isfinite(self.gamma))
        on_constraint = float(norm.detach()) > self.gamma
        objective = norm if on_constraint else self.lookahead_loss(params, grads, norm, shifted) / self.eta
        scale_grads = torch.autograd.grad(objective, alphas, allow_unused=True)
        return [torch.zeros_like(a) if g is None else g for a, g in zip(alphas, scale_grads)], on_constraint

    def evaluate(self, alphas: list[torch.Tensor], draws: list[tuple[Batch, Batch]]) -> tuple[float, float]:
        """Mean loss after one step, and mean gradient norm, over ``draws``."""
        objective = grad_norm = 0.0
        for batch, shifted in draws:
            params = self.parameters([a.detach() for a in alphas])
            params = {name: p.detach().requires_grad_(True) for name, p in params.items()}
            grads, norm = self.gradient(params, batch, create_graph=False)
            with torch.no_grad():
                objective += float(self.lookahead_loss(params, grads, norm, shifted))
            grad_norm += float(norm)
        return objective / len(draws), grad_norm / len(draws)


def _masked_layers(model: nn.Module, mask: object) -> tuple[list[MaskEntry], list[MaskEntry], Any]:
    """Every mask entry of ``model``, those of conv/linear weights, and its Surgery if prepared."""
    if not isinstance(model, nn.Module):
        raise TostSurgeryError(f"gradinit takes an nn.Module, found {type(model).__name__}.")
    if is_prepared(model):
        scaffold = model.tost
        if mask is not None:
            raise StateError(
                f"{type(model).__name__} is prepared: gradinit uses the masks it was prepared with.\n"
                "Hint: call gradinit(model, batches) without mask=."
            )
        surgery = scaffold.surgery
        decided = surgery.decided
        entries = decided.entries
        if decided.gradinit_layers and not surgery.gradinit_pending():
            warnings.warn(
                f"gradinit already applied its scales to {type(model).__name__} (model.tost.gradinit_done): "
                "this call multiplies new ones into them.\nHint: call it once, after prepare.",
                TostSurgeryWarning,
                stacklevel=3,
            )
        elif decided.gradinit_layers is None and decided.rescaled:
            recipe = decided.recipe
            by = f"prepare's {recipe.rescale_rule} rule" if recipe.rescale_init else "an earlier gradinit call"
            warnings.warn(
                f"gradinit stacks on the scales {by} already applied to {sorted(decided.rescaled)}.\n"
                "Hint: prepare with Recipe.tost(total_steps=N, rescale_rule='gradinit') to use the learned "
                "scales alone.",
                TostSurgeryWarning,
                stacklevel=3,
            )
    elif mask is None:
        raise StateError(
            f"gradinit needs masks: {type(model).__name__} is not prepared and no mask was given.\n"
            "Hint: gradinit(model, batches, mask=mask), or prepare(model, mask, recipe) first."
        )
    else:
        surgery = None
        entries = normalize_mask(model, resolve_mask(model, mask))
    layers = [e for e in entries if e.attr == "weight" and isinstance(e.module, LAYER_TYPES)]
    if surgery is not None and surgery.decided.gradinit_layers is not None:
        scope = set(surgery.decided.gradinit_layers)
        layers = [e for e in layers if e.name in scope]
        if not layers:
            raise TostSurgeryError(
                f"gradinit has no layer to scale: no masked conv/linear weight of {type(model).__name__} is in "
                f"rescale_scope={surgery.decided.recipe.rescale_scope!r}.\n"
                "Hint: prepare with rescale_scope='all' to learn a scale for every masked layer."
            )
    if not layers:
        raise TostSurgeryError(
            "gradinit learns one scale per masked Conv1d/2d/3d or Linear weight, but the mask covers none.\n"
            f"Hint: masked parameters are {[e.name for e in entries]}."
        )
    return entries, layers, surgery


def _search_copy(
    model: nn.Module, entries: list[MaskEntry], layers: list[MaskEntry], surgery: Any
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``model`` with masks attached, in GradInit's mode; ``{tensor name: fixed masked weight}``."""
    net = copy.deepcopy(model)
    if surgery is None:
        copies = normalize_mask(net, {e.name: e.mask for e in entries})
        attach_masks(copies)
    else:
        copies = net.tost.surgery.decided.entries
    names = {e.name for e in layers}
    copies = [c for c in copies if c.name in names]
    net.eval()  # dropout off (and the eval graph of a prepared model)
    for module in net.modules():
        if isinstance(module, _BatchNorm):  # batch statistics, running statistics untouched
            module.train()
            module.track_running_stats = False
    bases = {}
    for entry in copies:
        tensor = original_parameter(entry)
        bases[_tensor_name(net, tensor)] = (tensor.detach() * entry.mask.to(tensor.dtype)).clone()
    return net, bases


def _tensor_name(net: nn.Module, tensor: torch.Tensor) -> str:
    for name, p in net.named_parameters():
        if p is tensor:
            return name
    raise TostSurgeryError("gradinit: a masked weight is not a parameter of the model.")  # pragma: no cover


def _draws(batches: object, device: torch.device) -> Iterator[tuple[Batch, Batch]]:
    """Endless pairs ``(S, S~) = (b0 + b1, b0 + b2)`` of concatenated batches from ``batches``, in turn."""
    source = _endless(batches, device)
    while True:
        (x0, y0), (x1, y1), (x2, y2) = next(source), next(source), next(source)
        yield (torch.cat([x0, x1]), torch.cat([y0, y1])), (torch.cat([x0, x2]), torch.cat([y0, y2]))


def _endless(batches: object, device: torch.device) -> Iterator[Batch]:
    """The batches again and again: re-iterated (a list, a DataLoader) or, for a one-shot iterator, cached."""
    read = lambda: checked_batches(batches, device, "gradinit", TostSurgeryError, "gradinit(model, [(x, y)])")  # noqa: E731
    is_one_shot = isinstance(batches, Iterator)  # a generator: keep what it gives, to reuse
    cache: list[Batch] = []
    for batch in read():
        if is_one_shot:
            cache.append(batch)
        yield batch
    while True:
        yield from cache if is_one_shot else read()


def _check_settings(**settings: Any) -> dict[str, Any]:
    algorithm = settings["algorithm"]
    if algorithm not in ("sgd", "adam"):
        raise TostSurgeryError(f"gradinit: algorithm must be 'sgd' or 'adam', found {algorithm!r}.")
    steps = settings["steps"]
    if not is_positive_int(steps):
        raise TostSurgeryError(f"gradinit: steps must be a positive int, found {steps!r}.")
    for name in ("eta", "lr"):
        value = settings[name]
        if not is_positive_number(value):
            raise TostSurgeryError(f"gradinit: {name} must be a positive number, found {value!r}.")
    for name in ("gamma", "min_scale", "grad_clip"):
        value = settings[name]
        if not is_non_negative_number(value):
            raise TostSurgeryError(f"gradinit: {name} must be a number >= 0, found {value!r}.")
    if settings["gamma"] == 0:
        raise TostSurgeryError("gradinit: gamma bounds the gradient norm; it must be > 0 (math.inf: no bound).")
    return dict(settings)


def _own_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """The search draws no random numbers from the global generators (dropout is off anyway)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
